"""What an array is: host (NumPy) or CUDA, and the few memory operations the checks need there.

A leaf of the package: it imports nothing of numba_bn. :data:`HOST` serves NumPy arrays; the CUDA
counterpart is :data:`numba_bn.cuda.arrays.DEVICE`. Both implement :class:`Memory`, so
validation and allocation (:mod:`numba_bn.functional`) are written once for both. Where a call
runs is decided above both backends, in :mod:`numba_bn.dispatch`.
"""

from typing import Protocol

import numpy as np

_HOST_TYPES = (np.ndarray, int, float, str, bool)


def is_device_array(value):
    """True for anything that exposes ``__cuda_array_interface__`` (and the simulator's arrays)."""
    if value is None or type(value) in _HOST_TYPES:  # the common case, decided fast
        return False
    return hasattr(value, "__cuda_array_interface__") or bool(
        getattr(value, "__cuda_ndarray__", False)
    )


def reject_masked(value, name):
    """TypeError for a ``numpy.ma.MaskedArray``: its mask would be silently ignored."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray: masks are not supported (masked values would "
            f"enter the statistics); pass {name}.filled(value) or only the valid rows"
        )


def _conversion_hint(value, name):
    """What to do with an object NumPy could not turn into an array (torch tensors, say)."""
    module = type(value).__module__ or ""
    if module.startswith("torch"):
        if getattr(value, "requires_grad", False):
            return f"{name} is a torch tensor that requires grad: pass {name}.detach()"
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            return f"{name} is a torch bfloat16 tensor, which NumPy cannot hold: use {name}.float()"
        return f"{name} is a torch tensor NumPy cannot view: pass {name}.detach().cpu()"
    return f"{name} must be an array or a rectangular nested sequence of numbers"


class Memory(Protocol):
    """The operations the functional layer needs on one kind of array."""

    name: str  # the device, "cpu" or "cuda"
    array_kind: str  # for error messages: "a numpy array", ...

    def asarray(self, value, name): ...
    def is_array(self, value): ...
    def check_unmasked(self, value, name): ...
    def contiguous(self, array, dtype, name): ...
    def is_writable(self, array): ...
    def is_c_contiguous(self, array): ...
    def overlaps(self, a, b): ...
    def shares_memory(self, a, b): ...
    def empty(self, shape, dtype): ...
    def full(self, shape, value, dtype): ...
    def copy(self, array): ...
    def copy_into(self, dst, src): ...
    def astype(self, array, dtype): ...
    def product(self, a, b, dtype): ...
    def invstd(self, var, eps): ...
    def to_host(self, array): ...
    def from_host(self, array, out=None): ...


class HostMemory:
    """NumPy arrays in host memory."""

    name = "cpu"
    array_kind = "a numpy array"

    def asarray(self, value, name):
        if isinstance(value, np.ndarray):
            reject_masked(value, name)
            return value
        try:
            return np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            error = ValueError if isinstance(exc, ValueError) else TypeError
            raise error(f"{_conversion_hint(value, name)} (NumPy: {exc})") from exc

    def is_array(self, value):
        return isinstance(value, np.ndarray)

    def check_unmasked(self, value, name):
        reject_masked(value, name)

    def overlaps(self, a, b):
        """True when ``a`` and ``b`` share memory without being the same view of it."""
        if a is b or not np.may_share_memory(a, b):
            return False
        same_view = (
            a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides
            and a.shape == b.shape
            and a.dtype == b.dtype
        )
        return not same_view and np.shares_memory(a, b)

    def shares_memory(self, a, b):
        return np.may_share_memory(a, b) and np.shares_memory(a, b)

    def to_host(self, array):
        return array

    def from_host(self, array, out=None):
        """The host ``array`` in this memory: itself, or copied into ``out``."""
        if out is None or out is array:
            return array
        np.copyto(out, array)
        return out

    def contiguous(self, array, dtype, name):
        return np.ascontiguousarray(array, dtype=dtype)

    def is_writable(self, array):
        return array.flags.writeable

    def is_c_contiguous(self, array):
        return array.flags.c_contiguous

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype)

    def copy(self, array):
        return array.copy()

    def copy_into(self, dst, src):
        np.copyto(dst, src, casting="same_kind")

    def astype(self, array, dtype):
        return array.astype(dtype, copy=False)

    def product(self, a, b, dtype):
        """``a * b`` per channel (float64 arithmetic) in ``dtype``."""
        return (np.asarray(a, np.float64) * b).astype(dtype)

    def invstd(self, var, eps):
        """``1 / sqrt(var + eps)`` of a float64 vector (IEEE: inf for a zero variance and eps)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 / np.sqrt(var + eps)


HOST = HostMemory()
