"""CUDA backend: numba.cuda kernels on device arrays (tested under NUMBA_ENABLE_CUDASIM=1).

Importing this package does not import numba.cuda: the kernels are compiled on first use, after
:func:`require_cuda` has checked that a GPU (or the simulator) is there.
"""

import importlib.util
import os

from ..cpu import epilogue_code


class CudaUnavailableError(RuntimeError):
    """CUDA was asked for (``device="cuda"`` or device arrays) but cannot run here."""


def cuda_target():
    """Which CUDA target ``numba.cuda`` is: NVIDIA's numba-cuda package (the supported one, the
    ``cuda`` extra) or Numba's deprecated built-in target, with its version."""
    try:
        from importlib.metadata import version

        return f"numba-cuda {version('numba-cuda')}"
    except ImportError:  # importlib.metadata's PackageNotFoundError is an ImportError
        return 'numba\'s built-in target (deprecated: pip install "numba-bn[cuda]")'


def _point_numba_at_pip_toolkit():
    """Let numba find NVVM/libdevice from the ``nvidia-cuda-nvcc-cu12`` wheel when installed.

    Numba's built-in CUDA target looks in conda environments, CUDA_HOME and system paths only;
    the wheel lays out a toolkit tree (``nvvm/lib64``, ``nvvm/libdevice``) that CUDA_HOME can
    name. Nothing changes when CUDA_HOME is set, the wheel is absent, or numba-cuda is
    installed (it finds the toolkit wheels itself, through ``cuda.pathfinder``).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if importlib.util.find_spec("numba_cuda") is not None:
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
    if not _target_loaded:
        _load_target()
    return cuda


_target_loaded = False


def _load_target():
    """Load numba-cuda's NumPy typing now, where a failure can be explained: numba-cuda 0.30.4
    (in maintenance) names np.row_stack, which NumPy 2.5 removed, so its first kernel compile
    fails with AttributeError (NVIDIA/numba-cuda#907, closed without a fix). The simulator and
    Numba's built-in target have no such module."""
    global _target_loaded
    import numba

    try:
        if not numba.config.ENABLE_CUDASIM:
            importlib.import_module("numba.cuda.np.npyimpl")
    except ImportError:
        pass
    except AttributeError as exc:
        if "row_stack" not in str(exc):
            raise
        import numpy

        raise CudaUnavailableError(
            f"{cuda_target()} cannot compile kernels with NumPy {numpy.__version__}: it uses "
            "np.row_stack, which NumPy 2.5 removed (NVIDIA/numba-cuda#907); install NumPy "
            "< 2.5 (pip install 'numpy<2.5', as the numba-bn[cuda] extra asks)"
        ) from exc
    _target_loaded = True


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

    # The interface of numba_bn.cpu.CpuBackend; numba_bn.cuda.launch documents the launches.
    # The forward steps take residual= and activation= (y = activation(BN(x) + residual)),
    # applied in their elementwise launch as the CPU kernels' epilogue code.
    def forward_train(self, x, *, weight, bias, eps, y, mean, invstd, m2, running=None,
                      nan_check=False, residual=None, activation=None):  # fmt: skip
        launch = self._launch()
        if running is None:  # zero-length buffers: no running update
            none = launch.reused(x, x.dtype)
            running = (none, none, 0.0, True)
        run_mean, run_var, momentum, unbiased = running
        return launch.forward_train(x, weight, bias, eps, run_mean, run_var, momentum, unbiased,
                                    nan_check, y, mean, invstd, m2, residual,
                                    epilogue_code(residual, activation))  # fmt: skip

    def forward_eval(self, x, *, weight, bias, running_mean, running_var, eps, y, residual=None,
                     activation=None):  # fmt: skip
        self._launch().forward_eval(x, weight, bias, running_mean, running_var, eps, y, residual,
                                    epilogue_code(residual, activation))  # fmt: skip

    def activation_grad(self, dy, y, *, activation, grad):
        """grad (=, like dy) = dy where y > 0, else 0, for "relu" (the only activation)."""
        self._launch().relu_grad(dy, y, grad)

    def backward(self, dy, x, *, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, activation=None,
                 y=None, grad=None):  # fmt: skip
        if activation is not None:  # through the activation first, a launch of its own
            self.activation_grad(dy, y, activation=activation, grad=grad)
            dy = grad
        self._launch().backward(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu)

    def batch_stats(self, x, *, mean, m2):
        return self._launch().batch_stats(x, mean, m2)

    def normalize(self, x, *, mean, invstd, weight, bias, y, residual=None, activation=None):
        self._launch().normalize(x, mean, invstd, weight, bias, y, residual,
                                 epilogue_code(residual, activation))  # fmt: skip

    def backward_sums(self, dy, x, *, mean, sum_dy, sum_dy_xmu):
        self._launch().backward_sums(dy, x, mean, sum_dy, sum_dy_xmu)

    def backward_dx(self, dy, x, *, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
        self._launch().backward_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx)
