"""C backends: a shared library with the ABI of csrc/numba_bn.h behind ``backend=name``.

``register_backend("c", "plugin/libnumba_bn.so")`` loads the library with ctypes and makes
``backend="c"`` work in the functional API and in ``BatchNorm``. The library built by
``numba-bn build-plugin`` gives a backend that needs no JIT compile at start-up; the reference
backend (csrc/reference_backend.c) shows how to plug in C kernels of one's own.

How the backend protocol (:mod:`numba_bn.dispatch`) maps onto the ABI:

* ``forward_train``, ``forward_eval``, ``backward`` run in the library (ctypes releases the GIL).
  Arguments arrive validated by :mod:`numba_bn.checks`; the C side checks them again.
* A ``residual`` and an ``activation`` (the fused forward, y = activation(BN(x) + residual)) go
  through the _ex entry points of ABI 1.1 (``nbn_forward_train_ex_*``, ``nbn_forward_eval_ex_*``).
  A library without them (ABI 1.0, or a backend of one's own that has not added them yet) still
  serves every plain call; a fused one raises NotImplementedError naming the backend.
* The ABI carries statistics in the tensor's dtype: ``save_mean``/``save_invstd`` come back in it
  and go into ``backward`` in it (exact for those that ``forward_train`` returned), ``dweight``
  comes back as ``invstd * sum_dy_xmu``.
* The ABI updates running statistics with PyTorch's rule only, and checks nothing for NaN. So the
  batch mean and unbiased variance come back through running buffers that start at 0 with
  momentum 1, and the running update (PyTorch's, or the biased one of Keras/Flax/ONNX) and
  ``nan_policy="raise"`` happen here, in float64, from those float32/float64 values: running
  statistics can differ from the CPU backend's in the last bit of float32. With
  ``nan_policy="raise"`` the library writes y into scratch, copied into y only once the
  statistics are finite, so a call that raises leaves ``out=`` (x itself, perhaps) as it was.
* ``batch_stats``, ``normalize``, ``backward_sums`` and ``backward_dx`` (the eval-mode backward,
  SyncBatchNorm's split steps) have no ABI entry points: they run on the CPU backend, a residual
  and an activation of ``normalize`` with them.
* The backward of a fused forward (``backward(..., activation=, y=, grad=)``) is one call of
  ``nbn_backward_ex_*``, which writes g = dy where y > 0, else 0, into grad and runs the batch
  norm backward on it. ``activation_grad`` alone (the eval-mode and SyncBatchNorm paths) runs in
  NumPy: the ABI has no entry point for it, and the CPU backend would cost a JIT compile, which
  a C backend exists to avoid. g is dy or 0 element by element, so every way gives the same
  bits.
"""

import ctypes
import os

import numpy as np

from .. import dispatch
from ..cpu import CpuBackend
from ..stats import first_negative, running_update

ABI_MAJOR = 1  # NBN_VERSION_MAJOR of csrc/numba_bn.h
#: nbn_activation of csrc/numba_bn.h (1.1) by the ``activation`` of the Python API.
ACTIVATIONS = {None: 0, "relu": 1}

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_ARGTYPES = {
    "forward_train": [_P, _I, _I, _I, _P, _P, _D, _P, _P, _P, _P, _P, _D],
    "forward_eval": [_P, _I, _I, _I, _P, _P, _P, _P, _D, _P],
    "backward": [_P, _P, _I, _I, _I, _P, _P, _P, _P, _P, _P],
}
#: The fused entry points of ABI 1.1: the plain arguments, then residual and the activation
#: code (the backward: y, the activation code and residual_out).
_EX_ARGTYPES = {
    "forward_train_ex": [*_ARGTYPES["forward_train"], _P, ctypes.c_int],
    "forward_eval_ex": [*_ARGTYPES["forward_eval"], _P, ctypes.c_int],
    "backward_ex": [*_ARGTYPES["backward"], _P, ctypes.c_int, _P],
}
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
REQUIRED_SYMBOLS = (
    "nbn_version",
    "nbn_status_string",
    "nbn_set_num_threads",
    "nbn_get_num_threads",
    *(f"nbn_{op}_{suffix}" for op in _ARGTYPES for suffix in _SUFFIX.values()),
)
#: Exported by libraries of ABI 1.1 and later: residual= and activation= need them.
FUSED_SYMBOLS = tuple(f"nbn_{op}_{suffix}" for op in _EX_ARGTYPES for suffix in _SUFFIX.values())


def _pointer(array):
    """The data pointer of a C-contiguous array; None (NULL) for an absent (empty) one."""
    return array.ctypes.data if array is not None and array.size else None


def load_library(path_or_handle):
    """A ctypes library from a path, a ``ctypes.CDLL``, or a handle from ``dlopen``."""
    if isinstance(path_or_handle, ctypes.CDLL):
        return path_or_handle
    if isinstance(path_or_handle, int):
        return ctypes.CDLL(f"<handle {path_or_handle:#x}>", handle=path_or_handle)
    path = os.fspath(path_or_handle)
    try:
        return ctypes.CDLL(path)
    except OSError as exc:
        raise OSError(f"cannot load the C backend library {path!r}: {exc}") from None


class CBackend:
    """A shared library with the numba_bn.h ABI, as a backend of :mod:`numba_bn.dispatch`."""

    def __init__(self, name, library):
        missing = [symbol for symbol in REQUIRED_SYMBOLS if not hasattr(library, symbol)]
        if missing:
            raise ValueError(
                f"{library._name} does not export the numba_bn C ABI: missing {', '.join(missing)}"
            )
        self.name = name
        self.library = library
        library.nbn_version.restype = ctypes.c_uint32
        library.nbn_version.argtypes = []
        self.version = library.nbn_version()
        if self.version // 10000 != ABI_MAJOR:
            raise ValueError(
                f"{library._name} has ABI version {self.version} (major {self.version // 10000});"
                f" numba_bn needs major version {ABI_MAJOR}"
            )
        library.nbn_status_string.restype = ctypes.c_char_p
        library.nbn_status_string.argtypes = [ctypes.c_int]
        library.nbn_set_num_threads.argtypes = [ctypes.c_int]
        library.nbn_get_num_threads.argtypes = []
        if hasattr(library, "nbn_isa"):
            library.nbn_isa.argtypes, library.nbn_isa.restype = [], ctypes.c_char_p
        #: Whether the library has the fused entry points of ABI 1.1 (residual=, activation=).
        self.fused = all(hasattr(library, symbol) for symbol in FUSED_SYMBOLS)
        self._functions = {}
        for op, argtypes in (*_ARGTYPES.items(), *(_EX_ARGTYPES.items() if self.fused else ())):
            for dtype, suffix in _SUFFIX.items():
                function = getattr(library, f"nbn_{op}_{suffix}")
                function.argtypes, function.restype = argtypes, ctypes.c_int
                self._functions[op, dtype] = function
        self._cpu = CpuBackend()

    @property
    def isa(self):
        """The library's compiled variant in use (nbn_isa), or None if it does not say."""
        if not hasattr(self.library, "nbn_isa"):
            return None
        return self.library.nbn_isa().decode()

    def set_num_threads(self, n):
        """Worker threads of the library (n <= 0: all CPUs)."""
        self.library.nbn_set_num_threads(int(n))

    def get_num_threads(self):
        return self.library.nbn_get_num_threads()

    def _fused_op(self, op, residual, activation):
        """``op``, or its _ex entry point when there is a residual or an activation (then also
        the trailing arguments: residual pointer, activation code)."""
        if residual is None and activation is None:
            return op, ()
        if not self.fused:
            raise NotImplementedError(
                f"C backend {self.name!r} ({self.library._name}, ABI version {self.version}) "
                "lacks the fused entry points of numba_bn.h 1.1 (nbn_forward_train_ex_*, "
                "nbn_forward_eval_ex_*, nbn_backward_ex_*) that residual= and activation= need"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"C backend {self.name!r}: unknown activation {activation!r}")
        return f"{op}_ex", (_pointer(residual), ACTIVATIONS[activation])

    def _call(self, op, dtype, *args):
        status = self._functions[op, dtype](*args)
        if status != 0:
            message = self.library.nbn_status_string(status).decode(errors="replace")
            raise RuntimeError(f"C backend {self.name!r}: nbn_{op}_{_SUFFIX[dtype]}: {message}")

    # --------------------------------------------------------------- through the library
    def forward_train(self, x, *, weight, bias, eps, y, mean, invstd, m2, running=None,
                      nan_check=False, residual=None, activation=None, saved=None):  # fmt: skip
        op, fused = self._fused_op("forward_train", residual, activation)
        outer, channels, inner = x.shape
        if mean is None:  # not wanted
            mean, invstd, m2 = np.empty(channels), np.empty(channels), np.empty(channels)
        save_mean, save_invstd, save_m2 = mean, invstd, m2
        count = outer * inner
        mean, invstd = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
        batch_mean, batch_var = np.zeros(channels, x.dtype), np.zeros(channels, x.dtype)
        # the library checks nothing for NaN and writes y as it goes: with the check, into
        # scratch, so that y (which may be x) is untouched when the check fails
        y_written = np.empty_like(y) if nan_check else y
        self._call(
            op,
            x.dtype,
            _pointer(x),
            outer,
            channels,
            inner,
            _pointer(weight),
            _pointer(bias),
            eps,
            _pointer(y_written),
            _pointer(mean),
            _pointer(invstd),
            _pointer(batch_mean),
            _pointer(batch_var),
            1.0,  # momentum 1 from zeros: the running buffers receive the batch statistics
            *fused,
        )
        save_mean[:] = mean
        save_invstd[:] = invstd
        var_unbiased = batch_var.astype(np.float64)
        save_m2[:] = var_unbiased * (count - 1)
        if nan_check:
            if not (np.isfinite(save_mean).all() and np.isfinite(save_m2).all()):
                return False
            np.copyto(y, y_written)
        if running is not None:
            running_update(*running[:2], float(count), save_mean, save_m2, *running[2:])
        if saved is not None:
            saved[0], saved[1] = save_mean, save_invstd
        return True

    def forward_eval(self, x, *, weight, bias, running_mean, running_var, eps, y, residual=None,
                     activation=None):  # fmt: skip
        """As the CPU backend's: -1, or the index of the first negative running variance
        with nothing written (checked here: the library normalises whatever it is given)."""
        negative = first_negative(running_var)
        if negative >= 0:
            return negative
        op, fused = self._fused_op("forward_eval", residual, activation)
        outer, channels, inner = x.shape
        self._call(
            op,
            x.dtype,
            _pointer(x),
            outer,
            channels,
            inner,
            _pointer(weight),
            _pointer(bias),
            _pointer(running_mean),
            _pointer(running_var),
            eps,
            _pointer(y),
            *fused,
        )
        return -1

    def backward(self, dy, x, *, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, activation=None,
                 y=None, grad=None, grads=None):  # fmt: skip
        """The plain backward, or with an ``activation`` nbn_backward_ex: the gradient through
        it (from the forward's ``y``) into ``grad``, then the backward on it, in one call. The
        library's dweight and dbias land in ``grads`` when given."""
        op, through = "backward", ()
        if activation is not None:
            op, (_, code) = self._fused_op("backward", None, activation)
            through = (_pointer(y), code, _pointer(grad))
        outer, channels, inner = x.shape
        mean_t, invstd_t = mean.astype(x.dtype), invstd.astype(x.dtype)
        if grads is None:
            grads = np.empty((2, channels), x.dtype)
        dweight, dbias = grads
        self._call(
            op,
            x.dtype,
            _pointer(dy),
            _pointer(x),
            outer,
            channels,
            inner,
            _pointer(weight),
            _pointer(mean_t),
            _pointer(invstd_t),
            _pointer(dx),
            _pointer(dweight),
            _pointer(dbias),
            *through,
        )
        if sum_dy is None:  # not wanted
            return
        sum_dy[:] = dbias
        # dweight = invstd * sum_dy_xmu, in float64; nothing to recover where invstd = 0
        invstd64 = invstd_t.astype(np.float64)
        sum_dy_xmu[:] = 0.0
        np.divide(dweight.astype(np.float64), invstd64, out=sum_dy_xmu, where=invstd64 != 0)

    # ------------------------------------------------- not in the ABI: the CPU backend's
    def batch_stats(self, x, **vectors):
        return self._cpu.batch_stats(x, **vectors)

    def normalize(self, x, **vectors):
        """The CPU backend's, residual= and activation= included."""
        self._cpu.normalize(x, **vectors)

    # ----------------------------------------------------------------------- in NumPy
    def activation_grad(self, dy, y, *, activation, grad):
        """grad (=, like dy) = dy where y > 0, else 0 (``activation="relu"``): the gradient
        through the fused forward's activation, from its output ``y``. NumPy, exact (see the
        module's docstring); grad may be dy."""
        if activation != "relu":
            raise ValueError(f"activation_grad: unknown activation {activation!r}")
        cut = np.logical_not(y > 0)  # before grad is written: NaN in y cuts too
        np.copyto(grad, dy)
        np.copyto(grad, 0, where=cut)

    def backward_sums(self, dy, x, **vectors):
        self._cpu.backward_sums(dy, x, **vectors)

    def backward_dx(self, dy, x, **vectors):
        self._cpu.backward_dx(dy, x, **vectors)


def register_backend(
    name: str, path_or_handle: str | os.PathLike[str] | ctypes.CDLL | int
) -> CBackend:
    """Load a C library with the ABI of ``numba_bn.h`` and make ``backend=name`` use it.

    Parameters
    ----------
    name : str
        The name to pass as ``backend=`` to the functional API and ``BatchNorm``; it may replace
        an earlier C backend, not a built-in one ("cpu", "cuda").
    path_or_handle : str, os.PathLike, ctypes.CDLL or int
        The shared library (a path, an already loaded ``ctypes.CDLL``, or a ``dlopen`` handle),
        e.g. ``libnumba_bn.so`` from ``numba-bn build-plugin``.

    Returns
    -------
    CBackend
        The registered backend (``.isa``, ``.version``, ``.set_num_threads(n)``).
    """
    if name in dispatch.names() and not isinstance(dispatch.get(name), CBackend):
        raise ValueError(f"backend name {name!r} is taken by another backend; choose another name")
    backend = CBackend(name, load_library(path_or_handle))
    dispatch.register(name, backend)
    return backend
