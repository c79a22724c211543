"""Group norm (and instance norm, G = C) composed from batch norm's split backend steps, on any
backend and its memory: the CPU's path for few groups, and the whole of the CUDA path.

Views of channels-first x (N, C, S), C-contiguous, as in :mod:`numba_bn.cpu.norm_kernels`:

* statistics: ``batch_stats`` on ``(1, N*G, C/G*S)``, one "channel" per group ``n*G + g``;
* y: ``normalize`` on ``(1, N*C, S)`` with each group's mean and invstd repeated for its C/G
  channels and weight, bias tiled to N*C;
* dx (docs/backward.md, "Group, instance and layer norm"): ``g = dy * w`` by ``normalize`` on
  (N, C, S) with mean 0 and invstd 1 (``((dy - 0) - 0) * w + 0``: one rounding, the product's),
  then ``backward_sums`` and ``backward_dx`` on the grouped view with no weight, which is
  ``dx = invstd * (g - sum_g/m - (x - mu) * invstd**2 * sum_g_xmu/m)``;
* dweight, dbias: ``backward_sums`` of dy on ``(1, N*C, S)`` with the repeated means, then per
  channel ``sum_n invstd * sum_dy_xmu`` and ``sum_n sum_dy`` in float64.

The per-group and per-channel vectors (N*G and N*C values) are repeated, tiled, finalised and
summed over n on the host, in NumPy, for either memory (a device round trip of a few vectors,
as the statistics of SyncBatchNorm's exchange in :mod:`numba_bn.ops`): no kernel beyond batch
norm's. Everything here is float64 except the views and weight, bias (the compute dtype).
"""

import numpy as np

from .cpu.norm_kernels import group_parameter_sums
from .stats import invstd_of


def tiled(vector, n):
    """``vector`` (C,) repeated n times, (N*C,), as the group kernels index it (n*C + c);
    zero-length stays zero-length. (np.tile costs 3 us on a small vector, this 0.8.)"""
    if not vector.size:
        return vector
    result = np.empty((n, vector.size), vector.dtype)
    result[:] = vector
    return result.reshape(-1)


def tiled_in(memory, vector, n):
    """:func:`tiled` of a vector of ``memory``, in ``memory`` (through the host)."""
    if not vector.size:
        return vector
    return memory.from_host(tiled(memory.to_host(vector), n))


def split_group_forward(backend, memory, xc, groups, eps, weight, bias, y, mean, invstd, m2):
    """y (=, like ``xc`` (N, C, S)) and mean, invstd, m2 (=, float64 (N*G,)) of ``memory``;
    weight, bias tiled to (N*C,) or zero-length. x must not be empty."""
    n, channels, inner = xc.shape
    group_channels = channels // groups
    count = backend.batch_stats(xc.reshape(1, n * groups, group_channels * inner), mean=mean,
                                m2=m2)  # fmt: skip
    host_invstd = np.empty(n * groups)
    invstd_of(count, memory.to_host(m2), eps, host_invstd)
    memory.from_host(host_invstd, out=invstd)
    per_channel = [memory.from_host(np.repeat(v, group_channels))
                   for v in (memory.to_host(mean), host_invstd)]  # fmt: skip
    planes = (1, n * channels, inner)
    backend.normalize(xc.reshape(planes), mean=per_channel[0], invstd=per_channel[1],
                      weight=weight, bias=bias, y=y.reshape(planes))  # fmt: skip


def split_group_backward(backend, memory, dyc, xc, groups, mean, invstd, weight, dx):
    """dx (=, like ``xc`` (N, C, S)), and (dweight, dbias) float64 (C,) on the host; mean, invstd
    flat float64 (N*G,) and weight (C,) (or zero-length) of ``memory``. x must not be empty."""
    n, channels, inner = xc.shape
    group_channels = channels // groups
    float64 = np.dtype(np.float64)
    # dweight, dbias: the per-(n, c) sums of dy and dy * (x - mu), with mu repeated per channel
    planes = (1, n * channels, inner)
    channel_mean = memory.from_host(np.repeat(memory.to_host(mean), group_channels))
    sums = memory.empty((2, n * channels), float64)
    backend.backward_sums(dyc.reshape(planes), xc.reshape(planes), mean=channel_mean,
                          sum_dy=sums[0], sum_dy_xmu=sums[1])  # fmt: skip
    # term 1: g = dy * w, the gradient of x_hat, which batch norm's steps reduce per group
    none = memory.empty(0, xc.dtype)
    if weight.size:
        g = memory.empty(xc.shape, xc.dtype)
        backend.normalize(dyc, mean=memory.full(channels, 0.0, float64),
                          invstd=memory.full(channels, 1.0, float64), weight=weight, bias=none,
                          y=g)  # fmt: skip
    else:
        g = dyc
    grouped = (1, n * groups, group_channels * inner)
    group_sums = memory.empty((2, n * groups), float64)
    backend.backward_sums(g.reshape(grouped), xc.reshape(grouped), mean=mean,
                          sum_dy=group_sums[0], sum_dy_xmu=group_sums[1])  # fmt: skip
    backend.backward_dx(g.reshape(grouped), xc.reshape(grouped), mean=mean, invstd=invstd,
                        weight=none, sum_dy=group_sums[0], sum_dy_xmu=group_sums[1],
                        count=group_channels * inner, dx=dx.reshape(grouped))  # fmt: skip
    return parameter_sums(memory.to_host(sums), memory.to_host(invstd), n, groups)


def parameter_sums(sums, invstd, n, groups):
    """(dweight, dbias) float64 (C,) from the per-(n, c) ``sums`` (2, N*C) (sum_dy, sum_dy_xmu)
    and invstd (N*G,), host arrays: the CPU driver's own step
    (:func:`.cpu.norm_kernels.group_parameter_sums`)."""
    channels = sums.shape[1] // n
    grads = np.empty((2, channels))
    group_parameter_sums(sums[0], sums[1], invstd, channels // groups, grads[0], grads[1])
    return grads[0], grads[1]


def running_update(running_mean, running_var, mean, m2, inner, momentum):
    """PyTorch's instance norm update of the running buffers (host arrays, in place, N >= 1,
    S >= 2): the mean over the batch of the per-instance means and unbiased variances (float64
    (N, C)), ``momentum`` weighting it. Both buffers in one (2, C) float64 pass (11 -> 5 us on 8
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
