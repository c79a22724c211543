"""CUDA backend: numba.cuda kernels on device arrays (tested under NUMBA_ENABLE_CUDASIM=1).

Importing this package does not import numba.cuda: the kernels are compiled on first use, after
:func:`require_cuda` has checked that a GPU (or the simulator) is there.
"""

import importlib.util
import os


class CudaUnavailableError(RuntimeError):
    """CUDA was asked for (``device="cuda"`` or device arrays) but cannot run here."""


def _point_numba_at_pip_toolkit():
    """Let numba find NVVM/libdevice from the ``nvidia-cuda-nvcc-cu12`` wheel when installed.

    Numba's built-in CUDA target looks in conda environments, CUDA_HOME and system paths only;
    the wheel lays out a toolkit tree (``nvvm/lib64``, ``nvvm/libdevice``) that CUDA_HOME can
    name. Nothing changes when CUDA_HOME is set or the wheel is absent.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except ModuleNotFoundError:
        return
    for root in (spec.submodule_search_locations or []) if spec else []:
        if os.path.isdir(os.path.join(root, "nvvm", "lib64")):
            os.environ["CUDA_HOME"] = root
            return


def require_cuda():
    """numba.cuda, or CudaUnavailableError saying why it cannot run here."""
    _point_numba_at_pip_toolkit()
    try:
        from numba import cuda
    except ImportError as exc:  # pragma: no cover - numba without its CUDA target
        raise CudaUnavailableError(
            f"CUDA was requested; numba.cuda cannot be imported: {exc}"
        ) from exc
    if not cuda.is_available():
        reason = " ".join(str(cuda.cuda_error() or "no CUDA GPU was found").split())
        raise CudaUnavailableError(
            "CUDA was requested (device='cuda' or CUDA arrays), but numba.cuda.is_available() is "
            f"False: {reason} (to run the CUDA kernels without a GPU, set NUMBA_ENABLE_CUDASIM=1 "
            "before numba is imported)"
        )
    return cuda


class CudaBackend:
    """The operations of :class:`numba_bn.cpu.CpuBackend` on Numba device arrays."""

    name = "cuda"

    @property
    def memory(self):
        """Where this backend's arrays live: :data:`numba_bn.cuda.arrays.DEVICE`."""
        require_cuda()
        from .arrays import DEVICE

        return DEVICE

    @staticmethod
    def _launch():
        require_cuda()
        from . import launch

        return launch

    # The signatures are those of numba_bn.cpu.CpuBackend; numba_bn.cuda.launch documents them.
    def forward_train(self, *args):
        return self._launch().forward_train(*args)

    def forward_eval(self, *args):
        self._launch().forward_eval(*args)

    def backward(self, *args):
        self._launch().backward(*args)

    def channel_stats(self, *args):
        return self._launch().channel_stats(*args)

    def normalize(self, *args):
        self._launch().normalize(*args)

    def backward_sums(self, *args):
        self._launch().backward_sums(*args)

    def backward_dx(self, *args):
        self._launch().backward_dx(*args)
