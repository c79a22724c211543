"""Serial plans call a driver's machine code without Numba's dispatch (numba_bn/cpu/drivers.py,
machine_code): the same code, the same bits, and only where the types cannot differ."""

import sys

import numba
import numpy as np
import pytest
from numba.core.runtime import _nrt_python as nrt_stats
from numba.core.runtime import nrt

import numba_bn as nbn
from numba_bn import cpu
from numba_bn.cpu import drivers

from conftest import random_batch, run_child


def _serial_plans(shape, dtype):
    """(x, dy, weight, bias) of ``shape`` and the functional calls run twice on them: the first
    compiles or loads the serial twins, the second plans their machine code."""
    rng = np.random.default_rng(7)
    x, dy = random_batch(rng, shape, dtype), random_batch(rng, shape, dtype)
    weight, bias = random_batch(rng, (shape[1],), dtype), random_batch(rng, (shape[1],), dtype)
    for _ in range(2):
        _, mean, invstd = nbn.forward_train(x, weight, bias)
        nbn.backward(dy, x, mean, invstd, weight)
    return x, dy, weight, bias


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_serial_plan_calls_the_machine_code_of_the_twin_the_dispatcher_runs(dtype):
    x, dy, weight, bias = _serial_plans((8, 6, 5, 3), dtype)
    view = x.reshape(8, 6, 15)
    for step in ("forward_train", "backward"):
        run, fused = cpu._plan(step, view, may_fuse=True)
        twin = cpu._driver(step, view, 1, may_fuse=True)[0]
        assert run.__wrapped__ is twin  # the suite's check around the machine code
        (entry,) = {code.entry_point for signature, code in twin.overloads.items()
                    if str(signature[0].dtype) == np.dtype(dtype).name}  # fmt: skip
        assert drivers.CHECK_CALLS and run is not entry
    # the same bits as through Numba's dispatch
    y, mean, invstd = nbn.forward_train(x, weight, bias)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, weight)
    cpu._PLANS.clear()
    for step in ("forward_train", "backward"):  # plans that call the dispatchers
        cpu._PLANS[step, view.shape, view.dtype, True, 0] = cpu._driver(step, view, 1, True)
    try:
        expected = nbn.forward_train(x, weight, bias)
        expected += nbn.backward(dy, x, expected[1], expected[2], weight)
    finally:
        cpu._PLANS.clear()
    for got, want in zip((y, mean, invstd, dx, dweight, dbias), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_read_only_inputs_run_the_same_machine_code_and_compile_nothing():
    """Numba types a read-only array apart from a writable one: through its dispatch a read-only
    batch compiled every driver of the step again (seconds each)."""
    x, dy, weight, bias = _serial_plans((16, 12), np.float32)
    view = x.reshape(16, 12, 1)
    twins = [cpu._driver(step, view, 1, may_fuse=True)[0] for step in ("forward_train", "backward")]
    compiled = [len(twin.overloads) for twin in twins]
    y, mean, invstd = nbn.forward_train(x, weight, bias)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, weight)
    for array in (x, dy, weight, bias, mean, invstd):
        array.flags.writeable = False
    got = nbn.forward_train(x, weight, bias)
    got += nbn.backward(dy, x, mean, invstd, weight)
    assert [len(twin.overloads) for twin in twins] == compiled
    for value, want in zip(got, (y, mean, invstd, dx, dweight, dbias), strict=True):
        np.testing.assert_array_equal(value, want)


def test_the_suites_check_names_arguments_the_machine_code_was_not_compiled_for():
    x, dy, weight, bias = _serial_plans((16, 12), np.float32)
    view, y = x.reshape(16, 12, 1), np.full((16, 12, 1), np.nan, np.float32)
    ones = np.ones(12, np.float32)
    for _ in range(2):
        nbn.forward_eval(x, bias, ones)
    run, _ = cpu._plan("forward_eval", view)
    wrong = weight.astype(np.float64)  # a float64 weight for a float32 x
    with pytest.raises(TypeError, match=r"forward_eval.*\('float64', 1\)"):
        run(view, wrong, bias, bias, ones, 1e-5, y, view)
    with pytest.raises(TypeError, match="not C-contiguous"):
        run(view, weight, bias, bias, ones, 1e-5, y[::-1], view)
    with pytest.raises(TypeError, match="int"):
        run(view, weight, bias, bias, ones, 0, y, view)  # eps: Numba would type it int64
    assert np.isnan(y).all()  # nothing ran
    run(view, weight, bias, bias, ones, 1e-5, y, view)
    assert not np.isnan(y).any()


def _scale():
    """A new dispatcher of three arguments: an array, a float and a flag."""

    @numba.njit
    def scale(a, factor, flag):
        return a.sum() * factor if flag else 0.0

    return scale


def test_machine_code_only_where_every_overload_takes_the_same_kinds():
    a = np.arange(4.0, dtype=np.float32)
    scale = _scale()
    assert drivers.machine_code(scale, a.dtype) is None  # nothing compiled yet
    assert scale(a, 2.0, True) == 12.0
    run = drivers.machine_code(scale, a.dtype)
    assert run is not scale and run.__wrapped__ is scale and run(a, 2.0, True) == 12.0
    assert drivers.machine_code(scale, np.dtype(np.float64)) is None  # another dtype
    read_only = a.copy()
    read_only.flags.writeable = False
    scale(read_only, 2.0, True)  # another type for Numba, the same kinds
    assert drivers.machine_code(scale, a.dtype) is not scale
    scale(a[::2], 2.0, True)  # an "A" array: no kind
    assert drivers.machine_code(scale, a.dtype) is scale
    scale = _scale()
    scale(a, np.float32(2.0), True)  # a float32 scalar: no kind
    assert drivers.machine_code(scale, a.dtype) is scale
    scale = _scale()
    scale(a, 2.0, True)
    scale(a, 2.0, 1)  # an int flag: no kind either, and two overloads the dispatcher chooses from
    assert drivers.machine_code(scale, a.dtype) is scale


# The suite checks every call of a driver's machine code (conftest.py); a user's process calls
# it as it is. The same calls with and without the check, in a child each: the same bits.
UNCHECKED = """
import hashlib, sys
import numpy as np
import numba_bn as nbn
from numba_bn import cpu
from numba_bn.cpu import drivers

digest = hashlib.sha256()
rng = np.random.default_rng(11)
for shape in [(64, 32), (8, 16, 8, 8), (16, 5, 3, 3)]:  # rows, planes, short planes
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal(shape) * 3 + 4).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        weight = (rng.random(shape[1]) + 0.5).astype(dtype)
        buffers = np.zeros(shape[1], dtype), np.ones(shape[1], dtype)
        layer = nbn.BatchNorm(shape[1], dtype=dtype)
        for _ in range(3):  # the first call of each compiles or loads: its plan is not kept
            y, mean, invstd = nbn.forward_train(x, weight)
            results = (y, mean, invstd, *nbn.backward(dy, x, mean, invstd, weight),
                       nbn.batch_norm(x, *buffers, weight, training=True),
                       nbn.forward_eval(x, *buffers, weight), layer(x), layer.backward(dy))
        for array in (*results, *buffers, layer.running_mean, layer.grad_weight):
            digest.update(np.ascontiguousarray(array).tobytes())
kept = [plan[0] for plan in cpu._PLANS.values() if type(plan) is tuple]
machine = [run for run in kept if not hasattr(run, "overloads")]
assert kept and len(machine) == len(kept), kept
assert drivers.CHECK_CALLS == (sys.argv[1] == "1")
print(digest.hexdigest())
"""


def test_the_machine_code_gives_the_checked_calls_bits_unchecked():
    digests = []
    for check in ("1", "0"):
        status, output = run_child([sys.executable, "-c", UNCHECKED, check],
                                   {"NUMBA_BN_CHECK_DRIVER_CALLS": check})  # fmt: skip
        assert status == 0, output
        digests.append(output.split()[-1])
    assert digests[0] == digests[1]


def _runtime_counts():
    """Numba's runtime statistics: (allocations, frees, MemInfos made, MemInfos destroyed)."""
    return tuple(nrt.rtsys.get_allocation_stats())


#: Canonical shapes of each memory shape (rows, planes, short planes) below every serial bound
#: of the cost model and above every parallel one (numba_bn/cpu/__init__.py; 2 threads or more).
SERIAL_SHAPES = [(64, 12), (8, 6, 5, 3), (16, 5, 3, 3)]
PARALLEL_SHAPES = [(1024, 130), (32, 16, 16, 16), (2048, 8, 3, 3)]


def _every_driver(rng, dtype, shapes):
    """Calls that run the drivers of ``shapes``: each memory shape's split steps, the
    epilogues, a forward whose statistics are not finite (nan_policy="raise": the driver
    returns early), and the norms'."""
    calls = []
    for shape in shapes:
        x, dy = random_batch(rng, shape, dtype), random_batch(rng, shape, dtype)
        weight, bias = random_batch(rng, (shape[1],), dtype), random_batch(rng, (shape[1],), dtype)
        buffers = np.zeros(shape[1], dtype), np.ones(shape[1], dtype)

        def steps(x=x, dy=dy, weight=weight, bias=bias, buffers=buffers):
            y, mean, invstd = nbn.forward_train(x, weight, bias)
            nbn.backward(dy, x, mean, invstd, weight)
            nbn.forward_eval(x, *buffers, weight, bias)
            y = nbn.forward_train(x, weight, bias, residual=dy, activation="relu")[0]
            nbn.backward(dy, x, mean, invstd, weight, activation="relu", y=y)
            poisoned = x.copy()
            poisoned[0, 0] = np.nan
            with pytest.raises(ValueError, match="NaN or Inf"):
                nbn.batch_norm(poisoned, *buffers, training=True, nan_policy="raise")

        calls.append(steps)
    x = random_batch(rng, (4, 8, 5, 3) if shapes is SERIAL_SHAPES else (64, 32, 16, 16), dtype)
    calls.append(lambda: nbn.group_norm_backward(x, x, *nbn.group_norm_forward(x, 4)[1:], 4))
    dims = x.shape[2:]  # layer norm's normalized_shape: the trailing dimensions
    calls.append(lambda: nbn.layer_norm_backward(x, x, *nbn.layer_norm_forward(x, dims)[1:], dims))
    return calls


@pytest.mark.parametrize("shapes", [SERIAL_SHAPES, PARALLEL_SHAPES], ids=["serial", "parallel"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_drivers_run_without_numbas_runtime_and_free_what_they_allocate(dtype, shapes):
    """The drivers are compiled without Numba's runtime (drivers.twins): their entry point takes
    each array as a pointer, where Numba's made a reference-counted MemInfo of it (~0.5 us of a
    call). So they free their scratch themselves (stats.release), on every path, in the
    parallel twins' threads too: the runtime's statistics count every allocation of the calls
    freed in them, and no MemInfo made for an array argument."""
    if shapes is PARALLEL_SHAPES and numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread: every driver call is serial")
    rng = np.random.default_rng(23)
    calls = _every_driver(rng, dtype, shapes)
    with cpu.partitions(forward_train=True, backward=True):  # the fused planes' drivers
        calls[1]()
    for call in calls:
        call()  # compiles or loads each driver
    enabled = nrt_stats.memsys_stats_enabled()
    nrt_stats.memsys_enable_stats()
    try:
        before = _runtime_counts()
        with cpu.partitions(forward_train=True, backward=True):
            calls[1]()
        for call in calls:
            call()
        allocated, freed, made, destroyed = np.subtract(_runtime_counts(), before)
        outer, channels = shapes[0]
        view = random_batch(rng, (outer, channels), dtype).reshape(outer, channels, 1)
        run, _ = cpu._plan("backward", view, may_fuse=True)
        arguments = (view, view, np.zeros(channels), np.ones(channels), np.ones(channels, dtype),
                     np.empty_like(view), np.empty(channels), np.empty(channels),
                     np.empty((2, channels), dtype))  # fmt: skip
        before = _runtime_counts()
        run(*arguments)
        one_call = np.subtract(_runtime_counts(), before)
    finally:
        if not enabled:
            nrt_stats.memsys_disable_stats()
    assert made > 0 and (allocated, made) == (freed, destroyed)
    assert one_call[2] == one_call[3] < len(arguments)  # the scratch's MemInfos only
