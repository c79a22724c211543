import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

# the suite chooses when compiled calls are on (tests/test_plugin.py): a shell's setting, which
# `import numba_bn` reads, would serve calls the tests mean for the Python path (and children)
os.environ.pop("NUMBA_BN_COMPILED_CALLS", None)

import numba_bn as nbn
from numba_bn.capi import build
from numba_bn.cli import main
from numba_bn.memory import is_device_array

ROOT = Path(__file__).resolve().parents[1]


def run_child(command, env=None, timeout=600, stop_signal=signal.SIGKILL):
    """(return code, stdout + stderr) of ``command``, run at the repository root with this
    checkout first on PYTHONPATH and ``env`` over the current environment.

    The child gets its own process session, so on timeout its whole group (mpiexec and its
    ranks, say) gets ``stop_signal``, SIGKILL 10 s later, and the test fails.
    """
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    process = subprocess.Popen(
        [str(part) for part in command], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, stop_signal)
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        command_line = " ".join(str(part) for part in command)
        pytest.fail(f"{command_line} did not finish in {timeout} s:\n{output[-4000:]}")
    return process.returncode, output


@pytest.fixture
def rng(request):
    """A fresh generator per test; its seed is printed so that a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed for {request.node.nodeid}: {seed}")
    return np.random.default_rng(seed)


def random_batch(rng, shape, dtype=np.float64, mean_scale=5.0, std_range=(0.1, 10.0), axis=1):
    """Per-channel non-zero means and varied spreads: what real activations look like."""
    axis = axis % len(shape)
    channels = shape[axis]
    means = rng.uniform(-mean_scale, mean_scale, channels)
    stds = np.exp(rng.uniform(np.log(std_range[0]), np.log(std_range[1]), channels))
    bshape = [1] * len(shape)
    bshape[axis] = channels
    x = rng.standard_normal(shape) * stds.reshape(bshape) + means.reshape(bshape)
    return x.astype(dtype)


def poison(shape, dtype):
    """An output buffer full of NaN, so that any element a kernel forgets to write shows."""
    return np.full(shape, np.nan, dtype)


# (shape, axis) layouts every behaviour is checked on: rows, planes, channels-last, rank 5,
# odd channel counts, and a plane longer than one PLANE_BLOCK segment.
LAYOUTS = [
    ((16, 5), 1),
    ((7, 3, 11), 1),
    ((4, 6, 5, 7), 1),
    ((3, 5, 4, 6), -1),
    ((2, 3, 4, 3, 5), 1),
    ((2, 4, 3, 5), 2),
    ((3, 1, 4500), 1),
    ((200, 1), 1),
]


# ------------------------------------------------------------------------ backends under test
@dataclass(frozen=True)
class Backend:
    """How a test runs on one backend: the inputs placed with ``on``, the call selecting it with
    ``call``, the results read back with ``host``::

        x_d, w_d = backend.on(x, weight)
        y, mean, invstd = nbn.forward_train(x_d, w_d, out=backend.poisoned(x.shape, x.dtype),
                                            **backend.call)
        y, mean = backend.host(y, mean)
    """

    name: str
    call: dict = field(default_factory=dict)  # keywords that select it: functions and BatchNorm
    device: bool = False  # inputs go to the CUDA device as Numba device arrays
    setup: str | None = None  # the fixture that makes it ready

    def on(self, *arrays):
        """The arrays as this backend takes them: device copies for "cuda", None kept; one array
        for one argument, a tuple for several (as ``np.atleast_1d``)."""
        if self.device:
            from numba import cuda

            arrays = tuple(None if a is None else cuda.to_device(a) for a in arrays)
        return arrays[0] if len(arrays) == 1 else arrays

    def host(self, *arrays):
        """The arrays as NumPy arrays (device results copied back), shaped as ``on``'s answer."""
        arrays = tuple(a.copy_to_host() if is_device_array(a) else a for a in arrays)
        return arrays[0] if len(arrays) == 1 else arrays

    def poisoned(self, shape, dtype):
        """An ``out=`` buffer full of NaN, where this backend writes (see ``poison``)."""
        return self.on(poison(shape, dtype))


BACKENDS = {
    "cpu": Backend("cpu", {"backend": "cpu"}),
    "c-plugin": Backend("c-plugin", {"backend": "c-plugin"}, setup="plugin_backend"),
    # explicit device="cuda": host arrays (non-contiguous, Fortran order) are copied over too
    "cuda": Backend("cuda", {"device": "cuda"}, device=True, setup="tiny_launches"),
}


def backends_under_test():
    """$NBN_TEST_BACKENDS (names separated by commas), else "cpu", "c-plugin", and "cuda" where
    numba.cuda runs (a GPU, or NUMBA_ENABLE_CUDASIM=1)."""
    chosen = os.environ.get("NBN_TEST_BACKENDS")
    if chosen is None:
        from numba import cuda

        return ["cpu", "c-plugin", *(["cuda"] if cuda.is_available() else [])]
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise ValueError(f"NBN_TEST_BACKENDS={chosen!r}: choose among {', '.join(BACKENDS)}")
    return names


@pytest.fixture(params=backends_under_test())
def backend(request):
    """The conformance suite's backend (a :class:`Backend`), one per backend under test."""
    chosen = BACKENDS[request.param]
    if chosen.device:
        from numba import cuda

        if not cuda.is_available():
            pytest.skip("cuda: numba.cuda.is_available() is False (no GPU, no simulator)")
    if chosen.setup:
        request.getfixturevalue(chosen.setup)
    return chosen


@pytest.fixture(scope="session")
def simulator_pace():
    """Under the CUDA simulator, a short GIL switch interval: the simulator runs a block's
    threads as Python threads and polls them holding the GIL, so they reach each syncthreads()
    sooner (5x faster)."""
    import numba

    interval = sys.getswitchinterval()
    if numba.config.ENABLE_CUDASIM:
        sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
def tiny_launches(monkeypatch, simulator_pace):
    """8 threads per block, 2-channel row tiles, a block per 8 values: tiny inputs span blocks,
    tail tiles and the cross-block merge."""
    from numba_bn.cuda import config

    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "ROW_TILE", 2)
    monkeypatch.setattr(config, "VALUES_PER_THREAD", 1)
    monkeypatch.setattr(config, "BLOCKS_PER_CHANNEL", 4)
    monkeypatch.setattr(config, "TARGET_BLOCKS", 64)
    monkeypatch.setattr(config, "ELEMENTWISE_VALUES_PER_THREAD", 4)


# ------------------------------------------------------------- the C plugin, once per session
def _require_c_compiler():
    compiler = build.c_compiler()
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler: {compiler!r} is not on PATH (set CC); the C plugin needs one")


@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory):
    """The portable plugin (x86-64-v2/v3/v4 variants), built through the CLI: its folder."""
    _require_c_compiler()
    directory = tmp_path_factory.mktemp("plugin")
    assert main(["build-plugin", "--out", str(directory)]) == 0
    return directory


@pytest.fixture(scope="session")
def host_build(tmp_path_factory):
    """A ``--cpu host`` build, whose kernels are compiled exactly as the JIT's: its folder."""
    _require_c_compiler()
    directory = tmp_path_factory.mktemp("plugin-host")
    build.build_plugin(directory, cpu="host")
    return directory


@pytest.fixture(scope="session")
def plugin_backend(plugin_build):
    """The portable plugin registered as ``backend="c-plugin"``."""
    return nbn.register_backend("c-plugin", plugin_build / build.LIBRARY_NAME)
