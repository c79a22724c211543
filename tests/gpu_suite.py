"""The CUDA backend's tests: under NUMBA_ENABLE_CUDASIM=1 (tests/test_cuda.py runs this file in
a subprocess), or on a real GPU:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/gpu_suite.py    # simulator
    python -m pytest tests/gpu_suite.py                           # an NVIDIA GPU

The launch sizes are shrunk (see ``tiny_launches``) so that these tiny shapes span several
blocks per channel, tail tiles and the cross-block merge. The conformance cases are the CPU
tests' LAYOUTS, run on both backends ("cpu", "cuda") against the float64 loops of
tests/naive.py, plus one plane split across several blocks.
"""

import contextlib
import random
import sys
import threading
import time

import numba
import numpy as np
import pytest
from numba import cuda

import numba_bn as nbn
from numba_bn import dispatch
from numba_bn.cuda import config, launch
from numba_bn.cuda import kernels as cuda_kernels
from numba_bn.cuda.arrays import DEVICE, DeviceMemory
from numba_bn.memory import is_device_array

import naive
from conftest import LAYOUTS, poison, random_batch

if not cuda.is_available():
    pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)
if numba.config.ENABLE_CUDASIM:
    # The simulator runs a block's threads as Python threads and polls them while holding the
    # GIL: a short switch interval lets them reach each syncthreads() sooner (5x faster here).
    sys.setswitchinterval(1e-4)

CASES = [*LAYOUTS, ((1, 2, 40), 1)]
CASE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CASES]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: 3e-5, np.float64: 1e-11}
DEVICES = ["cpu", "cuda"]


@pytest.fixture(autouse=True)
def tiny_launches(monkeypatch):
    """8 threads per block, 2-channel row tiles, a block per 8 values: tiny inputs span blocks."""
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 8)
    monkeypatch.setattr(config, "ROW_TILE", 2)
    monkeypatch.setattr(config, "VALUES_PER_THREAD", 1)
    monkeypatch.setattr(config, "BLOCKS_PER_CHANNEL", 4)
    monkeypatch.setattr(config, "TARGET_BLOCKS", 64)
    monkeypatch.setattr(config, "ELEMENTWISE_VALUES_PER_THREAD", 4)


def params(rng, channels, dtype):
    return rng.uniform(0.5, 1.5, channels).astype(dtype), rng.normal(0, 1, channels).astype(dtype)


def on(device, *arrays):
    """The arrays as the backend under test takes them: device copies for "cuda"."""
    if device == "cpu":
        return arrays
    return tuple(None if a is None else cuda.to_device(a) for a in arrays)


def host(array):
    return array.copy_to_host() if is_device_array(array) else array


def poisoned(device, like):
    return on(device, poison(like.shape, like.dtype))[0]


# ------------------------------------------------------------------------------ conformance
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_forward_train_matches_reference(rng, device, dtype, shape, axis):
    x = random_batch(rng, shape, dtype, axis=axis)
    weight, bias = params(rng, shape[axis], dtype)
    x_d, w_d, b_d = on(device, x, weight, bias)
    out = poisoned(device, x)
    y, mean, invstd = nbn.forward_train(x_d, w_d, b_d, 1e-5, axis, out=out)
    y_ref, mean_ref, invstd_ref = naive.forward_train(x, weight, bias, 1e-5, axis)
    assert y is out
    np.testing.assert_allclose(host(y), y_ref, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(host(mean), mean_ref, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(host(invstd), invstd_ref, rtol=TOL[dtype])
    assert host(mean).dtype == dtype and host(invstd).dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "axis", "unbiased"),
    [(*case, True) for case in CASES] + [(*CASES[1], False)],
    ids=[*CASE_IDS, f"{CASE_IDS[1]}-biased"],
)
def test_running_statistics_follow_the_update_rule(rng, device, dtype, shape, axis, unbiased):
    x = random_batch(rng, shape, dtype, axis=axis)
    channels = shape[axis]
    running_mean = rng.normal(0, 1, channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)
    expected = naive.running_update(running_mean, running_var, x, 0.3, axis, unbiased)
    rm, rv = on(device, running_mean, running_var)
    nbn.batch_norm(
        on(device, x)[0], rm, rv, training=True, momentum=0.3, axis=axis,
        unbiased_running_var=unbiased,
    )  # fmt: skip
    np.testing.assert_allclose(host(rm), expected[0], rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(host(rv), expected[1], rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_eval_forward_uses_running_statistics(rng, device, dtype, shape, axis):
    x = random_batch(rng, shape, dtype, axis=axis)
    channels = shape[axis]
    weight, bias = params(rng, channels, dtype)
    running_mean = rng.normal(0, 5, channels).astype(dtype)
    running_var = rng.uniform(0.5, 4, channels).astype(dtype)
    args = on(device, x, running_mean, running_var, weight, bias)
    out = poisoned(device, x)
    y = nbn.forward_eval(*args, eps=1e-3, axis=axis, out=out)
    expected = naive.forward(x, running_mean, running_var, weight, bias, 1e-3, axis)
    np.testing.assert_allclose(host(y), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_backward_matches_textbook_formula(rng, device, dtype, shape, axis):
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    weight, _ = params(rng, shape[axis], dtype)
    x_d, dy_d, w_d = on(device, x, dy, weight)
    _, mean, invstd = nbn.forward_train(x_d, w_d, axis=axis)
    out = poisoned(device, x)
    dx, dweight, dbias = nbn.backward(dy_d, x_d, mean, invstd, w_d, axis, out=out)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x, weight, 1e-5, axis)
    tol = TOL[dtype] * 10  # dx subtracts nearly equal terms
    np.testing.assert_allclose(host(dx), dx_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(host(dweight), dweight_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(host(dbias), dbias_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), CASES[:3], ids=CASE_IDS[:3])
def test_eval_mode_backward_uses_frozen_statistics(rng, device, dtype, shape, axis):
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = rng.standard_normal(shape).astype(dtype)
    bn = nbn.BatchNorm(shape[axis], axis=axis, dtype=dtype, device=device).eval()
    running_var = rng.uniform(0.5, 3, shape[axis]).astype(dtype)
    bn.load_state_dict({"running_var": running_var}, strict=False)
    x_d, dy_d = on(device, x, dy)
    bn(x_d)
    dx = bn.backward(dy_d)
    np.testing.assert_allclose(
        host(dx), naive.backward_frozen(dy, running_var, None, bn.eps, axis), rtol=TOL[dtype]
    )
    xhat = naive.forward(x, np.zeros(shape[axis]), running_var, eps=bn.eps, axis=axis)
    reduce = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    expected_dweight = (dy.astype(np.float64) * xhat).sum(axis=reduce)
    tol = TOL[dtype] * 10
    np.testing.assert_allclose(host(bn.grad_weight), expected_dweight, rtol=tol, atol=tol)
    np.testing.assert_allclose(host(bn.grad_bias), dy.sum(axis=reduce), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_keeps_precision_when_the_mean_dwarfs_the_spread(rng, device):
    x = (1e4 + 1e-2 * rng.standard_normal((64, 3, 5))).astype(np.float32)
    y, mean, _ = nbn.forward_train(*on(device, x))
    y_ref, mean_ref, _ = naive.forward_train(x)
    np.testing.assert_allclose(host(y), y_ref, atol=2e-4)
    np.testing.assert_allclose(host(mean), mean_ref, rtol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_channel_normalises_to_bias(device):
    x = np.full((4, 2, 3), 7.0)
    bias = np.array([0.5, -1.0])
    y, mean, invstd = nbn.forward_train(*on(device, x, None, bias))
    np.testing.assert_array_equal(host(y), np.broadcast_to(bias[None, :, None], x.shape))
    np.testing.assert_array_equal(host(invstd), 1 / np.sqrt(1e-5))
    np.testing.assert_array_equal(host(mean), 7.0)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_into_output_and_running_statistics(rng, device):
    x = rng.standard_normal((5, 3, 4))
    x[2, 1, 3] = np.nan
    rm, rv = on(device, np.zeros(3), np.ones(3))
    y = host(nbn.batch_norm(on(device, x)[0], rm, rv, training=True))
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert np.isnan(host(rm)[1]) and np.isfinite(host(rm)[[0, 2]]).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the simulator's inf - inf
@pytest.mark.parametrize("device", DEVICES)
def test_nan_policy_raise_leaves_running_statistics_untouched(rng, device):
    x = rng.standard_normal((5, 3, 4))
    x[0, 2, 0] = np.inf
    rm, rv = on(device, np.full(3, 0.25), np.full(3, 2.0))
    with pytest.raises(ValueError, match="not finite"):
        nbn.batch_norm(on(device, x)[0], rm, rv, training=True, nan_policy="raise")
    np.testing.assert_array_equal(host(rm), 0.25)
    np.testing.assert_array_equal(host(rv), 2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_empty_output_and_nan_statistics(device):
    y, mean, invstd = nbn.forward_train(*on(device, np.empty((0, 3, 4), np.float32)))
    assert host(y).shape == (0, 3, 4)
    assert np.isnan(host(mean)).all() and np.isnan(host(invstd)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_single_value_per_channel_is_rejected_in_training(device):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nbn.forward_train(*on(device, np.ones((1, 3))))


# --------------------------------------------------------------------------- device specifics
def test_tiny_launches_span_several_blocks_and_tail_tiles():
    blocks, (bx, by), parts_n, parts_s, tiles = launch.reduction_shape((6, 3, 1))
    assert (bx, tiles, parts_n) == (2, 2, 2)  # 3 channels in 2-wide tiles: a tail tile
    _, _, parts_n, parts_s, _ = launch.reduction_shape((1, 2, 40))
    assert (parts_n, parts_s) == (1, 4)  # one plane split across 4 blocks
    _, _, parts_n, parts_s, _ = launch.reduction_shape((3, 4, 5))
    assert parts_n * parts_s > 1


def test_outputs_stay_on_the_device(rng):
    x, dy = on("cuda", random_batch(rng, (4, 3, 5), np.float32), rng.standard_normal((4, 3, 5)))
    dy = on("cuda", host(dy).astype(np.float32))[0]
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
    y_eval = nbn.forward_eval(x, mean, invstd)
    for value in (y, mean, invstd, dx, dweight, dbias, y_eval):
        assert is_device_array(value) and not isinstance(value, np.ndarray)


def test_device_arrays_are_used_in_place(rng, monkeypatch):
    def no_copy(*args, **kwargs):
        raise AssertionError("a device argument was copied or converted")

    for method in ("to_device", "copy", "astype", "copy_into"):
        monkeypatch.setattr(DeviceMemory, method, no_copy)
    x = random_batch(rng, (4, 3, 5), np.float32)
    weight, bias = params(rng, 3, np.float32)
    x_d, w_d, b_d, rm, rv = on(
        "cuda", x, weight, bias, np.zeros(3, np.float32), np.ones(3, np.float32)
    )
    out = poisoned("cuda", x)
    y = nbn.batch_norm(x_d, rm, rv, w_d, b_d, training=True, out=out)
    assert y is out
    np.testing.assert_allclose(host(y), naive.forward_train(x, weight, bias)[0], atol=3e-5)
    np.testing.assert_allclose(
        host(rm), naive.running_update(np.zeros(3), np.ones(3), x, 0.1)[0], atol=1e-6
    )


def test_numpy_inputs_with_device_cuda_come_back_as_numpy(rng):
    x = random_batch(rng, (4, 3, 5), np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    out = np.full_like(x, np.nan)
    y = nbn.batch_norm(x, rm, rv, training=True, out=out, device="cuda")
    assert y is out and isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, naive.forward_train(x)[0], atol=1e-12)
    expected_mean, expected_var = naive.running_update(np.zeros(3), np.ones(3), x, 0.1)
    np.testing.assert_allclose(rm, expected_mean, atol=1e-12)  # updated in the caller's array
    np.testing.assert_allclose(rv, expected_var, atol=1e-12)
    y, mean, invstd = nbn.forward_train(x, device="cuda")
    dx, dweight, dbias = nbn.backward(x, x, mean, invstd, device="cuda")
    assert all(isinstance(v, np.ndarray) for v in (y, mean, invstd, dx, dweight, dbias))


def test_host_and_device_arguments_in_one_call_raise():
    x = np.ones((4, 3))
    x_d, w_d = on("cuda", x, np.ones(3))
    with pytest.raises(ValueError, match=r"x is on the CUDA device, weight is in host memory"):
        nbn.forward_train(x_d, np.ones(3))
    with pytest.raises(ValueError, match=r"weight is on the CUDA device, x is in host memory"):
        nbn.forward_train(x, w_d, device="cuda")
    with pytest.raises(ValueError, match=r"running_mean, running_var are in host memory"):
        nbn.batch_norm(x_d, np.zeros(3), np.ones(3), training=True)
    with pytest.raises(ValueError, match=r"dy is in host memory"):
        nbn.backward(x, x_d, *on("cuda", np.zeros(3), np.ones(3)))
    with pytest.raises(TypeError, match=r"device='cpu', but x is on the CUDA device"):
        nbn.forward_train(x_d, device="cpu")


def test_non_contiguous_device_input_is_rejected():
    x_d = on("cuda", np.ones((4, 6, 3)))[0][:, ::2]
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        nbn.forward_train(x_d)


def test_float16_on_the_device_is_computed_in_float32(rng):
    x = random_batch(rng, (4, 3, 5), np.float16)
    rm, rv = on("cuda", np.zeros(3, np.float16), np.ones(3, np.float16))
    y = nbn.batch_norm(on("cuda", x)[0], rm, rv, training=True)
    assert host(y).dtype == np.float16 and host(rm).dtype == np.float16
    np.testing.assert_allclose(host(y), naive.forward_train(x)[0], atol=4e-3)
    expected = naive.running_update(np.zeros(3), np.ones(3), x, 0.1)
    np.testing.assert_allclose(host(rm), expected[0], rtol=2e-3)


def test_results_are_deterministic(rng):
    x = on("cuda", random_batch(rng, (5, 4, 7), np.float32))[0]
    first = [host(v) for v in nbn.forward_train(x)]
    second = [host(v) for v in nbn.forward_train(x)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@contextlib.contextmanager
def interleaved_threads(probability=0.05, seed=0):
    """Threads started inside this context give up the GIL at random C calls (and every 1 us).

    Under the simulator a block's threads are Python threads that switch only at the GIL's
    switch interval, so most launches run each stretch of code in one thread without
    interruption and a missing barrier or an unlocked check-then-set still passes. Yielding at
    a random few percent of C calls (array reads and writes, merges, allocations) interleaves the
    threads the way a GPU's warps do, as often as the time of the test allows.
    """
    choose = random.Random(seed)

    def maybe_yield(frame, event, arg):
        if event == "c_call" and choose.random() < probability:
            time.sleep(0)  # releases the GIL: another thread of the block may run now

    interval, profile = sys.getswitchinterval(), threading.getprofile()
    sys.setswitchinterval(1e-6)
    threading.setprofile(maybe_yield)
    try:
        yield
    finally:
        threading.setprofile(profile)
        sys.setswitchinterval(interval)


STRESS_SHAPES = [(4, 1, 7), (8, 2, 1)]  # a plane over 4 blocks; a tile of 2 rows over 2 blocks
STRESS_REPETITIONS = 40


def stress_case(fixed, shape, spread):
    """(x, dy, mean) on the device and the float64 (mean, M2, sum_dy, sum_dy_xmu) of x, dy."""
    x, dy = fixed.normal(spread, spread, shape), fixed.normal(0, 1, shape)
    mean = x.mean(axis=(0, 2))
    xmu = x - mean[:, None]
    expected = [mean, (xmu**2).sum(axis=(0, 2)), dy.sum(axis=(0, 2)), (dy * xmu).sum(axis=(0, 2))]
    return on("cuda", x, dy, mean), expected


def test_cross_block_merges_are_exact_when_threads_interleave():
    """Reductions of fixed inputs, each spread over several blocks, repeated with the threads of
    every block interleaved: each launch must give the float64 sums. Alternating two inputs per
    layout keeps a shared array left over from the previous launch from holding the right values
    by chance. (Before the simulator's shared arrays were made thread-safe, see
    numba_bn/cuda/simulator.py, a few launches in a hundred went wrong here.)"""
    backend = dispatch.get("cuda")
    fixed = np.random.default_rng(1234)
    cases = []
    for shape in STRESS_SHAPES:
        _, _, parts_n, parts_s, _ = launch.reduction_shape(shape)
        assert parts_n * parts_s > 1, shape  # the merge crosses blocks
        cases += [stress_case(fixed, shape, spread) for spread in (1.0, 100.0)]
    wrong = []
    with interleaved_threads():
        for repetition in range(STRESS_REPETITIONS):
            for (x, dy, mean), expected in cases:
                got = on("cuda", *(np.full(x.shape[1], np.nan) for _ in expected))
                backend.batch_stats(x, mean=got[0], m2=got[1])
                backend.backward_sums(dy, x, mean=mean, sum_dy=got[2], sum_dy_xmu=got[3])
                got = np.array([host(v) for v in got])
                if not np.allclose(got, expected, rtol=1e-12, atol=1e-12):
                    wrong.append(f"repetition {repetition}, {x.shape}: {got} != {expected}")
    runs = STRESS_REPETITIONS * len(cases)
    assert not wrong, f"{len(wrong)} of {runs} runs wrong; first: {wrong[0]}"


def test_launch_shape_changes_rounding_only(rng, monkeypatch):
    x = random_batch(rng, (6, 3, 10), np.float32)
    results = []
    for threads in (4, 32):
        monkeypatch.setattr(config, "THREADS_PER_BLOCK", threads)
        results.append([host(v) for v in nbn.forward_train(on("cuda", x)[0])])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_launch_sizes_are_checked(monkeypatch):
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 6)
    with pytest.raises(ValueError, match="THREADS_PER_BLOCK must be a power of two"):
        nbn.forward_train(on("cuda", np.ones((4, 3)))[0])


class Counting:
    """A kernel whose launches are counted."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, configuration):
        self.launches.append(self.kernel.py_func.__name__)
        return self.kernel[configuration]


def test_each_forward_and_backward_launches_at_most_two_kernels(rng, monkeypatch):
    launches = []
    for name in ("channel_stats", "affine", "eval_coefficients", "backward_sums", "backward_dx"):
        monkeypatch.setattr(cuda_kernels, name, Counting(getattr(cuda_kernels, name), launches))
    bn = nbn.BatchNorm(3, device="cuda")
    x, dy = on("cuda", random_batch(rng, (4, 3, 5), np.float32), np.ones((4, 3, 5), np.float32))
    bn(x)
    assert launches == ["channel_stats", "affine"]
    launches.clear()
    bn.backward(dy)
    assert launches == ["backward_sums", "backward_dx"]
    launches.clear()
    bn.eval()(x)
    assert launches == ["eval_coefficients", "affine"]


def test_split_primitives_match_the_cpu_backend(rng):
    for shape in ((7, 3, 1), (3, 2, 6)):
        x = random_batch(rng, shape, np.float64).reshape(shape)
        dy = rng.standard_normal(shape)
        weight, bias = rng.uniform(0.5, 2.0, shape[1]), rng.uniform(-1.0, 1.0, shape[1])
        invstd = rng.uniform(0.5, 2.0, shape[1])
        results = {}
        for device in DEVICES:
            backend = dispatch.get(device)
            mean, m2, sum_dy, sum_dy_xmu = on(device, *(np.zeros(shape[1]) for _ in range(4)))
            x_d, dy_d, w_d, b_d, invstd_d = on(device, x, dy, weight, bias, invstd)
            count = backend.batch_stats(x_d, mean=mean, m2=m2)
            backend.backward_sums(dy_d, x_d, mean=mean, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
            y, dx = on(device, np.zeros(shape), np.zeros(shape))
            backend.normalize(x_d, mean=mean, invstd=invstd_d, weight=w_d, bias=b_d, y=y)
            backend.backward_dx(dy_d, x_d, mean=mean, invstd=invstd_d, weight=w_d, sum_dy=sum_dy,
                                sum_dy_xmu=sum_dy_xmu, count=count, dx=dx)  # fmt: skip
            results[device] = [count, *(host(v) for v in (mean, m2, sum_dy, sum_dy_xmu, y, dx))]
        for a, b in zip(results["cpu"], results["cuda"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------- BatchNorm
def test_batchnorm_on_cuda_matches_the_cpu_layer_over_steps(rng):
    layers = {d: nbn.BatchNorm(3, momentum=None, dtype=np.float64, device=d) for d in DEVICES}
    for step in range(3):
        x = random_batch(rng, (4, 3, 5), np.float64)
        dy = rng.standard_normal(x.shape)
        outputs = {}
        for device, bn in layers.items():
            if step == 2:
                bn.eval()
            y = bn(on(device, x)[0])
            dx = bn.backward(on(device, dy)[0])
            outputs[device] = [host(v) for v in (y, dx, bn.grad_weight, bn.grad_bias)]
        for a, b in zip(outputs["cpu"], outputs["cuda"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    states = {d: bn.state_dict() for d, bn in layers.items()}
    for key, value in states["cpu"].items():
        assert isinstance(states["cuda"][key], np.ndarray)
        np.testing.assert_allclose(states["cuda"][key], value, rtol=1e-12)


def test_batchnorm_on_cuda_keeps_its_arrays_on_the_device(rng):
    bn = nbn.BatchNorm(3, device="cuda")
    x = on("cuda", random_batch(rng, (4, 3, 5), np.float32))[0]
    bn(x)
    bn.backward(x)
    for name in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        assert is_device_array(getattr(bn, name)), name
    assert bn.num_batches_tracked == 1


def test_batchnorm_to_moves_and_pins_the_layer():
    bn = nbn.BatchNorm(3, dtype=np.float64).to("cuda")
    bn.load_state_dict({"running_mean": np.arange(3.0)}, strict=False)
    assert is_device_array(bn.running_mean)
    with pytest.raises(ValueError, match=r"x is a host \(NumPy\) array.*\.to\('cpu'\)"):
        bn(np.ones((4, 3)))
    bn.to("cpu")
    assert isinstance(bn.running_mean, np.ndarray)
    np.testing.assert_array_equal(bn.running_mean, np.arange(3.0))
    with pytest.raises(ValueError, match=r"x is a CUDA device array"):
        bn(on("cuda", np.ones((4, 3)))[0])


def test_batchnorm_auto_follows_its_input():
    bn = nbn.BatchNorm(3)
    assert isinstance(bn.weight, np.ndarray)
    bn(on("cuda", np.arange(12.0, dtype=np.float32).reshape(4, 3))[0])
    assert is_device_array(bn.weight) and is_device_array(bn.running_var)


def test_load_state_dict_accepts_device_arrays():
    bn = nbn.BatchNorm(3, dtype=np.float64)
    bn.load_state_dict({"weight": DEVICE.to_device(np.array([1.0, 2.0, 3.0]))}, strict=False)
    np.testing.assert_array_equal(bn.weight, [1.0, 2.0, 3.0])
