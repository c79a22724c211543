"""The CUDA backend from the main test process, which has no GPU and no simulator.

numba.cuda picks the simulator when it is first imported, so the backend's tests (the "cuda" cases
of tests/test_conformance.py and tests/test_fused.py, tests/gpu_suite.py and
tests/gpu_norms_suite.py) run in a subprocess with NUMBA_ENABLE_CUDASIM=1; this process checks
the dispatch errors that need no CUDA at all, and that the kernels compile for a real GPU.
"""

import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest

import numba_bn as nbn
from numba_bn.cuda import CudaUnavailableError
from numba_bn.memory import dtype_of

from conftest import run_child

ROOT = pathlib.Path(__file__).resolve().parent.parent


class FakeDeviceArray:
    """Exposes __cuda_array_interface__ like CuPy or PyTorch arrays; never touched."""

    __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False), "version": 3}
    shape, dtype, ndim = (4, 3), np.dtype(np.float32), 2


class TorchLikeDtype:
    """What torch.float32 is to NumPy: not a dtype."""

    def __repr__(self):
        return "torch.float32"


class FakeTorchTensor(FakeDeviceArray):
    dtype = TorchLikeDtype()


def test_dtype_of_reads_a_torch_tensors_dtype_from_its_array_interface():
    """Results go back to a torch caller as torch tensors, whose dtype NumPy cannot read; the
    library inspects them through dtype_of (forward_train's statistics, backward's parameter
    gradients: both raised TypeError for torch CUDA tensors on an H200 before)."""
    with pytest.raises(TypeError):
        np.dtype(FakeTorchTensor.dtype)
    assert dtype_of(FakeTorchTensor()) == np.float32
    assert dtype_of(np.ones(2, np.float16)) == np.float16


def test_numba_cuda_without_numpy_2_5_support_is_explained(monkeypatch):
    """numba-cuda 0.30.4 cannot compile a kernel with NumPy 2.5 (it names np.row_stack): its
    first compile raised AttributeError deep in its typing on an H200 with NumPy 2.5.2.
    require_cuda loads that module first and says what to install; other errors pass."""
    from numba_bn import cuda as nbn_cuda

    def removed(name):
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(nbn_cuda.importlib, "import_module", removed)
    monkeypatch.setattr(nbn_cuda, "_target_loaded", False)
    with pytest.raises(CudaUnavailableError, match=r"NumPy 2\.5 removed .*numpy<2\.5"):
        nbn_cuda._load_target()
    assert nbn_cuda._target_loaded is False

    def other(name):
        raise AttributeError("something else")

    monkeypatch.setattr(nbn_cuda.importlib, "import_module", other)
    with pytest.raises(AttributeError, match="something else"):
        nbn_cuda._load_target()

    def absent(name):  # Numba's built-in target: no numba.cuda.np
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(nbn_cuda.importlib, "import_module", absent)
    nbn_cuda._load_target()
    assert nbn_cuda._target_loaded is True


def run(command, env_extra, timeout):
    """(returncode, output) of a child process; its process group is killed on timeout."""
    return run_child(command, env_extra, timeout)


def cuda_runs_here():
    from numba import cuda

    return cuda.is_available()


def toolkit_root():
    """A CUDA toolkit tree with NVVM (CUDA_HOME, or the nvidia-cuda-nvcc-cu12 wheel), or None."""
    candidates = [os.environ.get("CUDA_HOME", "")]
    spec = (
        importlib.util.find_spec("nvidia.cuda_nvcc") if importlib.util.find_spec("nvidia") else None
    )
    candidates += list(spec.submodule_search_locations) if spec else []
    for root in candidates:
        if root and (pathlib.Path(root) / "nvvm" / "lib64").is_dir():
            return root
    return None


def test_cuda_conformance_and_gpu_suite_pass_under_the_simulator(simulator_suite):
    """The conformance suite on the "cuda" backend alone and the GPU suites (conftest's
    _simulator_suite, run in a child started with the session); nothing skipped, so a
    simulator that did not start shows."""
    code, output = simulator_suite
    assert code == 0, output[-6000:]
    summary = output.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, output[-2000:]


@pytest.mark.skipif(sys.platform != "linux", reason="the test extra has numba-cuda on Linux")
def test_numba_cuda_is_the_cuda_target_under_test():
    """The simulator suite and the PTX compile run on NVIDIA's numba-cuda (the ``cuda`` extra),
    not on Numba's deprecated built-in target: ``numba.cuda`` is its module."""
    code, output = run(
        [sys.executable, "-c", "import numba.cuda, numba_cuda; print(numba.cuda.__file__)"],
        {"NUMBA_ENABLE_CUDASIM": "1"}, timeout=120,
    )  # fmt: skip
    assert code == 0, output[-2000:]
    assert "numba_cuda" in pathlib.Path(output.strip().splitlines()[-1]).parts, output


def test_gpu_benchmark_smoke_mode_runs_under_the_simulator():
    command = [sys.executable, "benchmarks/gpu_bench.py", "--smoke"]
    code, output = run(command, {"NUMBA_ENABLE_CUDASIM": "1"}, timeout=300)
    assert code == 0, output[-4000:]
    assert "all checks passed" in output, output[-4000:]


def test_gpu_launch_sizes_benchmark_smoke_mode_runs_under_the_simulator():
    """Every launch size it times gives the elementwise passes' same bits (it says so)."""
    command = [sys.executable, "benchmarks/gpu_launch_sizes.py", "--smoke"]
    code, output = run(command, {"NUMBA_ENABLE_CUDASIM": "1"}, timeout=300)
    assert code == 0, output[-4000:]
    assert "result: the same bits at every elementwise size" in output, output[-4000:]
    assert "reduction 256/thread, 4096 blocks" in output, output[-4000:]


def test_gpu_host_overhead_benchmark_smoke_mode_runs_under_the_simulator():
    command = [sys.executable, "benchmarks/gpu_host_overhead.py", "--smoke"]
    code, output = run(command, {"NUMBA_ENABLE_CUDASIM": "1"}, timeout=300)
    assert code == 0, output[-4000:]
    for line in ("launch, 13 arguments", "backend backward", "cProfile of 1 calls of backward"):
        assert line in output, output[-4000:]


@pytest.mark.skipif(toolkit_root() is None, reason="no NVVM: pip install nvidia-cuda-nvcc-cu12")
def test_kernels_compile_for_a_real_gpu():
    code, output = run(
        [sys.executable, "tests/cuda_compile.py", "9.0"], {"CUDA_HOME": toolkit_root()}, 600
    )
    assert code == 0, output[-4000:]
    assert "channel_stats" in output


@pytest.mark.skipif("cuda_runs_here()", reason="a GPU (or the simulator) is present")
@pytest.mark.parametrize(
    "call",
    [
        lambda: nbn.forward_train(np.ones((4, 3)), device="cuda"),
        lambda: nbn.forward_train(FakeDeviceArray()),
        lambda: nbn.BatchNorm(3, device="cuda"),
    ],
    ids=["device=cuda", "device array", "BatchNorm(device=cuda)"],
)
def test_cuda_without_a_gpu_raises_and_names_the_reason(call):
    with pytest.raises(CudaUnavailableError, match=r"numba\.cuda\.is_available\(\) is False: \S"):
        call()


def test_device_must_be_auto_cpu_or_cuda():
    with pytest.raises(ValueError, match=r"device must be one of \('auto', 'cpu', 'cuda'\)"):
        nbn.forward_train(np.ones((4, 3)), device="gpu")


def test_device_cpu_rejects_device_arrays():
    with pytest.raises(TypeError, match=r"device='cpu', but x is on the CUDA device"):
        nbn.forward_train(FakeDeviceArray(), device="cpu")


def test_host_and_device_arrays_in_one_call_raise_before_touching_cuda():
    with pytest.raises(ValueError, match=r"x is on the CUDA device, weight is in host memory"):
        nbn.forward_train(FakeDeviceArray(), np.ones(3))
    with pytest.raises(ValueError, match=r"dy is on the CUDA device, x, mean, invstd are in host"):
        nbn.backward(FakeDeviceArray(), np.ones((4, 3)), np.zeros(3), np.ones(3))
