"""Drivers: split the canonical view into the serial ranges of :mod:`.kernels`.

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

import types

import numpy as np
from numba import prange

from ..stats import AFFINE_ROWS, DX_ROWS, kernel
from .kernels import (
    CHANNEL_TILE,
    PLANE_BLOCK,
    ROW_CHUNK,
    add_parts,
    affine_range,
    channel_segments_jit,
    dx_coefficients,
    dx_range,
    eval_coefficients,
    merge_parts,
    plane_channel_backward,
    plane_channel_train,
    plane_segment_stats,
    plane_segment_sums,
    plane_segments_jit,
    row_span_rows,
    rows_affine,
    rows_chunk_stats,
    rows_chunk_sums,
    rows_dx,
    train_coefficients,
    update_running,
)

CACHE = True


def _twins(template):
    """Compile ``template`` twice: ``parallel=True``, and serial (``prange`` runs as ``range``).

    The serial twin serves inputs too small to repay waking the thread pool (a parallel launch
    costs ~5 us on an idle machine and milliseconds on a loaded one). Both run the same code in
    the same order, so they give bitwise the same results. The copy gets its own qualname so
    that Numba's on-disk cache keeps the two apart.
    """
    serial = types.FunctionType(
        template.__code__, template.__globals__, template.__name__ + "_serial",
        template.__defaults__, template.__closure__,
    )  # fmt: skip
    serial.__qualname__ = template.__qualname__ + "_serial"
    serial.__doc__ = template.__doc__
    return kernel(parallel=True, cache=CACHE)(template), kernel(cache=CACHE)(serial)


# ------------------------------------------------------------------------------ work items
# Every prange body below is a call into .kernels (index arithmetic aside). Keeping the floating
# point inside separately compiled kernels is what makes the parallel and serial twins bitwise
# identical: float code written inline in a prange body was seen to round differently (1 ulp)
# between the twins once the function held several parallel loops.
@kernel(inline="always")
def _row_items(outer, channels):
    return -(-outer // ROW_CHUNK), -(-channels // CHANNEL_TILE)


@kernel(inline="always")
def _row_item_range(item, ntiles, outer, channels):
    k, t = item // ntiles, item % ntiles
    r0, c0 = k * ROW_CHUNK, t * CHANNEL_TILE
    return k, r0, min(r0 + ROW_CHUNK, outer), c0, min(c0 + CHANNEL_TILE, channels)


@kernel(inline="always")
def _row_span_items(outer, channels):
    """(items, rows per item) of the elementwise passes of the rows layout: whole rows."""
    rows = row_span_rows(channels)
    return -(-outer // rows), rows


@kernel(inline="always")
def _plane_item(item, channels, nblk, inner):
    """(channel, start, stop) of elementwise item ``item`` = (n, c, block) in the flat array."""
    plane, b = item // nblk, item % nblk
    start = plane * inner + b * PLANE_BLOCK
    return plane % channels, start, min(start + PLANE_BLOCK, (plane + 1) * inner)


# ------------------------------------------------------------------------------- loop nests
# inline="always" inlines these into each driver before Numba's parfor pass, so their prange
# loops run on threads in the parallel twin and as plain loops in the serial one.
@kernel(inline="always")
def _stats_loops(x, mean, m2):
    """mean, M2 (=) per channel: partials per work item, then a merge per channel."""
    outer, channels, inner = x.shape
    if inner == 1:
        x2 = x.reshape(outer, channels)
        nparts, ntiles = _row_items(outer, channels)
        part = np.empty((3, nparts, channels))
        for item in prange(nparts * ntiles):
            k, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            scratch = np.empty((2, c1 - c0))
            part[0, k, c0:c1] = rows_chunk_stats(
                x2, r0, r1, c0, c1, part[1, k, c0:c1], part[2, k, c0:c1], scratch[0], scratch[1]
            )
    else:
        nparts = channel_segments_jit(outer, inner)
        part = np.empty((3, nparts, channels))
        for item in prange(channels * nparts):
            c, g = item // nparts, item % nparts
            part[0, g, c], part[1, g, c], part[2, g, c] = plane_segment_stats(x, c, g)
    for c in prange(channels):
        _, mean[c], m2[c] = merge_parts(part, c)


@kernel(inline="always")
def _normalize_loops(x, coef, y):
    outer, channels, inner = x.shape
    if inner == 1:
        x2 = x.reshape(outer, channels)
        y2 = y.reshape(outer, channels)
        nitems, rows = _row_span_items(outer, channels)
        for item in prange(nitems):
            r0 = item * rows
            rows_affine(x2, y2, r0, min(r0 + rows, outer), 0, channels, coef)
    else:
        x_flat, y_flat = x.reshape(x.size), y.reshape(y.size)
        nblk = plane_segments_jit(inner)
        for item in prange(outer * channels * nblk):
            c, start, stop = _plane_item(item, channels, nblk, inner)
            affine_range(x_flat, y_flat, start, stop, coef, c)


@kernel(inline="always")
def _sums_loops(dy, x, mean, sum_dy, sum_dy_xmu):
    """sum_dy, sum_dy_xmu (=) per channel: partials per work item, added in part order."""
    outer, channels, inner = x.shape
    if inner == 1:
        dy2 = dy.reshape(outer, channels)
        x2 = x.reshape(outer, channels)
        nparts, ntiles = _row_items(outer, channels)
        part = np.empty((2, nparts, channels))
        for item in prange(nparts * ntiles):
            k, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            rows_chunk_sums(dy2, x2, r0, r1, c0, c1, mean, part[0, k, c0:c1], part[1, k, c0:c1])
    else:
        nparts = channel_segments_jit(outer, inner)
        part = np.empty((2, nparts, channels))
        for item in prange(channels * nparts):
            c, g = item // nparts, item % nparts
            part[0, g, c], part[1, g, c] = plane_segment_sums(dy, x, c, g, mean[c])
    for c in prange(channels):
        sum_dy[c], sum_dy_xmu[c] = add_parts(part, c)


@kernel(inline="always")
def _dx_loops(dy, x, coef, dx):
    outer, channels, inner = x.shape
    if inner == 1:
        dy2 = dy.reshape(outer, channels)
        x2 = x.reshape(outer, channels)
        dx2 = dx.reshape(outer, channels)
        nitems, rows = _row_span_items(outer, channels)
        for item in prange(nitems):
            r0 = item * rows
            rows_dx(dy2, x2, dx2, r0, min(r0 + rows, outer), 0, channels, coef)
    else:
        dy_flat, x_flat, dx_flat = dy.reshape(dy.size), x.reshape(x.size), dx.reshape(dx.size)
        nblk = plane_segments_jit(inner)
        for item in prange(outer * channels * nblk):
            c, start, stop = _plane_item(item, channels, nblk, inner)
            dx_range(dy_flat, x_flat, dx_flat, start, stop, coef, c)


# ------------------------------------------------------------------------------------ drivers
def _channel_stats(x, mean, m2):
    """mean, M2 (=, float64, (C,)) of each channel of ``x`` (outer, C, inner); returns the count."""
    _stats_loops(x, mean, m2)
    return float(x.shape[0] * x.shape[2])


def _normalize(x, coef, y):
    """y = ((x * pre - mean_hi) - mean_lo) * scale + shift with per-channel ``coef`` rows."""
    _normalize_loops(x, coef, y)


def _backward_sums(dy, x, mean, sum_dy, sum_dy_xmu):
    """sum_dy, sum_dy_xmu (=, float64, (C,)): the per-channel reduction of the backward."""
    _sums_loops(dy, x, mean, sum_dy, sum_dy_xmu)


def _backward_dx(dy, x, coef, dx):
    """dx from per-channel ``coef`` dx rows (mean_hi, mean_lo, proj, mean_dy, k, pre)."""
    _dx_loops(dy, x, coef, dx)


def _forward_train(
    x, weight, bias, eps, running_mean, running_var, momentum, unbiased, nan_check, fused,
    y, save_mean, save_invstd, save_m2,
):  # fmt: skip
    """Batch statistics, normalisation and the running update in one call.

    Writes y, save_mean, save_invstd and save_m2 (M2 per channel, float64). Returns False, with
    the running buffers untouched, when ``nan_check`` is set and a statistic is not finite.
    ``fused`` (planes only): one channel per work item, statistics and normalisation back to back.
    """
    outer, channels, inner = x.shape
    count = float(outer * inner)
    coef = np.empty((AFFINE_ROWS, channels), x.dtype)
    if fused:
        for c in prange(channels):
            plane_channel_train(x, c, eps, weight, bias, coef, y, save_mean, save_invstd, save_m2)
    else:
        _stats_loops(x, save_mean, save_m2)
        for c in range(channels):
            train_coefficients(c, count, save_mean[c], save_m2[c], eps, weight, bias, coef,
                               save_mean, save_invstd)  # fmt: skip
    if nan_check and not (np.isfinite(save_mean).all() and np.isfinite(save_m2).all()):
        return False
    if running_mean.size:
        update_running(running_mean, running_var, count, save_mean, save_m2, momentum, unbiased)
    if not fused:
        _normalize_loops(x, coef, y)
    return True


def _forward_eval(x, weight, bias, running_mean, running_var, eps, y):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias."""
    coef = np.empty((AFFINE_ROWS, x.shape[1]), x.dtype)
    eval_coefficients(weight, bias, running_mean, running_var, eps, coef)
    _normalize_loops(x, coef, y)


def _backward(dy, x, mean, invstd, weight, fused, dx, sum_dy, sum_dy_xmu):
    """Training-mode backward: the per-channel reduction, then dx (docs/backward.md).

    Writes dx and the float64 reductions sum_dy (= dbias) and sum_dy_xmu (dweight is
    invstd * sum_dy_xmu). ``fused`` as in forward_train.
    """
    outer, channels, inner = x.shape
    count = float(outer * inner)
    coef = np.empty((DX_ROWS, channels), x.dtype)
    if fused:
        for c in prange(channels):
            plane_channel_backward(dy, x, c, mean, invstd, weight, coef, dx, sum_dy, sum_dy_xmu)
    else:
        _sums_loops(dy, x, mean, sum_dy, sum_dy_xmu)
        for c in range(channels):
            dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)
        _dx_loops(dy, x, coef, dx)


channel_stats, channel_stats_serial = _twins(_channel_stats)
normalize, normalize_serial = _twins(_normalize)
backward_sums, backward_sums_serial = _twins(_backward_sums)
backward_dx, backward_dx_serial = _twins(_backward_dx)
forward_train, forward_train_serial = _twins(_forward_train)
forward_eval, forward_eval_serial = _twins(_forward_eval)
backward, backward_serial = _twins(_backward)
