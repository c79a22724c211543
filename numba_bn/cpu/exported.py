"""Serial range drivers over raw pointers: the compute code of the C plugin.

``numba-bn build-plugin`` (:mod:`numba_bn.plugin`) compiles every function in :data:`EXPORTED`
with ``@cfunc`` for float32 and float64 and links them into ``libnumba_bn.so``. The C shim
(kernels/nbn_shim.c) checks arguments, allocates scratch and runs them on its threads, each call
over a range ``first:last`` of work items. Items, block sizes, merge order and per-channel helpers
are those of the parallel drivers (:mod:`.drivers`), so the plugin computes what the JIT backend
computes; only the loop over items moved from ``prange`` to the shim.

Arguments: ``T`` is the tensor dtype, ``(outer, channels, inner)`` the canonical view; weight and
bias come with their length (``channels``, or 0 when absent). Annotations give each argument's C
type; the build generates the C declarations from them. Outputs are overwritten (``=``); nothing
allocates (``part`` and ``scratch`` come from the shim).

==========================  ==========================  =======================================
function                    items                       writes
==========================  ==========================  =======================================
train_plane_channels        channels (fused)            y, coef, mean, invstd, m2
plane_stats_items           (channel, segment)          part (3, C, segments): count, mean, M2
train_from_plane_parts      channels                    coef, mean, invstd, m2
rows_stats_items            (row chunk, channel tile)   part_mean, part_m2 (chunks, C)
train_from_row_parts        channels                    coef, mean, invstd, m2
normalize_items             (n, c, block) / (chunk, t)  y
update_running              -                           running_mean, running_var (unbiased)
eval_coefficients           channels                    coef
backward_plane_channels     channels (fused)            dx, coef, sum_dy, sum_dy_xmu
plane_sums_items            (channel, segment)          part (2, C, segments)
dx_from_plane_parts         channels                    coef, sum_dy, sum_dy_xmu
rows_sums_items             (row chunk, channel tile)   part (2, chunks, C)
dx_from_row_parts           channels                    coef, sum_dy, sum_dy_xmu
dx_items                    (n, c, block) / (chunk, t)  dx
==========================  ==========================  =======================================
"""

from numba import carray

from ..stats import chan_merge
from .drivers import (
    _dx_coefficients,
    _eval_coefficients,
    _row_item_range,
    _row_items,
    _train_coefficients,
)
from .drivers import (
    update_running as _update_running,
)
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

# C types of the arguments; T becomes float or double.
IN = "const T *"
OUT = "T *"
IN64 = "const double *"
OUT64 = "double *"
I64 = "int64_t"
F64 = "double"

#: Constants the shim needs to lay out its work items like the drivers.
CONSTANTS = {"PLANE_BLOCK": PLANE_BLOCK, "ROW_CHUNK": ROW_CHUNK, "CHANNEL_TILE": CHANNEL_TILE}


# ---------------------------------------------------------------------------- forward statistics
def train_plane_channels(
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    eps: F64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    y_ptr: OUT,
    coef_ptr: OUT,
    mean_ptr: OUT64,
    invstd_ptr: OUT64,
    m2_ptr: OUT64,
):
    """Channels first:last of the planes layout, fused: statistics, coefficients, y."""
    x = carray(x_ptr, (outer, channels, inner))
    y = carray(y_ptr, (outer, channels, inner))
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    coef = carray(coef_ptr, (4, channels))
    mean, invstd, m2 = (
        carray(mean_ptr, channels),
        carray(invstd_ptr, channels),
        carray(m2_ptr, channels),
    )
    count = float(outer * inner)
    for c in range(first, last):
        _, mu, sq = plane_channel_stats(x, c)
        m2[c] = sq
        _train_coefficients(c, count, mu, sq, eps, weight, bias, coef, mean, invstd)
        for n in range(outer):
            plane_affine(x, y, n, c, coef)


def plane_stats_items(
    x_ptr: IN, outer: I64, channels: I64, inner: I64, first: I64, last: I64, part_ptr: OUT64
):
    """(count, mean, M2) of (channel, segment) items first:last into ``part[:, c, segment]``."""
    x = carray(x_ptr, (outer, channels, inner))
    nseg = outer * plane_segments_jit(inner)
    part = carray(part_ptr, (3, channels, nseg))
    for item in range(first, last):
        c, g = item // nseg, item % nseg
        part[0, c, g], part[1, c, g], part[2, c, g] = plane_segment_stats(x, c, g)


def train_from_plane_parts(
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    part_ptr: IN64,
    eps: F64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    coef_ptr: OUT,
    mean_ptr: OUT64,
    invstd_ptr: OUT64,
    m2_ptr: OUT64,
):
    """Channels first:last: merge the segments in order, then the coefficients."""
    nseg = outer * plane_segments_jit(inner)
    part = carray(part_ptr, (3, channels, nseg))
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    coef = carray(coef_ptr, (4, channels))
    mean, invstd, m2 = (
        carray(mean_ptr, channels),
        carray(invstd_ptr, channels),
        carray(m2_ptr, channels),
    )
    count = float(outer * inner)
    for c in range(first, last):
        total, mu, sq = 0.0, 0.0, 0.0
        for g in range(nseg):
            total, mu, sq = chan_merge(total, mu, sq, part[0, c, g], part[1, c, g], part[2, c, g])
        m2[c] = sq
        _train_coefficients(c, count, mu, sq, eps, weight, bias, coef, mean, invstd)


def rows_stats_items(
    x_ptr: IN,
    outer: I64,
    channels: I64,
    first: I64,
    last: I64,
    part_mean_ptr: OUT64,
    part_m2_ptr: OUT64,
    scratch_ptr: OUT64,
):
    """(mean, M2) of (row chunk, channel tile) items first:last; scratch: 2 * CHANNEL_TILE."""
    x = carray(x_ptr, (outer, channels))
    nchunks, ntiles = _row_items(outer, channels)
    part_mean = carray(part_mean_ptr, (nchunks, channels))
    part_m2 = carray(part_m2_ptr, (nchunks, channels))
    scratch = carray(scratch_ptr, (2, CHANNEL_TILE))
    for item in range(first, last):
        k, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
        rows_chunk_stats(
            x, r0, r1, c0, c1, part_mean[k, c0:c1], part_m2[k, c0:c1], scratch[0], scratch[1]
        )


def train_from_row_parts(
    outer: I64,
    channels: I64,
    first: I64,
    last: I64,
    part_mean_ptr: IN64,
    part_m2_ptr: IN64,
    eps: F64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    coef_ptr: OUT,
    mean_ptr: OUT64,
    invstd_ptr: OUT64,
    m2_ptr: OUT64,
):
    """Channels first:last: merge the row chunks in order, then the coefficients."""
    nchunks, _ = _row_items(outer, channels)
    part_mean = carray(part_mean_ptr, (nchunks, channels))
    part_m2 = carray(part_m2_ptr, (nchunks, channels))
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    coef = carray(coef_ptr, (4, channels))
    mean, invstd, m2 = (
        carray(mean_ptr, channels),
        carray(invstd_ptr, channels),
        carray(m2_ptr, channels),
    )
    count = float(outer)
    for c in range(first, last):
        total, mu, sq = 0.0, 0.0, 0.0
        for k in range(nchunks):
            rows = float(min(ROW_CHUNK, outer - k * ROW_CHUNK))
            total, mu, sq = chan_merge(total, mu, sq, rows, part_mean[k, c], part_m2[k, c])
        m2[c] = sq
        _train_coefficients(c, count, mu, sq, eps, weight, bias, coef, mean, invstd)


# ------------------------------------------------------------------------- elementwise transform
def normalize_items(
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    coef_ptr: IN,
    y_ptr: OUT,
):
    """y of items first:last: (n, c, block) for planes, (row chunk, channel tile) for rows."""
    coef = carray(coef_ptr, (4, channels))
    if inner == 1:
        x = carray(x_ptr, (outer, channels))
        y = carray(y_ptr, (outer, channels))
        _, ntiles = _row_items(outer, channels)
        for item in range(first, last):
            _, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            rows_affine(x, y, r0, r1, c0, c1, coef)
        return
    x = carray(x_ptr, (outer, channels, inner))
    y = carray(y_ptr, (outer, channels, inner))
    nblk = plane_segments_jit(inner)
    for item in range(first, last):
        n, c, b = item // (channels * nblk), (item // nblk) % channels, item % nblk
        s0, s1 = b * PLANE_BLOCK, min((b + 1) * PLANE_BLOCK, inner)
        affine_run(x[n, c, s0:s1], y[n, c, s0:s1], coef[0, c], coef[1, c], coef[2, c], coef[3, c])


def update_running(
    channels: I64,
    running_mean_ptr: OUT,
    running_var_ptr: OUT,
    count: F64,
    mean_ptr: IN64,
    m2_ptr: IN64,
    momentum: F64,
):
    """PyTorch's running update (unbiased variance), as the JIT driver does it."""
    _update_running(
        carray(running_mean_ptr, channels),
        carray(running_var_ptr, channels),
        count,
        carray(mean_ptr, channels),
        carray(m2_ptr, channels),
        momentum,
        True,
    )


def eval_coefficients(
    channels: I64,
    first: I64,
    last: I64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    running_mean_ptr: IN,
    running_var_ptr: IN,
    eps: F64,
    coef_ptr: OUT,
):
    """Coefficients of the eval forward for channels first:last."""
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    running_mean = carray(running_mean_ptr, channels)
    running_var = carray(running_var_ptr, channels)
    coef = carray(coef_ptr, (4, channels))
    for c in range(first, last):
        _eval_coefficients(c, weight, bias, running_mean, running_var, eps, coef)


# ------------------------------------------------------------------------------------- backward
def backward_plane_channels(
    dy_ptr: IN,
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    mean_ptr: IN64,
    invstd_ptr: IN64,
    weight_ptr: IN,
    n_weight: I64,
    coef_ptr: OUT,
    sum_dy_ptr: OUT64,
    sum_dy_xmu_ptr: OUT64,
    dx_ptr: OUT,
):
    """Channels first:last of the planes layout, fused: the reduction, coefficients, dx."""
    dy = carray(dy_ptr, (outer, channels, inner))
    x = carray(x_ptr, (outer, channels, inner))
    dx = carray(dx_ptr, (outer, channels, inner))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    weight = carray(weight_ptr, n_weight)
    coef = carray(coef_ptr, (5, channels))
    sum_dy, sum_dy_xmu = carray(sum_dy_ptr, channels), carray(sum_dy_xmu_ptr, channels)
    count = float(outer * inner)
    for c in range(first, last):
        sum_dy[c], sum_dy_xmu[c] = plane_channel_sums(dy, x, c, mean[c])
        _dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)
        for n in range(outer):
            plane_dx(dy, x, dx, n, c, coef)


def plane_sums_items(
    dy_ptr: IN,
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    mean_ptr: IN64,
    part_ptr: OUT64,
):
    """(sum_dy, sum_dy_xmu) of (channel, segment) items first:last into ``part[:, c, segment]``."""
    dy = carray(dy_ptr, (outer, channels, inner))
    x = carray(x_ptr, (outer, channels, inner))
    mean = carray(mean_ptr, channels)
    nseg = outer * plane_segments_jit(inner)
    part = carray(part_ptr, (2, channels, nseg))
    for item in range(first, last):
        c, g = item // nseg, item % nseg
        part[0, c, g], part[1, c, g] = plane_segment_sums(dy, x, c, g, mean[c])


def dx_from_plane_parts(
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    part_ptr: IN64,
    mean_ptr: IN64,
    invstd_ptr: IN64,
    weight_ptr: IN,
    n_weight: I64,
    coef_ptr: OUT,
    sum_dy_ptr: OUT64,
    sum_dy_xmu_ptr: OUT64,
):
    """Channels first:last: add the segments in order, then the dx coefficients."""
    nseg = outer * plane_segments_jit(inner)
    part = carray(part_ptr, (2, channels, nseg))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    weight = carray(weight_ptr, n_weight)
    coef = carray(coef_ptr, (5, channels))
    sum_dy, sum_dy_xmu = carray(sum_dy_ptr, channels), carray(sum_dy_xmu_ptr, channels)
    count = float(outer * inner)
    for c in range(first, last):
        total_dy, total_dy_xmu = 0.0, 0.0
        for g in range(nseg):
            total_dy += part[0, c, g]
            total_dy_xmu += part[1, c, g]
        sum_dy[c], sum_dy_xmu[c] = total_dy, total_dy_xmu
        _dx_coefficients(c, count, mean[c], invstd[c], weight, total_dy, total_dy_xmu, coef)


def rows_sums_items(
    dy_ptr: IN,
    x_ptr: IN,
    outer: I64,
    channels: I64,
    first: I64,
    last: I64,
    mean_ptr: IN64,
    part_ptr: OUT64,
):
    """(sum_dy, sum_dy_xmu) of (row chunk, channel tile) items first:last into ``part[:, k]``."""
    dy = carray(dy_ptr, (outer, channels))
    x = carray(x_ptr, (outer, channels))
    mean = carray(mean_ptr, channels)
    nchunks, ntiles = _row_items(outer, channels)
    part = carray(part_ptr, (2, nchunks, channels))
    for item in range(first, last):
        k, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
        rows_chunk_sums(dy, x, r0, r1, c0, c1, mean, part[0, k, c0:c1], part[1, k, c0:c1])


def dx_from_row_parts(
    outer: I64,
    channels: I64,
    first: I64,
    last: I64,
    part_ptr: IN64,
    mean_ptr: IN64,
    invstd_ptr: IN64,
    weight_ptr: IN,
    n_weight: I64,
    coef_ptr: OUT,
    sum_dy_ptr: OUT64,
    sum_dy_xmu_ptr: OUT64,
):
    """Channels first:last: add the row chunks in order, then the dx coefficients."""
    nchunks, _ = _row_items(outer, channels)
    part = carray(part_ptr, (2, nchunks, channels))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    weight = carray(weight_ptr, n_weight)
    coef = carray(coef_ptr, (5, channels))
    sum_dy, sum_dy_xmu = carray(sum_dy_ptr, channels), carray(sum_dy_xmu_ptr, channels)
    count = float(outer)
    for c in range(first, last):
        total_dy, total_dy_xmu = 0.0, 0.0
        for k in range(nchunks):
            total_dy += part[0, k, c]
            total_dy_xmu += part[1, k, c]
        sum_dy[c], sum_dy_xmu[c] = total_dy, total_dy_xmu
        _dx_coefficients(c, count, mean[c], invstd[c], weight, total_dy, total_dy_xmu, coef)


def dx_items(
    dy_ptr: IN,
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    coef_ptr: IN,
    dx_ptr: OUT,
):
    """dx of items first:last: (n, c, block) for planes, (row chunk, channel tile) for rows."""
    coef = carray(coef_ptr, (5, channels))
    if inner == 1:
        dy = carray(dy_ptr, (outer, channels))
        x = carray(x_ptr, (outer, channels))
        dx = carray(dx_ptr, (outer, channels))
        _, ntiles = _row_items(outer, channels)
        for item in range(first, last):
            _, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            rows_dx(dy, x, dx, r0, r1, c0, c1, coef)
        return
    dy = carray(dy_ptr, (outer, channels, inner))
    x = carray(x_ptr, (outer, channels, inner))
    dx = carray(dx_ptr, (outer, channels, inner))
    nblk = plane_segments_jit(inner)
    for item in range(first, last):
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


#: In the order of the generated C table (kernels/nbn_kernels.h in the build directory).
EXPORTED = (
    train_plane_channels,
    plane_stats_items,
    train_from_plane_parts,
    rows_stats_items,
    train_from_row_parts,
    normalize_items,
    update_running,
    eval_coefficients,
    backward_plane_channels,
    plane_sums_items,
    dx_from_plane_parts,
    rows_sums_items,
    dx_from_row_parts,
    dx_items,
)
