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
affine_range, _planes, rows_   y = (x - mean) * scale + b    read x, write y
  with an epilogue             y = relu(... + z)             and read z (a residual)
plane_channel_sums / rows_     sum_dy, sum_dy_xmu            read dy, x
dx_range, _planes, rows_dx     dx from the three terms       read dy, x; write dx
plane_channel_train            all of the forward, fused     read x, write y (x in L2)
plane_channel_backward         all of the backward, fused    read dy, x; write dx
=============================  ============================  ==========================

Block sizes fix the merge order; the merge order fixes the result. They are constants so that the
result for a shape is the same for any number of threads and on every entry point (parallel and
serial drivers, C plugin).
"""

import numpy as np
from numba import uint64

from ..stats import (
    CONTRACT_FASTMATH,
    ONE_PASS,
    REDUCE_FASTMATH,
    apart,
    by_width,
    callee,
    chan_merge,
    flat,
    four_runs,
    imax,
    imin,
    kernel,
    runs_stats,
)

# The per-channel coefficients live in .channels; drivers and the C library's ranges still
# import them from here.
from .channels import (  # noqa: F401
    affine_coefficients,
    dx_coefficients,
    eval_coefficients,
    train_coefficients,
)

PLANE_BLOCK = 4096  # elements of one plane reduced at a time: 16 KiB of float32, in L1
ROW_BLOCK = 32  # rows reduced at a time in two passes (float64): a block of a tile stays in L2
ROW_CHUNK = 1024  # rows merged sequentially into one partial (a work item of the rows layout)
# One pass (float32) reads a block once, so its block need not stay in L1: it takes ROW_CHUNK
# rows at a time (a reduction item's rows, one block), which saves each column's finalisation and
# Chan merge per 32 rows: the serial rows statistics 13-17% faster from (256, 512) on, 8% on
# (64, 256) (benchmarks/README.md, stop 58). It loses at most log2(1025) = 10 of float64's bits
# (stats.one_pass_exact), below a planes block's 12.
ROW_BLOCK_ONE_PASS = ROW_CHUNK
# Channels of the rows layout one reduction item handles, at most (items.row_tile). Each row of
# a tile is a run of its columns; the next row's run starts a row pitch further. Longer runs read
# faster: serially, out of cache, (4096, 1024) float32's sums pass took 0.70 ns a value in
# 256-column tiles and 0.42 in one of 1024 (float64 statistics 0.66 and 0.48; (4096, 4096),
# (256, 4096), (1024, 1024) alike), and the tile never changes a column's bits. Wider tiles
# read faster still, but the statistics' accumulators (40 bytes a column) fill L1 at 1024, and
# the C shim's per-thread scratch (5 rows of a tile, on its stack) is 40 KiB there
# (benchmarks/README.md, stop 66).
CHANNEL_TILE = 1024
# Elementwise items span about ELEMENTWISE_SPAN elements: whole rows for rows (a channel tile
# would stride through memory, and a row pitch of 4 KiB makes every row of a tile land in the
# same L1 sets: measured 2x slower), runs of whole consecutive planes for planes shorter than
# PLANE_BLOCK (an item per plane costs a call and reference counting per 196 values of a 14x14
# feature map: eval of (64, 256, 14, 14) 605 -> 553 us serial), PLANE_BLOCK pieces of longer ones.
ELEMENTWISE_SPAN = 1 << 16
# A call whose items would be fewer than ITEMS_WANTED takes smaller ones, down to
# ITEM_MIN_ELEMENTS (an item's own cost, a call and its arguments, stays far below its values'):
# a (256, 256) batch was one item of each pass, a (1024, 256) one reduction item, and they ran
# no faster on two threads than on one. Elementwise items never change a bit; a reduction item
# is a set of whole columns (items.row_tile), whose bits do not depend on the set either. Four
# items wanted measured the same on two threads, within noise, but (256, 512) forward-train
# ~4% slower (benchmarks/README.md, stop 33).
ITEMS_WANTED = 2
ITEM_MIN_ELEMENTS = 1 << 15


@kernel(inline="always")
def wanted_units(units, unit):
    """Units of ``unit`` elements per item, ``units`` in all, for ITEMS_WANTED items where each
    keeps ITEM_MIN_ELEMENTS: the rule of the elementwise items (rows, planes) and of the
    reduction tiles (columns of a row chunk, items.row_tile); each caller bounds it."""
    return imax(-(-units // ITEMS_WANTED), -(-ITEM_MIN_ELEMENTS // unit))


@kernel(inline="always")
def _span_units(units, unit):
    """Units (rows or planes) of ``unit`` elements per elementwise item of ``units`` of them:
    ELEMENTWISE_SPAN elements at most, wanted_units where they are fewer."""
    return imax(1, imin(ELEMENTWISE_SPAN // unit, wanted_units(units, unit)))


@callee
def row_span_rows(outer, width):
    """Rows per elementwise work item of an (``outer``, ``width``) rows view."""
    return _span_units(outer, width)


#: Planes of fewer values than SHORT_PLANE, in a view of SHORT_MIN_OUTER planes per channel or more,
#: are short (:data:`.items.MEMORY_SHORT`): they run as the rows of the (outer, C * inner) view,
#: the reductions a partial per column (filed as the channel's, merged in order), the
#: elementwise passes over coefficient rows with a column per value (spread_columns, once per
#: call). A loop over one plane of 4 or 9 values does not vectorise: normalising (64, 64, 4)
#: float32 took 16.3 us by planes, 3.5 as rows of 256, its statistics 15.1 against 3.9; from 16
#: values on (coefficient rows of 2048 values and more no longer stay in L1) and below 8 planes
#: a channel (spreading costs more than it saves), planes were as fast or faster
#: (benchmarks/README.md, "Short planes").
SHORT_PLANE = 16
SHORT_MIN_OUTER = 8


def short_planes(outer, inner):
    """Whether a canonical view's planes are short (SHORT_PLANE)."""
    return 1 < inner < SHORT_PLANE and outer >= SHORT_MIN_OUTER


short_planes_jit = kernel(inline="always")(short_planes)


@callee
def spread_columns(coef, inner, wide):
    """wide (=) (rows, C * inner): column c * inner + i of each row is coef's column c. A value
    of the plane at a time, over every channel: strided stores, 0.3 ns a value, where a loop
    over each channel's few columns took 0.6-0.9."""
    rows, channels = coef.shape
    step = uint64(inner)
    for k in range(rows):
        for i in range(step):
            for c in range(uint64(channels)):
                wide[k, c * step + i] = coef[k, c]


@callee
def plane_run_planes(outer, channels, inner):
    """Planes per elementwise work item of planes shorter than PLANE_BLOCK."""
    return _span_units(outer * channels, inner)


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
        return start, imin(PLANE_BLOCK, inner - block * PLANE_BLOCK), pitch, 1
    group = PLANE_BLOCK // inner
    n0 = segment * group
    return (n0 * channels + c) * inner, inner, pitch, imin(group, outer - n0)


# ---------------------------------------------------------------------------- forward statistics
@kernel(inline="always")
def plane_segment_stats(x, shape, c, segment):
    """(count, mean, M2) of reduction segment ``segment`` of channel ``c``; ``x`` flat, the
    values of a canonical view of ``shape``."""
    outer, channels, inner = shape
    start, length, stride, runs = segment_runs(outer, channels, inner, c, segment)
    return apart(runs_stats, (x, start, length, stride, runs))


@callee
def plane_channel_stats(flat, shape, c):
    """(count, mean, M2) of channel ``c`` of the canonical view ``shape`` of ``flat``: its
    segments merged in order. On the flat array its caller made once: with the 3-D view a call
    cost ~33 ns (a view and its reference counts), as much as a layer norm row of 8 values'
    statistics; ~11 ns now. Inlined into layer norm's rows it saved those 11 ns a row and cost
    ~0.5 s of the driver's compile: compiled once, for every caller."""
    outer, channels, inner = shape
    count, mean, m2 = 0.0, 0.0, 0.0
    for segment in range(channel_segments_jit(outer, inner)):
        start, length, stride, runs = segment_runs(outer, channels, inner, c, segment)
        seg_count, seg_mean, seg_m2 = apart(runs_stats, (flat, start, length, stride, runs))
        count, mean, m2 = chan_merge(count, mean, m2, seg_count, seg_mean, seg_m2)
    return count, mean, m2


@kernel(inline="always")
def _one_pass_moments(x, first, last, c0, width, mean, m2, shift):
    """(mean, M2) (=) of columns ``c0 : c0 + width`` over rows ``first:last`` of (rows, C) ``x``
    in ``mean``, ``m2`` (float64, length >= width): one ROW_BLOCK_ONE_PASS of rows_chunk_stats.

    Each column's values are taken less its first one, kept in float64 in the scratch ``shift``
    (length >= width): converted once per block, not once per four rows (float32 -> float64
    conversions bound the pass on this Zen 4, 8 values per 2 cycles: a block 9% faster, the
    serial statistics of (256, 512) 4%; the same bits)."""
    first, c0, width, four = uint64(first), uint64(c0), uint64(width), uint64(4)
    count, quads = float(last - first), uint64((last - first) // 4)
    tail = first + four * quads
    for j in range(width):
        mean[j] = 0.0  # S1, then the mean
        m2[j] = 0.0  # S2, then M2
        shift[j] = x[first, c0 + j]
    for q in range(quads):
        r = first + four * q
        for j in range(width):
            cj, k = c0 + j, shift[j]
            d0, d1 = x[r, cj] - k, x[r + 1, cj] - k
            d2, d3 = x[r + 2, cj] - k, x[r + 3, cj] - k
            mean[j] += (d0 + d1) + (d2 + d3)
            m2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r in range(tail, uint64(last)):
        for j in range(width):
            d = x[r, c0 + j] - shift[j]
            mean[j] += d
            m2[j] += d * d
    for j in range(width):
        offset = mean[j] / count
        m2[j] -= mean[j] * offset
        mean[j] = shift[j] + offset


@kernel(inline="always")
def _two_pass_moments(x, first, last, c0, width, mean, m2):
    """_one_pass_moments in two passes (float64)."""
    first, c0, width, four = uint64(first), uint64(c0), uint64(width), uint64(4)
    count, quads = float(last - first), uint64((last - first) // 4)
    tail = first + four * quads
    for j in range(width):
        mean[j] = 0.0
        m2[j] = 0.0
    for q in range(quads):
        r = first + four * q
        for j in range(width):
            cj = c0 + j
            mean[j] += (np.float64(x[r, cj]) + x[r + 1, cj]) + (
                np.float64(x[r + 2, cj]) + x[r + 3, cj]
            )
    for r in range(tail, uint64(last)):
        for j in range(width):
            mean[j] += x[r, c0 + j]
    for j in range(width):
        mean[j] /= count
    for q in range(quads):
        r = first + four * q
        for j in range(width):
            cj, mu = c0 + j, mean[j]
            d0, d1 = x[r, cj] - mu, x[r + 1, cj] - mu
            d2, d3 = x[r + 2, cj] - mu, x[r + 3, cj] - mu
            m2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r in range(tail, uint64(last)):
        for j in range(width):
            dev = x[r, c0 + j] - mean[j]
            m2[j] += dev * dev


@by_width(fastmath=REDUCE_FASTMATH)
def rows_chunk_stats(x, r0, r1, c0, c1, mean_out, m2_out, block_mean, block_m2, block_shift):
    """(mean, M2) of channels ``c0:c1`` over rows ``r0:r1`` of ``x`` (rows, C); returns the count.

    ``mean_out``, ``m2_out`` (=) and the scratch ``block_mean``, ``block_m2``, ``block_shift``
    have length >= c1-c0.
    Rows are reduced a block at a time, in one pass (ROW_BLOCK_ONE_PASS rows) or two
    (ROW_BLOCK rows) (:func:`..stats.one_pass_exact`, a copy each: :func:`..stats.by_width`),
    vectorised across columns, four rows per update of the L1 accumulators, and each block is
    Chan-merged into the chunk in row order.
    """
    width = uint64(c1 - c0)
    for j in range(width):
        mean_out[j] = 0.0
        m2_out[j] = 0.0
    count = 0.0
    block = ROW_BLOCK_ONE_PASS if ONE_PASS else ROW_BLOCK
    for b0 in range(r0, r1, block):
        b1 = imin(b0 + block, r1)
        if ONE_PASS:
            _one_pass_moments(x, b0, b1, c0, width, block_mean, block_m2, block_shift)
        else:
            _two_pass_moments(x, b0, b1, c0, width, block_mean, block_m2)
        block_count = float(b1 - b0)
        for j in range(width):
            _, mean_out[j], m2_out[j] = chan_merge(
                count, mean_out[j], m2_out[j], block_count, block_mean[j], block_m2[j]
            )
        count += block_count
    return count


# ------------------------------------------------------------------------- elementwise transform
# A call in place (out= one of its inputs: the fronts and hostcall.output take an output that is
# an input's view or shares no memory with it) hands an elementwise pass one array twice. The
# pass then reads and writes it through one of the two (one_memory): through both, the vector
# loop's run-time check finds that they overlap and runs the scalar loop instead, 5-7x the time
# (rows_affine of (64, 256) in place 9.1 us against 1.2; rows_dx 13.6 against 1.9). The same
# bits: each value is read before the value at its index is written. Each such loop is a second
# copy of the pass's loop to compile, so only the usual cases have one: y into x, dx into dy
# (a cold step compiled ~0.35 s, ~9%, longer with them); y into the residual, dx into x, the
# rows' loops of a large mean's pre and planes of one value run the two-array loop. Group and
# layer norm (.norm_kernels) likewise: dx into dy, and layer norm's y into x with a weight and
# a bias (their cold steps ~0.3-0.45 s longer).
@kernel(inline="always")
def one_memory(a, b):
    """Whether the arrays ``a`` and ``b`` (of one shape and layout) are views of one memory."""
    return a.ctypes.data == b.ctypes.data


# The epilogue of the elementwise forward (fused BN+ReLU and BN+Add+ReLU): what a normalised
# value becomes before it is stored. Bit 0: add the residual z (an array like x); bit 1: ReLU.
# Callers pass the code as a compile-time constant (Numba types it as a literal), so each
# specialisation keeps only its own arithmetic and vectorises as the plain loop does; without a
# residual, z is x itself and never read.
EPILOGUE_NONE, EPILOGUE_ADD, EPILOGUE_RELU, EPILOGUE_ADD_RELU = 0, 1, 2, 3


@kernel(inline="always")
def _epilogue(v, z, i, epilogue):
    """``v`` (+ z[i]), then max(., 0) keeping NaN (as torch.relu), per the ``epilogue`` bits."""
    if epilogue & EPILOGUE_ADD:
        v = v + z[i]
    if epilogue & EPILOGUE_RELU:
        v = v if not v < 0 else 0
    return v


@kernel(inline="always")
def _affine(v, pre, mean_hi, scale, shift):
    """A value normalised with its channel's affine rows: the one formula of every affine pass
    (runs, planes of one value, rows), so that all give the same bits."""
    return (v * pre - mean_hi) * scale + shift


@kernel(inline="always")
def _affine_run(x, y, start, stop, coef, c, z, epilogue):
    mean_hi, scale, shift, pre = coef[0, c], coef[2, c], coef[3, c], coef[4, c]
    for i in range(uint64(start), uint64(stop)):
        y[i] = _epilogue(_affine(x[i], pre, mean_hi, scale, shift), z, i, epilogue)


@callee(fastmath=CONTRACT_FASTMATH)
def affine_range(x, y, start, stop, coef, c, z, epilogue):
    """y = (x * pre - mean_hi) * scale + shift over [start, stop) of 1-D arrays, with the
    affine rows of channel ``c`` (mean_lo folded into shift: stats.folded_shift), then the
    ``epilogue`` with flat ``z``; y may be x (in place: one_memory)."""
    if one_memory(x, y):
        _affine_run(y, y, start, stop, coef, c, z, epilogue)
    else:
        _affine_run(x, y, start, stop, coef, c, z, epilogue)


@kernel(inline="always")
def _next_channel(c, step, channels):
    """The channel of the plane ``step`` planes after one of channel ``c``: ``(c + step) %
    channels`` by subtraction (a planes loop took a modulo per plane, ~5 ns, as much as a
    short plane's work)."""
    c += step
    while c >= channels:
        c -= channels
    return c


@callee(fastmath=CONTRACT_FASTMATH)
def affine_planes(x, y, first, stop, step, inner, coef, z, epilogue):
    """y over the whole planes ``first:stop:step`` of flat ``x``, ``y``: plane p holds elements
    [p * inner, (p + 1) * inner) of channel p % C. One call for many planes: a call per plane
    costs as much as a short plane's work. In place as affine_range (planes of one value: two
    arrays)."""
    if inner == 1 and step == 1:  # a value a plane (group norm of an (N, C) batch): one loop
        for p in range(uint64(first), uint64(stop)):  # that vectorises, a run's arithmetic
            v = _affine(x[p], coef[4, p], coef[0, p], coef[2, p], coef[3, p])
            y[p] = _epilogue(v, z, p, epilogue)
    elif one_memory(x, y):
        _affine_plane_runs(y, y, first, stop, step, inner, coef, z, epilogue)
    else:
        _affine_plane_runs(x, y, first, stop, step, inner, coef, z, epilogue)


@kernel(inline="always")
def _affine_plane_runs(x, y, first, stop, step, inner, coef, z, epilogue):
    channels = coef.shape[1]
    c = first % channels
    for p in range(first, stop, step):
        _affine_run(x, y, p * inner, (p + 1) * inner, coef, c, z, epilogue)
        c = _next_channel(c, step, channels)


@kernel(inline="always")
def _all_one(pre, c0, c1):
    """Whether ``pre`` is 1 in every channel of c0:c1: it is unless a channel's |mean| reaches
    max * eps / 8 (stats.prescale; 5e30 in float32). The rows passes then skip ``x * pre`` (x * 1
    is x, bit for bit): in a (rows, C) array pre is a row of its own, and its load is one of
    six memory operations per vector (measured 12-20% of the pass); in planes it is one
    scalar per run and costs nothing."""
    off = 0
    for c in range(uint64(c0), uint64(c1)):
        off += pre[c] != 1.0
    return off == 0


@callee(fastmath=CONTRACT_FASTMATH)
def rows_affine(x, y, r0, r1, c0, c1, coef, z, epilogue):
    """Normalise rows ``r0:r1``, channels ``c0:c1`` of (rows, C) arrays; coef as affine_range,
    ``z`` (rows, C); in place as there (the loop of a channel's pre, ~never taken: two
    arrays)."""
    mean_hi, scale, shift, pre = coef[0], coef[2], coef[3], coef[4]
    if _all_one(pre, c0, c1):
        if one_memory(x, y):
            _rows_affine_all_one(y, y, r0, r1, c0, c1, coef, z, epilogue)
        else:
            _rows_affine_all_one(x, y, r0, r1, c0, c1, coef, z, epilogue)
        return
    for r in range(uint64(r0), uint64(r1)):
        for c in range(uint64(c0), uint64(c1)):
            v = _affine(x[r, c], pre[c], mean_hi[c], scale[c], shift[c])
            y[r, c] = _epilogue(v, z, (r, c), epilogue)


@kernel(inline="always")
def _rows_affine_all_one(x, y, r0, r1, c0, c1, coef, z, epilogue):
    mean_hi, scale, shift = coef[0], coef[2], coef[3]
    for r in range(uint64(r0), uint64(r1)):
        for c in range(uint64(c0), uint64(c1)):
            v = (x[r, c] - mean_hi[c]) * scale[c] + shift[c]
            y[r, c] = _epilogue(v, z, (r, c), epilogue)


# ----------------------------------------------------------------------------- backward: reduce
@callee(fastmath=REDUCE_FASTMATH)
def runs_sums(dy, x, start, length, stride, runs, mean):
    """(sum dy, sum dy * (x - mean)) over a block laid out as in runs_stats, in float64, four
    runs at a time as there.

    Two accumulators of each sum, each updated with one addition or fused multiply-add per
    value: 3 operations a value where the pairwise tree of four runs took 3.5, and its chains
    no longer wait on one another. A block in L2 reduced 20-30% faster (benchmarks/README.md,
    "Stop 60")."""
    dy0, dy1, xmu0, xmu1 = 0.0, 0.0, 0.0, 0.0
    n, quads = uint64(length), runs // 4
    for q in range(quads):
        a, b, c, d = four_runs(start, stride, q)
        for i in range(n):
            g0, g1, g2, g3 = dy[a + i], dy[b + i], dy[c + i], dy[d + i]
            dy0 += np.float64(g0) + g1
            dy1 += np.float64(g2) + g3
            xmu0 += g0 * (x[a + i] - mean)
            xmu1 += g1 * (x[b + i] - mean)
            xmu0 += g2 * (x[c + i] - mean)
            xmu1 += g3 * (x[d + i] - mean)
    for k in range(4 * quads, runs):
        first = uint64(start + k * stride)
        for i in range(first, first + n):
            dy0 += dy[i]
            xmu0 += dy[i] * (x[i] - mean)
    return dy0 + dy1, xmu0 + xmu1


@kernel(inline="always")
def plane_segment_sums(dy, x, shape, c, segment, mean):
    """(sum_dy, sum_dy_xmu) of reduction segment ``segment`` of channel ``c``; ``dy``, ``x`` as
    in plane_segment_stats."""
    outer, channels, inner = shape
    start, length, stride, runs = segment_runs(outer, channels, inner, c, segment)
    return apart(runs_sums, (dy, x, start, length, stride, runs, mean))


@callee
def plane_channel_sums(dy_flat, x_flat, shape, c, mean):
    """(sum_dy, sum_dy_xmu) of channel ``c`` of the canonical view ``shape`` of the flat arrays,
    its segments added in order (flat arrays: see plane_channel_stats)."""
    outer, channels, inner = shape
    sum_dy, sum_dy_xmu = 0.0, 0.0
    for segment in range(channel_segments_jit(outer, inner)):
        start, length, stride, runs = segment_runs(outer, channels, inner, c, segment)
        seg_dy, seg_dy_xmu = apart(runs_sums, (dy_flat, x_flat, start, length, stride, runs, mean))
        sum_dy += seg_dy
        sum_dy_xmu += seg_dy_xmu
    return sum_dy, sum_dy_xmu


@callee(fastmath=REDUCE_FASTMATH)
def rows_chunk_sums(dy, x, r0, r1, c0, c1, mean, sum_dy_out, sum_dy_xmu_out):
    """sum_dy, sum_dy_xmu (=, length >= c1-c0) of channels ``c0:c1`` over rows ``r0:r1``;
    ``mean`` (length >= c1-c0): those channels' means, from c0's on.

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
            mu = mean[j]
            g0, g1, g2, g3 = dy[r, cj], dy[r + 1, cj], dy[r + 2, cj], dy[r + 3, cj]
            sum_dy_out[j] += (np.float64(g0) + g1) + (np.float64(g2) + g3)
            sum_dy_xmu_out[j] += (g0 * (x[r, cj] - mu) + g1 * (x[r + 1, cj] - mu)) + (
                g2 * (x[r + 2, cj] - mu) + g3 * (x[r + 3, cj] - mu)
            )
    for r in range(tail, uint64(r1)):
        for j in range(width):
            g = dy[r, c0 + j]
            sum_dy_out[j] += g
            sum_dy_xmu_out[j] += g * (x[r, c0 + j] - mean[j])


# ------------------------------------------------------------------------ backward: elementwise
# dx = k * (dy - mean_dy - xmu * proj), see docs/backward.md:
#   term 1: dy                 term 2: mean_dy = sum_dy / m
#   term 3: xmu * proj, proj = invstd**2 * sum_dy_xmu / m      final scale: k = weight * invstd
# xmu is (x - mean) * pre, and proj carries 1 / pre. As in the affine, mean_lo is folded into a
# per-channel term (stats.folded_shift): xmu * proj = (x * pre - mean_hi) * proj - mean_lo * proj,
# so row 3 holds mean_dy - mean_lo * proj and the pass does not read row 1.
@kernel(inline="always")
def _dx_run(dy, x, dx, start, stop, coef, c):
    mean_hi, proj, mean_dy, k, pre = coef[0, c], coef[2, c], coef[3, c], coef[4, c], coef[5, c]
    for i in range(uint64(start), uint64(stop)):
        dx[i] = (dy[i] - mean_dy - (x[i] * pre - mean_hi) * proj) * k


@callee(fastmath=CONTRACT_FASTMATH)
def dx_range(dy, x, dx, start, stop, coef, c):
    """dx over [start, stop) of 1-D arrays with the dx rows of channel ``c``; dx may be dy (in
    place: one_memory)."""
    if one_memory(dy, dx):
        _dx_run(dx, x, dx, start, stop, coef, c)
    else:
        _dx_run(dy, x, dx, start, stop, coef, c)


@callee(fastmath=CONTRACT_FASTMATH)
def dx_planes(dy, x, dx, first, stop, step, inner, coef):
    """dx over the whole planes ``first:stop:step`` of flat arrays, as affine_planes; in place
    as dx_range."""
    if one_memory(dy, dx):
        _dx_planes(dx, x, dx, first, stop, step, inner, coef)
    else:
        _dx_planes(dy, x, dx, first, stop, step, inner, coef)


@kernel(inline="always")
def _dx_planes(dy, x, dx, first, stop, step, inner, coef):
    channels = coef.shape[1]
    c = first % channels
    for p in range(first, stop, step):
        _dx_run(dy, x, dx, p * inner, (p + 1) * inner, coef, c)
        c = _next_channel(c, step, channels)


@callee(fastmath=CONTRACT_FASTMATH)
def rows_dx(dy, x, dx, r0, r1, c0, c1, coef):
    """dx over rows ``r0:r1``, channels ``c0:c1`` of (rows, C) arrays; in place as dx_range
    (the loop of a channel's pre: two arrays, as rows_affine's)."""
    mean_hi, proj, mean_dy, k, pre = coef[0], coef[2], coef[3], coef[4], coef[5]
    if _all_one(pre, c0, c1):
        if one_memory(dy, dx):
            _rows_dx_all_one(dx, x, dx, r0, r1, c0, c1, coef)
        else:
            _rows_dx_all_one(dy, x, dx, r0, r1, c0, c1, coef)
        return
    for r in range(uint64(r0), uint64(r1)):
        for c in range(uint64(c0), uint64(c1)):
            xmu = x[r, c] * pre[c] - mean_hi[c]
            dx[r, c] = (dy[r, c] - mean_dy[c] - xmu * proj[c]) * k[c]


@kernel(inline="always")
def _rows_dx_all_one(dy, x, dx, r0, r1, c0, c1, coef):
    mean_hi, proj, mean_dy, k = coef[0], coef[2], coef[3], coef[4]
    for r in range(uint64(r0), uint64(r1)):
        for c in range(uint64(c0), uint64(c1)):
            xmu = x[r, c] - mean_hi[c]
            dx[r, c] = (dy[r, c] - mean_dy[c] - xmu * proj[c]) * k[c]


# --------------------------------------------------------------------- backward of an epilogue
@kernel(inline="always")
def _relu_grad_run(dy, y, g, start, stop):
    for i in range(uint64(start), uint64(stop)):
        g[i] = dy[i] if y[i] > 0 else 0


@callee
def relu_grad_range(dy, y, g, start, stop):
    """g = dy where y > 0, else 0, over [start, stop) of flat arrays: the gradient through the
    ReLU of a fused forward, from its output (torch's threshold_backward). The batch norm
    backward then runs on g; g is also the gradient of the residual."""
    _relu_grad_run(dy, y, g, start, stop)


@callee
def relu_grad_planes(dy, y, g, first, stop, step, inner):
    """relu_grad_range over the whole planes ``first:stop:step`` of flat arrays (as
    affine_planes): one channel's, before its backward reads g from L2."""
    for p in range(first, stop, step):
        _relu_grad_run(dy, y, g, p * inner, (p + 1) * inner)


# ------------------------------------------------------------------ whole channels (planes, fused)
# One channel start to finish while its planes are still in L2: x (and dy) come from memory once.
@callee
def plane_channel_train(x, c, eps, weight, bias, coef, y, save_mean, save_invstd, save_m2, z,
                        epilogue):  # fmt: skip
    """Statistics of channel ``c``, its coefficients, then y for its planes (with the
    ``epilogue`` and ``z``, as x)."""
    outer, channels, inner = x.shape
    x_flat = flat(x)
    count, mean, m2 = plane_channel_stats(x_flat, x.shape, c)
    save_m2[c] = m2
    train_coefficients(c, count, mean, m2, eps, weight, bias, coef, save_mean, save_invstd)
    affine_planes(x_flat, flat(y), c, outer * channels, channels, inner, coef,
                  flat(z), epilogue)  # fmt: skip


@callee
def plane_channel_backward(dy, x, c, mean, invstd, weight, coef, dx, sum_dy, sum_dy_xmu):
    """Backward reduction of channel ``c``, its dx coefficients, then dx for its planes."""
    outer, channels, inner = x.shape
    count = float(outer * inner)
    dy_flat, x_flat, dx_flat = flat(dy), flat(x), flat(dx)
    sum_dy[c], sum_dy_xmu[c] = plane_channel_sums(dy_flat, x_flat, x.shape, c, mean[c])
    dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)
    dx_planes(dy_flat, x_flat, dx_flat, c, outer * channels, channels, inner, coef)
