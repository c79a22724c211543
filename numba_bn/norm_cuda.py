"""Group and instance norm on CUDA arrays: :mod:`numba_bn.norm_steps` on the CUDA backend.

:mod:`numba_bn.norm_ops` sends here every call that has a CUDA array among its arrays (anything
with ``__cuda_array_interface__``). :func:`numba_bn.dispatch.placed` views them as Numba device
arrays (no copy), raises for arrays on two sides, and gives the results back as the caller's kind
(CuPy in, CuPy out; torch in, torch out; Numba device arrays otherwise), the caller's own ``out=``
and running buffers as they went in. Statistics and gradients are float64, as norm_ops' (the
public functions give them x's compute dtype).

The arguments are checked as the host path checks them, with the device memory (batch norm's
:mod:`numba_bn.checks`), and all before anything is written. One refusal of the host path's
reach: channels on an axis other than 1 (channels-last) would need a transposition copy on the
device, which the device memory does not offer; such a call raises ValueError naming x and axis.
Layer norm is not here: its per-element affine has no CUDA kernel (:mod:`numba_bn.norm_checks`
refuses its CUDA arrays).
"""

import numpy as np

from . import dispatch
from .checks import (
    Prepared,
    Vectors,
    check_array,
    check_eps,
    check_input,
    check_like,
    check_momentum,
    check_out,
    compute_dtype,
)
from .dispatch import placed
from .layout import normalize_axis
from .memory import HOST, is_device_array
from .norm_checks import check_groups, check_spatial_dims
from .norm_steps import running_update, split_group_backward, split_group_forward, tiled_in
from .ops import frozen_backward, frozen_forward

FLOAT64 = np.dtype(np.float64)


def any_on_device(*arrays):
    """True when one of ``arrays`` is a CUDA array: the call runs here."""
    return any(map(is_device_array, arrays))


def _backend(backend):
    kernels = dispatch.get(backend)
    return kernels, dispatch.memory(kernels)


# ------------------------------------------------------------------------------ checks
def _channels_first(x, axis, memory):
    """x checked and seen as its C-contiguous (N, C, S) view in the compute dtype (Prepared):
    channels on axis 1 only."""
    x = check_input(x, "x", memory)
    position = normalize_axis(axis, x.ndim)
    if position == 0:
        raise ValueError("axis must not be 0, the batch axis: channels are on another axis")
    if position != 1:
        raise ValueError(
            f"x is a CUDA array with its channels on axis {axis}: group and instance norm on the "
            "GPU take channels-first arrays (axis=1) only, since moving the channels needs a "
            "transposition copy the device memory does not offer; transpose x to channels-first "
            "on the device (cupy.ascontiguousarray(x.transpose(0, 3, 1, 2)), torch: "
            "x.permute(0, 3, 1, 2).contiguous()), or pass a NumPy array"
        )
    return Prepared(x, position, memory=memory)


def _stat(value, name, shape, memory):
    """A saved statistic of ``shape`` as a flat C-contiguous float64 array of ``memory``."""
    value = check_array(value, name, memory)
    if value.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {value.shape}")
    compute_dtype(value.dtype, name)
    return memory.contiguous(value, FLOAT64, name).reshape(-1)


def _sample(x, out, spatial_dims, memory):
    """(x as a batch, out as a batch or None, the caller's out, whether x is one sample): as
    :func:`numba_bn.norm_checks.instance_batch`, a sample (C, *spatial) seen as a batch of one
    (a reshape of the C-contiguous array, no copy)."""
    if spatial_dims is None:
        return x, out, out, False
    if x.ndim == spatial_dims + 2:
        return x, out, out, False
    if x.ndim != spatial_dims + 1:
        raise ValueError(
            f"x must have {spatial_dims + 2} dimensions (a batch) or {spatial_dims + 1} (one "
            f"sample) for spatial_dims={spatial_dims}, got shape {x.shape}"
        )
    compute_dtype(x.dtype, "x")
    batch = memory.contiguous(x, x.dtype, "x").reshape((1, *x.shape))
    if out is None:
        return batch, None, None, True
    out = check_out(out, x, memory)
    return batch, out.reshape(batch.shape), out, True


def _sample_like(dy, batch, memory):
    """dy checked against one sample, ``batch[0]``, and seen as ``batch`` (a batch of one)."""
    dy = check_input(dy, "dy", memory)
    if dy.shape != batch.shape[1:]:
        raise ValueError(f"dy must have the shape of x, {batch.shape[1:]}, got {dy.shape}")
    if dy.dtype != batch.dtype:
        raise TypeError(f"dy must have the dtype of x, {batch.dtype}, got {dy.dtype}")
    return memory.contiguous(dy, dy.dtype, "dy").reshape(batch.shape)


def _unbatched(result, given, one):
    """The forward's (y, mean, invstd) of a batch of one as one sample's: y without its batch
    axis, unless it is the caller's ``given`` out; the statistics (1, C) as (C,)."""
    if not one:
        return result
    first, *rest = result
    return (given if given is not None else first[0], *(v[0] for v in rest))


# ------------------------------------------------------------------------------ group norm
def _group_forward(kernels, memory, x, num_groups, weight, bias, eps, axis, out):
    """(y, mean, invstd, m2), the statistics float64 (N, G) of ``memory``."""
    prepared = _channels_first(x, axis, memory)
    n, channels, _ = prepared.shape
    groups = channels if num_groups is None else check_groups(num_groups, channels)
    eps = check_eps(eps, training=True)
    vectors = Vectors(prepared.x, channels, memory=memory, weight=weight, bias=bias)
    y, y_view = prepared.output(out)
    stats = memory.full((3, n * groups), np.nan, FLOAT64)
    if prepared.x.size:
        affine = [tiled_in(memory, vectors.kernel(name), n) for name in ("weight", "bias")]
        split_group_forward(kernels, memory, prepared.view, groups, eps, *affine, y_view,
                            stats[0], stats[1], stats[2])  # fmt: skip
    mean, invstd, m2 = (stats[row].reshape(n, groups) for row in range(3))
    return prepared.finish(y, y_view), mean, invstd, m2


@placed(("x", "weight", "bias", "out"), inplace=("out",))
def group_forward(x, num_groups, weight, bias, eps, axis, out, *, backend="cuda"):
    """norm_ops.group_stats_forward on the device: (y, mean, invstd, m2)."""
    return _group_forward(*_backend(backend), x, num_groups, weight, bias, eps, axis, out)


def _group_backward(kernels, memory, dy, x, mean, invstd, num_groups, weight, axis, out):
    """(dx, dweight, dbias), the gradients float64 (C,) of ``memory``."""
    prepared = _channels_first(x, axis, memory)
    n, channels, _ = prepared.shape
    groups = channels if num_groups is None else check_groups(num_groups, channels)
    dy = check_like(dy, "dy", prepared, memory)
    mean, invstd = (_stat(v, name, (n, groups), memory)
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    vectors = Vectors(prepared.x, channels, memory=memory, weight=weight)
    dx, dx_view = prepared.output(out, dy=dy, x=prepared.x)
    if prepared.x.size:
        dy_view = memory.contiguous(dy, prepared.dtype, "dy").reshape(prepared.shape)
        dweight, dbias = split_group_backward(kernels, memory, dy_view, prepared.view, groups,
                                              mean, invstd, vectors.kernel("weight"),
                                              dx_view)  # fmt: skip
    else:  # sums over no values
        dweight, dbias = np.zeros(channels), np.zeros(channels)
    return prepared.finish(dx, dx_view), memory.from_host(dweight), memory.from_host(dbias)


@placed(("dy", "x", "mean", "invstd", "weight", "out"), inplace=("out",))
def group_backward(dy, x, mean, invstd, num_groups, weight, axis, out, *, backend="cuda"):
    """norm_ops.group_stats_backward on the device: (dx, dweight, dbias)."""
    return _group_backward(*_backend(backend), dy, x, mean, invstd, num_groups, weight, axis, out)


# --------------------------------------------------------------------------- instance norm
@placed(
    ("x", "running_mean", "running_var", "weight", "bias", "out"),
    inplace=("running_mean", "running_var", "out"),
)
def instance_forward(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                     axis, spatial_dims, out, *, backend="cuda"):  # fmt: skip
    """norm_ops.instance_stats_forward on the device: (y, mean, invstd), float64 (N, C), (C,)
    for one sample; the running buffers updated in place (through the host) when training."""
    kernels, memory = _backend(backend)
    spatial_dims = check_spatial_dims(spatial_dims)
    if not isinstance(use_input_stats, (bool, np.bool_)):
        raise TypeError(f"use_input_stats must be a bool, got {type(use_input_stats).__name__}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    x, out, given, one = _sample(memory.asarray(x, "x"), out, spatial_dims, memory)
    prepared = _channels_first(x, axis, memory)
    n, channels, inner = prepared.shape
    if not use_input_stats:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when use_input_stats=False")
        y = frozen_forward(prepared.x, running_mean, running_var, weight, bias, eps, 1, out=out,
                           backend=backend)  # fmt: skip
        mean = memory.to_host(_stat(running_mean, "running_mean", (channels,), memory))
        var = memory.to_host(_stat(running_var, "running_var", (channels,), memory))
        stats = [np.broadcast_to(v, (n, channels)).copy() for v in (mean, HOST.invstd(var, eps))]
        return _unbatched((y, *map(memory.from_host, stats)), given, one)
    if running_mean is not None:
        momentum = check_momentum(momentum)
        Vectors(prepared.x, channels, memory=memory, running_mean=running_mean,
                running_var=running_var)  # fmt: skip
        for name, buffer in (("running_mean", running_mean), ("running_var", running_var)):
            if not memory.is_c_contiguous(buffer):
                raise ValueError(f"{name} must be C-contiguous: it is updated in place")
    if inner <= 1 and prepared.x.size:
        raise ValueError(
            "Expected more than 1 spatial element when training, got input size "
            f"{prepared.x.shape} (axis={axis})"
        )
    y, mean, invstd, m2 = _group_forward(kernels, memory, prepared.x, None, weight, bias, eps, 1,
                                         out)  # fmt: skip
    if running_mean is not None and n:
        buffers = [memory.to_host(b) for b in (running_mean, running_var)]
        running_update(*buffers, memory.to_host(mean), memory.to_host(m2), inner, momentum)
        for buffer, updated in zip((running_mean, running_var), buffers, strict=True):
            memory.from_host(updated, out=buffer)
    return _unbatched((y, mean, invstd), given, one)


@placed(("dy", "x", "mean", "invstd", "weight", "out"), inplace=("out",))
def instance_backward(dy, x, mean, invstd, weight, axis, spatial_dims, out, *, backend="cuda"):
    """norm_ops.instance_stats_backward on the device: (dx, dweight, dbias); ``mean``,
    ``invstd`` (N, C), or (C,) for one sample."""
    kernels, memory = _backend(backend)
    x, out, given, one = _sample(memory.asarray(x, "x"), out, check_spatial_dims(spatial_dims),
                                 memory)  # fmt: skip
    if one:  # dy and the statistics of one sample, seen as a batch of one
        channels = x.shape[1]
        dy = _sample_like(dy, x, memory)
        mean, invstd = (_stat(v, name, (channels,), memory).reshape(1, channels)
                        for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    dx, dweight, dbias = _group_backward(kernels, memory, dy, x, mean, invstd, None, weight, axis,
                                         out)  # fmt: skip
    if one:
        dx = given if given is not None else dx[0]
    return dx, dweight, dbias


@placed(("dy", "x", "running_mean", "running_var", "weight", "out"), inplace=("out",))
def instance_frozen_backward(dy, x, running_mean, running_var, weight, eps, axis, spatial_dims,
                             out, *, backend="cuda"):  # fmt: skip
    """The backward of InstanceNorm's eval forward (the running statistics normalised:
    constants, so dx = dy * weight * invstd, batch norm's frozen backward): (dx, dweight,
    dbias), the gradients float64 (C,)."""
    _, memory = _backend(backend)
    x, out, given, one = _sample(memory.asarray(x, "x"), out, check_spatial_dims(spatial_dims),
                                 memory)  # fmt: skip
    if one:
        dy = _sample_like(dy, x, memory)
    _channels_first(x, axis, memory)
    dx, sum_dy, sum_dy_xmu, invstd = frozen_backward(dy, x, running_mean, running_var, weight,
                                                     eps, 1, out=out, backend=backend)  # fmt: skip
    if one:
        dx = given if given is not None else dx[0]
    return dx, memory.product(invstd, sum_dy_xmu, FLOAT64), sum_dy
