"""Which backend and which device run a call.

Backends: a backend implements, on validated C-contiguous canonical ``(outer, C, inner)`` views,
the interface of :class:`numba_bn.cpu.CpuBackend`, every per-channel argument named:

* whole operations, which a backend may fuse: ``forward_train(x, *, weight, bias, eps, y,
  mean, invstd, m2, running=None, nan_check=False, residual=None, activation=None)``,
  ``forward_eval(x, *, weight, bias, running_mean, running_var, eps, y, residual=None,
  activation=None)``, ``backward(dy, x, *, mean, invstd, weight, dx, sum_dy, sum_dy_xmu,
  activation=None, y=None, grad=None)`` (a host backend's also takes ``grads=None``: a (2, C)
  array of x's dtype that receives dweight = invstd * sum_dy_xmu and dbias = sum_dy, rounded
  from float64, when given; its forward_train takes ``saved=None``, a (2, C) array of x's dtype
  that receives mean and invstd rounded as NumPy's astype rounds them; and it takes None for
  ``mean``, ``invstd`` and ``m2`` together, and for ``sum_dy`` and ``sum_dy_xmu`` together:
  not wanted, the backend keeps its own; its forward_eval returns -1, or the index of the first
  negative value of ``running_var`` with nothing written, which the plain calls then explain);
* the split steps that an exchange (SyncBatchNorm's ranks) goes between: ``batch_stats(x, *,
  mean, m2)`` -> count, ``normalize(x, *, mean, invstd, weight, bias, y, residual=None,
  activation=None)``, ``backward_sums(dy, x, *, mean, sum_dy, sum_dy_xmu)``,
  ``backward_dx(dy, x, *, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx)``;
* the epilogue (issue 13): the forwards' ``residual`` (a view like x) and ``activation`` (None
  or "relu") give ``y = activation(BN(x) + residual)`` in the elementwise pass;
  ``activation_grad(dy, y, *, activation, grad)`` writes the gradient through the activation
  (dy where y > 0), on which the plain backward then runs; ``backward`` with an activation does
  both (the CPU channel by channel, while grad is in L2).

mean, invstd, m2 and the sums are float64; a backend builds its own elementwise coefficients
from them. Its arrays live in its ``memory`` (:mod:`numba_bn.memory`; host NumPy when it has
none).

Devices: ``device="auto"`` runs where the arrays are: on the CUDA backend when they expose
``__cuda_array_interface__`` (CuPy, PyTorch, Numba device arrays, ...), on the host backend for
NumPy arrays. ``device="cpu"`` / ``device="cuda"`` force it; NumPy arrays with
``device="cuda"`` are copied to the GPU, and the results come back as NumPy arrays. Host and
device arrays in one call are an error that names which argument is where.
"""

import functools
import inspect

import numpy as np

from .cpu import CpuBackend
from .cuda import CudaBackend, require_cuda
from .memory import HOST, host_view, is_device_array

DEVICES = ("auto", "cpu", "cuda")

_backends = {}
_on_host = {}  # the registered backends whose arrays are host NumPy arrays


def register(name, backend):
    """Make ``backend`` available as ``backend=name`` in the functional API and BatchNorm."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    _backends[name] = backend
    _on_host.pop(name, None)
    if inspect.getattr_static(backend, "memory", None) is None:
        _on_host[name] = backend


def on_host(name):
    """The backend ``name`` when it is registered and takes host NumPy arrays, else None."""
    return _on_host.get(name) if type(name) is str else None


def get(name):
    try:
        return _backends[name]
    except KeyError:
        known = ", ".join(sorted(_backends))
        raise ValueError(f"backend={name!r} is not registered; known backends: {known}") from None


def memory(backend):
    """Where ``backend``'s arrays live: its ``memory``, or host NumPy arrays."""
    return getattr(backend, "memory", HOST)


register("cpu", CpuBackend())
register("cuda", CudaBackend())


def names():
    return sorted(_backends)


# ------------------------------------------------------------------------------- devices
def memory_of(array):
    """The memory an array returned by the functional layer lives in."""
    return _backends["cuda"].memory if is_device_array(array) else HOST


def move(array, side):
    """``array`` on ``side`` ("cpu" or "cuda"): a copy when it is on the other side."""
    if side == "cuda":
        return array if is_device_array(array) else _backends["cuda"].memory.to_device(array)
    return memory_of(array).to_host(array)


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
    own ``inplace`` arrays; its other device arrays come back as NumPy arrays when the inputs
    were NumPy, else as the kind of the first CUDA input in ``arrays`` order (CuPy in, CuPy out;
    a torch CUDA tensor in, torch tensors out; Numba device arrays otherwise), zero-copy.
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
            device_memory = _backends["cuda"].memory
            bound.arguments["backend"] = "cuda"
            moved, callers = {}, {}
            for name, value in given.items():
                if name in on_device:
                    moved[name] = device_memory.adopt(value)
                else:  # a torch CPU tensor or a DLPack object, as NumPy views it
                    moved[name] = device_memory.to_device(host_view(value))
                bound.arguments[name] = moved[name]
                if name in inplace:
                    callers[id(moved[name])] = value
            result = function(*bound.args, **bound.kwargs)
            for name in on_host:
                if name in inplace:
                    np.copyto(host_view(given[name]), moved[name].copy_to_host())
            if on_host:  # NumPy inputs (device="cuda"): NumPy results
                returned = _copy_to_host
            else:  # the kind of the first CUDA input: CuPy, torch, or Numba device arrays
                returned = device_memory.returner(given[on_device[0]])
            return _returned(result, callers, returned)

        return call

    return decorate


def _copy_to_host(array):
    return array.copy_to_host()


def _returned(value, callers, returned):
    """``value`` with the caller's own arrays (``callers``: id -> array) in place of their
    device views, and the other device arrays passed through ``returned`` (when not None)."""
    if isinstance(value, tuple):
        items = [_returned(item, callers, returned) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if id(value) in callers:
        return callers[id(value)]
    if returned is not None and is_device_array(value):
        return returned(value)
    return value
