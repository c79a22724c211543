"""The operations of group, layer and instance norm (:mod:`numba_bn.norms`): statistics, y,
and the backward, on the kernels of :mod:`numba_bn.cpu.norm_kernels`.

Each operation tries the plain call first (:mod:`numba_bn.norm_checks`), then the checked path,
which accepts all a plain call does, with the same bits. The statistics and gradients come back
in float64; the public functions give them the compute dtype of x.
"""

import math

import numpy as np

from . import ahead, hostcall, norm_cuda
from .checks import Vectors, check_eps, check_momentum, compute_dtype
from .cpu import CpuBackend, threads_for
from .cpu import norm_kernels as kernels
from .cpu.threads import launcher, num_threads
from .memory import HOST
from .norm_checks import (
    ChannelsFirst,
    check_dy,
    check_groups,
    check_input,
    check_norm_out,
    check_normalized_shape,
    check_spatial_dims,
    check_stat,
    element_vectors,
    instance_batch,
    plain_elements,
    plain_grid,
    plain_groups,
    plain_layer_shape,
    plain_stat,
    refuse_device,
    sample_out,
)
from .norm_cuda import any_on_device
from .norm_steps import running_update, split_group_forward, tiled
from .ops import frozen_forward

_BACKEND = CpuBackend()  # the split steps, for group norm with fewer groups than threads


def _plan(step, size, parallel, serial):
    """(threads, run): the CPU backend's cost model for a step of ``size`` elements, and the
    twin it picks (the parallel one as :func:`.cpu.threads.launcher` calls it)."""
    threads = threads_for(step, size)
    return threads, launcher(parallel) if threads > 1 else serial


def _expect_backward(forward, view, job, parallel, serial):
    """A norm's forward driver not run yet in this process: if it compiles, the backward's twin
    (``parallel`` or ``serial``, as :func:`_plan` will pick it) compiles ahead in a worker
    (:mod:`numba_bn.ahead`, ``job``) on an array shaped like ``view``, the forward's."""
    if view.size <= ahead.AHEAD_MAX_ELEMENTS:
        backward = parallel if threads_for("backward", view.size) > 1 else serial
        ahead.expect(forward, view, num_threads(), job, [backward])


# --------------------------------------------------------------------------- operations
def _plain_or_checked(plain, checked, out, *args):
    """``plain(*args, out)`` when it recognises the call (not None), else
    ``checked(*args, out)``: every operation's two paths."""
    result = plain(*args, out)
    if result is not None:
        return result
    return checked(*args, out)


def group_stats_forward(x, num_groups, weight, bias, eps, axis, *, out=None):
    """Group norm forward: (y, mean, invstd, m2), the statistics float64 (N, G);
    ``num_groups=None``: one group per channel (instance norm)."""
    return _plain_or_checked(
        _plain_group_forward, _checked_group_forward, out, x, num_groups, weight, bias, eps, axis
    )


def _plain_group_forward(x, num_groups, weight, bias, eps, axis, out):
    """group_stats_forward of a plain call; None for any other."""
    xc = plain_grid(x, axis)
    if xc is None or not hostcall.training_eps(eps):
        return None
    n, channels, _ = xc.shape
    groups = plain_groups(num_groups, channels)
    weight = hostcall.vector(weight, channels, x.dtype)
    bias = hostcall.vector(bias, channels, x.dtype)
    if groups is None or weight is None or bias is None:
        return None
    y = np.empty(x.shape, x.dtype) if out is None else hostcall.output(out, x, x)
    if y is None:
        return None
    stats = np.empty((3, n * groups))
    group_kernels_forward(xc, groups, eps, weight, bias, y.reshape(xc.shape),
                          stats[0], stats[1], stats[2])  # fmt: skip
    stats = stats.reshape(3, n, groups)  # rows by index: unpacking an array's rows costs 1 us
    return y, stats[0], stats[1], stats[2]


def _checked_group_forward(x, num_groups, weight, bias, eps, axis, out):
    """group_stats_forward with every check (CUDA arrays: :mod:`numba_bn.norm_cuda`)."""
    if any_on_device(x, weight, bias, out):
        return norm_cuda.group_forward(x, num_groups, weight, bias, eps, axis, out)
    grid = ChannelsFirst(x, axis)
    n, channels, inner = grid.shape
    groups = channels if num_groups is None else check_groups(num_groups, channels)
    eps = check_eps(eps, training=True)
    vectors = Vectors(grid.x, channels, weight=weight, bias=bias)
    out = check_norm_out(out, grid.x)
    y, work = grid.output(out)
    stats = np.full((3, n * groups), np.nan)
    if grid.x.size:
        affine = [vectors.kernel(name) for name in ("weight", "bias")]
        group_kernels_forward(grid.view(grid.x), groups, eps, *affine, work, *stats)
    mean, invstd, m2 = (s.reshape(n, groups) for s in stats)
    return grid.finish(y, work), mean, invstd, m2


def group_kernels_forward(xc, groups, eps, weight, bias, y, mean, invstd, m2):
    """Kernels of the group norm forward on channels-first (N, C, S) arrays; weight and bias
    (C,) or zero-length."""
    n, channels, inner = xc.shape
    group_channels = channels // groups  # groups >= 1: x is not empty
    grouped = (1, n * groups, group_channels * inner)
    threads, run = _plan("forward_train", xc.size, kernels.group_forward,
                         kernels.group_forward_serial)  # fmt: skip
    if threads > 1 and n * groups < 2 * threads:  # a group per item would idle some threads
        split_group_forward(_BACKEND, HOST, xc, groups, eps, tiled(weight, n), tiled(bias, n), y,
                            mean, invstd, m2)  # fmt: skip
        return
    forward = kernels.group_forward if threads > 1 else kernels.group_forward_serial
    if not forward.overloads:
        _expect_backward(forward, xc, f"group_norm {groups}", kernels.group_backward,
                         kernels.group_backward_serial)  # fmt: skip
    run(xc.reshape(grouped), group_channels, eps, weight, bias, y.reshape(grouped), mean, invstd,
        m2)  # fmt: skip


def group_stats_backward(dy, x, mean, invstd, num_groups, weight, axis, *, out=None):
    """Group norm backward: (dx, dweight, dbias), the gradients float64 (C,);
    ``num_groups=None``: one group per channel (instance norm)."""
    return _plain_or_checked(
        _plain_group_backward,
        _checked_group_backward,
        out,
        dy,
        x,
        mean,
        invstd,
        num_groups,
        weight,
        axis,
    )


def _plain_group_backward(dy, x, mean, invstd, num_groups, weight, axis, out):
    """group_stats_backward of a plain call; None for any other."""
    xc = plain_grid(x, axis)
    if xc is None:
        return None
    dyc = hostcall.like(dy, x, xc)
    n, channels, _ = xc.shape
    groups = plain_groups(num_groups, channels)
    if dyc is None or groups is None:
        return None
    mean, invstd = plain_stat(mean, (n, groups)), plain_stat(invstd, (n, groups))
    weight = hostcall.vector(weight, channels, x.dtype)
    if mean is None or invstd is None or weight is None:
        return None
    dx = np.empty(x.shape, x.dtype) if out is None else hostcall.output(out, x, dy, x)
    if dx is None:
        return None
    dx_view = dx.reshape(xc.shape)
    dweight, dbias = group_kernels_backward(dyc, xc, groups, mean, invstd, weight, dx_view)
    return dx, dweight, dbias


def group_kernels_backward(dyc, xc, groups, mean, invstd, weight, dx):
    """Kernels of the group norm backward on channels-first (N, C, S) arrays, S > 0: dx (=),
    and (dweight, dbias) float64 (C,); mean, invstd flat float64 (N*G,), weight (C,) or
    zero-length."""
    n, channels, inner = xc.shape
    planes = (1, n * channels, inner)
    sums, grads = np.empty((2, n * channels)), np.empty((2, channels))
    _, run = _plan("backward", xc.size, kernels.group_backward, kernels.group_backward_serial)
    run(dyc.reshape(planes), xc.reshape(planes), channels // groups, mean, invstd,
        weight, dx.reshape(planes), sums[0], sums[1], grads[0], grads[1])  # fmt: skip
    return grads[0], grads[1]


def _checked_group_backward(dy, x, mean, invstd, num_groups, weight, axis, out):
    """group_stats_backward with every check (CUDA arrays: :mod:`numba_bn.norm_cuda`)."""
    if any_on_device(dy, x, mean, invstd, weight, out):
        return norm_cuda.group_backward(dy, x, mean, invstd, num_groups, weight, axis, out)
    grid = ChannelsFirst(x, axis)
    n, channels, inner = grid.shape
    groups = channels if num_groups is None else check_groups(num_groups, channels)
    dy = check_dy(dy, grid.x)
    mean, invstd = (check_stat(v, name, (n, groups))
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    vectors = Vectors(grid.x, channels, weight=weight)
    out = check_norm_out(out, grid.x, dy=dy, x=grid.x)
    dx, work = grid.output(out)
    if grid.x.size:
        dweight, dbias = group_kernels_backward(grid.view(dy), grid.view(grid.x), groups,
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
    if spatial_dims is None and use_input_stats is True:
        result = _plain_instance_forward(x, running_mean, running_var, weight, bias, momentum,
                                         eps, axis, out)  # fmt: skip
        if result is not None:
            return result
    if any_on_device(x, running_mean, running_var, weight, bias, out):
        return norm_cuda.instance_forward(x, running_mean, running_var, weight, bias,
                                          use_input_stats, momentum, eps, axis, spatial_dims,
                                          out)  # fmt: skip
    if not isinstance(use_input_stats, (bool, np.bool_)):
        raise TypeError(f"use_input_stats must be a bool, got {type(use_input_stats).__name__}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is not None:  # NumPy's views of a torch tensor's memory, say: in place
        running_mean = HOST.view(running_mean, "running_mean")
        running_var = HOST.view(running_var, "running_var")
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
    grid = ChannelsFirst(x, axis)
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
        running_update(running_mean, running_var, mean, m2, inner, momentum)
    return y, mean, invstd


def _plain_instance_forward(x, running_mean, running_var, weight, bias, momentum, eps, axis,
                            out):  # fmt: skip
    """instance_stats_forward of a plain call with input statistics; None for any other."""
    xc = plain_grid(x, axis)
    if xc is None or xc.shape[2] < 2:
        return None
    if running_mean is not None or running_var is not None:
        channels = xc.shape[1]
        running_mean = hostcall.buffer(running_mean, channels, x.dtype)
        running_var = hostcall.buffer(running_var, channels, x.dtype)
        if running_mean is None or running_var is None or not hostcall.momentum(momentum):
            return None
    result = _plain_group_forward(x, None, weight, bias, eps, axis, out)
    if result is None:
        return None
    y, mean, invstd, m2 = result
    if running_mean is not None:
        running_update(running_mean, running_var, mean, m2, xc.shape[2], momentum)
    return y, mean, invstd


def instance_stats_backward(dy, x, mean, invstd, weight, axis, *, spatial_dims=None, out=None):
    """Instance norm backward: (dx, dweight, dbias), the gradients float64 (C,); ``mean``,
    ``invstd`` (N, C), or (C,) for one sample (:func:`instance_batch`)."""
    if spatial_dims is None:  # a batch: group norm's backward (its checked path takes CUDA)
        return group_stats_backward(dy, x, mean, invstd, None, weight, axis, out=out)
    if any_on_device(dy, x, mean, invstd, weight, out):
        return norm_cuda.instance_backward(dy, x, mean, invstd, weight, axis, spatial_dims, out)
    x, one = instance_batch(x, check_spatial_dims(spatial_dims))
    if not one:
        return group_stats_backward(dy, x, mean, invstd, None, weight, axis, out=out)
    channels = ChannelsFirst(x, axis).shape[1]
    dy = check_dy(dy, x[0])[None]
    mean, invstd = (check_stat(v, name, (channels,)).reshape(1, channels)
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    given, out = sample_out(out, x[0])
    dx, dweight, dbias = group_stats_backward(dy, x, mean, invstd, None, weight, axis, out=out)
    return dx[0] if given is None else given, dweight, dbias


def _frozen_instance_forward(x, running_mean, running_var, weight, bias, eps, axis, out):
    """Instance norm with the running statistics: batch norm's eval forward."""
    if running_mean is None:
        raise ValueError("running_mean and running_var are required when use_input_stats=False")
    grid = ChannelsFirst(x, axis)
    y = frozen_forward(grid.x, running_mean, running_var, weight, bias, eps, grid.axis, out=out)
    n = grid.shape[0]
    mean = np.broadcast_to(np.asarray(running_mean, np.float64), (n, grid.shape[1])).copy()
    var = np.asarray(running_var, np.float64)
    invstd = np.broadcast_to(HOST.invstd(var, eps), mean.shape).copy()
    return y, mean, invstd


def layer_stats_forward(x, normalized_shape, weight, bias, eps, *, out=None):
    """Layer norm forward: (y, mean, invstd), float64 with x's leading shape."""
    return _plain_or_checked(
        _plain_layer_forward, _checked_layer_forward, out, x, normalized_shape, weight, bias, eps
    )


def _plain_layer_forward(x, normalized_shape, weight, bias, eps, out):
    """layer_stats_forward of a plain call; None for any other."""
    plain = plain_layer_shape(x, normalized_shape)
    if plain is None or not hostcall.training_eps(eps):
        return None
    rows, width, shape = plain
    weight, bias = plain_elements(weight, shape, x.dtype), plain_elements(bias, shape, x.dtype)
    if weight is None or bias is None:
        return None
    y = np.empty(x.shape, x.dtype) if out is None else hostcall.output(out, x, x)
    if y is None:
        return None
    stats = np.empty((2, rows))
    layer_kernels_forward(x.reshape(1, rows, width), eps, weight, bias, y, stats[0], stats[1])
    lead = x.shape[: x.ndim - len(shape)]
    return y, stats[0].reshape(lead), stats[1].reshape(lead)


def layer_kernels_forward(xc, eps, weight, bias, y, mean, invstd):
    """Kernels of the layer norm forward on ``xc`` (1, rows, width), y of any shape of its
    size: mean, invstd (rows,) float64 (=)."""
    threads, run = _plan("forward_train", xc.size, kernels.layer_forward,
                         kernels.layer_forward_serial)  # fmt: skip
    forward = kernels.layer_forward if threads > 1 else kernels.layer_forward_serial
    if not forward.overloads:
        _expect_backward(forward, xc, "layer_norm", kernels.layer_backward,
                         kernels.layer_backward_serial)  # fmt: skip
    run(xc, eps, weight, bias, y.reshape(xc.shape), mean, invstd)


def _checked_layer_forward(x, normalized_shape, weight, bias, eps, out):
    """layer_stats_forward with every check (a plain call has no CUDA array to refuse)."""
    refuse_device(x=x, weight=weight, bias=bias, out=out)
    x = check_input(x, "x", 1)
    shape = check_normalized_shape(normalized_shape, x.shape)
    lead = x.shape[: x.ndim - len(shape)]
    rows, width = math.prod(lead), math.prod(shape)
    eps = check_eps(eps, training=True)
    weight, bias = element_vectors(x, shape, weight=weight, bias=bias)
    out = check_norm_out(out, x)
    dtype = compute_dtype(x.dtype)
    mean, invstd = np.full(rows, np.nan), np.full(rows, np.nan)
    y = out if out is not None and dtype == x.dtype else np.empty(x.shape, dtype)
    if x.size:
        xc = np.ascontiguousarray(x, dtype).reshape(1, rows, width)
        layer_kernels_forward(xc, eps, weight, bias, y, mean, invstd)
    return _in_dtype(y, x, out), mean.reshape(lead), invstd.reshape(lead)


def layer_stats_backward(dy, x, mean, invstd, normalized_shape, weight, *, out=None):
    """Layer norm backward: (dx, dweight, dbias), the gradients float64 of normalized_shape."""
    return _plain_or_checked(
        _plain_layer_backward,
        _checked_layer_backward,
        out,
        dy,
        x,
        mean,
        invstd,
        normalized_shape,
        weight,
    )


def _plain_layer_backward(dy, x, mean, invstd, normalized_shape, weight, out):
    """layer_stats_backward of a plain call; None for any other."""
    plain = plain_layer_shape(x, normalized_shape)
    if plain is None:
        return None
    rows, width, shape = plain
    view = x.reshape(1, rows, width)
    dyc = hostcall.like(dy, x, view)
    lead = x.shape[: x.ndim - len(shape)]
    mean, invstd = plain_stat(mean, lead), plain_stat(invstd, lead)
    weight = plain_elements(weight, shape, x.dtype)
    if dyc is None or mean is None or invstd is None or weight is None:
        return None
    dx = np.empty(x.shape, x.dtype) if out is None else hostcall.output(out, x, dy, x)
    if dx is None:
        return None
    grads = np.empty((2, width))
    layer_kernels_backward(dyc, view, mean, invstd, weight, dx, grads[0], grads[1])
    return dx, grads[0].reshape(shape), grads[1].reshape(shape)


def layer_kernels_backward(dyc, xc, mean, invstd, weight, dx, dweight, dbias):
    """Kernels of the layer norm backward on (1, rows, width) views, dx of any shape of their
    size: dweight, dbias (width,) float64 (=)."""
    _, run = _plan("backward", xc.size, kernels.layer_backward, kernels.layer_backward_serial)
    run(dyc, xc, mean, invstd, weight, dx.reshape(xc.shape), dweight, dbias)


def _checked_layer_backward(dy, x, mean, invstd, normalized_shape, weight, out):
    """layer_stats_backward with every check."""
    refuse_device(dy=dy, x=x, mean=mean, invstd=invstd, weight=weight, out=out)
    x = check_input(x, "x", 1)
    shape = check_normalized_shape(normalized_shape, x.shape)
    lead = x.shape[: x.ndim - len(shape)]
    rows, width = math.prod(lead), math.prod(shape)
    dy = check_dy(dy, x)
    mean, invstd = (check_stat(v, name, lead)
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    (weight,) = element_vectors(x, shape, weight=weight)
    out = check_norm_out(out, x, dy=dy, x=x)
    dtype = compute_dtype(x.dtype)
    dx = out if out is not None and dtype == x.dtype else np.empty(x.shape, dtype)
    dweight, dbias = np.zeros(width), np.zeros(width)
    if x.size:
        view = (1, rows, width)
        layer_kernels_backward(np.ascontiguousarray(dy, dtype).reshape(view),
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
