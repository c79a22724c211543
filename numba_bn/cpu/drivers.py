"""Parallel drivers: split the canonical view into the serial ranges of :mod:`.kernels`.

Arguments come validated, C-contiguous and in one dtype (float32 or float64) from
:mod:`numba_bn.functional`; per-channel outputs are float64. Absent weight/bias/running buffers
are zero-length arrays.

Work partition (the merge order inside a channel never depends on it):

* planes, ``C >= 2 * threads``: one channel per work item; statistics and normalisation (or the
  backward reduction and dx) run back to back while the channel is still in L2, so x is read
  from memory once.
* planes, few channels: (channel, segment) work items for statistics, a merge per channel, then
  (channel, segment) items again for the elementwise pass; C = 1 still uses every core.
* rows: (row chunk, channel tile) items reduce into per-chunk partials, merged per channel in
  chunk order, then the elementwise pass over the same items.
"""

import numpy as np
from numba import njit, prange

from ..stats import chan_merge, finalize, split_hi_lo
from .kernels import (
    CHANNEL_TILE,
    PLANE_BLOCK,
    ROW_CHUNK,
    affine_run,
    dx_run,
    plane_affine,
    plane_channel_stats,
    plane_channel_sums,
    plane_dx,
    plane_segment_stats,
    plane_segment_sums,
    plane_segments_jit,
    rows_affine,
    rows_chunk_stats,
    rows_chunk_sums,
    rows_dx,
)

CACHE = True


# ------------------------------------------------------------------------- per-channel helpers
@njit(inline="always")
def _row_items(outer, channels):
    return -(-outer // ROW_CHUNK), -(-channels // CHANNEL_TILE)


@njit(inline="always")
def _row_item_range(item, ntiles, outer, channels):
    k, t = item // ntiles, item % ntiles
    r0, c0 = k * ROW_CHUNK, t * CHANNEL_TILE
    return k, r0, min(r0 + ROW_CHUNK, outer), c0, min(c0 + CHANNEL_TILE, channels)


@njit(inline="always")
def _train_coefficients(c, count, mean, m2, eps, weight, bias, coef, save_mean, save_invstd):
    """Channel c: save (mean, invstd); coefficients of y = (x - mean) * scale + shift."""
    invstd, _ = finalize(count, mean, m2, eps)
    save_mean[c] = mean
    save_invstd[c] = invstd
    scale = invstd * weight[c] if weight.size else invstd
    split_hi_lo(mean, coef[0], coef[1], c)
    coef[2, c] = scale
    coef[3, c] = bias[c] if bias.size else 0.0


@njit(inline="always")
def _dx_coefficients(c, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """Channel c: the terms of dx = k * (dy - mean_dy - (x - mean) * proj), docs/backward.md."""
    split_hi_lo(mean, coef[0], coef[1], c)
    coef[2, c] = invstd * invstd * sum_dy_xmu / count  # term 3: projection onto x_hat
    coef[3, c] = sum_dy / count  # term 2: mean of dy
    coef[4, c] = invstd * weight[c] if weight.size else invstd  # final scale


# ---------------------------------------------------------------------------- split primitives
@njit(parallel=True, cache=CACHE)
def channel_stats(x, mean, m2):
    """mean, M2 (=, float64, (C,)) of each channel of ``x`` (outer, C, inner); returns the count."""
    outer, channels, inner = x.shape
    if inner == 1:
        x2 = x.reshape(outer, channels)
        nchunks, ntiles = _row_items(outer, channels)
        part_mean = np.empty((nchunks, channels))
        part_m2 = np.empty((nchunks, channels))
        for item in prange(nchunks * ntiles):
            k, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            scratch = np.empty((2, c1 - c0))
            rows_chunk_stats(
                x2, r0, r1, c0, c1, part_mean[k, c0:c1], part_m2[k, c0:c1], scratch[0], scratch[1]
            )
        for c in prange(channels):
            count, mu, sq = 0.0, 0.0, 0.0
            for k in range(nchunks):
                rows = float(min(ROW_CHUNK, outer - k * ROW_CHUNK))
                count, mu, sq = chan_merge(count, mu, sq, rows, part_mean[k, c], part_m2[k, c])
            mean[c] = mu
            m2[c] = sq
    else:
        nseg = outer * plane_segments_jit(inner)
        part = np.empty((3, channels, nseg))
        for item in prange(channels * nseg):
            c, g = item // nseg, item % nseg
            part[0, c, g], part[1, c, g], part[2, c, g] = plane_segment_stats(x, c, g)
        for c in prange(channels):
            count, mu, sq = 0.0, 0.0, 0.0
            for g in range(nseg):
                count, mu, sq = chan_merge(
                    count, mu, sq, part[0, c, g], part[1, c, g], part[2, c, g]
                )
            mean[c] = mu
            m2[c] = sq
    return float(outer * inner)


@njit(parallel=True, cache=CACHE)
def normalize(x, coef, y):
    """y = ((x - mean_hi) - mean_lo) * scale + shift with per-channel ``coef`` rows."""
    outer, channels, inner = x.shape
    if inner == 1:
        x2 = x.reshape(outer, channels)
        y2 = y.reshape(outer, channels)
        nchunks, ntiles = _row_items(outer, channels)
        for item in prange(nchunks * ntiles):
            _, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            rows_affine(x2, y2, r0, r1, c0, c1, coef)
    else:
        nblk = plane_segments_jit(inner)
        for item in prange(outer * channels * nblk):
            n, c, b = item // (channels * nblk), (item // nblk) % channels, item % nblk
            s0, s1 = b * PLANE_BLOCK, min((b + 1) * PLANE_BLOCK, inner)
            affine_run(
                x[n, c, s0:s1], y[n, c, s0:s1], coef[0, c], coef[1, c], coef[2, c], coef[3, c]
            )


@njit(parallel=True, cache=CACHE)
def backward_sums(dy, x, mean, sum_dy, sum_dy_xmu):
    """sum_dy, sum_dy_xmu (=, float64, (C,)): the per-channel reduction of the backward."""
    outer, channels, inner = x.shape
    if inner == 1:
        dy2 = dy.reshape(outer, channels)
        x2 = x.reshape(outer, channels)
        nchunks, ntiles = _row_items(outer, channels)
        part = np.empty((2, nchunks, channels))
        for item in prange(nchunks * ntiles):
            k, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            rows_chunk_sums(dy2, x2, r0, r1, c0, c1, mean, part[0, k, c0:c1], part[1, k, c0:c1])
        for c in prange(channels):
            total_dy, total_dy_xmu = 0.0, 0.0
            for k in range(nchunks):
                total_dy += part[0, k, c]
                total_dy_xmu += part[1, k, c]
            sum_dy[c] = total_dy
            sum_dy_xmu[c] = total_dy_xmu
    else:
        nseg = outer * plane_segments_jit(inner)
        part = np.empty((2, channels, nseg))
        for item in prange(channels * nseg):
            c, g = item // nseg, item % nseg
            part[0, c, g], part[1, c, g] = plane_segment_sums(dy, x, c, g, mean[c])
        for c in prange(channels):
            total_dy, total_dy_xmu = 0.0, 0.0
            for g in range(nseg):
                total_dy += part[0, c, g]
                total_dy_xmu += part[1, c, g]
            sum_dy[c] = total_dy
            sum_dy_xmu[c] = total_dy_xmu


@njit(parallel=True, cache=CACHE)
def backward_dx(dy, x, coef, dx):
    """dx from per-channel ``coef`` rows (mean_hi, mean_lo, proj, mean_dy, k)."""
    outer, channels, inner = x.shape
    if inner == 1:
        dy2 = dy.reshape(outer, channels)
        x2 = x.reshape(outer, channels)
        dx2 = dx.reshape(outer, channels)
        nchunks, ntiles = _row_items(outer, channels)
        for item in prange(nchunks * ntiles):
            _, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            rows_dx(dy2, x2, dx2, r0, r1, c0, c1, coef)
    else:
        nblk = plane_segments_jit(inner)
        for item in prange(outer * channels * nblk):
            n, c, b = item // (channels * nblk), (item // nblk) % channels, item % nblk
            s0, s1 = b * PLANE_BLOCK, min((b + 1) * PLANE_BLOCK, inner)
            dx_run(
                dy[n, c, s0:s1],
                x[n, c, s0:s1],
                dx[n, c, s0:s1],
                coef[0, c],
                coef[1, c],
                coef[2, c],
                coef[3, c],
                coef[4, c],
            )


# ------------------------------------------------------------------------------ fused drivers
@njit(cache=CACHE)
def update_running(running_mean, running_var, count, mean, m2, momentum, unbiased):
    """r = (1 - momentum) * r + momentum * batch; momentum weights the new batch."""
    keep = 1.0 - momentum
    for c in range(mean.size):
        var = m2[c] / (count - 1.0) if unbiased else m2[c] / count
        running_mean[c] = keep * running_mean[c] + momentum * mean[c]
        running_var[c] = keep * running_var[c] + momentum * var


@njit(parallel=True, cache=CACHE)
def forward_train(
    x,
    weight,
    bias,
    eps,
    running_mean,
    running_var,
    momentum,
    unbiased,
    nan_check,
    fused,
    y,
    save_mean,
    save_invstd,
    save_m2,
):
    """Batch statistics, normalisation and the running update in one call.

    Writes y, save_mean, save_invstd and save_m2 (M2 per channel, float64). Returns False, with
    the running buffers untouched, when ``nan_check`` is set and a statistic is not finite.
    """
    outer, channels, inner = x.shape
    count = float(outer * inner)
    coef = np.empty((4, channels), x.dtype)
    if fused:
        for c in prange(channels):
            _, mu, sq = plane_channel_stats(x, c)
            save_m2[c] = sq
            _train_coefficients(c, count, mu, sq, eps, weight, bias, coef, save_mean, save_invstd)
            for n in range(outer):
                plane_affine(x, y, n, c, coef)
    else:
        channel_stats(x, save_mean, save_m2)
        for c in range(channels):
            mu, sq = save_mean[c], save_m2[c]
            _train_coefficients(c, count, mu, sq, eps, weight, bias, coef, save_mean, save_invstd)
    if nan_check:
        for c in range(channels):
            if not (np.isfinite(save_mean[c]) and np.isfinite(save_m2[c])):
                return False
    if running_mean.size:
        update_running(running_mean, running_var, count, save_mean, save_m2, momentum, unbiased)
    if not fused:
        normalize(x, coef, y)
    return True


@njit(cache=CACHE)
def forward_eval(x, weight, bias, running_mean, running_var, eps, y):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias."""
    channels = x.shape[1]
    coef = np.empty((4, channels), x.dtype)
    for c in range(channels):
        invstd = 1.0 / np.sqrt(np.float64(running_var[c]) + eps)
        coef[0, c] = running_mean[c]
        coef[1, c] = 0.0
        coef[2, c] = invstd * weight[c] if weight.size else invstd
        coef[3, c] = bias[c] if bias.size else 0.0
    normalize(x, coef, y)


@njit(parallel=True, cache=CACHE)
def backward(dy, x, mean, invstd, weight, fused, dx, sum_dy, sum_dy_xmu):
    """Training-mode backward: the per-channel reduction, then dx (docs/backward.md).

    Writes dx and the float64 reductions sum_dy (= dbias) and sum_dy_xmu (dweight is
    invstd * sum_dy_xmu).
    """
    outer, channels, inner = x.shape
    count = float(outer * inner)
    coef = np.empty((5, channels), x.dtype)
    if fused:
        for c in prange(channels):
            sum_dy[c], sum_dy_xmu[c] = plane_channel_sums(dy, x, c, mean[c])
            _dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)
            for n in range(outer):
                plane_dx(dy, x, dx, n, c, coef)
        return
    backward_sums(dy, x, mean, sum_dy, sum_dy_xmu)
    for c in range(channels):
        _dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)
    backward_dx(dy, x, coef, dx)
