"""The CUDA backend's own tests: what the conformance suite (tests/test_conformance.py, which
checks every backend against tests/naive.py) does not cover: launch shapes, outputs staying on
the device and coming back as the caller's kind (CuPy, torch: stand-ins under the simulator, the
real libraries in the ``*_on_a_gpu`` tests, which need a GPU, ``pip install cupy-cuda12x`` and a
CUDA build of torch), arguments on two devices, races in cross-block merges, kernel counts,
BatchNorm on the GPU. Run under NUMBA_ENABLE_CUDASIM=1 (tests/test_cuda.py runs both files in a
subprocess), or on a real GPU:

    NUMBA_ENABLE_CUDASIM=1 NBN_TEST_BACKENDS=cuda python -m pytest tests/test_conformance.py \
        tests/gpu_suite.py                                                  # simulator
    NBN_TEST_BACKENDS=cuda python -m pytest tests/test_conformance.py tests/gpu_suite.py  # a GPU

The launch sizes are shrunk (conftest's ``tiny_launches``) so that these tiny shapes span several
blocks per channel, tail tiles and the cross-block merge.
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
from conftest import BACKENDS, assert_mean_close, random_batch

if not cuda.is_available():
    pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("tiny_launches")
CPU, CUDA = BACKENDS["cpu"], BACKENDS["cuda"]
DEVICES = ["cpu", "cuda"]


# --------------------------------------------------------------------------- device specifics
def test_tiny_launches_span_several_blocks_and_tail_tiles():
    blocks, (bx, by), parts_n, parts_s, tiles = launch.reduction_shape((6, 3, 1))
    assert (bx, tiles, parts_n) == (2, 2, 2)  # 3 channels in 2-wide tiles: a tail tile
    _, _, parts_n, parts_s, _ = launch.reduction_shape((1, 2, 40))
    assert (parts_n, parts_s) == (1, 4)  # one plane split across 4 blocks
    _, _, parts_n, parts_s, _ = launch.reduction_shape((3, 4, 5))
    assert parts_n * parts_s > 1


@pytest.mark.parametrize("shape", [(64, 3, 40), (300, 5, 1)], ids=["planes", "rows"])
def test_float32_statistics_are_float64_exact(rng, shape):
    """Each thread's sums of a float32 batch are exact in float64 (shifted by its first value)
    and every merge is float64, so the float64 statistics agree with math.fsum loops to float64
    rounding, though each thread reduces ~20-80 values here. Welford steps in float32 (before)
    were off by 2e-9 to 8e-9 relative here."""
    x_host = random_batch(rng, shape, np.float32)
    mean_ref, var_ref, _ = naive.batch_stats(x_host.astype(np.float64))
    x = CUDA.on(x_host)
    mean, m2 = (CUDA.poisoned((shape[1],), np.float64) for _ in range(2))
    count = dispatch.get("cuda").batch_stats(x, mean=mean, m2=m2)
    assert count == shape[0] * shape[2]
    mean, m2 = CUDA.host(mean), CUDA.host(m2)
    assert_mean_close(mean, mean_ref, x_host, rtol=1e-13)
    np.testing.assert_allclose(m2 / count, var_ref, rtol=1e-12, atol=0)


def test_outputs_stay_on_the_device(rng):
    x, dy = CUDA.on(
        random_batch(rng, (4, 3, 5), np.float32), rng.standard_normal((4, 3, 5)).astype(np.float32)
    )
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
    y_eval = nbn.forward_eval(x, mean, invstd)
    for value in (y, mean, invstd, dx, dweight, dbias, y_eval):
        assert is_device_array(value) and not isinstance(value, np.ndarray)


# ------------------------------------------------------------ results in the caller's kind
_STAND_INS = {}


def _as_kind(array, package):
    """The Numba device array ``array`` disguised as an array of ``package`` (what numba_bn reads
    is the class's module): the same object and memory, so the stand-in is zero-copy by
    construction and the test checks numba_bn's choice, not the library's conversion."""
    base = type(array)
    if (package, base) not in _STAND_INS:
        attributes = {"__module__": f"{package}._core", "device": f"{package}-device:1"}
        _STAND_INS[package, base] = type(f"{package}_stand_in", (base,), attributes)
    array.__class__ = _STAND_INS[package, base]
    return array


def _stand_in_module(monkeypatch, package):
    """A module ``package`` in sys.modules whose converter disguises and records its inputs."""
    import types

    module = types.ModuleType(package)
    module.converted = []
    module.Tensor = type("Tensor", (), {})  # memory.py's isinstance checks on torch.Tensor

    def asarray(array):  # cupy.asarray
        module.converted.append(array)
        return _as_kind(array, package)

    def as_tensor(array, device):  # torch.as_tensor
        module.converted.append(device)
        return asarray(array)

    module.asarray, module.as_tensor = asarray, as_tensor
    monkeypatch.setitem(sys.modules, package, module)
    return module


@pytest.mark.parametrize("package", ["cupy", "torch"])
def test_results_come_back_as_the_kind_of_the_first_cuda_input(rng, monkeypatch, package):
    """CuPy in, CuPy out; torch in, torch out (on the input's device); the caller's own in-place
    arrays (running buffers, out=) come back as they went in."""
    library = _stand_in_module(monkeypatch, package)
    x_host = random_batch(rng, (4, 3, 5), np.float64)
    dy_host = rng.standard_normal(x_host.shape)
    x, dy = (_as_kind(a, package) for a in CUDA.on(x_host, dy_host))
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
    results = (y, mean, invstd, dx, dweight, dbias)
    for index, value in enumerate(results):
        assert type(value).__module__.startswith(package), (index, type(value))
    expected = (*naive.forward_train(x_host), *naive.backward(dy_host, x_host))
    for value, reference in zip(results, expected, strict=True):
        np.testing.assert_allclose(value.copy_to_host(), reference, rtol=1e-12, atol=1e-12)
    if package == "torch":  # as_tensor(array, device=x.device)
        assert library.converted[0] == x.device
    rm, rv = CUDA.on(np.zeros(3), np.ones(3))  # Numba device arrays: kept, updated in place
    out = _as_kind(CUDA.poisoned(x_host.shape, x_host.dtype), package)
    y = nbn.batch_norm(x, rm, rv, training=True, out=out)
    assert y is out
    np.testing.assert_allclose(y.copy_to_host(), expected[0], rtol=1e-12, atol=1e-12)
    expected_rm, expected_rv = naive.running_update(np.zeros(3), np.ones(3), x_host, 0.1)
    assert_mean_close(rm.copy_to_host(), expected_rm, x_host)
    np.testing.assert_allclose(rv.copy_to_host(), expected_rv, rtol=1e-12)
    bn = nbn.BatchNorm(3, dtype=np.float64)  # the layer's outputs follow x too
    y = bn(x)
    dx = bn.backward(dy)
    assert type(y).__module__.startswith(package) and type(dx).__module__.startswith(package)
    np.testing.assert_allclose(dx.copy_to_host(), expected[3], rtol=1e-12, atol=1e-12)


class TorchLikeDtype:
    """What torch.float32 is to NumPy: not a dtype."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"


class TorchLikeCudaTensor:
    """What the library meets in a torch CUDA tensor, where _as_kind's stand-in (a Numba array
    in disguise) is too kind: torch's own dtype, which NumPy cannot read, ``size()`` a method,
    no Numba array methods; the memory only through ``__cuda_array_interface__`` (here the
    simulator array it wraps, which the test's ``as_cuda_array`` hands out)."""

    __module__ = "torch"
    device = "cuda:0"

    def __init__(self, array):
        self.wrapped = array

    shape = property(lambda self: tuple(self.wrapped.shape))
    ndim = property(lambda self: self.wrapped.ndim)
    dtype = property(lambda self: TorchLikeDtype(self.wrapped.dtype.name))

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    @property
    def __cuda_array_interface__(self):
        interface = {"shape": self.shape, "typestr": self.wrapped.dtype.str, "version": 3}
        return {**interface, "data": (0, False), "strides": None}


def test_torch_cuda_tensors_are_only_read_through_their_array_interface(rng, monkeypatch):
    """torch in, torch out, with tensors that are not Numba arrays in disguise: on an H200,
    forward_train and backward raised TypeError reading torch.float32 as a NumPy dtype and
    reshaping a returned tensor (whose size is a method) before this was fixed."""
    import types

    torch = types.ModuleType("torch")
    torch.Tensor = type("Tensor", (), {})  # memory.py's isinstance checks on torch.Tensor
    torch.as_tensor = lambda array, device: (
        array if isinstance(array, TorchLikeCudaTensor) else TorchLikeCudaTensor(array)
    )
    monkeypatch.setitem(sys.modules, "torch", torch)
    adopt = DeviceMemory.adopt  # cuda.as_cuda_array: a Numba view of the tensor's memory
    monkeypatch.setattr(
        DeviceMemory,
        "adopt",
        lambda self, value: (
            value.wrapped if isinstance(value, TorchLikeCudaTensor) else adopt(self, value)
        ),
    )
    x_host = random_batch(rng, (4, 3, 5), np.float32)
    dy_host = rng.standard_normal(x_host.shape).astype(np.float32)
    x, dy = (TorchLikeCudaTensor(a) for a in CUDA.on(x_host, dy_host))
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
    y_eval = nbn.forward_eval(x, mean, invstd)  # mean, invstd as running mean and variance
    bn = nbn.BatchNorm(3, dtype=np.float32)
    y_layer = bn(x)
    dx_layer = bn.backward(dy)
    results = (y, mean, invstd, dx, dweight, dbias, y_layer, dx_layer, y_eval)
    for value in results:
        assert isinstance(value, TorchLikeCudaTensor), type(value)
    expected = (*naive.forward_train(x_host), *naive.backward(dy_host, x_host))
    host_mean, host_invstd = (CUDA.host(a.wrapped) for a in (mean, invstd))
    eval_reference = naive.forward(x_host, host_mean, host_invstd.astype(np.float64))
    expected += (expected[0], expected[3], eval_reference)
    for value, reference in zip(results, expected, strict=True):
        np.testing.assert_allclose(CUDA.host(value.wrapped), reference, rtol=1e-4, atol=1e-4)


def test_numba_device_arrays_come_back_as_numba_device_arrays(rng):
    x = CUDA.on(random_batch(rng, (4, 3, 5), np.float32))
    y, mean, _ = nbn.forward_train(x)
    assert type(y) is type(x) and type(mean) is type(x)


# the same with the real libraries, on a GPU (the simulator's arrays are not theirs)
on_a_gpu = pytest.mark.skipif(numba.config.ENABLE_CUDASIM, reason="needs a real GPU")


@on_a_gpu
def test_cupy_in_cupy_out_on_a_gpu(rng):
    cupy = pytest.importorskip("cupy")
    x_host = random_batch(rng, (8, 3, 33), np.float32)
    x = cupy.asarray(x_host)
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, _ = nbn.backward(x, x, mean, invstd)
    for value in (y, mean, invstd, dx, dweight):
        assert isinstance(value, cupy.ndarray), type(value)
    np.testing.assert_allclose(cupy.asnumpy(y), naive.forward_train(x_host)[0], atol=3e-5)


@on_a_gpu
def test_torch_cuda_in_torch_out_on_a_gpu(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    x_host = random_batch(rng, (8, 3, 33), np.float32)
    dy_host = rng.standard_normal(x_host.shape).astype(np.float32)
    x, dy = (torch.as_tensor(a, device="cuda") for a in (x_host, dy_host))
    # the results' dtypes are torch's (torch.float32), which NumPy cannot read: the library
    # must not look at them as NumPy dtypes (it did, and raised TypeError, on an H200)
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
    bn = nbn.BatchNorm(3, dtype=np.float32)
    y_layer = bn(x)
    dx_layer = bn.backward(dy)
    results = (y, mean, invstd, dx, dweight, dbias, y_layer, dx_layer)
    for value in results:
        assert isinstance(value, torch.Tensor) and value.device == x.device
    expected = (*naive.forward_train(x_host), *naive.backward(dy_host, x_host))
    expected += (expected[0], expected[3])
    for value, reference in zip(results, expected, strict=True):
        np.testing.assert_allclose(value.cpu().numpy(), reference, rtol=1e-4, atol=1e-4)


# The library's launch sizes, read before any test shrinks them (conftest's tiny_launches).
FULL_LAUNCHES = {name: getattr(config, name) for name in dir(config) if name.isupper()}
# Shapes whose channels each span many blocks at the full sizes (the planes: 64 blocks of
# 256 x 16 values per channel; the rows: 2 tiles of 32 channels over 256 blocks each).
REPEATABLE_SHAPES = [(64, 6, 4096), (65536, 40)]


@on_a_gpu
@pytest.mark.parametrize("shape", REPEATABLE_SHAPES, ids=str)
def test_cross_block_merges_are_repeatable_and_exact_on_a_gpu(rng, monkeypatch, shape):
    """At the library's own launch sizes, on a GPU, where the blocks of a channel run at once:
    the last block merges all partials (the fences around its counter), so forward-train and
    backward give the same bits on every call and the float64 reference's values."""
    for name, value in FULL_LAUNCHES.items():
        monkeypatch.setattr(config, name, value)
    _, _, parts_n, parts_s, _ = launch.reduction_shape((*shape, 1)[:3])
    assert parts_n * parts_s >= 32, (parts_n, parts_s)  # many blocks per channel
    x_host = random_batch(rng, shape, np.float32)
    dy_host = rng.standard_normal(shape).astype(np.float32)
    x, dy = CUDA.on(x_host, dy_host)
    runs = []
    for _ in range(20):
        y, mean, invstd = nbn.forward_train(x)
        dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
        runs.append(CUDA.host(y, mean, invstd, dx, dweight, dbias))
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            np.testing.assert_array_equal(a, b)
    y, mean, invstd, dx, dweight, dbias = runs[0]
    y_ref, mean_ref, invstd_ref = naive.forward_train(x_host)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6 * np.abs(mean_ref).max())
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=5e-5)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy_host, x_host)
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(dweight, dweight_ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-5 * np.abs(dx_ref).max())


def test_device_arrays_are_used_in_place(rng, monkeypatch):
    def no_copy(*args, **kwargs):
        raise AssertionError("a device argument was copied or converted")

    for method in ("to_device", "copy", "astype", "copy_into"):
        monkeypatch.setattr(DeviceMemory, method, no_copy)
    x = random_batch(rng, (4, 3, 5), np.float32)
    weight = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    bias = rng.normal(0, 1, 3).astype(np.float32)
    x_d, w_d, b_d, rm, rv = CUDA.on(
        x, weight, bias, np.zeros(3, np.float32), np.ones(3, np.float32)
    )
    out = CUDA.poisoned(x.shape, x.dtype)
    y = nbn.batch_norm(x_d, rm, rv, w_d, b_d, training=True, out=out)
    assert y is out
    np.testing.assert_allclose(CUDA.host(y), naive.forward_train(x, weight, bias)[0], atol=3e-5)
    np.testing.assert_allclose(
        CUDA.host(rm), naive.running_update(np.zeros(3), np.ones(3), x, 0.1)[0], atol=1e-6
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


def test_torch_cpu_buffers_with_device_cuda_are_written_back_into_their_memory(rng):
    torch = pytest.importorskip("torch")
    x = random_batch(rng, (4, 3, 5), np.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    out = torch.full(x.shape, float("nan"), dtype=torch.float64)
    pointers = [t.data_ptr() for t in (rm, rv, out)]
    y = nbn.batch_norm(x, rm, rv, training=True, out=out, device="cuda")
    assert y is out and [t.data_ptr() for t in (rm, rv, out)] == pointers
    np.testing.assert_allclose(out.numpy(), naive.forward_train(x)[0], atol=1e-12)
    expected_mean, expected_var = naive.running_update(np.zeros(3), np.ones(3), x, 0.1)
    np.testing.assert_allclose(rm.numpy(), expected_mean, atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), expected_var, atol=1e-12)


def test_host_and_device_arguments_in_one_call_raise():
    x = np.ones((4, 3))
    x_d, w_d = CUDA.on(x, np.ones(3))
    with pytest.raises(ValueError, match=r"x is on the CUDA device, weight is in host memory"):
        nbn.forward_train(x_d, np.ones(3))
    with pytest.raises(ValueError, match=r"weight is on the CUDA device, x is in host memory"):
        nbn.forward_train(x, w_d, device="cuda")
    with pytest.raises(ValueError, match=r"running_mean, running_var are in host memory"):
        nbn.batch_norm(x_d, np.zeros(3), np.ones(3), training=True)
    with pytest.raises(ValueError, match=r"dy is in host memory"):
        nbn.backward(x, x_d, *CUDA.on(np.zeros(3), np.ones(3)))
    with pytest.raises(TypeError, match=r"device='cpu', but x is on the CUDA device"):
        nbn.forward_train(x_d, device="cpu")


def test_non_contiguous_device_input_is_rejected():
    x_d = CUDA.on(np.ones((4, 6, 3)))[:, ::2]
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        nbn.forward_train(x_d)


def test_results_are_deterministic(rng):
    x = CUDA.on(random_batch(rng, (5, 4, 7), np.float32))
    first = CUDA.host(*nbn.forward_train(x))
    second = CUDA.host(*nbn.forward_train(x))
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
    return CUDA.on(x, dy, mean), expected


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
                got = CUDA.on(*(np.full(x.shape[1], np.nan) for _ in expected))
                backend.batch_stats(x, mean=got[0], m2=got[1])
                backend.backward_sums(dy, x, mean=mean, sum_dy=got[2], sum_dy_xmu=got[3])
                got = np.array(CUDA.host(*got))
                if not np.allclose(got, expected, rtol=1e-12, atol=1e-12):
                    wrong.append(f"repetition {repetition}, {x.shape}: {got} != {expected}")
    runs = STRESS_REPETITIONS * len(cases)
    assert not wrong, f"{len(wrong)} of {runs} runs wrong; first: {wrong[0]}"


def test_launch_shape_changes_rounding_only(rng, monkeypatch):
    x = random_batch(rng, (6, 3, 10), np.float32)
    results = []
    for threads in (4, 32):
        monkeypatch.setattr(config, "THREADS_PER_BLOCK", threads)
        results.append(CUDA.host(*nbn.forward_train(CUDA.on(x))))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_launch_sizes_are_checked(monkeypatch):
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 6)
    with pytest.raises(ValueError, match="THREADS_PER_BLOCK must be a power of two"):
        nbn.forward_train(CUDA.on(np.ones((4, 3))))


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
    x, dy = CUDA.on(random_batch(rng, (4, 3, 5), np.float32), np.ones((4, 3, 5), np.float32))
    bn(x)
    assert launches == ["channel_stats", "affine"]
    launches.clear()
    bn.backward(dy)
    assert launches == ["backward_sums", "backward_dx"]
    launches.clear()
    bn.eval()(x)
    assert launches == ["eval_coefficients", "affine"]


def test_repeated_calls_reuse_their_scratch_and_copy_nothing_from_the_host(rng, monkeypatch):
    """Partials, counters and coefficients are kept per thread (launch's workspace): once a
    shape has run, the backend's calls on it allocate nothing and copy nothing from the host,
    and every call is still right: the counters that each launch's last block sets back to
    zero find the last block again (a counter left counting would leave the outputs
    poisoned)."""
    backend = dispatch.get("cuda")
    shape = (6, 3, 10)  # each channel over several blocks at the tiny launch sizes
    assert launch.reduction_shape(shape)[2] * launch.reduction_shape(shape)[3] > 1
    batches = [random_batch(rng, shape, np.float32) for _ in range(3)]
    dy_host = rng.standard_normal(shape).astype(np.float32)
    dy, weight, bias = CUDA.on(dy_host, np.ones(3, np.float32), np.zeros(3, np.float32))

    def outputs():  # y, dx, and the float64 mean, invstd, m2, sum_dy, sum_dy_xmu: poisoned
        return [CUDA.poisoned(shape, np.float32) for _ in range(2)] + [
            CUDA.poisoned(3, np.float64) for _ in range(5)
        ]

    def step(x, y, dx, mean, invstd, m2, sum_dy, sum_dy_xmu):
        backend.forward_train(x, weight=weight, bias=bias, eps=1e-5, y=y, mean=mean,
                              invstd=invstd, m2=m2)  # fmt: skip
        backend.backward(dy, x, mean=mean, invstd=invstd, weight=weight, dx=dx, sum_dy=sum_dy,
                         sum_dy_xmu=sum_dy_xmu)  # fmt: skip

    inputs = [CUDA.on(x) for x in batches]
    step(inputs[0], *outputs())  # the first call of the shape makes the workspace

    def no_host_copy_or_allocation(*args, **kwargs):
        raise AssertionError("a repeated call allocated or copied from the host")

    for x_host, x in zip(batches, inputs, strict=True):
        out = outputs()
        with monkeypatch.context() as patched:
            patched.setattr(cuda, "device_array", no_host_copy_or_allocation)
            patched.setattr(cuda, "to_device", no_host_copy_or_allocation)
            step(x, *out)
        y, dx, mean = CUDA.host(out[0], out[1], out[2])
        y_ref, mean_ref, _ = naive.forward_train(x_host)
        np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(y, y_ref, atol=5e-5)
        np.testing.assert_allclose(dx, naive.backward(dy_host, x_host)[0], atol=5e-5)


def test_each_thread_has_its_own_workspace():
    """Reuse is safe only in one thread's launch order: another thread (which may run on a
    stream of its own) gets buffers of its own; the same thread gets the same ones back."""
    x = CUDA.on(np.ones((2, 3, 4), np.float32))
    mine = launch.reused(x, np.float32, (4, 3))
    assert launch.reused(x, np.float32, (4, 3)) is mine
    theirs = []
    worker = threading.Thread(target=lambda: theirs.append(launch.reused(x, np.float32, (4, 3))))
    worker.start()
    worker.join()
    assert theirs and theirs[0] is not mine


def test_the_workspace_is_bounded_in_buffers_and_bytes(monkeypatch):
    """Many shapes in one thread do not pile up device memory: past WORKSPACE_BUFFERS buffers
    or WORKSPACE_BYTES bytes the thread's buffers are dropped (Numba frees them once the
    launches that use them are done) and the new one starts over."""
    monkeypatch.setattr(launch, "WORKSPACE_BYTES", 1000)
    x = CUDA.on(np.ones((2, 3, 4), np.float32))
    launch._WORKSPACE.buffers = {}
    first = launch.reused(x, np.float64, (10, 10))  # 800 bytes
    assert launch.reused(x, np.float64, (10, 10)) is first
    launch.reused(x, np.float64, (2, 10))  # 160 more: 960, kept
    assert len(launch._WORKSPACE.buffers) == 2
    launch.reused(x, np.float64, (1, 10))  # 80 more would pass 1000: all dropped first
    assert len(launch._WORKSPACE.buffers) == 1
    assert launch.reused(x, np.float64, (10, 10)) is not first
    monkeypatch.setattr(launch, "WORKSPACE_BUFFERS", 2)
    launch.reused(x, np.float32, (1,))
    launch.reused(x, np.float32, (2,))
    assert len(launch._WORKSPACE.buffers) <= 2


def test_the_workspace_is_keyed_by_the_gpu_of_a_real_device_array():
    """A Numba device array on a GPU names its context through a weak proxy, and a context is
    unhashable (it defines __eq__): the workspace keys by the device id behind it (keying by
    the context raised TypeError on an H200). The simulator's arrays have none: one key."""
    import types
    import weakref

    class Context:  # numba.cuda.cudadrv.driver.Context: __eq__ and no __hash__
        def __init__(self, device_id):
            self.device = types.SimpleNamespace(id=device_id)

        def __eq__(self, other):
            return self is other

    context = Context(3)
    real = types.SimpleNamespace(gpu_data=types.SimpleNamespace(context=weakref.proxy(context)))
    assert launch.device_of(real) == 3
    expected = None if numba.config.ENABLE_CUDASIM else cuda.get_current_device().id
    assert launch.device_of(CUDA.on(np.ones(2))) == expected


def test_split_primitives_match_the_cpu_backend(rng):
    for shape in ((7, 3, 1), (3, 2, 6)):
        x = random_batch(rng, shape, np.float64).reshape(shape)
        dy = rng.standard_normal(shape)
        weight, bias = rng.uniform(0.5, 2.0, shape[1]), rng.uniform(-1.0, 1.0, shape[1])
        invstd = rng.uniform(0.5, 2.0, shape[1])
        results = {}
        for device in DEVICES:
            backend, side = dispatch.get(device), BACKENDS[device]
            mean, m2, sum_dy, sum_dy_xmu = side.on(*(np.zeros(shape[1]) for _ in range(4)))
            x_d, dy_d, w_d, b_d, invstd_d = side.on(x, dy, weight, bias, invstd)
            count = backend.batch_stats(x_d, mean=mean, m2=m2)
            backend.backward_sums(dy_d, x_d, mean=mean, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
            y, dx = side.on(np.zeros(shape), np.zeros(shape))
            backend.normalize(x_d, mean=mean, invstd=invstd_d, weight=w_d, bias=b_d, y=y)
            backend.backward_dx(dy_d, x_d, mean=mean, invstd=invstd_d, weight=w_d, sum_dy=sum_dy,
                                sum_dy_xmu=sum_dy_xmu, count=count, dx=dx)  # fmt: skip
            results[device] = [count, *side.host(mean, m2, sum_dy, sum_dy_xmu, y, dx)]
        for a, b in zip(results["cpu"], results["cuda"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ fused epilogues
def _train(x, residual=None, activation=None):
    """y of the cuda backend's forward_train on host ``x`` (and ``residual``), no weight/bias."""
    backend, channels = dispatch.get("cuda"), x.shape[1]
    y = CUDA.poisoned(x.shape, x.dtype)
    mean, invstd, m2 = CUDA.on(*(np.zeros(channels) for _ in range(3)))
    none = CUDA.on(np.zeros(0, x.dtype))
    residual = None if residual is None else CUDA.on(residual)
    epilogue = {"residual": residual, "activation": activation}
    backend.forward_train(CUDA.on(x), weight=none, bias=none, eps=1e-5, y=y, mean=mean,
                          invstd=invstd, m2=m2, **epilogue)  # fmt: skip
    return CUDA.host(y)


@pytest.mark.parametrize("shape", [(7, 3, 1), (3, 2, 40)], ids=["rows", "planes"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_epilogue_is_the_plain_affine_then_add_and_relu_bit_for_bit(rng, shape, dtype):
    """Across the blocks and tail tiles of both elementwise layouts the residual is read at y's
    own index, and the affine rounds as before: fused y == relu(plain y + z) in x's dtype."""
    x = random_batch(rng, shape, dtype)
    z = rng.standard_normal(shape).astype(dtype)
    z[0, 1, 0] = np.nan  # passes through the ReLU
    plain = _train(x)
    added = plain + z
    np.testing.assert_array_equal(_train(x, z), added)
    np.testing.assert_array_equal(_train(x, z, "relu"), np.where(added < 0, dtype(0), added))
    np.testing.assert_array_equal(_train(x, None, "relu"), np.where(plain < 0, dtype(0), plain))


def test_fused_forward_launches_two_kernels_and_relu_grad_one(rng, monkeypatch):
    launches = []
    for name in ("channel_stats", "affine", "relu_grad"):
        monkeypatch.setattr(cuda_kernels, name, Counting(getattr(cuda_kernels, name), launches))
    x = random_batch(rng, (4, 3, 5), np.float32)
    _train(x, np.ones_like(x), "relu")
    assert launches == ["channel_stats", "affine"]
    launches.clear()
    dy, y, grad = CUDA.on(x, x, np.zeros_like(x))
    dispatch.get("cuda").activation_grad(dy, y, activation="relu", grad=grad)
    assert launches == ["relu_grad"]


@pytest.mark.parametrize("size", [1, 31, 32, 33, 100])
def test_relu_grad_writes_every_element_across_blocks(rng, size):
    """tiny_launches: 8 threads of 4 values, so these sizes end inside, at and past a block."""
    dy, y = rng.standard_normal((2, size)), rng.standard_normal((2, size))
    y[0, 0], dy[1, -1], y[1, -1] = np.nan, np.nan, 1.0  # NaN in y masks; NaN in dy passes
    grad = CUDA.poisoned(dy.shape, dy.dtype)
    dispatch.get("cuda").activation_grad(*CUDA.on(dy, y), activation="relu", grad=grad)
    np.testing.assert_array_equal(CUDA.host(grad), np.where(y > 0, dy, 0.0))


# -------------------------------------------------------------------------------- BatchNorm
def test_batchnorm_on_cuda_matches_the_cpu_layer_over_steps(rng):
    layers = {d: nbn.BatchNorm(3, momentum=None, dtype=np.float64, device=d) for d in DEVICES}
    seen = []
    for step in range(3):
        x = random_batch(rng, (4, 3, 5), np.float64)
        dy = rng.standard_normal(x.shape)
        seen.append(x)
        outputs = {}
        for device, bn in layers.items():
            if step == 2:
                bn.eval()
            side = BACKENDS[device]
            y = bn(side.on(x))
            dx = bn.backward(side.on(dy))
            outputs[device] = side.host(y, dx, bn.grad_weight, bn.grad_bias)
        for a, b in zip(outputs["cpu"], outputs["cuda"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    states = {d: bn.state_dict() for d, bn in layers.items()}
    for key, value in states["cpu"].items():
        assert isinstance(states["cuda"][key], np.ndarray)
        if key == "running_mean":
            assert_mean_close(states["cuda"][key], value, seen)
        else:
            np.testing.assert_allclose(states["cuda"][key], value, rtol=1e-12)


def test_batchnorm_on_cuda_keeps_its_arrays_on_the_device(rng):
    bn = nbn.BatchNorm(3, device="cuda")
    x = CUDA.on(random_batch(rng, (4, 3, 5), np.float32))
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
        bn(CUDA.on(np.ones((4, 3))))


def test_batchnorm_auto_follows_its_input():
    bn = nbn.BatchNorm(3)
    assert isinstance(bn.weight, np.ndarray)
    bn(CUDA.on(np.arange(12.0, dtype=np.float32).reshape(4, 3)))
    assert is_device_array(bn.weight) and is_device_array(bn.running_var)


def test_load_state_dict_accepts_device_arrays():
    bn = nbn.BatchNorm(3, dtype=np.float64)
    bn.load_state_dict({"weight": DEVICE.to_device(np.array([1.0, 2.0, 3.0]))}, strict=False)
    np.testing.assert_array_equal(bn.weight, [1.0, 2.0, 3.0])
