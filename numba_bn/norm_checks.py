"""The arguments of group, layer and instance norm (:mod:`numba_bn.norms`): the checks, with
the error each bad argument gets, the channels-first view the kernels take, and the plain call.

As batch norm's (:mod:`numba_bn.checks`), every check runs before anything is written. The plain
call (the counterpart of :mod:`numba_bn.hostcall`) is recognised in a few attribute checks:
C-contiguous NumPy float32/float64 x with channels on axis 1 and no empty dimension, vectors of
x's dtype, Python ints and floats, no ``out=``; its recognisers return None for anything else,
which then takes the checks (the plain path never raises).
"""

import math
import numbers

import numpy as np

from . import hostcall
from .checks import check_array, check_out, compute_dtype
from .layout import normalize_axis
from .memory import HOST, is_device_array


# ------------------------------------------------------------------------------ checks
def refuse_device(**arrays):
    """TypeError naming the first CUDA array of a layer norm call: layer norm runs on the CPU
    only (its per-element affine has no CUDA kernel)."""
    for name, value in arrays.items():
        if is_device_array(value):
            raise TypeError(
                f"{name} is a CUDA array: layer norm runs on the CPU only (its per-element "
                "affine has no CUDA kernel yet; group and instance norm take CUDA arrays, "
                "docs/norms.md); pass NumPy arrays"
            )


def check_input(value, name, min_ndim):
    if is_device_array(value):  # group and instance norm send CUDA arrays to norm_cuda first
        raise TypeError(
            f"{name} is a CUDA array where a host (NumPy) array is expected: group and instance "
            "norm take CUDA arrays for all their arrays or none; layer norm runs on the CPU only "
            "(docs/norms.md)"
        )
    array = HOST.asarray(value, name)
    compute_dtype(array.dtype, name)
    if array.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {array.shape}"
        )
    return array


def check_count(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_groups(num_groups, channels):
    """``num_groups`` as an int that divides ``channels``."""
    num_groups = check_count(num_groups, "num_groups")
    if channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must divide the {channels} channels of x "
            f"(num_channels ({channels}) must be divisible by num_groups ({num_groups}))"
        )
    return num_groups


def check_normalized_shape(normalized_shape, shape=None):
    """``normalized_shape`` (an int or a sequence of ints) as a tuple; with ``shape`` (x's),
    ValueError unless it is x's trailing dimensions."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    try:
        dims = tuple(normalized_shape)
    except TypeError:
        raise TypeError(
            "normalized_shape must be an int or a sequence of ints, got "
            f"{type(normalized_shape).__name__} {normalized_shape!r}"
        ) from None
    if not dims or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in dims
    ):
        raise ValueError(
            f"normalized_shape must be one or more non-negative ints, got {normalized_shape!r}"
        )
    dims = tuple(int(d) for d in dims)
    if shape is not None and tuple(shape[len(shape) - len(dims) :]) != dims:
        raise ValueError(
            f"normalized_shape={dims} must be the trailing dimensions of x, got x of shape "
            f"{tuple(shape)}"
        )
    return dims


def check_spatial_dims(spatial_dims):
    """None, or the number of spatial dimensions of an instance norm input as an int >= 1
    (PyTorch's InstanceNorm1d, 2d, 3d: 1, 2, 3)."""
    return None if spatial_dims is None else check_count(spatial_dims, "spatial_dims")


def instance_batch(x, spatial_dims):
    """(x as a batch, whether x is one sample). Without ``spatial_dims`` x is a batch, as in
    PyTorch's functional (x is returned as given). With it, x of ``spatial_dims + 2`` dimensions
    is a batch and x of ``spatial_dims + 1`` one sample, seen as a batch of one (a view, as
    PyTorch's modules decide); any other rank is a ValueError naming x and spatial_dims."""
    if spatial_dims is None:
        return x, False
    x = check_input(x, "x", 0)
    if x.ndim == spatial_dims + 2:
        return x, False
    if x.ndim == spatial_dims + 1:
        return x[None], True
    raise ValueError(
        f"x must have {spatial_dims + 2} dimensions (a batch) or {spatial_dims + 1} (one "
        f"sample) for spatial_dims={spatial_dims}, got shape {x.shape}"
    )


def sample_out(out, sample):
    """``out`` (or None) checked for one sample ``sample`` (x without its batch axis): (NumPy's
    view of it to return, its batch-of-one view for the kernels)."""
    if out is None:
        return None, None
    out = check_norm_out(out, sample)
    return out, out[None]


def check_norm_out(out, like, **inputs):
    """``out`` (or None) as checks.check_out sees it: NumPy's view of the caller's array."""
    return None if out is None else check_out(out, like, HOST, "out", **inputs)


def check_dy(dy, x):
    dy = check_input(dy, "dy", 0)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x, {x.dtype}, got {dy.dtype}")
    return dy


def check_stat(value, name, shape):
    """A saved statistic as a C-contiguous float64 array of ``shape``."""
    value = check_array(value, name)
    if value.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {value.shape}")
    compute_dtype(value.dtype, name)
    return np.ascontiguousarray(value, dtype=np.float64)


def element_vectors(x, shape, **vectors):
    """Layer norm's weight and bias: ``shape``, one dtype (x's or its compute dtype), returned
    flat in the compute dtype (zero-length when absent)."""
    dtype = compute_dtype(x.dtype)
    given = {}
    for name, vector in vectors.items():
        if vector is None:
            continue
        vector = check_array(vector, name)
        if vector.shape != shape:
            raise ValueError(f"{name} must have shape normalized_shape={shape}, got {vector.shape}")
        if vector.dtype not in (x.dtype, dtype):
            raise TypeError(f"{name} has dtype {vector.dtype}; expected {x.dtype} (as x)")
        given[name] = vector
    if len({v.dtype for v in given.values()}) > 1:
        raise TypeError("weight and bias must share one dtype")
    empty = np.empty(0, dtype)
    return tuple(
        np.ascontiguousarray(given[n], dtype).reshape(-1) if n in given else empty for n in vectors
    )


class ChannelsFirst:
    """x checked, seen channels first in its compute dtype as (N, C, S): S is the product of
    the dimensions other than the batch (0) and the channels (``axis``)."""

    def __init__(self, x, axis):
        x = check_input(x, "x", 2)
        self.x = x
        self.axis = normalize_axis(axis, x.ndim)
        if self.axis == 0:
            raise ValueError("axis must not be 0, the batch axis: channels are on another axis")
        self.dtype = compute_dtype(x.dtype)
        self.moved = (x.shape[0], x.shape[self.axis]) + tuple(
            d for i, d in enumerate(x.shape) if i not in (0, self.axis)
        )
        self.shape = (x.shape[0], x.shape[self.axis], math.prod(self.moved[2:]))

    def view(self, array):
        """``array`` (x's shape) as a C-contiguous (N, C, S) array in the compute dtype."""
        moved = array if self.axis == 1 else np.moveaxis(array, self.axis, 1)
        return np.ascontiguousarray(moved, dtype=self.dtype).reshape(self.shape)

    def output(self, out):
        """(the array to return or None, the (N, C, S) array the kernels write)."""
        if self.axis == 1 and self.dtype == self.x.dtype:
            target = np.empty(self.x.shape, self.dtype) if out is None else out
            return target, target.reshape(self.shape)
        return out, np.empty(self.shape, self.dtype)

    def finish(self, out, work):
        """The result in x's shape, layout and dtype (written into ``out`` when given)."""
        if out is not None and np.may_share_memory(out, work):  # work is a view of out
            return out
        result = np.moveaxis(work.reshape(self.moved), 1, self.axis)
        if out is None:
            return np.ascontiguousarray(result, dtype=self.x.dtype)
        np.copyto(out, result, casting="same_kind")
        return out


# ------------------------------------------------------------------------- the plain call
def plain_grid(x, axis):
    """x as (N, C, S) for a plain call: a C-contiguous float32/float64 ndarray of rank >= 2
    and no empty dimension, channels on axis 1 (the int 1, or -1 for rank 2); else None."""
    if type(x) is not np.ndarray or type(axis) is not int or not x.flags.c_contiguous:
        return None
    shape, dtype = x.shape, x.dtype
    ndim = len(shape)
    if (dtype is not hostcall.F32 and dtype is not hostcall.F64) or ndim < 2 or not x.size:
        return None
    if axis != 1 and axis != 1 - ndim:
        return None
    return x.reshape(shape[0], shape[1], x.size // (shape[0] * shape[1]))


def plain_groups(num_groups, channels):
    """num_groups (None: one per channel) when it is an int >= 1 dividing C; else None."""
    if num_groups is None:
        return channels
    if type(num_groups) is not int or num_groups < 1 or channels % num_groups:
        return None
    return num_groups


def plain_stat(value, shape):
    """A saved statistic of ``shape`` as a flat float64 array; else None."""
    if type(value) is not np.ndarray or value.shape != shape:
        return None
    if value.dtype is hostcall.F64:
        return value.reshape(-1) if value.flags.c_contiguous else None
    return value.astype(hostcall.F64).reshape(-1) if value.dtype is hostcall.F32 else None


def plain_layer_shape(x, normalized_shape):
    """(rows, width, normalized_shape as a tuple) of a plain layer norm call; else None."""
    if type(x) is not np.ndarray or not x.flags.c_contiguous or not x.size:
        return None
    if x.dtype is not hostcall.F32 and x.dtype is not hostcall.F64:
        return None
    if type(normalized_shape) is int:
        shape = (normalized_shape,)
    elif type(normalized_shape) is tuple and all(type(d) is int for d in normalized_shape):
        shape = normalized_shape
    else:
        return None
    lead = x.ndim - len(shape)
    if not shape or lead < 0 or x.shape[lead:] != shape:
        return None
    width = math.prod(shape)
    return x.size // width, width, shape


def plain_elements(value, shape, dtype):
    """Layer norm's weight or bias of ``shape`` and ``dtype``, flat (zero-length for None);
    else None."""
    if value is None:
        return hostcall.vector(None, 0, dtype)
    if type(value) is not np.ndarray or value.dtype is not dtype or value.shape != shape:
        return None
    return value.reshape(-1) if value.flags.c_contiguous else None
