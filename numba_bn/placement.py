"""Which device runs a call, and the few memory operations the functional layer needs there.

``device="auto"`` runs where the arrays are: on the CUDA backend when they expose
``__cuda_array_interface__`` (CuPy, PyTorch, Numba device arrays, ...), on the host backend for
NumPy arrays. ``device="cpu"`` / ``device="cuda"`` force it; NumPy arrays with
``device="cuda"`` are copied to the GPU, and the results come back as NumPy arrays. Host and
device arrays in one call are an error that names which argument is where.

A backend says where its arrays live through a ``memory`` attribute (host by default):
:data:`HOST` here, the CUDA one in :mod:`numba_bn.cuda.arrays`. Both offer the operations below,
so validation and allocation in :mod:`numba_bn.functional` are written once.
"""

import functools
import inspect

import numpy as np

DEVICES = ("auto", "cpu", "cuda")
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


def memory_of(array):
    """The memory an array returned by the functional layer lives in."""
    if is_device_array(array):
        from .cuda.arrays import DEVICE

        return DEVICE
    return HOST


def move(array, side):
    """``array`` on ``side`` ("cpu" or "cuda"): a copy when it is on the other side."""
    if side == "cuda":
        if is_device_array(array):
            return array
        from .cuda import require_cuda

        require_cuda()
        from .cuda.arrays import DEVICE

        return DEVICE.to_device(array)
    if is_device_array(array):
        from .cuda.arrays import DEVICE

        return DEVICE.adopt(array).copy_to_host()
    return array


# --------------------------------------------------------------------------------- placement
def _names(names):
    return ", ".join(names) + (" is" if len(names) == 1 else " are")


def resolve_device(device, on_device, on_host):
    """The device ("cpu" or "cuda") of a call whose named arrays are on_device / on_host."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        if on_device:
            raise TypeError(
                f"device='cpu', but {_names(on_device)} on the CUDA device: copy them to the host "
                "(numba: a.copy_to_host(), CuPy: a.get()) or use device='cuda'"
            )
        return "cpu"
    if on_device and on_host:
        raise ValueError(
            f"arrays on two devices: {_names(on_device)} on the CUDA device, {_names(on_host)} "
            "in host memory (NumPy). Pass them all on one side: numba.cuda.to_device(a) copies a "
            "NumPy array to the GPU, d.copy_to_host() brings one back"
        )
    if device == "cuda" or on_device:
        from .cuda import require_cuda

        require_cuda()
        return "cuda"
    return "cpu"


def placed(arrays, inplace=()):
    """Run the decorated function on the device that ``device=`` or its arrays name.

    The wrapper takes a keyword ``device`` ("auto", "cpu", "cuda") and sets ``backend="cuda"``
    for the GPU. ``arrays`` names the array parameters; ``inplace`` those the function updates.
    On the GPU, device arrays are viewed as Numba device arrays (no copy) and NumPy arrays
    (``device="cuda"``) are copied over; afterwards the ``inplace`` NumPy arrays are updated
    from their copies, and the result (a value, a tuple or a NamedTuple) gives back the caller's
    own ``inplace`` arrays, and NumPy arrays for the other device arrays when the inputs were
    NumPy.
    """

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def call(*args, device="auto", **kwargs):
            if device in ("auto", "cpu") and not any(
                map(is_device_array, (*args, *kwargs.values()))
            ):
                return function(*args, **kwargs)  # the common host call, without binding
            bound = signature.bind(*args, **kwargs)
            given = {n: bound.arguments[n] for n in arrays if bound.arguments.get(n) is not None}
            on_device = [name for name, value in given.items() if is_device_array(value)]
            on_host = [name for name in given if name not in on_device]
            if resolve_device(device, on_device, on_host) == "cpu":
                return function(*bound.args, **bound.kwargs)
            backend = bound.arguments.get("backend", "cpu")
            if backend not in ("cpu", "cuda"):
                raise ValueError(
                    f"backend={backend!r} runs on the host; CUDA arrays run on the 'cuda' backend"
                )
            from .cuda.arrays import DEVICE

            bound.arguments["backend"] = "cuda"
            moved, callers = {}, {}
            for name, value in given.items():
                moved[name] = DEVICE.adopt(value) if name in on_device else DEVICE.to_device(value)
                bound.arguments[name] = moved[name]
                if name in inplace:
                    callers[id(moved[name])] = value
            result = function(*bound.args, **bound.kwargs)
            for name in on_host:
                if name in inplace:
                    np.copyto(given[name], moved[name].copy_to_host())
            return _returned(result, callers, to_host=bool(on_host))

        return call

    return decorate


def _returned(value, callers, to_host):
    """``value`` with the caller's own arrays (``callers``: id -> array) in place of their
    device views, and other device arrays copied to NumPy when ``to_host``."""
    if isinstance(value, tuple):
        items = [_returned(item, callers, to_host) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if id(value) in callers:
        return callers[id(value)]
    if to_host and is_device_array(value):
        return value.copy_to_host()
    return value
