"""CUDA device arrays for the functional layer: adoption without copies, allocation, and the
few per-channel conversions it needs (the counterpart of :class:`numba_bn.memory.HostMemory`).

Any object that exposes ``__cuda_array_interface__`` (CuPy, PyTorch, Numba) is viewed as a Numba
device array over the same memory; nothing is copied unless a dtype conversion is asked for.
"""

import math
import sys

import numpy as np
from numba import cuda, float64

from ..memory import is_device_array


def _grid(size):
    """[blocks, threads] for one thread per element of a small array."""
    threads = min(128, size)
    return math.ceil(size / threads), threads


@cuda.jit
def _cast(src, dst):
    """dst = src, elementwise over flat arrays of any two dtypes."""
    i = cuda.grid(1)
    if i < dst.size:
        dst[i] = src[i]


@cuda.jit
def _fill(out, value):
    """out = value, elementwise over a flat array."""
    i = cuda.grid(1)
    if i < out.size:
        out[i] = value


@cuda.jit
def _product(a, b, out):
    """out = a * b in float64 arithmetic, stored in out's dtype."""
    i = cuda.grid(1)
    if i < out.size:
        out[i] = float64(a[i]) * b[i]


@cuda.jit
def _invstd(var, eps, out):
    """out = 1 / sqrt(var + eps)."""
    i = cuda.grid(1)
    if i < out.size:
        out[i] = 1.0 / math.sqrt(float64(var[i]) + eps)


def _byte_range(array):
    """[start, end) device addresses of a C-contiguous device array."""
    # the simulator's arrays hold a NumPy array and have only its __array_interface__
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    start = interface["data"][0]
    return start, start + array.size * array.dtype.itemsize


class DeviceMemory:
    """Numba device arrays on the current CUDA device."""

    name = "cuda"
    array_kind = "a CUDA device array (anything with __cuda_array_interface__)"

    def adopt(self, value):
        """A Numba device array over the memory of ``value`` (no copy)."""
        if getattr(value, "__cuda_ndarray__", False):  # Numba's own (and the simulator's)
            return value
        return cuda.as_cuda_array(value)

    def returner(self, value):
        """What turns a result back into the kind of the caller's CUDA input ``value``: a CuPy
        array for CuPy, a torch tensor on ``value``'s device for torch, or None (Numba device
        arrays stay as they are). Both views are zero-copy, through ``__cuda_array_interface__``,
        and keep the Numba array that owns the memory alive. Neither library is imported here:
        an input of its kind means it is loaded."""
        package = type(value).__module__.partition(".")[0]
        if package == "cupy":
            return sys.modules["cupy"].asarray
        if package == "torch":
            torch, device = sys.modules["torch"], value.device
            return lambda array: torch.as_tensor(array, device=device)
        return None

    def to_device(self, value):
        """A device copy of a host array (or anything np.asarray takes)."""
        return cuda.to_device(np.ascontiguousarray(np.asarray(value)))

    def asarray(self, value, name):
        if not is_device_array(value):
            raise TypeError(f"{name} must be {self.array_kind}, got {type(value).__name__}")
        return self.adopt(value)

    def is_array(self, value):
        return is_device_array(value)

    def contiguous(self, array, dtype, name):
        array = self.adopt(array)
        if not array.is_c_contiguous():
            raise ValueError(
                f"{name} must be C-contiguous on the CUDA device (strides {array.strides}); "
                "make it so there first (cupy.ascontiguousarray(a), torch: a.contiguous())"
            )
        if array.dtype == dtype:
            return array
        return self.astype(array, dtype)

    def is_writable(self, array):
        return True

    def is_c_contiguous(self, array):
        return self.adopt(array).is_c_contiguous()

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype)

    def full(self, shape, value, dtype):
        """A launch, not a copy from the host (which costs ~4x as much and waits for the
        GPU)."""
        out = cuda.device_array(shape, dtype)
        if out.size:
            _fill[_grid(out.size)](out.reshape(out.size), float(value))
        return out

    # The methods below take arrays of any kind (the library's own results already turned into
    # the caller's torch tensors, say) and read them as Numba arrays (adopt).
    def copy(self, array):
        array = self.adopt(array)
        out = cuda.device_array(array.shape, array.dtype)
        out.copy_to_device(array)
        return out

    def copy_into(self, dst, src):
        dst, src = self.adopt(dst), self.adopt(src)
        if dst.size:
            _cast[_grid(dst.size)](src.reshape(src.size), dst.reshape(dst.size))

    def astype(self, array, dtype):
        array = self.adopt(array)
        out = cuda.device_array(array.shape, dtype)
        self.copy_into(out, array)
        return out

    def product(self, a, b, dtype):
        a, b = self.adopt(a), self.adopt(b)
        out = cuda.device_array(a.shape, dtype)
        if out.size:
            _product[_grid(out.size)](a, b, out)
        return out

    def invstd(self, var, eps):
        var = self.adopt(var)
        out = cuda.device_array(var.shape, np.float64)
        if out.size:
            _invstd[_grid(out.size)](var, float(eps), out)
        return out

    def check_unmasked(self, value, name):
        """Device arrays carry no mask (see memory.reject_masked)."""

    def shares_memory(self, a, b):
        """True when C-contiguous ``a`` and ``b`` share bytes."""
        (start_a, end_a), (start_b, end_b) = _byte_range(self.adopt(a)), _byte_range(self.adopt(b))
        return start_a < end_b and start_b < end_a

    def overlaps(self, a, b):
        """True when C-contiguous ``a`` and ``b`` share bytes without being the same view."""
        same_view = _byte_range(self.adopt(a)) == _byte_range(self.adopt(b)) and (
            a.shape == b.shape and a.dtype == b.dtype
        )
        return not same_view and self.shares_memory(a, b)

    def to_host(self, array):
        return self.adopt(array).copy_to_host()

    def from_host(self, array, out=None):
        """A device copy of the host ``array``, or ``out`` (same shape and dtype) overwritten
        with it."""
        if out is None:
            return cuda.to_device(array)
        out.copy_to_device(array)
        return out


DEVICE = DeviceMemory()
