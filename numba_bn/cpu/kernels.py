"""Serial range kernels on the canonical ``(outer, C, inner)`` view.

Each kernel covers one channel (planes, ``inner > 1``) or one block of rows and a tile of
channels (rows, ``inner == 1``); the parallel drivers in :mod:`numba_bn.cpu.drivers` and the C
shim of the plugin split the work into these ranges. None of them allocates: scratch and outputs
come from the caller, so they can be exported through ``@cfunc``.

Outputs: ``=`` overwritten, never ``+=``. Bytes per element (float32, 4 B):

=====================  ============================  ==============
kernel                 role                          traffic
=====================  ============================  ==============
plane_channel_stats    (count, mean, M2) of channel  read x (1x)
rows_chunk_stats       (mean, M2) of a row chunk     read x (1x)
plane_affine/rows_aff  y = (x - mean)*scale + shift  read x, write y
plane_channel_sums     sum_dy, sum_dy_xmu            read dy, x
rows_chunk_sums        sum_dy, sum_dy_xmu            read dy, x
plane_dx / rows_dx     dx from the three terms       read dy, x; write dx
=====================  ============================  ==============

Block sizes fix the merge order; the merge order fixes the result. They are constants so that the
result of a shape is the same for any number of threads and on every entry point (parallel
drivers, C plugin).
"""

from numba import njit

from ..stats import CONTRACT_FASTMATH, REDUCE_FASTMATH, chan_merge, run_stats

PLANE_BLOCK = 4096  # elements of one plane reduced at a time: 16 KiB of float32, in L1
ROW_BLOCK = 32  # rows reduced at a time; ROW_BLOCK x CHANNEL_TILE float32 = 32 KiB, in L1
ROW_CHUNK = 1024  # rows merged sequentially into one partial (a work item of the rows layout)
CHANNEL_TILE = 256  # channels of the rows layout handled by one work item


def plane_segments(inner):
    """Number of PLANE_BLOCK segments in one plane of ``inner`` elements."""
    return -(-inner // PLANE_BLOCK)


plane_segments_jit = njit(inline="always")(plane_segments)


# ---------------------------------------------------------------------------- forward statistics
@njit
def plane_segment_stats(x, c, segment):
    """(count, mean, M2) of segment ``segment`` of channel ``c``; segments run over (n, block)."""
    inner = x.shape[2]
    nseg = plane_segments_jit(inner)
    n = segment // nseg
    start = (segment % nseg) * PLANE_BLOCK
    return run_stats(x[n, c, start : min(start + PLANE_BLOCK, inner)])


@njit
def plane_channel_stats(x, c):
    """(count, mean, M2) of channel ``c``: segments merged in (n, block) order."""
    count, mean, m2 = 0.0, 0.0, 0.0
    for segment in range(x.shape[0] * plane_segments_jit(x.shape[2])):
        seg_count, seg_mean, seg_m2 = plane_segment_stats(x, c, segment)
        count, mean, m2 = chan_merge(count, mean, m2, seg_count, seg_mean, seg_m2)
    return count, mean, m2


@njit(fastmath=REDUCE_FASTMATH)
def rows_chunk_stats(x, r0, r1, c0, c1, mean_out, m2_out, block_mean, block_m2):
    """(mean, M2) of channels ``c0:c1`` over rows ``r0:r1`` of ``x`` (rows, C); returns the count.

    ``mean_out``, ``m2_out`` (=) and the scratch ``block_mean``, ``block_m2`` have length >= c1-c0.
    Rows are reduced ROW_BLOCK at a time (two passes, vectorised across channels) and each block
    is Chan-merged into the chunk in row order.
    """
    width = c1 - c0
    for j in range(width):
        mean_out[j] = 0.0
        m2_out[j] = 0.0
    count = 0.0
    for b0 in range(r0, r1, ROW_BLOCK):
        b1 = min(b0 + ROW_BLOCK, r1)
        block_count = float(b1 - b0)
        for j in range(width):
            block_mean[j] = 0.0
            block_m2[j] = 0.0
        for r in range(b0, b1):
            for j in range(width):
                block_mean[j] += x[r, c0 + j]
        for j in range(width):
            block_mean[j] /= block_count
        for r in range(b0, b1):
            for j in range(width):
                dev = x[r, c0 + j] - block_mean[j]
                block_m2[j] += dev * dev
        for j in range(width):
            _, mean_out[j], m2_out[j] = chan_merge(
                count, mean_out[j], m2_out[j], block_count, block_mean[j], block_m2[j]
            )
        count += block_count
    return count


# ------------------------------------------------------------------------- elementwise transform
@njit(fastmath=CONTRACT_FASTMATH)
def affine_run(src, dst, mean_hi, mean_lo, scale, shift):
    """dst = ((src - mean_hi) - mean_lo) * scale + shift over a contiguous run."""
    for i in range(src.size):
        dst[i] = ((src[i] - mean_hi) - mean_lo) * scale + shift


@njit
def plane_affine(x, y, n, c, coef):
    """Normalise plane (n, c); ``coef`` rows: mean_hi, mean_lo, scale, shift."""
    affine_run(x[n, c], y[n, c], coef[0, c], coef[1, c], coef[2, c], coef[3, c])


@njit(fastmath=CONTRACT_FASTMATH)
def rows_affine(x, y, r0, r1, c0, c1, coef):
    """Normalise rows ``r0:r1``, channels ``c0:c1`` of (rows, C) arrays; coef as plane_affine."""
    mean_hi, mean_lo, scale, shift = coef[0], coef[1], coef[2], coef[3]
    for r in range(r0, r1):
        for c in range(c0, c1):
            y[r, c] = ((x[r, c] - mean_hi[c]) - mean_lo[c]) * scale[c] + shift[c]


# ----------------------------------------------------------------------------- backward: reduce
@njit(fastmath=REDUCE_FASTMATH)
def sums_run(dy, x, mean):
    """(sum dy, sum dy * (x - mean)) over a contiguous run, in float64."""
    sum_dy = 0.0
    sum_dy_xmu = 0.0
    for i in range(dy.size):
        sum_dy += dy[i]
        sum_dy_xmu += dy[i] * (x[i] - mean)
    return sum_dy, sum_dy_xmu


@njit
def plane_segment_sums(dy, x, c, segment, mean):
    inner = x.shape[2]
    nseg = plane_segments_jit(inner)
    n = segment // nseg
    start = (segment % nseg) * PLANE_BLOCK
    stop = min(start + PLANE_BLOCK, inner)
    return sums_run(dy[n, c, start:stop], x[n, c, start:stop], mean)


@njit
def plane_channel_sums(dy, x, c, mean):
    """(sum_dy, sum_dy_xmu) of channel ``c``, segments added in (n, block) order."""
    sum_dy, sum_dy_xmu = 0.0, 0.0
    for segment in range(x.shape[0] * plane_segments_jit(x.shape[2])):
        seg_dy, seg_dy_xmu = plane_segment_sums(dy, x, c, segment, mean)
        sum_dy += seg_dy
        sum_dy_xmu += seg_dy_xmu
    return sum_dy, sum_dy_xmu


@njit(fastmath=REDUCE_FASTMATH)
def rows_chunk_sums(dy, x, r0, r1, c0, c1, mean, sum_dy_out, sum_dy_xmu_out):
    """sum_dy, sum_dy_xmu (=, length >= c1-c0) of channels ``c0:c1`` over rows ``r0:r1``."""
    width = c1 - c0
    for j in range(width):
        sum_dy_out[j] = 0.0
        sum_dy_xmu_out[j] = 0.0
    for r in range(r0, r1):
        for j in range(width):
            g = dy[r, c0 + j]
            sum_dy_out[j] += g
            sum_dy_xmu_out[j] += g * (x[r, c0 + j] - mean[c0 + j])


# ------------------------------------------------------------------------ backward: elementwise
# dx = k * (dy - mean_dy - xmu * proj), see docs/backward.md:
#   term 1: dy                 term 2: mean_dy = sum_dy / m
#   term 3: xmu * proj, proj = invstd**2 * sum_dy_xmu / m      final scale: k = weight * invstd
# ``coef`` rows: mean_hi, mean_lo, proj, mean_dy, k.
@njit(fastmath=CONTRACT_FASTMATH)
def dx_run(dy, x, dx, mean_hi, mean_lo, proj, mean_dy, k):
    for i in range(dy.size):
        xmu = (x[i] - mean_hi) - mean_lo
        dx[i] = (dy[i] - mean_dy - xmu * proj) * k


@njit
def plane_dx(dy, x, dx, n, c, coef):
    dx_run(dy[n, c], x[n, c], dx[n, c], coef[0, c], coef[1, c], coef[2, c], coef[3, c], coef[4, c])


@njit(fastmath=CONTRACT_FASTMATH)
def rows_dx(dy, x, dx, r0, r1, c0, c1, coef):
    mean_hi, mean_lo, proj, mean_dy, k = coef[0], coef[1], coef[2], coef[3], coef[4]
    for r in range(r0, r1):
        for c in range(c0, c1):
            xmu = (x[r, c] - mean_hi[c]) - mean_lo[c]
            dx[r, c] = (dy[r, c] - mean_dy[c] - xmu * proj[c]) * k[c]
