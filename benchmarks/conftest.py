"""pytest-benchmark suites for numba_bn and its peers, on the shapes of numba_bn.bench.

    pytest benchmarks --benchmark-group-by=param:shape            # the issue's shapes
    pytest benchmarks --bn-shapes=A,D --benchmark-group-by=param:shape
    pytest benchmarks --bn-shapes=small --benchmark-disable -q    # run each once (CI smoke)

Every test checks its implementation against the float64 reference before timing it. Not
collected by a plain ``pytest`` at the repository root (testpaths = tests).
"""

import functools
import os

import numpy as np
import pytest

from numba_bn.bench import set_threads
from numba_bn.bench.cases import BYTES_PER_ELEMENT_MOVED, SHAPES, Case, parse_shapes
from numba_bn.bench.measure import verify
from numba_bn.bench.peers import implementations, import_torch


def pytest_addoption(parser):
    group = parser.getgroup("numba_bn benchmarks")
    group.addoption(
        "--bn-shapes",
        default=os.environ.get("NUMBA_BN_BENCH_SHAPES", "default"),
        help="shape names or sets as in `numba-bn bench --shapes` (env NUMBA_BN_BENCH_SHAPES; "
        "default: the issue's A,B,C,D,small-nchw,small-nc; 'small' for a quick run)",
    )
    group.addoption("--bn-dtype", default="float32", choices=["float32", "float64"])
    group.addoption("--bn-threads", type=int, default=2, help="numba and torch threads (2)")


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", parse_shapes(metafunc.config.getoption("--bn-shapes")))
    if "peer" in metafunc.fixturenames:
        metafunc.parametrize("peer", ["numba_bn", "torch", "numpy"])


@pytest.fixture(scope="session")
def torch_module(pytestconfig):
    torch = import_torch()
    set_threads(pytestconfig.getoption("--bn-threads"), torch)
    return torch


@functools.lru_cache(maxsize=1)  # one shape's arrays at a time: A's references take ~300 MB
def _case(name, dtype):
    return Case(SHAPES[name], np.dtype(dtype))


@pytest.fixture
def case(shape, pytestconfig, torch_module):
    return _case(shape, pytestconfig.getoption("--bn-dtype"))


@pytest.fixture
def implementation(peer, pytestconfig, torch_module):
    if peer == "torch" and torch_module is None:
        pytest.skip("torch is not installed")
    (chosen,) = implementations([peer], pytestconfig.getoption("--bn-threads"), torch_module)
    return chosen


@pytest.fixture
def verify_then_time(benchmark):
    """verify_then_time(implementation, case, op): check ``op`` against the float64 reference,
    then benchmark it."""

    def run(implementation, case, op):
        call = implementation.calls(case)[op]
        error = verify(implementation, case, op, call)
        benchmark.extra_info.update(
            {
                "dims": list(case.shape.dims),
                "axis": case.shape.axis,
                "dtype": str(case.dtype),
                "bytes_moved": BYTES_PER_ELEMENT_MOVED[op] * case.x.nbytes,
                "relative_error": error,
            }
        )
        benchmark(call)

    return run
