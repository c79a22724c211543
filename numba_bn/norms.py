"""Group, layer and instance normalisation: batch norm's reduction on another view (CPU).

Each normalises groups of values with their own float64 ``(count, mean, M2)`` statistics, by
the kernels batch norm uses (:mod:`numba_bn.cpu.norm_kernels`), and applies the affine per
original channel (group and instance norm) or per element of ``normalized_shape`` (layer norm):

==============  ======================================  ===================  ================
operation       statistics over                         mean, invstd shape   weight, bias
==============  ======================================  ===================  ================
group norm      (n, g): C/G channels x spatial          (N, G)               (C,)
instance norm   (n, c): spatial (group norm, G = C)     (N, C)               (C,)
layer norm      each row of the trailing dimensions     leading shape        normalized_shape
==============  ======================================  ===================  ================

The batch is axis 0 and the channels are on ``axis`` (1, or -1 for channels-last); any other
axis is moved to 1 by one copy of x (and of dy), and y (dx) moved back. float16 is computed in
float32. The statistics and gradients the functions return are in the compute dtype of x
(float32 for float16); the layers (:mod:`numba_bn.norm_layers`) keep them in float64. The
backward is derived in docs/backward.md ("Group, instance and layer norm").

Every argument is checked before anything is written: a call that raises leaves ``out=`` and the
running buffers as they were. As batch norm's functions (:mod:`numba_bn.hostcall`), each
operation first tries the plain call, recognised in a few attribute checks: C-contiguous NumPy
float32/float64 x with channels on axis 1 and no empty dimension, vectors of x's dtype, Python
ints and floats, no ``out=``. Anything else takes the checked path, which accepts all a plain
call does (with the same bits) and explains what it rejects; the plain path never raises.
"""

import contextlib
import math
import numbers
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from . import hostcall
from .annotations import HostArray
from .checks import (
    Vectors,
    check_array,
    check_eps,
    check_momentum,
    check_out,
    compute_dtype,
)
from .cpu import CpuBackend, threads_for
from .cpu import norm_kernels as kernels
from .cpu.threads import launch_guard
from .layout import normalize_axis
from .memory import HOST, is_device_array
from .ops import frozen_forward
from .stats import invstd_of

_BACKEND = CpuBackend()  # the split steps, for group norm with fewer groups than threads


# ------------------------------------------------------------------------------ checks
def _check_array(value, name, min_ndim):
    if is_device_array(value):
        raise TypeError(
            f"{name} is a CUDA array: group, layer and instance norm run on the CPU only for now "
            "(docs/norms.md); pass a NumPy array"
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
    x = _check_array(x, "x", 0)
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
    out = _check_out(out, sample)
    return out, out[None]


def _check_out(out, like, **inputs):
    """``out`` (or None) as checks.check_out sees it: NumPy's view of the caller's array."""
    return None if out is None else check_out(out, like, HOST, "out", **inputs)


def check_dy(dy, x):
    dy = _check_array(dy, "dy", 0)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x, {x.dtype}, got {dy.dtype}")
    return dy


def _check_stat(value, name, shape):
    """A saved statistic as a C-contiguous float64 array of ``shape``."""
    value = check_array(value, name)
    if value.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {value.shape}")
    compute_dtype(value.dtype, name)
    return np.ascontiguousarray(value, dtype=np.float64)


def _element_vectors(x, shape, **vectors):
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


class _ChannelsFirst:
    """x checked, seen channels first in its compute dtype as (N, C, S): S is the product of
    the dimensions other than the batch (0) and the channels (``axis``)."""

    def __init__(self, x, axis):
        x = _check_array(x, "x", 2)
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


def _plan(step, size):
    """(threads, guard): the CPU backend's cost model for a step of ``size`` elements."""
    threads = threads_for(step, size)
    return threads, launch_guard() if threads > 1 else _NO_GUARD


_NO_GUARD = contextlib.nullcontext()


def _tiled(vector, n):
    """``vector`` (C,) repeated n times, (N*C,), as the group kernels index it (n*C + c);
    zero-length stays zero-length. (np.tile costs 3 us on a small vector, this 0.8.)"""
    if not vector.size:
        return vector
    tiled = np.empty((n, vector.size), vector.dtype)
    tiled[:] = vector
    return tiled.reshape(-1)


# ------------------------------------------------------------------------- the plain call
def _plain_grid(x, axis):
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


def _plain_groups(num_groups, channels):
    """num_groups (None: one per channel) when it is an int >= 1 dividing C; else None."""
    if num_groups is None:
        return channels
    if type(num_groups) is not int or num_groups < 1 or channels % num_groups:
        return None
    return num_groups


def _plain_stat(value, shape):
    """A saved statistic of ``shape`` as a flat float64 array; else None."""
    if type(value) is not np.ndarray or value.shape != shape:
        return None
    if value.dtype is hostcall.F64:
        return value.reshape(-1) if value.flags.c_contiguous else None
    return value.astype(hostcall.F64).reshape(-1) if value.dtype is hostcall.F32 else None


def _plain_layer_shape(x, normalized_shape):
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


def _plain_elements(value, shape, dtype):
    """Layer norm's weight or bias of ``shape`` and ``dtype``, flat (zero-length for None);
    else None."""
    if value is None:
        return hostcall.vector(None, 0, dtype)
    if type(value) is not np.ndarray or value.dtype is not dtype or value.shape != shape:
        return None
    return value.reshape(-1) if value.flags.c_contiguous else None


# --------------------------------------------------------------------------- operations
def group_stats_forward(x, num_groups, weight, bias, eps, axis, *, out=None):
    """Group norm forward: (y, mean, invstd, m2), the statistics float64 (N, G);
    ``num_groups=None``: one group per channel (instance norm)."""
    if out is None:
        result = _plain_group_forward(x, num_groups, weight, bias, eps, axis)
        if result is not None:
            return result
    return _checked_group_forward(x, num_groups, weight, bias, eps, axis, out)


def _plain_group_forward(x, num_groups, weight, bias, eps, axis):
    """group_stats_forward of a plain call; None for any other."""
    xc = _plain_grid(x, axis)
    if xc is None or not hostcall.training_eps(eps):
        return None
    n, channels, _ = xc.shape
    groups = _plain_groups(num_groups, channels)
    weight = hostcall.vector(weight, channels, x.dtype)
    bias = hostcall.vector(bias, channels, x.dtype)
    if groups is None or weight is None or bias is None:
        return None
    y = np.empty(x.shape, x.dtype)
    stats = np.empty((3, n * groups))
    _group_forward(xc, groups, eps, _tiled(weight, n), _tiled(bias, n), y.reshape(xc.shape),
                   stats[0], stats[1], stats[2])  # fmt: skip
    mean, invstd, m2 = stats.reshape(3, n, groups)
    return y, mean, invstd, m2


def _checked_group_forward(x, num_groups, weight, bias, eps, axis, out):
    """group_stats_forward with every check."""
    grid = _ChannelsFirst(x, axis)
    n, channels, inner = grid.shape
    groups = channels if num_groups is None else check_groups(num_groups, channels)
    eps = check_eps(eps, training=True)
    vectors = Vectors(grid.x, channels, weight=weight, bias=bias)
    out = _check_out(out, grid.x)
    y, work = grid.output(out)
    stats = np.full((3, n * groups), np.nan)
    if grid.x.size:
        tiled = [_tiled(vectors.kernel(name), n) for name in ("weight", "bias")]
        _group_forward(grid.view(grid.x), groups, eps, *tiled, work, *stats)
    mean, invstd, m2 = (s.reshape(n, groups) for s in stats)
    return grid.finish(y, work), mean, invstd, m2


def _group_forward(xc, groups, eps, weight, bias, y, mean, invstd, m2):
    """Kernels of the group norm forward on channels-first (N, C, S) arrays."""
    n, channels, inner = xc.shape
    group_channels = channels // groups  # groups >= 1: x is not empty
    grouped = (1, n * groups, group_channels * inner)
    threads, guard = _plan("forward_train", xc.size)
    if threads > 1 and n * groups < 2 * threads:  # a group per item would idle some threads
        count = _BACKEND.batch_stats(xc.reshape(grouped), mean=mean, m2=m2)
        invstd_of(count, m2, eps, invstd)
        planes = (1, n * channels, inner)
        _BACKEND.normalize(xc.reshape(planes), mean=np.repeat(mean, group_channels),
                           invstd=np.repeat(invstd, group_channels), weight=weight, bias=bias,
                           y=y.reshape(planes))  # fmt: skip
        return
    run = kernels.group_forward if threads > 1 else kernels.group_forward_serial
    with guard:
        run(xc.reshape(grouped), group_channels, eps, weight, bias, y.reshape(grouped), mean,
            invstd, m2)  # fmt: skip


def group_stats_backward(dy, x, mean, invstd, num_groups, weight, axis, *, out=None):
    """Group norm backward: (dx, dweight, dbias), the gradients float64 (C,);
    ``num_groups=None``: one group per channel (instance norm)."""
    if out is None:
        result = _plain_group_backward(dy, x, mean, invstd, num_groups, weight, axis)
        if result is not None:
            return result
    return _checked_group_backward(dy, x, mean, invstd, num_groups, weight, axis, out)


def _plain_group_backward(dy, x, mean, invstd, num_groups, weight, axis):
    """group_stats_backward of a plain call; None for any other."""
    xc = _plain_grid(x, axis)
    if xc is None:
        return None
    dyc = hostcall.like(dy, x, xc)
    n, channels, _ = xc.shape
    groups = _plain_groups(num_groups, channels)
    if dyc is None or groups is None:
        return None
    mean, invstd = _plain_stat(mean, (n, groups)), _plain_stat(invstd, (n, groups))
    weight = hostcall.vector(weight, channels, x.dtype)
    if mean is None or invstd is None or weight is None:
        return None
    dx = np.empty(x.shape, x.dtype)
    dweight, dbias = _group_backward(dyc, xc, groups, mean, invstd, weight, dx.reshape(xc.shape))
    return dx, dweight, dbias


def _group_backward(dyc, xc, groups, mean, invstd, weight, dx):
    """Kernels of the group norm backward on channels-first (N, C, S) arrays, S > 0: dx (=),
    and (dweight, dbias) float64 (C,); mean, invstd flat float64 (N*G,), weight (C,) or
    zero-length."""
    n, channels, inner = xc.shape
    group_channels = channels // groups
    planes = (1, n * channels, inner)
    sums = np.empty((2, n * channels))
    threads, guard = _plan("backward", xc.size)
    run = kernels.group_backward if threads > 1 else kernels.group_backward_serial
    with guard:
        run(dyc.reshape(planes), xc.reshape(planes), group_channels, mean, invstd,
            _tiled(weight, n), dx.reshape(planes), sums[0], sums[1])  # fmt: skip
    # sum_dy_xmu * invstd per (n, c), then both rows summed over n in one reduction
    sums.reshape(2, n, groups, group_channels)[1] *= invstd.reshape(n, groups, 1)
    dbias, dweight = np.add.reduce(sums.reshape(2, n, channels), axis=1)
    return dweight, dbias


def _checked_group_backward(dy, x, mean, invstd, num_groups, weight, axis, out):
    """group_stats_backward with every check."""
    grid = _ChannelsFirst(x, axis)
    n, channels, inner = grid.shape
    groups = channels if num_groups is None else check_groups(num_groups, channels)
    dy = check_dy(dy, grid.x)
    mean, invstd = (_check_stat(v, name, (n, groups))
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    vectors = Vectors(grid.x, channels, weight=weight)
    out = _check_out(out, grid.x, dy=dy, x=grid.x)
    dx, work = grid.output(out)
    if grid.x.size:
        dweight, dbias = _group_backward(grid.view(dy), grid.view(grid.x), groups,
                                         mean.reshape(-1), invstd.reshape(-1),
                                         vectors.kernel("weight"), work)  # fmt: skip
    else:  # sums over no values
        dweight, dbias = np.zeros(channels), np.zeros(channels)
    return grid.finish(dx, work), dweight, dbias


def instance_stats_forward(x, running_mean, running_var, weight, bias, use_input_stats, momentum,
                           eps, axis, *, spatial_dims=None, out=None):  # fmt: skip
    """Instance norm forward: (y, mean, invstd), float64 (N, C), (C,) for one sample
    (:func:`instance_batch`); with input statistics and running buffers, the buffers take
    PyTorch's update (in place)."""
    if out is None and spatial_dims is None and use_input_stats is True:
        result = _plain_instance_forward(x, running_mean, running_var, weight, bias, momentum,
                                         eps, axis)  # fmt: skip
        if result is not None:
            return result
    if not isinstance(use_input_stats, (bool, np.bool_)):
        raise TypeError(f"use_input_stats must be a bool, got {type(use_input_stats).__name__}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    x, one = instance_batch(x, check_spatial_dims(spatial_dims))
    if one:  # a batch of one: the batch's statistics are the sample's
        given, out = sample_out(out, x[0])
        y, mean, invstd = instance_stats_forward(x, running_mean, running_var, weight, bias,
                                                 use_input_stats, momentum, eps, axis,
                                                 out=out)  # fmt: skip
        return y[0] if given is None else given, mean[0], invstd[0]
    if not use_input_stats:
        return _frozen_instance_forward(x, running_mean, running_var, weight, bias, eps, axis,
                                        out)  # fmt: skip
    grid = _ChannelsFirst(x, axis)
    n, channels, inner = grid.shape
    if running_mean is not None:
        momentum = check_momentum(momentum)
        Vectors(grid.x, channels, running_mean=running_mean, running_var=running_var)
        for name, buffer in (("running_mean", running_mean), ("running_var", running_var)):
            if not buffer.flags.writeable:
                raise ValueError(f"{name} must be writable: it is updated in place")
    if inner <= 1 and grid.x.size:
        raise ValueError(
            "Expected more than 1 spatial element when training, got input size "
            f"{grid.x.shape} (axis={grid.axis})"
        )
    y, mean, invstd, m2 = group_stats_forward(grid.x, None, weight, bias, eps, grid.axis,
                                              out=out)  # fmt: skip
    if running_mean is not None and n:
        _running_update(running_mean, running_var, mean, m2, inner, momentum)
    return y, mean, invstd


def _plain_instance_forward(x, running_mean, running_var, weight, bias, momentum, eps, axis):
    """instance_stats_forward of a plain call with input statistics; None for any other."""
    xc = _plain_grid(x, axis)
    if xc is None or xc.shape[2] < 2:
        return None
    if running_mean is not None or running_var is not None:
        channels = xc.shape[1]
        running_mean = hostcall.buffer(running_mean, channels, x.dtype)
        running_var = hostcall.buffer(running_var, channels, x.dtype)
        if running_mean is None or running_var is None or not hostcall.momentum(momentum):
            return None
    result = _plain_group_forward(x, None, weight, bias, eps, axis)
    if result is None:
        return None
    y, mean, invstd, m2 = result
    if running_mean is not None:
        _running_update(running_mean, running_var, mean, m2, xc.shape[2], momentum)
    return y, mean, invstd


def _running_update(running_mean, running_var, mean, m2, inner, momentum):
    """PyTorch's instance norm update of the running buffers (in place, N >= 1, S >= 2): the
    mean over the batch of the per-instance means and unbiased variances (float64 (N, C)),
    ``momentum`` weighting it. Both buffers in one (2, C) float64 pass (11 -> 5 us on 8
    channels; the bits of ``(1 - m) * r + m * batch.mean(axis=0)``, buffer by buffer)."""
    n, channels = mean.shape
    per_instance = np.empty((2, n, channels))
    per_instance[0] = mean
    np.divide(m2, inner - 1, out=per_instance[1])  # unbiased, as PyTorch
    batch = np.add.reduce(per_instance, axis=1)
    batch /= n  # ndarray.mean(axis=0): the sum, then one division
    batch *= momentum
    update = np.empty((2, channels))
    update[0], update[1] = running_mean, running_var
    update *= 1.0 - momentum
    update += batch
    running_mean[...], running_var[...] = update


def instance_stats_backward(dy, x, mean, invstd, weight, axis, *, spatial_dims=None, out=None):
    """Instance norm backward: (dx, dweight, dbias), the gradients float64 (C,); ``mean``,
    ``invstd`` (N, C), or (C,) for one sample (:func:`instance_batch`)."""
    x, one = instance_batch(x, check_spatial_dims(spatial_dims))
    if not one:
        return group_stats_backward(dy, x, mean, invstd, None, weight, axis, out=out)
    channels = _ChannelsFirst(x, axis).shape[1]
    dy = check_dy(dy, x[0])[None]
    mean, invstd = (_check_stat(v, name, (channels,)).reshape(1, channels)
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    given, out = sample_out(out, x[0])
    dx, dweight, dbias = group_stats_backward(dy, x, mean, invstd, None, weight, axis, out=out)
    return dx[0] if given is None else given, dweight, dbias


def _frozen_instance_forward(x, running_mean, running_var, weight, bias, eps, axis, out):
    """Instance norm with the running statistics: batch norm's eval forward."""
    if running_mean is None:
        raise ValueError("running_mean and running_var are required when use_input_stats=False")
    grid = _ChannelsFirst(x, axis)
    y = frozen_forward(grid.x, running_mean, running_var, weight, bias, eps, grid.axis, out=out)
    n = grid.shape[0]
    mean = np.broadcast_to(np.asarray(running_mean, np.float64), (n, grid.shape[1])).copy()
    var = np.asarray(running_var, np.float64)
    invstd = np.broadcast_to(HOST.invstd(var, eps), mean.shape).copy()
    return y, mean, invstd


def layer_stats_forward(x, normalized_shape, weight, bias, eps, *, out=None):
    """Layer norm forward: (y, mean, invstd), float64 with x's leading shape."""
    if out is None:
        result = _plain_layer_forward(x, normalized_shape, weight, bias, eps)
        if result is not None:
            return result
    return _checked_layer_forward(x, normalized_shape, weight, bias, eps, out)


def _plain_layer_forward(x, normalized_shape, weight, bias, eps):
    """layer_stats_forward of a plain call; None for any other."""
    plain = _plain_layer_shape(x, normalized_shape)
    if plain is None or not hostcall.training_eps(eps):
        return None
    rows, width, shape = plain
    weight, bias = _plain_elements(weight, shape, x.dtype), _plain_elements(bias, shape, x.dtype)
    if weight is None or bias is None:
        return None
    y = np.empty(x.shape, x.dtype)
    stats = np.empty((2, rows))
    _layer_forward(x.reshape(1, rows, width), eps, weight, bias, y, stats[0], stats[1])
    lead = x.shape[: x.ndim - len(shape)]
    return y, stats[0].reshape(lead), stats[1].reshape(lead)


def _layer_forward(xc, eps, weight, bias, y, mean, invstd):
    """Kernels of the layer norm forward on ``xc`` (1, rows, width), y of any shape of its
    size: mean, invstd (rows,) float64 (=)."""
    threads, guard = _plan("forward_train", xc.size)
    run = kernels.layer_forward if threads > 1 else kernels.layer_forward_serial
    with guard:
        run(xc, eps, weight, bias, y.reshape(xc.shape), mean, invstd)


def _checked_layer_forward(x, normalized_shape, weight, bias, eps, out):
    """layer_stats_forward with every check."""
    x = _check_array(x, "x", 1)
    shape = check_normalized_shape(normalized_shape, x.shape)
    lead = x.shape[: x.ndim - len(shape)]
    rows, width = math.prod(lead), math.prod(shape)
    eps = check_eps(eps, training=True)
    weight, bias = _element_vectors(x, shape, weight=weight, bias=bias)
    out = _check_out(out, x)
    dtype = compute_dtype(x.dtype)
    mean, invstd = np.full(rows, np.nan), np.full(rows, np.nan)
    y = out if out is not None and dtype == x.dtype else np.empty(x.shape, dtype)
    if x.size:
        xc = np.ascontiguousarray(x, dtype).reshape(1, rows, width)
        _layer_forward(xc, eps, weight, bias, y, mean, invstd)
    return _in_dtype(y, x, out), mean.reshape(lead), invstd.reshape(lead)


def layer_stats_backward(dy, x, mean, invstd, normalized_shape, weight, *, out=None):
    """Layer norm backward: (dx, dweight, dbias), the gradients float64 of normalized_shape."""
    if out is None:
        result = _plain_layer_backward(dy, x, mean, invstd, normalized_shape, weight)
        if result is not None:
            return result
    return _checked_layer_backward(dy, x, mean, invstd, normalized_shape, weight, out)


def _plain_layer_backward(dy, x, mean, invstd, normalized_shape, weight):
    """layer_stats_backward of a plain call; None for any other."""
    plain = _plain_layer_shape(x, normalized_shape)
    if plain is None:
        return None
    rows, width, shape = plain
    view = x.reshape(1, rows, width)
    dyc = hostcall.like(dy, x, view)
    lead = x.shape[: x.ndim - len(shape)]
    mean, invstd = _plain_stat(mean, lead), _plain_stat(invstd, lead)
    weight = _plain_elements(weight, shape, x.dtype)
    if dyc is None or mean is None or invstd is None or weight is None:
        return None
    dx = np.empty(x.shape, x.dtype)
    grads = np.empty((2, width))
    _layer_backward(dyc, view, mean, invstd, weight, dx, grads[0], grads[1])
    return dx, grads[0].reshape(shape), grads[1].reshape(shape)


def _layer_backward(dyc, xc, mean, invstd, weight, dx, dweight, dbias):
    """Kernels of the layer norm backward on (1, rows, width) views, dx of any shape of their
    size: dweight, dbias (width,) float64 (=)."""
    threads, guard = _plan("backward", xc.size)
    run = kernels.layer_backward if threads > 1 else kernels.layer_backward_serial
    with guard:
        run(dyc, xc, mean, invstd, weight, dx.reshape(xc.shape), dweight, dbias)


def _checked_layer_backward(dy, x, mean, invstd, normalized_shape, weight, out):
    """layer_stats_backward with every check."""
    x = _check_array(x, "x", 1)
    shape = check_normalized_shape(normalized_shape, x.shape)
    lead = x.shape[: x.ndim - len(shape)]
    rows, width = math.prod(lead), math.prod(shape)
    dy = check_dy(dy, x)
    mean, invstd = (_check_stat(v, name, lead)
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    (weight,) = _element_vectors(x, shape, weight=weight)
    out = _check_out(out, x, dy=dy, x=x)
    dtype = compute_dtype(x.dtype)
    dx = out if out is not None and dtype == x.dtype else np.empty(x.shape, dtype)
    dweight, dbias = np.zeros(width), np.zeros(width)
    if x.size:
        view = (1, rows, width)
        _layer_backward(np.ascontiguousarray(dy, dtype).reshape(view),
                        np.ascontiguousarray(x, dtype).reshape(view), mean.reshape(-1),
                        invstd.reshape(-1), weight, dx, dweight, dbias)  # fmt: skip
    return _in_dtype(dx, x, out), dweight.reshape(shape), dbias.reshape(shape)


def _in_dtype(result, x, out):
    """``result`` (compute dtype) in x's dtype, in ``out`` when given."""
    if result.dtype == x.dtype:
        return result
    if out is None:
        return result.astype(x.dtype)
    np.copyto(out, result, casting="same_kind")
    return out


def _public(dtype, *arrays):
    """float64 statistics or gradients in the compute dtype of ``dtype``."""
    dtype = compute_dtype(dtype)
    return tuple(a.astype(dtype, copy=False) for a in arrays)


# --------------------------------------------------------------------------- public API
def group_norm_forward(
    x: ArrayLike,
    num_groups: int,
    weight: HostArray | None = None,
    bias: HostArray | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    out: HostArray | None = None,
) -> tuple[HostArray, HostArray, HostArray]:
    """Group normalisation with its statistics: ``(y, mean, invstd)``.

    Parameters
    ----------
    x : ndarray, float16/32/64, shape (N, C, ...) (channels on ``axis``; axis 0 is the batch)
    num_groups : int
        G, dividing C; each sample's channels are split into G consecutive groups.
    weight, bias : ndarray (C,), optional
        Per-channel affine (1 and 0 when None), in x's dtype (or float32 for float16 x).
    eps : float > 0
    axis : int
        The channel axis: 1 (NCHW) or -1 (channels-last).
    out : ndarray, optional
        C-contiguous array of x's shape and dtype for y (may be x itself).

    Returns
    -------
    y, mean, invstd
        ``mean``, ``invstd = 1/sqrt(var + eps)`` (biased variance) of shape (N, G), in x's
        compute dtype (float32 for float16).

    .. math:: y_{n,c} = \\frac{x_{n,c} - \\mu_{n,g(c)}}{\\sqrt{\\sigma^2_{n,g(c)} + \\epsilon}}
              \\,w_c + b_c
    """
    y, mean, invstd, _ = group_stats_forward(x, num_groups, weight, bias, eps, axis, out=out)
    return (y, *_public(y.dtype, mean, invstd))


def group_norm(
    x: ArrayLike,
    num_groups: int,
    weight: HostArray | None = None,
    bias: HostArray | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    out: HostArray | None = None,
) -> HostArray:
    """``torch.nn.functional.group_norm``: y of :func:`group_norm_forward`."""
    return group_stats_forward(x, num_groups, weight, bias, eps, axis, out=out)[0]


def group_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: HostArray,
    invstd: HostArray,
    num_groups: int,
    weight: HostArray | None = None,
    axis: int = 1,
    *,
    out: HostArray | None = None,
) -> tuple[HostArray, HostArray, HostArray]:
    """Exact group norm backward: ``(dx, dweight, dbias)``.

    ``mean``, ``invstd`` (N, G) are those :func:`group_norm_forward` returned for ``x``;
    ``dweight = sum over n and spatial of dy * x_hat``, ``dbias = sum of dy`` per channel, in x's
    compute dtype. ``out`` (for dx) may be dy or x.

    .. math:: dx = \\sigma^{-1}\\left(g - \\tfrac{1}{m}\\textstyle\\sum_{group} g
              - \\hat x\\,\\tfrac{1}{m}\\sum_{group} g\\,\\hat x\\right),\\quad g = w_c\\,dy
    """
    dx, dweight, dbias = group_stats_backward(dy, x, mean, invstd, num_groups, weight, axis,
                                              out=out)  # fmt: skip
    return (dx, *_public(dx.dtype, dweight, dbias))


def layer_norm_forward(
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: HostArray | None = None,
    bias: HostArray | None = None,
    eps: float = 1e-5,
    *,
    out: HostArray | None = None,
) -> tuple[HostArray, HostArray, HostArray]:
    """Layer normalisation over the trailing dimensions ``normalized_shape``:
    ``(y, mean, invstd)``.

    ``weight``, ``bias`` have shape ``normalized_shape`` (elementwise affine); ``mean`` and
    ``invstd`` have x's leading shape (``x.shape[:-len(normalized_shape)]``), in x's compute
    dtype. ``out`` as :func:`group_norm_forward`.
    """
    y, mean, invstd = layer_stats_forward(x, normalized_shape, weight, bias, eps, out=out)
    return (y, *_public(y.dtype, mean, invstd))


def layer_norm(
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: HostArray | None = None,
    bias: HostArray | None = None,
    eps: float = 1e-5,
    *,
    out: HostArray | None = None,
) -> HostArray:
    """``torch.nn.functional.layer_norm``: y of :func:`layer_norm_forward`."""
    return layer_stats_forward(x, normalized_shape, weight, bias, eps, out=out)[0]


def layer_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: HostArray,
    invstd: HostArray,
    normalized_shape: int | Sequence[int],
    weight: HostArray | None = None,
    *,
    out: HostArray | None = None,
) -> tuple[HostArray, HostArray, HostArray]:
    """Exact layer norm backward: ``(dx, dweight, dbias)``, the gradients of shape
    ``normalized_shape`` summed over the leading dimensions; arguments as
    :func:`group_norm_backward`."""
    dx, dweight, dbias = layer_stats_backward(dy, x, mean, invstd, normalized_shape, weight,
                                              out=out)  # fmt: skip
    return (dx, *_public(dx.dtype, dweight, dbias))


def instance_norm_forward(
    x: ArrayLike,
    running_mean: HostArray | None = None,
    running_var: HostArray | None = None,
    weight: HostArray | None = None,
    bias: HostArray | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    spatial_dims: int | None = None,
    out: HostArray | None = None,
) -> tuple[HostArray, HostArray, HostArray]:
    """Instance normalisation (group norm with one channel per group): ``(y, mean, invstd)``,
    the statistics (N, C).

    x is a batch (N, C, *spatial), as in ``torch.nn.functional.instance_norm``. With
    ``spatial_dims`` (the number of spatial dimensions, PyTorch's InstanceNorm1d/2d/3d: 1, 2, 3),
    x may also be one sample (C, *spatial) as those modules take it: ``x.ndim == spatial_dims +
    1``; it is normalised as a batch of one (a view, no copy), y has its shape and the
    statistics are (C,). ``axis`` counts the batch axis either way (1, or -1 for channels-last).

    With ``use_input_stats`` (training) and running buffers (C,), the buffers are updated in
    place as PyTorch does: ``r = (1 - momentum) * r + momentum * b`` with ``b`` the mean over
    the batch of the per-instance means (unbiased variances). With ``use_input_stats=False`` the
    running statistics normalise (batch norm's eval forward), and ``mean``, ``invstd`` are
    theirs, repeated for each sample.
    """
    y, mean, invstd = instance_stats_forward(x, running_mean, running_var, weight, bias,
                                             use_input_stats, momentum, eps, axis,
                                             spatial_dims=spatial_dims, out=out)  # fmt: skip
    return (y, *_public(y.dtype, mean, invstd))


def instance_norm(
    x: ArrayLike,
    running_mean: HostArray | None = None,
    running_var: HostArray | None = None,
    weight: HostArray | None = None,
    bias: HostArray | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    spatial_dims: int | None = None,
    out: HostArray | None = None,
) -> HostArray:
    """``torch.nn.functional.instance_norm``: y of :func:`instance_norm_forward` (one sample
    with ``spatial_dims``, as there)."""
    return instance_stats_forward(x, running_mean, running_var, weight, bias, use_input_stats,
                                  momentum, eps, axis, spatial_dims=spatial_dims,
                                  out=out)[0]  # fmt: skip


def instance_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: HostArray,
    invstd: HostArray,
    weight: HostArray | None = None,
    axis: int = 1,
    *,
    spatial_dims: int | None = None,
    out: HostArray | None = None,
) -> tuple[HostArray, HostArray, HostArray]:
    """Exact instance norm backward (input statistics): ``(dx, dweight, dbias)``; ``mean``,
    ``invstd`` (N, C) from :func:`instance_norm_forward`, (C,) for one sample (x and dy of
    ``spatial_dims + 1`` dimensions, as there)."""
    dx, dweight, dbias = instance_stats_backward(dy, x, mean, invstd, weight, axis,
                                                 spatial_dims=spatial_dims, out=out)  # fmt: skip
    return (dx, *_public(dx.dtype, dweight, dbias))
