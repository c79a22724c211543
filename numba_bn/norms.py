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
running buffers as they were.
"""

import contextlib
import math
import numbers
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

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
    return threads, launch_guard() if threads > 1 else contextlib.nullcontext()


# --------------------------------------------------------------------------- operations
def group_stats_forward(x, num_groups, weight, bias, eps, axis, *, out=None):
    """Group norm forward: (y, mean, invstd, m2), the statistics float64 (N, G);
    ``num_groups=None``: one group per channel (instance norm)."""
    grid = _ChannelsFirst(x, axis)
    n, channels, inner = grid.shape
    groups = channels if num_groups is None else check_groups(num_groups, channels)
    eps = check_eps(eps, training=True)
    vectors = Vectors(grid.x, channels, weight=weight, bias=bias)
    out = _check_out(out, grid.x)
    y, work = grid.output(out)
    stats = np.full((3, n * groups), np.nan)
    if grid.x.size:
        tiled = [np.tile(vectors.kernel(name), n) for name in ("weight", "bias")]
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
    grid = _ChannelsFirst(x, axis)
    n, channels, inner = grid.shape
    groups = channels if num_groups is None else check_groups(num_groups, channels)
    group_channels = channels // groups if groups else 1
    dy = check_dy(dy, grid.x)
    mean, invstd = (_check_stat(v, name, (n, groups))
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    vectors = Vectors(grid.x, channels, weight=weight)
    out = _check_out(out, grid.x, dy=dy, x=grid.x)
    dx, work = grid.output(out)
    sums = np.zeros((2, n * channels))
    if grid.x.size:
        planes = (1, n * channels, inner)
        threads, guard = _plan("backward", grid.x.size)
        run = kernels.group_backward if threads > 1 else kernels.group_backward_serial
        with guard:
            run(grid.view(dy).reshape(planes), grid.view(grid.x).reshape(planes),
                group_channels, mean.reshape(-1), invstd.reshape(-1),
                np.tile(vectors.kernel("weight"), n), work.reshape(planes), *sums)  # fmt: skip
    sum_dy, sum_dy_xmu = (s.reshape(n, groups, group_channels) for s in sums)
    dbias = sum_dy.sum(axis=0).reshape(channels)
    if inner:
        dweight = (sum_dy_xmu * invstd[:, :, None]).sum(axis=0).reshape(channels)
    else:  # a sum over no values (invstd is NaN)
        dweight = np.zeros(channels)
    return grid.finish(dx, work), dweight, dbias


def instance_stats_forward(x, running_mean, running_var, weight, bias, use_input_stats, momentum,
                           eps, axis, *, spatial_dims=None, out=None):  # fmt: skip
    """Instance norm forward: (y, mean, invstd), float64 (N, C), (C,) for one sample
    (:func:`instance_batch`); with input statistics and running buffers, the buffers take
    PyTorch's update (in place)."""
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
        batch = (mean.mean(axis=0), (m2 / (inner - 1)).mean(axis=0))  # unbiased, as PyTorch
        for buffer, value in zip((running_mean, running_var), batch, strict=True):
            update = (1.0 - momentum) * buffer.astype(np.float64) + momentum * value
            np.copyto(buffer, update, casting="same_kind")
    return y, mean, invstd


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
        view = (1, rows, width)
        xc = np.ascontiguousarray(x, dtype).reshape(view)
        threads, guard = _plan("forward_train", x.size)
        run = kernels.layer_forward if threads > 1 else kernels.layer_forward_serial
        with guard:
            run(xc, eps, weight, bias, y.reshape(view), mean, invstd)
    return _in_dtype(y, x, out), mean.reshape(lead), invstd.reshape(lead)


def layer_stats_backward(dy, x, mean, invstd, normalized_shape, weight, *, out=None):
    """Layer norm backward: (dx, dweight, dbias), the gradients float64 of normalized_shape."""
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
        threads, guard = _plan("backward", x.size)
        run = kernels.layer_backward if threads > 1 else kernels.layer_backward_serial
        with guard:
            run(np.ascontiguousarray(dy, dtype).reshape(view),
                np.ascontiguousarray(x, dtype).reshape(view), mean.reshape(-1),
                invstd.reshape(-1), weight, dx.reshape(view), dweight, dbias)  # fmt: skip
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
