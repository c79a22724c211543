"""The CPU work partition, counted and split once.

Every CPU entry point runs these work items: the JIT drivers (:mod:`.drivers`) as ``prange``
loops over items, the C plugin's range drivers (:mod:`numba_bn.capi.ranges`) over
``first:last`` on the shim's threads. The shim takes its item counts and the size of its
partials from :func:`plan` (exported as ``plan``), never from arithmetic of its own.

Work items of the canonical ``(outer, C, inner)`` view:

* fused, planes (the forward: of FUSED_FORWARD_MIN_INNER values or more; the backward: from
  FUSED_BACKWARD_MIN_ELEMENTS elements on, not short) with ``C >= 2 * threads`` (one thread: from
  FUSED_SERIAL_MIN_ELEMENTS elements on): one channel per item, statistics and normalisation (or
  reduction and dx) back to back while the channel is in L2. That rule (:func:`is_fused`, the
  C shim's) was measured on one machine; the JIT backend's parallel plans time both partitions
  where both can run (:func:`both_partitions`) and keep the faster (:mod:`.race`);
* reduction items write partials ``part`` (rows, parts, C): ``(channel, segment)`` for planes
  (:func:`.kernels.channel_segments`), ``(row chunk, channel tile)`` for rows, ``(row chunk,
  column tile)`` of the (outer, C * inner) view for short planes (partial ``chunk * inner + i``
  of channel c from column ``c * inner + i``); a tile is CHANNEL_TILE columns, fewer on a batch
  that would otherwise be too few items for the threads (:func:`row_tile`);
* channel items (:func:`channel_items`) merge the partials of CHANNEL_GROUP channels, each in
  part order, then their coefficients, in one kernel call (:mod:`.channels`): an item per
  channel cost 30-40 ns a channel in reference counting and calls, more than the merge. An item
  past the last group does nothing, so a loop over ``range(channels)`` also covers every channel
  once. Where each reduction item holds whole channels (:func:`whole_channels`: rows of one
  chunk), the JIT drivers let it finish them instead (:func:`item_channels`), in the parallel
  region that reduced them; the C shim keeps its channel items (the same bits);
* elementwise items: runs of whole rows for rows, runs of whole consecutive planes for planes
  shorter than PLANE_BLOCK (ELEMENTWISE_SPAN elements at most, ITEMS_WANTED items where they
  can), ``(n, channel, block)`` for longer ones (:mod:`.kernels`); short
  planes (:func:`.kernels.short_planes`) as runs of whole rows of the (outer, C * inner) view,
  whose coefficient rows have a column per value (:func:`coef_columns`; the loop nest or the C
  shim spreads them with :func:`.kernels.spread_columns` once per call).

The items that differ between memory shapes come as one per shape (``stats_item_rows``,
``stats_item_planes``) and one that decides per call from ``inner`` (``stats_item``: the C shim's
range drivers); :data:`ITEMS` names them by shape. Short planes are a shape of their own: the
rows of the (outer, C * inner) view, whose reduction items file a column's partial as its
channel's (``chunk * inner + i``: part order, the merge order) and whose elementwise items read
coefficient rows spread to a column per value. A JIT driver is compiled for one shape
(:func:`numba_bn.cpu.drivers.driver`) and calls that shape's items only, so that Numba never
types, inlines or compiles the others' (the README's "First call"). For the same reason the
item counts and sizes (``reduce_items``, ``elementwise_items``, ``parts``, ``row_tile``, ...)
are compiled once, as functions every driver calls, not inlined into each: Numba's inlining
redoes a function's front end and copies its IR at every site, and these nests, inlined at
dozens of sites, took ~1.5 s of a cold first call's 15 (benchmarks/README.md, stop 36); the
leaves they call (``short_planes_jit``, ``wanted_units``) stay inlined.

Which item computes what never changes the merge order inside a channel, so results do not depend
on the partition's use of threads. Each item is index arithmetic plus a call into
:mod:`.kernels` or :mod:`.channels`, inlined into the loop that runs it. An item's arrays are
views that hold no reference (:func:`numba_bn.stats.borrowed`, taken by the loop; the C library's
are ``carray`` views): Numba counted one for each array of an item in every iteration, two
atomic operations each, ~0.8 us of a small backward's 4.4 (benchmarks/README.md, stop 55). Items
are still long (see the channel items and the short planes' elementwise items): each is a call
or two and its index arithmetic. They take the view's values flat with its shape, shaped as rows
inside (:func:`numba_bn.stats.shaped`: Numba's reshape calls into its helper library, ~27 ns of a
short planes reduction item's 66 ns overhead). Floating point stays in the separately compiled
kernels, which keeps the parallel and serial twins bitwise identical (float code inline in a
prange body was seen to round 1 ulp differently between twins). The reductions that may be
reassociated go further: they are called through :func:`numba_bn.stats.apart`, never inlined,
so a fused item and a split item run one compiled body of ``runs_sums`` (inlined, LLVM
vectorised it two ways in the C library's x86-64-v2 build, and 1 and 2 threads gave other
bits).
"""

import types

from ..stats import apart, callee, empty, imax, imin, kernel, release, shaped
from .kernels import (
    CHANNEL_TILE,
    ELEMENTWISE_SPAN,
    PLANE_BLOCK,
    ROW_CHUNK,
    affine_planes,
    affine_range,
    channel_segments_jit,
    dx_planes,
    dx_range,
    plane_run_planes,
    plane_segment_stats,
    plane_segment_sums,
    plane_segments_jit,
    row_span_rows,
    rows_affine,
    rows_chunk_stats,
    rows_chunk_sums,
    rows_dx,
    short_planes,
    short_planes_jit,
    spread_columns,
    wanted_units,
)

#: Channels per channel-item kernel call (see the module's docstring).
CHANNEL_GROUP = 64

#: The float64 scratch a reduction item of rows or short planes needs: rows_chunk_stats' block
#: sums and shifts, and a short planes item's column partials (or column means) before it files
#: them.
ITEM_SCRATCH_SHAPE = (5, CHANNEL_TILE)

#: Memory shapes: the keys of :data:`ITEMS` (see the module's docstring).
MEMORY_ANY, MEMORY_ROWS, MEMORY_PLANES, MEMORY_SHORT = 0, 1, 2, 3


def memory_of(outer, inner):
    """The memory shape of a canonical view (``outer``, C, ``inner``)."""
    if inner == 1:
        return MEMORY_ROWS
    return MEMORY_SHORT if short_planes(outer, inner) else MEMORY_PLANES


#: The fields :func:`plan` writes, in order (the shim reads them by these names).
PLAN_FIELDS = (
    "fused_forward",
    "fused_backward",
    "parts",
    "reduce_items",
    "reduce_item_elements",
    "elementwise_items",
    "elementwise_item_elements",
    "coef_columns",
    "channel_items",
    "channel_item_elements",
)


# ------------------------------------------------------------------------------ counting
#: One thread runs the fused partition only on inputs of this many elements or more: below, the
#: split one was faster (benchmarks/README.md, "Lead: the fused partition": forward 0.5-1.0x,
#: backward 0.7-0.95x the fused time from 8K to 3.2M elements; at 6.4M the backward 1.1-1.25x).
FUSED_SERIAL_MIN_ELEMENTS = 1 << 22
#: The forward's fused partition only on planes of this many values or more (runs of 8 KiB of
#: float32): a fused item writes y in runs of ``inner`` values C * inner apart, and on shorter
#: planes the split forward was faster with two threads, 2026-12-02 (benchmarks/README.md, "The
#: fused partition: split where it was faster": public forward_train, fused / split time
#: 1.27-1.49 on (64, 256, 14, 14), 1.03-1.32 on (32, 64, 28, 28), 1.10-1.22 on (128, 64, 28, 28)
#: and (32, 64, 40, 40); from 2048 values on within +-10%).
FUSED_FORWARD_MIN_INNER = 2048
#: The backward's fused partition only from this many elements on: below, the split backward's
#: second read of dy and x comes from L3, and it was faster (split / fused 0.6-0.9 on 1.6M
#: elements, 0.9-1.0 on 3.2M of short planes); on larger tensors fused won by 12-20%.
FUSED_BACKWARD_MIN_ELEMENTS = 1 << 21


def is_fused(channels, inner, threads, size, forward):
    """Whole channels per item: planes (the forward's of FUSED_FORWARD_MIN_INNER values or more,
    the backward's not short) with a channel or more for each thread, twice over; only from
    FUSED_SERIAL_MIN_ELEMENTS elements (``size``) on with one thread, from
    FUSED_BACKWARD_MIN_ELEMENTS for a backward."""
    if threads == 1 and size < FUSED_SERIAL_MIN_ELEMENTS:
        return False
    if not forward and size < FUSED_BACKWARD_MIN_ELEMENTS:
        return False
    if not forward and short_planes(size // (channels * inner), inner):
        return False  # split, dx as rows: 1.5-3x faster (benchmarks/README.md, "Short planes")
    return inner >= (FUSED_FORWARD_MIN_INNER if forward else 2) and channels >= 2 * threads


def both_partitions(outer, channels, inner, threads):
    """Whether both partitions can run a canonical view (``outer``, ``channels``, ``inner``) on
    ``threads`` threads: planes, not short, with a channel or more for each thread, twice over
    (a race times them: :mod:`.race`)."""
    return inner > 1 and not short_planes(outer, inner) and channels >= 2 * threads


# the same rule for plan(), calling the compiled short_planes (Numba calls no Python function)
is_fused_jit = kernel(inline="always")(
    types.FunctionType(is_fused.__code__, {**globals(), "short_planes": short_planes_jit})
)


#: The narrowest reduction tile of the rows layouts (row_tile): rows of 256 bytes of float32.
MIN_CHANNEL_TILE = 64


@callee
def row_tile(outer, width):
    """Columns per reduction item of an (``outer``, ``width``) rows view (rows; short planes'
    (outer, C * inner)): all of them up to CHANNEL_TILE (longer runs of a row read faster), or
    fewer (a multiple of 16, at least MIN_CHANNEL_TILE) for ITEMS_WANTED items of
    ITEM_MIN_ELEMENTS or more (:mod:`.kernels`: a (1024, 256) batch was one item, and its
    statistics ran no faster on two threads than on one). A tile is a set of whole columns,
    each reduced as in any tile (row blocks merged in row order): the tile decides which item
    computes a column, never its bits."""
    chunks, rows = -(-outer // ROW_CHUNK), imin(outer, ROW_CHUNK)
    tile = wanted_units(width * chunks, rows)  # a column of a chunk: rows values
    return imin(CHANNEL_TILE, imax(MIN_CHANNEL_TILE, -(-tile // 16) * 16))


@callee
def row_tiles(outer, width):
    return -(-width // row_tile(outer, width))


@callee
def parts(outer, inner):
    """Partials per channel: segments for planes, row chunks for rows, and for short planes row
    chunks of the (outer, C * inner) view times the values of a plane (a partial per column:
    chunk * inner + i)."""
    if inner == 1:
        return -(-outer // ROW_CHUNK)
    if short_planes_jit(outer, inner):
        return -(-outer // ROW_CHUNK) * inner
    return channel_segments_jit(outer, inner)


@callee
def reduce_items(outer, channels, inner):
    if inner == 1:
        return parts(outer, inner) * row_tiles(outer, channels)
    if short_planes_jit(outer, inner):
        return -(-outer // ROW_CHUNK) * row_tiles(outer, channels * inner)
    return channels * parts(outer, inner)


@callee
def reduce_item_elements(outer, channels, inner):
    """Elements one reduction item reads (the largest item)."""
    if inner == 1 or short_planes_jit(outer, inner):
        return imin(outer, ROW_CHUNK) * row_tile(outer, channels * inner)
    if inner >= PLANE_BLOCK:
        return PLANE_BLOCK
    return imin(outer, PLANE_BLOCK // inner) * inner


@callee
def elementwise_items(outer, channels, inner):
    if inner == 1 or short_planes_jit(outer, inner):  # short planes: rows of (outer, C * inner)
        return -(-outer // row_span_rows(outer, channels * inner))
    if inner >= PLANE_BLOCK:
        return outer * channels * plane_segments_jit(inner)
    return -(-(outer * channels) // plane_run_planes(outer, channels, inner))


@callee
def elementwise_item_elements(outer, channels, inner):
    if inner == 1 or short_planes_jit(outer, inner):
        return imin(outer, row_span_rows(outer, channels * inner)) * channels * inner
    if inner >= PLANE_BLOCK:
        return PLANE_BLOCK
    return imin(outer * channels, plane_run_planes(outer, channels, inner)) * inner


@callee
def coef_columns(outer, channels, inner):
    """Columns of the coefficient rows the elementwise items read: one per channel, and for
    short planes one per value of a channel's plane (spread_columns)."""
    return channels * inner if short_planes_jit(outer, inner) else channels


@kernel(inline="always")
def wide_coefficients(coef, outer, inner):
    """The coefficient rows (rows, C) as the elementwise items of a view (``outer``, C,
    ``inner``) read them: ``coef`` itself, or for short planes a copy with a column per value."""
    if short_planes_jit(outer, inner):
        wide = empty((coef.shape[0], coef.shape[1] * inner), coef.dtype)
        spread_columns(coef, inner, wide)
        return wide
    return coef


@kernel(inline="always")
def release_wide(wide, outer, inner):
    """Free wide_coefficients' copy (:func:`numba_bn.stats.release`: in a function without
    Numba's runtime); ``coef`` itself stays its caller's. Every memory shape's loops call it:
    rows and planes never have short planes, so same_coefficients' coef is never freed."""
    if short_planes_jit(outer, inner):
        release(wide)


@kernel(inline="always")
def same_coefficients(coef, outer, inner):
    """wide_coefficients of a memory shape without short planes."""
    return coef


@callee
def plan(outer, channels, inner, threads, out):
    """The partition of a call, as :data:`PLAN_FIELDS` in ``out`` (int64, length >= 10)."""
    size = outer * channels * inner
    out[0] = 1 if is_fused_jit(channels, inner, threads, size, True) else 0
    out[1] = 1 if is_fused_jit(channels, inner, threads, size, False) else 0
    out[2] = parts(outer, inner)
    out[3] = reduce_items(outer, channels, inner)
    out[4] = reduce_item_elements(outer, channels, inner)
    out[5] = elementwise_items(outer, channels, inner)
    out[6] = elementwise_item_elements(outer, channels, inner)
    out[7] = coef_columns(outer, channels, inner)
    out[8] = channel_items(channels)
    out[9] = out[2] * imin(CHANNEL_GROUP, channels)  # the partials a channel item merges


# ---------------------------------------------------------------------------- reduction items
@kernel(inline="always")
def _row_item_range(item, outer, channels):
    """(chunk, r0, r1, c0, c1) of reduction item ``item`` of the rows layout."""
    tile = row_tile(outer, channels)
    ntiles = -(-channels // tile)
    k, t = item // ntiles, item % ntiles
    r0, c0 = k * ROW_CHUNK, t * tile
    return k, r0, imin(r0 + ROW_CHUNK, outer), c0, imin(c0 + tile, channels)


@kernel(inline="always")
def stats_item_rows(x, shape, item, part, scratch):
    """Partials (=) count, mean, M2 of reduction item ``item`` in ``part`` (3, parts, C), rows.

    ``x``: the values of the canonical view of ``shape`` (outer, C, inner), flat, as every
    reduction and elementwise item takes them. ``scratch`` (3, >= CHANNEL_TILE) float64:
    rows_chunk_stats' block sums and shifts.
    """
    outer, channels, _ = shape
    k, r0, r1, c0, c1 = _row_item_range(item, outer, channels)
    part[0, k, c0:c1] = apart(rows_chunk_stats, (
        shaped(x, (outer, channels)), r0, r1, c0, c1, part[1, k, c0:c1], part[2, k, c0:c1],
        scratch[0], scratch[1], scratch[2],
    ))  # fmt: skip


@kernel(inline="always")
def stats_item_planes(x, shape, item, part, scratch):
    """stats_item_rows for planes (``scratch`` unused)."""
    nparts = part.shape[1]
    c, g = item // nparts, item % nparts
    part[0, g, c], part[1, g, c], part[2, g, c] = plane_segment_stats(x, shape, c, g)


@kernel(inline="always")
def stats_item_short(x, shape, item, part, scratch):
    """stats_item_rows of the (outer, C * inner) view: the partials of columns c * inner + i go
    to channel c's partial chunk * inner + i (merged in that order), through ``scratch``."""
    outer, channels, inner = shape
    width = channels * inner
    k, r0, r1, c0, c1 = _row_item_range(item, outer, width)
    count = apart(rows_chunk_stats, (
        shaped(x, (outer, width)), r0, r1, c0, c1, scratch[2], scratch[3], scratch[0], scratch[1],
        scratch[4],
    ))  # fmt: skip
    for j in range(c1 - c0):
        c, i = (c0 + j) // inner, (c0 + j) % inner
        part[0, k * inner + i, c] = count
        part[1, k * inner + i, c] = scratch[2, j]
        part[2, k * inner + i, c] = scratch[3, j]


@kernel(inline="always")
def stats_item(x, shape, item, part, scratch):
    """Any memory shape, decided from ``shape``."""
    if shape[2] == 1:
        stats_item_rows(x, shape, item, part, scratch)
    elif short_planes_jit(shape[0], shape[2]):
        stats_item_short(x, shape, item, part, scratch)
    else:
        stats_item_planes(x, shape, item, part, scratch)


@kernel(inline="always")
def sums_item_rows(dy, x, shape, item, mean, part, scratch):
    """Partials (=) sum_dy, sum_dy_xmu of reduction item ``item`` in ``part`` (2, parts, C),
    rows; ``dy`` and ``x`` flat as in stats_item_rows (``scratch`` unused)."""
    outer, channels, _ = shape
    k, r0, r1, c0, c1 = _row_item_range(item, outer, channels)
    apart(rows_chunk_sums, (
        shaped(dy, (outer, channels)), shaped(x, (outer, channels)), r0, r1, c0, c1, mean[c0:c1],
        part[0, k, c0:c1], part[1, k, c0:c1],
    ))  # fmt: skip


@kernel(inline="always")
def sums_item_planes(dy, x, shape, item, mean, part, scratch):
    nparts = part.shape[1]
    c, g = item // nparts, item % nparts
    part[0, g, c], part[1, g, c] = plane_segment_sums(dy, x, shape, c, g, mean[c])


@kernel(inline="always")
def sums_item_short(dy, x, shape, item, mean, part, scratch):
    """sums_item_rows of the (outer, C * inner) view, its columns' means and partials through
    ``scratch`` (ITEM_SCRATCH_SHAPE), filed as stats_item_short files them."""
    outer, channels, inner = shape
    width = channels * inner
    k, r0, r1, c0, c1 = _row_item_range(item, outer, width)
    for j in range(c1 - c0):
        scratch[0, j] = mean[(c0 + j) // inner]
    apart(rows_chunk_sums, (
        shaped(dy, (outer, width)), shaped(x, (outer, width)), r0, r1, c0, c1, scratch[0],
        scratch[1], scratch[2],
    ))  # fmt: skip
    for j in range(c1 - c0):
        c, i = (c0 + j) // inner, (c0 + j) % inner
        part[0, k * inner + i, c] = scratch[1, j]
        part[1, k * inner + i, c] = scratch[2, j]


@kernel(inline="always")
def sums_item(dy, x, shape, item, mean, part, scratch):
    """Any memory shape, decided from ``shape``."""
    if shape[2] == 1:
        sums_item_rows(dy, x, shape, item, mean, part, scratch)
    elif short_planes_jit(shape[0], shape[2]):
        sums_item_short(dy, x, shape, item, mean, part, scratch)
    else:
        sums_item_planes(dy, x, shape, item, mean, part, scratch)


@kernel(inline="always")
def whole_channels(outer, inner):
    """Whether every reduction item of an (``outer``, C, ``inner``) view reads all the values of
    the channels it reduces, and the channels are many (rows of at most ROW_CHUNK rows: one
    partial a channel, an item a tile of columns): its partials are then those channels'
    statistics or sums, and the item finishes them itself (:func:`item_channels`), in the
    parallel region that reduced them, without channel items of their own. Planes of one
    segment a channel hold their channel whole too, but there an item is one channel:
    finishing each alone cost a call a channel where a channel item takes CHANNEL_GROUP of
    them, +0.5-1 us of a serial (8, 16, 8, 8) step (benchmarks/README.md, stop 65)."""
    return inner == 1 and parts(outer, inner) == 1


@kernel(inline="always")
def item_channels_rows(shape, item):
    """Channels c0:c1 of reduction item ``item`` of the rows layout: its column tile."""
    _, _, _, c0, c1 = _row_item_range(item, shape[0], shape[1])
    return c0, c1


@kernel(inline="always")
def item_channels_none(shape, item):
    """Planes' and short planes' reduction items, which never finish channels (whole_channels):
    none."""
    return 0, 0


@kernel(inline="always")
def item_channels(shape, item):
    """Any memory shape, decided from ``shape``."""
    if shape[2] == 1:
        return item_channels_rows(shape, item)
    return item_channels_none(shape, item)


# ----------------------------------------------------------------------------- channel items
@callee
def channel_items(channels):
    """Channel items: groups of CHANNEL_GROUP channels."""
    return -(-channels // CHANNEL_GROUP)


@kernel(inline="always")
def _group(item, channels):
    """Channels c0:c1 of channel item ``item``; empty past the last group."""
    c0 = imin(item * CHANNEL_GROUP, channels)
    return c0, imin(c0 + CHANNEL_GROUP, channels)


@kernel(inline="always")
def channel_item(item, part, finish, finishing):
    """Channel item ``item``: ``finish(c0, c1, part, *finishing)`` on its channels c0:c1, the
    partials merged or added in part order (:mod:`.channels`: ``merge_channels``,
    ``train_channels`` (and the affine rows), ``add_channels``, ``dx_channels`` (and the dx
    rows)); nothing past the last group."""
    c0, c1 = _group(item, part.shape[2])
    if c1 > c0:
        finish(c0, c1, part, *finishing)


# -------------------------------------------------------------------------- elementwise items
@kernel(inline="always")
def _plane_block(item, channels, inner):
    """(channel, start, stop) of elementwise item ``item`` = (n, c, block) of planes of at least
    PLANE_BLOCK values, in the flat array."""
    nblk = plane_segments_jit(inner)
    plane, b = item // nblk, item % nblk
    start = plane * inner + b * PLANE_BLOCK
    return plane % channels, start, imin(start + PLANE_BLOCK, (plane + 1) * inner)


@kernel(inline="always")
def _plane_run(item, outer, channels, inner):
    """Planes p0:p1 (flat plane index n * C + c) of elementwise item ``item`` of short planes."""
    planes = plane_run_planes(outer, channels, inner)
    p0 = item * planes
    return p0, imin(p0 + planes, outer * channels)


@kernel(inline="always")
def flat_items(size):
    """Items of an elementwise pass that needs no channel: ELEMENTWISE_SPAN elements each."""
    return -(-size // ELEMENTWISE_SPAN)


@kernel(inline="always")
def flat_item(item, size):
    """[start, stop) of flat item ``item``."""
    start = item * ELEMENTWISE_SPAN
    return start, imin(start + ELEMENTWISE_SPAN, size)


# Elementwise items take the flat arrays and the view's shape; the rows layout's items view them
# as rows (numba_bn.stats.shaped) once per item, inside.
@kernel(inline="always")
def normalize_item_rows(x, y, shape, item, coef, z, epilogue):
    """y (=) of elementwise item ``item`` of flat ``x``, ``y`` with the affine rows ``coef``,
    then the ``epilogue`` (:mod:`.kernels`) with flat ``z``; rows."""
    outer, channels, _ = shape
    rows, view = row_span_rows(outer, channels), (outer, channels)
    r0 = item * rows
    rows_affine(shaped(x, view), shaped(y, view), r0, imin(r0 + rows, outer), 0, channels, coef,
                shaped(z, view), epilogue)  # fmt: skip


@kernel(inline="always")
def normalize_item_planes(x, y, shape, item, coef, z, epilogue):
    outer, channels, inner = shape
    if inner < PLANE_BLOCK:
        p0, p1 = _plane_run(item, outer, channels, inner)
        affine_planes(x, y, p0, p1, 1, inner, coef, z, epilogue)
    else:
        c, start, stop = _plane_block(item, channels, inner)
        affine_range(x, y, start, stop, coef, c, z, epilogue)


@kernel(inline="always")
def normalize_item_short(x, y, shape, item, coef, z, epilogue):
    """normalize_item_rows of the (outer, C * inner) view; ``coef`` has a column per value."""
    outer, channels, inner = shape
    normalize_item_rows(x, y, (outer, channels * inner, 1), item, coef, z, epilogue)


@kernel(inline="always")
def normalize_item(x, y, shape, item, coef, z, epilogue):
    """Any memory shape, decided from ``shape``."""
    if shape[2] == 1:
        normalize_item_rows(x, y, shape, item, coef, z, epilogue)
    elif short_planes_jit(shape[0], shape[2]):
        normalize_item_short(x, y, shape, item, coef, z, epilogue)
    else:
        normalize_item_planes(x, y, shape, item, coef, z, epilogue)


@kernel(inline="always")
def dx_item_rows(dy, x, dx, shape, item, coef):
    """dx (=) of elementwise item ``item`` of flat ``dy``, ``x``, ``dx`` with the dx rows; rows."""
    outer, channels, _ = shape
    rows, view = row_span_rows(outer, channels), (outer, channels)
    r0 = item * rows
    rows_dx(shaped(dy, view), shaped(x, view), shaped(dx, view), r0, imin(r0 + rows, outer), 0,
            channels, coef)  # fmt: skip


@kernel(inline="always")
def dx_item_planes(dy, x, dx, shape, item, coef):
    outer, channels, inner = shape
    if inner < PLANE_BLOCK:
        p0, p1 = _plane_run(item, outer, channels, inner)
        dx_planes(dy, x, dx, p0, p1, 1, inner, coef)
    else:
        c, start, stop = _plane_block(item, channels, inner)
        dx_range(dy, x, dx, start, stop, coef, c)


@kernel(inline="always")
def dx_item_short(dy, x, dx, shape, item, coef):
    """dx_item_rows of the (outer, C * inner) view; ``coef`` has a column per value."""
    outer, channels, inner = shape
    dx_item_rows(dy, x, dx, (outer, channels * inner, 1), item, coef)


@kernel(inline="always")
def dx_item(dy, x, dx, shape, item, coef):
    """Any memory shape, decided from ``shape``."""
    if shape[2] == 1:
        dx_item_rows(dy, x, dx, shape, item, coef)
    elif short_planes_jit(shape[0], shape[2]):
        dx_item_short(dy, x, dx, shape, item, coef)
    else:
        dx_item_planes(dy, x, dx, shape, item, coef)


#: The items of each memory shape by name, as the drivers' loop nests call them
#: (:func:`numba_bn.cpu.drivers.twins`): MEMORY_ANY's decide per call.
ITEMS = {
    MEMORY_ANY: {"stats_item": stats_item, "sums_item": sums_item,
                 "normalize_item": normalize_item, "dx_item": dx_item,
                 "wide_coefficients": wide_coefficients, "item_channels": item_channels},
    MEMORY_ROWS: {"stats_item": stats_item_rows, "sums_item": sums_item_rows,
                  "normalize_item": normalize_item_rows, "dx_item": dx_item_rows,
                  "wide_coefficients": same_coefficients, "item_channels": item_channels_rows},
    MEMORY_PLANES: {"stats_item": stats_item_planes, "sums_item": sums_item_planes,
                    "normalize_item": normalize_item_planes, "dx_item": dx_item_planes,
                    "wide_coefficients": same_coefficients, "item_channels": item_channels_none},
    MEMORY_SHORT: {"stats_item": stats_item_short, "sums_item": sums_item_short,
                   "normalize_item": normalize_item_short, "dx_item": dx_item_short,
                   "wide_coefficients": wide_coefficients, "item_channels": item_channels_none},
}  # fmt: skip
