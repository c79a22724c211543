"""The plain host call, recognised in a few attribute checks.

Most calls pass C-contiguous NumPy float32/float64 arrays whose per-channel vectors match x, and
ordinary float scalars. Such a call needs none of the conversions, copies and explanations of
:mod:`numba_bn.checks`: recognising it costs about a microsecond where the full checks cost ten,
which is most of a call on an (N, C) batch of an MLP.

Each function here returns what the kernels take, or None when an argument is anything but
plain; :mod:`numba_bn.ops` then takes the full path, which accepts everything accepted here and
explains what it rejects (tests/test_hostcall.py holds the two paths to the same bits and the
same errors). Nothing here raises.
"""

import math

import numpy as np

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
_EMPTY = {F32: np.empty(0, F32), F64: np.empty(0, F64)}  # "absent": no elements to share


def canonical_view(x, axis):
    """The ``(outer, C, inner)`` view of a plain ``x`` (an ``np.ndarray`` of float32 or
    float64, C-contiguous, rank >= 2) with channels on the int ``axis``; else None."""
    if type(x) is not np.ndarray or type(axis) is not int:
        return None
    dtype = x.dtype
    if (dtype is not F32 and dtype is not F64) or not x.flags.c_contiguous:
        return None
    key = (x.shape, axis)
    shape = _VIEW_SHAPES.get(key)
    if shape is None:
        shape = _view_shape(*key)
        if shape is None:
            return None
        if len(_VIEW_SHAPES) < _VIEW_SHAPES_MAX:
            _VIEW_SHAPES[key] = shape
    return x.reshape(shape)


#: (x.shape, axis) -> the canonical view's shape, for the shapes a program calls with (a few):
#: a lookup instead of the products and the axis arithmetic (0.3-0.5 us less for a 4-D x)
_VIEW_SHAPES = {}
_VIEW_SHAPES_MAX = 256


def _view_shape(shape, axis):
    """(outer, C, inner) of ``shape`` with channels on ``axis`` (negative counts from the end),
    or None for a rank below 2 or an axis out of range."""
    ndim = len(shape)
    if ndim < 2 or not -ndim <= axis < ndim:
        return None
    axis %= ndim
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def like(other, x, view):
    """``other`` (dy, say) seen as ``view``, the canonical view of ``x``, when it is plain with
    the shape and dtype of x; else None."""
    if type(other) is not np.ndarray or other.dtype is not x.dtype or other.shape != x.shape:
        return None
    return other.reshape(view.shape) if other.flags.c_contiguous else None


def output(out, x, *inputs):
    """The caller's ``out`` when a plain call can write its result like ``x`` into it: a
    writable plain array like x that each of ``inputs`` (plain arrays or None) either is (in
    place) or shares no memory with (np.may_share_memory: their bounds); else None (the checks
    explain, or take an alias that is the same view). A call without out= makes its own
    array, ``np.empty(x.shape, x.dtype)``, without this call (~0.1 us of a small one)."""
    if (type(out) is not np.ndarray or out.dtype is not x.dtype or out.shape != x.shape
            or not out.flags.c_contiguous or not out.flags.writeable):  # fmt: skip
        return None
    for value in inputs:
        if value is not out and value is not None and np.may_share_memory(out, value):
            return None
    return out


def vector(value, channels, dtype):
    """A plain per-channel vector (C,) of ``dtype`` as it is, the zero-length "absent" array for
    None; else None."""
    if value is None:
        return _EMPTY[dtype]
    if type(value) is not np.ndarray or value.dtype is not dtype or value.shape != (channels,):
        return None
    return value if value.flags.c_contiguous else None


def buffer(value, channels, dtype):
    """A running buffer the kernels update in place: a plain vector that is writable; else None
    (also for None: a running buffer is given or the call has none)."""
    if value is None:
        return None
    value = vector(value, channels, dtype)
    return value if value is not None and value.flags.writeable else None


def statistic(value, channels):
    """A saved statistic (mean, invstd) as the float64 vector the kernels take; else None."""
    if type(value) is not np.ndarray or value.shape != (channels,):
        return None
    if value.dtype is F64:
        return value if value.flags.c_contiguous else None
    return value.astype(F64) if value.dtype is F32 else None


def training_eps(eps):
    return type(eps) is float and 0.0 < eps <= math.inf


def eval_eps(eps):
    return type(eps) is float and 0.0 <= eps <= math.inf


def activation(value):
    """Whether ``value`` names an activation as the kernels take it (None or "relu")."""
    return value is None or (type(value) is str and value == "relu")


def residual(value, x, view):
    """(True, the residual as ``view``) for None or a plain array like x; (False, None) else."""
    if value is None:
        return True, None
    value = like(value, x, view)
    return value is not None, value


def momentum(value):
    return type(value) is float and 0.0 <= value <= 1.0
