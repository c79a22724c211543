"""What an array is: host (NumPy) or CUDA, and the few memory operations the checks need there.

A leaf of the package: it imports nothing of numba_bn. :data:`HOST` serves NumPy arrays; the CUDA
counterpart is :data:`numba_bn.cuda.arrays.DEVICE`. Both implement :class:`Memory`, so
validation and allocation (:mod:`numba_bn.functional`) are written once for both. Where a call
runs is decided above both backends, in :mod:`numba_bn.dispatch`.

Host arrays of other libraries are NumPy arrays here: :func:`host_view` is NumPy's view, without
a copy, of anything that exports host memory through ``__array_interface__`` (or
``__array_struct__``), the buffer protocol, or ``__dlpack__`` (``np.from_dlpack``: JAX CPU
arrays; torch CPU tensors through ``Tensor.numpy()``, the same view faster). A view shares the
caller's memory, so a running buffer or ``out=`` given as a torch tensor is updated in place; a
read-only export gives a read-only view.

bfloat16 is ``ml_dtypes.bfloat16`` in NumPy, an optional dependency imported only when a torch
bfloat16 tensor comes in (NumPy's DLPack import has no bfloat16): the tensor's bits are viewed as
int16 and seen as bfloat16, still without a copy (:func:`_torch_bfloat16_view`).
"""

import sys
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


def dtype_of(array):
    """The NumPy dtype of an array of any kind: a torch CUDA tensor (a result returned in the
    caller's kind) names its own in torch's terms, read here from its CUDA array interface."""
    dtype = array.dtype
    if isinstance(dtype, np.dtype):
        return dtype
    return np.dtype(array.__cuda_array_interface__["typestr"])


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
        return f"{name} is a torch tensor NumPy cannot view: pass {name}.detach().cpu()"
    if hasattr(value, "__dlpack__"):
        return f"{name} exports __dlpack__, but not as host memory NumPy can view"
    return f"{name} must be an array or a rectangular nested sequence of numbers"


def _exports_buffer(value):
    try:
        with memoryview(value):
            return True
    except TypeError:
        return False


def _is_torch_bfloat16(value):
    """True for a torch bfloat16 tensor NumPy may view: in host memory, not requiring grad (the
    export of one that does explains itself). torch is never imported here: a tensor's module is
    loaded already."""
    torch = sys.modules.get("torch")
    return (
        torch is not None
        and isinstance(value, torch.Tensor)
        and value.dtype == torch.bfloat16
        and value.device.type == "cpu"
        and not value.requires_grad
    )


def _torch_numpy(value):
    """NumPy's view of a torch CPU tensor of a NumPy dtype, ``Tensor.numpy()``: the memory, shape
    and strides ``np.from_dlpack`` gives, in ~0.7 us against ~2.4. None for anything else, and
    for a tensor it refuses (one that requires grad, bfloat16, on a GPU), whose export below
    takes it or explains why not: those are asked first, since a refusal raises (~9 us)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.Tensor):
        return None
    if value.requires_grad or value.is_cuda or value.dtype is torch.bfloat16:
        return None
    try:
        return value.numpy()
    except (RuntimeError, TypeError):  # another device or dtype NumPy has not
        return None


def _bfloat16(name):
    """ml_dtypes' bfloat16 dtype, imported at the first torch bfloat16 tensor; TypeError naming
    ``name`` and the extra to install when ml_dtypes is missing."""
    try:
        import ml_dtypes
    except ImportError as exc:
        raise TypeError(
            f"{name} is a torch bfloat16 tensor: NumPy holds bfloat16 through the optional "
            f'ml_dtypes package; pip install "numba-bn[bfloat16]" (or pass {name}.float())'
        ) from exc
    return np.dtype(ml_dtypes.bfloat16)


def _torch_bfloat16_view(tensor, dtype):
    """NumPy's view of a torch bfloat16 CPU tensor as ``dtype`` (ml_dtypes' bfloat16), without a
    copy: its bits cross DLPack as int16, which NumPy takes, and have the same size."""
    return np.from_dlpack(tensor.view(sys.modules["torch"].int16)).view(dtype)


def _exported(value, name):
    """``value`` itself for an ndarray (TypeError for a masked one), else NumPy's view of the host
    memory ``value`` exports, without a copy; None when it exports none. TypeError (ValueError
    for NumPy's ValueError) naming ``name`` when an export fails (a torch tensor that requires
    grad, a DLPack tensor on another device, a torch bfloat16 one without ml_dtypes)."""
    if isinstance(value, np.ndarray):
        reject_masked(value, name)
        return value
    view = _torch_numpy(value)
    if view is not None:
        return view
    bfloat16 = _bfloat16(name) if _is_torch_bfloat16(value) else None
    try:
        if bfloat16 is not None:
            return _torch_bfloat16_view(value, bfloat16)
        if (
            hasattr(value, "__array_interface__")
            or hasattr(value, "__array_struct__")
            or _exports_buffer(value)
        ):
            return np.asarray(value)  # these protocols describe the memory: never a copy
        if hasattr(value, "__dlpack__"):
            return np.from_dlpack(value)  # zero-copy or an error, never a copy
    except (TypeError, ValueError, RuntimeError, BufferError) as exc:
        error = ValueError if isinstance(exc, ValueError) else TypeError
        raise error(f"{_conversion_hint(value, name)} (NumPy: {exc})") from exc
    return None


def host_view(value):
    """``value`` as NumPy sees it without a copy when it is a host array of another library (a
    torch CPU tensor, a ``__dlpack__`` or buffer-protocol object); anything else as it is
    (NumPy and CUDA arrays, None, sequences, and exports that fail, which the checks explain)."""
    if value is None or type(value) is np.ndarray:
        return value
    view = _torch_numpy(value)  # first: asking a torch CPU tensor for its CUDA interface raises
    if view is not None:
        return view
    if is_device_array(value):
        return value
    try:
        array = _exported(value, "value")
    except (TypeError, ValueError):
        return value
    return value if array is None else array


def host_views(*values):
    """The arguments of a call as NumPy's views (:func:`host_view` of each) when the first is a
    torch CPU tensor NumPy views, so that a plain call of tensors takes the plain path of
    ndarrays; else the values as they are (CUDA arrays, sequences and other host arrays take the
    checked path, which converts or explains them, without a look here)."""
    first = _torch_numpy(values[0])
    if first is None:
        return values
    return (first, *[host_view(value) for value in values[1:]])


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
    def returner(self, value): ...  # results -> the kind of the caller's ``value``, or None


class HostMemory:
    """NumPy arrays in host memory, and NumPy's views of other host arrays (:func:`host_view`)."""

    name = "cpu"
    array_kind = (
        "a numpy array (or an object NumPy views without a copy: the buffer protocol, "
        "__array_interface__ or __dlpack__)"
    )

    def asarray(self, value, name):
        """An input (x, dy, a residual) as a NumPy array: a view of any host array, else a
        conversion (a nested sequence is copied)."""
        array = _exported(value, name)
        if array is not None:
            return array
        try:
            return np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            error = ValueError if isinstance(exc, ValueError) else TypeError
            raise error(f"{_conversion_hint(value, name)} (NumPy: {exc})") from exc

    def view(self, value, name):
        """``value`` as a NumPy array over its own memory, for arguments the kernels may write
        (running buffers, ``out=``) or take as they are (per-channel vectors): an ndarray itself
        or NumPy's view of another host array; TypeError naming ``name`` for anything else (a
        list: converting it would hide that it is not updated)."""
        array = _exported(value, name)
        if array is None:
            raise TypeError(f"{name} must be {self.array_kind}, got {type(value).__name__}")
        return array

    def is_array(self, value):
        return isinstance(value, np.ndarray)

    def check_unmasked(self, value, name):
        reject_masked(value, name)

    def overlaps(self, a, b):
        """True when ``a`` and ``b`` share memory without being the same view of it."""
        a, b = host_view(a), host_view(b)
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
        a, b = host_view(a), host_view(b)
        return np.may_share_memory(a, b) and np.shares_memory(a, b)

    def to_host(self, array):
        return host_view(array)

    def from_host(self, array, out=None):
        """The host ``array`` in this memory: itself, or copied into ``out``."""
        if out is None or out is array:
            return array
        np.copyto(out, array)
        return out

    def returner(self, value):
        """None: results for host inputs are NumPy arrays, whatever kind came in."""
        return None

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
        np.copyto(host_view(dst), src, casting="same_kind")

    def astype(self, array, dtype):
        return array.astype(dtype, copy=False)

    def product(self, a, b, dtype):
        """``a * b`` per channel (float64 arithmetic) in ``dtype``."""
        return np.multiply(host_view(a), b, dtype=np.float64).astype(dtype)  # no float64 copy

    def invstd(self, var, eps):
        """``1 / sqrt(var + eps)`` of a float64 vector (IEEE: inf for a zero variance and eps)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 / np.sqrt(var + eps)


HOST = HostMemory()
