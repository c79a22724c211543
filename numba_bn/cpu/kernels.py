"""Serial range kernels on the canonical ``(outer, C, inner)`` view.

Each kernel covers one channel or one segment of a plane (planes, ``inner > 1``), or one chunk of
rows and a tile of channels (rows, ``inner == 1``); the drivers in :mod:`numba_bn.cpu.drivers`
and the C shim of the plugin split the work into these ranges. None of them allocates: scratch
and outputs come from the caller, so they can be exported through ``@cfunc``. Runs inside a
plane are addressed as ``[start, stop)`` of the flattened array, so the hot loops create no
array views (each view costs reference counting). Hot loops index with unsigned integers: a
signed index of unknown sign makes Numba emit negative-index wraparound, which stops LLVM from
vectorising the loop.

Outputs are overwritten (``=``), never accumulated. Memory traffic per element:

=============================  ============================  ==========================
kernel                         computes                      traffic
=============================  ============================  ==========================
plane_channel_stats / rows_    (count, mean, M2)             read x
affine_range / rows_affine     y = (x - mean) * scale + b    read x, write y
plane_channel_sums / rows_     sum_dy, sum_dy_xmu            read dy, x
dx_range / rows_dx             dx from the three terms       read dy, x; write dx
plane_channel_train            all of the forward, fused     read x, write y (x in L2)
plane_channel_backward         all of the backward, fused    read dy, x; write dx
=============================  ============================  ==========================

Block sizes fix the merge order; the merge order fixes the result. They are constants so that the
result for a shape is the same for any number of threads and on every entry point (parallel and
serial drivers, C plugin).
"""

import math

import numpy as np
from numba import uint64

from ..stats import (
    CONTRACT_FASTMATH,
    REDUCE_FASTMATH,
    chan_merge,
    finalize,
    kernel,
    prescale,
    runs_stats,
    split_hi_lo,
)

PLANE_BLOCK = 4096  # elements of one plane reduced at a time: 16 KiB of float32, in L1
ROW_BLOCK = 32  # rows reduced at a time; ROW_BLOCK x CHANNEL_TILE float32 = 32 KiB, in L1
ROW_CHUNK = 1024  # rows merged sequentially into one partial (a work item of the rows layout)
CHANNEL_TILE = 256  # channels of the rows layout handled by one work item
# Elementwise passes of the rows layout take whole rows (a channel tile would stride through
# memory, and a row pitch of 4 KiB makes every row of a tile land in the same L1 sets: measured
# 2x slower) in items of about ROW_SPAN elements.
ROW_SPAN = 1 << 16


@kernel(inline="always")
def row_span_rows(channels):
    """Rows per elementwise work item of the rows layout."""
    return max(1, ROW_SPAN // channels)


def plane_segments(inner):
    """Number of PLANE_BLOCK pieces of one plane of ``inner`` elements (elementwise items)."""
    return -(-inner // PLANE_BLOCK)


plane_segments_jit = kernel(inline="always")(plane_segments)


def channel_segments(outer, inner):
    """Reduction segments of one channel, merged in this order: the PLANE_BLOCK pieces of each
    plane (n, block) for planes of at least PLANE_BLOCK values; groups of whole consecutive
    planes, up to PLANE_BLOCK values, for shorter ones (one merge per group, not per plane)."""
    if inner >= PLANE_BLOCK:
        return outer * -(-inner // PLANE_BLOCK)
    return -(-outer // (PLANE_BLOCK // inner))


channel_segments_jit = kernel(inline="always")(channel_segments)


@kernel(inline="always")
def segment_runs(outer, channels, inner, c, segment):
    """(start, length, stride, runs) of reduction segment ``segment`` of channel ``c``."""
    pitch = channels * inner
    if inner >= PLANE_BLOCK:
        nblk = plane_segments_jit(inner)
        n, block = segment // nblk, segment % nblk
        start = (n * channels + c) * inner + block * PLANE_BLOCK
        return start, min(PLANE_BLOCK, inner - block * PLANE_BLOCK), pitch, 1
    group = PLANE_BLOCK // inner
    n0 = segment * group
    return (n0 * channels + c) * inner, inner, pitch, min(group, outer - n0)


# ---------------------------------------------------------------------------- forward statistics
@kernel
def plane_segment_stats(x, c, segment):
    """(count, mean, M2) of reduction segment ``segment`` of channel ``c``."""
    outer, channels, inner = x.shape
    start, length, stride, runs = segment_runs(outer, channels, inner, c, segment)
    return runs_stats(x.reshape(x.size), start, length, stride, runs)


@kernel
def plane_channel_stats(x, c):
    """(count, mean, M2) of channel ``c``: its segments merged in order."""
    outer, channels, inner = x.shape
    flat = x.reshape(x.size)
    count, mean, m2 = 0.0, 0.0, 0.0
    for segment in range(channel_segments_jit(outer, inner)):
        start, length, stride, runs = segment_runs(outer, channels, inner, c, segment)
        seg_count, seg_mean, seg_m2 = runs_stats(flat, start, length, stride, runs)
        count, mean, m2 = chan_merge(count, mean, m2, seg_count, seg_mean, seg_m2)
    return count, mean, m2


@kernel(fastmath=REDUCE_FASTMATH)
def rows_chunk_stats(x, r0, r1, c0, c1, mean_out, m2_out, block_mean, block_m2):
    """(mean, M2) of channels ``c0:c1`` over rows ``r0:r1`` of ``x`` (rows, C); returns the count.

    ``mean_out``, ``m2_out`` (=) and the scratch ``block_mean``, ``block_m2`` have length >= c1-c0.
    Rows are reduced ROW_BLOCK at a time (two passes, vectorised across channels, four rows per
    update of the L1 accumulators) and each block is Chan-merged into the chunk in row order.
    """
    width, c0 = uint64(c1 - c0), uint64(c0)
    four = uint64(4)
    for j in range(width):
        mean_out[j] = 0.0
        m2_out[j] = 0.0
    count = 0.0
    for b0 in range(r0, r1, ROW_BLOCK):
        b1 = min(b0 + ROW_BLOCK, r1)
        block_count = float(b1 - b0)
        first, quads = uint64(b0), uint64((b1 - b0) // 4)
        tail = first + four * quads
        for j in range(width):
            block_mean[j] = 0.0
            block_m2[j] = 0.0
        for q in range(quads):
            r = first + four * q
            for j in range(width):
                cj = c0 + j
                block_mean[j] += (np.float64(x[r, cj]) + x[r + 1, cj]) + (
                    np.float64(x[r + 2, cj]) + x[r + 3, cj]
                )
        for r in range(tail, uint64(b1)):
            for j in range(width):
                block_mean[j] += x[r, c0 + j]
        for j in range(width):
            block_mean[j] /= block_count
        for q in range(quads):
            r = first + four * q
            for j in range(width):
                cj, mu = c0 + j, block_mean[j]
                d0, d1 = x[r, cj] - mu, x[r + 1, cj] - mu
                d2, d3 = x[r + 2, cj] - mu, x[r + 3, cj] - mu
                block_m2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for r in range(tail, uint64(b1)):
            for j in range(width):
                dev = x[r, c0 + j] - block_mean[j]
                block_m2[j] += dev * dev
        for j in range(width):
            _, mean_out[j], m2_out[j] = chan_merge(
                count, mean_out[j], m2_out[j], block_count, block_mean[j], block_m2[j]
            )
        count += block_count
    return count


@kernel
def merge_parts(part, c):
    """(count, mean, M2) of channel ``c`` from partials ``part`` (3, parts, C), in part order."""
    count, mean, m2 = 0.0, 0.0, 0.0
    for k in range(part.shape[1]):
        count, mean, m2 = chan_merge(count, mean, m2, part[0, k, c], part[1, k, c], part[2, k, c])
    return count, mean, m2


@kernel
def add_parts(part, c):
    """(sum_dy, sum_dy_xmu) of channel ``c`` from partials ``part`` (2, parts, C), in order."""
    sum_dy, sum_dy_xmu = 0.0, 0.0
    for k in range(part.shape[1]):
        sum_dy += part[0, k, c]
        sum_dy_xmu += part[1, k, c]
    return sum_dy, sum_dy_xmu


# ---------------------------------------------------------------------- per-channel coefficients
@kernel
def affine_coefficients(c, mean, invstd, weight, bias, coef):
    """Channel c: ``coef`` affine rows of y = (x - mean) * invstd * weight + bias."""
    pre = prescale(mean, coef)
    split_hi_lo(mean * pre, coef, 0, c)
    coef[2, c] = (invstd * weight[c] if weight.size else invstd) / pre
    coef[3, c] = bias[c] if bias.size else 0.0
    coef[4, c] = pre


@kernel
def train_coefficients(c, count, mean, m2, eps, weight, bias, coef, save_mean, save_invstd):
    """Channel c: save (mean, invstd); ``coef`` affine rows of y from the batch statistics."""
    invstd = finalize(count, m2, eps)
    save_mean[c] = mean
    save_invstd[c] = invstd
    affine_coefficients(c, mean, invstd, weight, bias, coef)


@kernel
def eval_coefficients(weight, bias, running_mean, running_var, eps, coef):
    """``coef`` affine rows from frozen running statistics, every channel."""
    for c in range(coef.shape[1]):
        invstd = 1.0 / math.sqrt(running_var[c] + eps)
        affine_coefficients(c, running_mean[c], invstd, weight, bias, coef)


@kernel
def dx_coefficients(c, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """Channel c: ``coef`` dx rows, see dx_range."""
    pre = prescale(mean, coef)
    split_hi_lo(mean * pre, coef, 0, c)
    coef[2, c] = invstd * invstd * sum_dy_xmu / count / pre  # term 3: projection onto x_hat
    coef[3, c] = sum_dy / count  # term 2: mean of dy
    coef[4, c] = invstd * weight[c] if weight.size else invstd  # final scale
    coef[5, c] = pre


# ------------------------------------------------------------------------- elementwise transform
@kernel(fastmath=CONTRACT_FASTMATH)
def affine_range(x, y, start, stop, coef, c):
    """y = ((x * pre - mean_hi) - mean_lo) * scale + shift over [start, stop) of 1-D arrays,
    with the affine rows of channel ``c``."""
    mean_hi, mean_lo, scale, shift, pre = coef[0, c], coef[1, c], coef[2, c], coef[3, c], coef[4, c]
    for i in range(uint64(start), uint64(stop)):
        y[i] = ((x[i] * pre - mean_hi) - mean_lo) * scale + shift


@kernel(fastmath=CONTRACT_FASTMATH)
def rows_affine(x, y, r0, r1, c0, c1, coef):
    """Normalise rows ``r0:r1``, channels ``c0:c1`` of (rows, C) arrays; coef as affine_range."""
    mean_hi, mean_lo, scale, shift, pre = coef[0], coef[1], coef[2], coef[3], coef[4]
    for r in range(uint64(r0), uint64(r1)):
        for c in range(uint64(c0), uint64(c1)):
            y[r, c] = ((x[r, c] * pre[c] - mean_hi[c]) - mean_lo[c]) * scale[c] + shift[c]


# ----------------------------------------------------------------------------- backward: reduce
@kernel(fastmath=REDUCE_FASTMATH)
def runs_sums(dy, x, start, length, stride, runs, mean):
    """(sum dy, sum dy * (x - mean)) over a block laid out as in runs_stats, in float64."""
    sum_dy = 0.0
    sum_dy_xmu = 0.0
    for k in range(runs):
        first = uint64(start + k * stride)
        for i in range(first, first + uint64(length)):
            sum_dy += dy[i]
            sum_dy_xmu += dy[i] * (x[i] - mean)
    return sum_dy, sum_dy_xmu


@kernel
def plane_segment_sums(dy, x, c, segment, mean):
    outer, channels, inner = x.shape
    start, length, stride, runs = segment_runs(outer, channels, inner, c, segment)
    return runs_sums(dy.reshape(dy.size), x.reshape(x.size), start, length, stride, runs, mean)


@kernel
def plane_channel_sums(dy, x, c, mean):
    """(sum_dy, sum_dy_xmu) of channel ``c``, its segments added in order."""
    outer, channels, inner = x.shape
    dy_flat, x_flat = dy.reshape(dy.size), x.reshape(x.size)
    sum_dy, sum_dy_xmu = 0.0, 0.0
    for segment in range(channel_segments_jit(outer, inner)):
        start, length, stride, runs = segment_runs(outer, channels, inner, c, segment)
        seg_dy, seg_dy_xmu = runs_sums(dy_flat, x_flat, start, length, stride, runs, mean)
        sum_dy += seg_dy
        sum_dy_xmu += seg_dy_xmu
    return sum_dy, sum_dy_xmu


@kernel(fastmath=REDUCE_FASTMATH)
def rows_chunk_sums(dy, x, r0, r1, c0, c1, mean, sum_dy_out, sum_dy_xmu_out):
    """sum_dy, sum_dy_xmu (=, length >= c1-c0) of channels ``c0:c1`` over rows ``r0:r1``.

    Four rows per update of the L1 accumulators, then the remaining rows one by one.
    """
    width, c0 = uint64(c1 - c0), uint64(c0)
    four = uint64(4)
    first, quads = uint64(r0), uint64((r1 - r0) // 4)
    tail = first + four * quads
    for j in range(width):
        sum_dy_out[j] = 0.0
        sum_dy_xmu_out[j] = 0.0
    for q in range(quads):
        r = first + four * q
        for j in range(width):
            cj = c0 + j
            mu = mean[cj]
            g0, g1, g2, g3 = dy[r, cj], dy[r + 1, cj], dy[r + 2, cj], dy[r + 3, cj]
            sum_dy_out[j] += (np.float64(g0) + g1) + (np.float64(g2) + g3)
            sum_dy_xmu_out[j] += (g0 * (x[r, cj] - mu) + g1 * (x[r + 1, cj] - mu)) + (
                g2 * (x[r + 2, cj] - mu) + g3 * (x[r + 3, cj] - mu)
            )
    for r in range(tail, uint64(r1)):
        for j in range(width):
            g = dy[r, c0 + j]
            sum_dy_out[j] += g
            sum_dy_xmu_out[j] += g * (x[r, c0 + j] - mean[c0 + j])


# ------------------------------------------------------------------------ backward: elementwise
# dx = k * (dy - mean_dy - xmu * proj), see docs/backward.md:
#   term 1: dy                 term 2: mean_dy = sum_dy / m
#   term 3: xmu * proj, proj = invstd**2 * sum_dy_xmu / m      final scale: k = weight * invstd
# xmu is (x - mean) * pre, and proj carries 1 / pre.
@kernel(fastmath=CONTRACT_FASTMATH)
def dx_range(dy, x, dx, start, stop, coef, c):
    """dx over [start, stop) of 1-D arrays with the dx rows of channel ``c``."""
    mean_hi, mean_lo, proj, mean_dy = coef[0, c], coef[1, c], coef[2, c], coef[3, c]
    k, pre = coef[4, c], coef[5, c]
    for i in range(uint64(start), uint64(stop)):
        xmu = (x[i] * pre - mean_hi) - mean_lo
        dx[i] = (dy[i] - mean_dy - xmu * proj) * k


@kernel(fastmath=CONTRACT_FASTMATH)
def rows_dx(dy, x, dx, r0, r1, c0, c1, coef):
    mean_hi, mean_lo, proj, mean_dy, k = coef[0], coef[1], coef[2], coef[3], coef[4]
    pre = coef[5]
    for r in range(uint64(r0), uint64(r1)):
        for c in range(uint64(c0), uint64(c1)):
            xmu = (x[r, c] * pre[c] - mean_hi[c]) - mean_lo[c]
            dx[r, c] = (dy[r, c] - mean_dy[c] - xmu * proj[c]) * k[c]


# ------------------------------------------------------------------ whole channels (planes, fused)
# One channel start to finish while its planes are still in L2: x (and dy) come from memory once.
@kernel
def plane_channel_train(x, c, eps, weight, bias, coef, y, save_mean, save_invstd, save_m2):
    """Statistics of channel ``c``, its coefficients, then y for its planes."""
    outer, channels, inner = x.shape
    count, mean, m2 = plane_channel_stats(x, c)
    save_m2[c] = m2
    train_coefficients(c, count, mean, m2, eps, weight, bias, coef, save_mean, save_invstd)
    x_flat, y_flat = x.reshape(x.size), y.reshape(y.size)
    for n in range(outer):
        start = (n * channels + c) * inner
        affine_range(x_flat, y_flat, start, start + inner, coef, c)


@kernel
def plane_channel_backward(dy, x, c, mean, invstd, weight, coef, dx, sum_dy, sum_dy_xmu):
    """Backward reduction of channel ``c``, its dx coefficients, then dx for its planes."""
    outer, channels, inner = x.shape
    count = float(outer * inner)
    sum_dy[c], sum_dy_xmu[c] = plane_channel_sums(dy, x, c, mean[c])
    dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)
    dy_flat, x_flat, dx_flat = dy.reshape(dy.size), x.reshape(x.size), dx.reshape(dx.size)
    for n in range(outer):
        start = (n * channels + c) * inner
        dx_range(dy_flat, x_flat, dx_flat, start, start + inner, coef, c)
