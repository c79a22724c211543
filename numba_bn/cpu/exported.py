"""Serial range drivers over raw pointers: the compute code of the C plugin.

``numba-bn build-plugin`` (:mod:`numba_bn.plugin`) compiles every function in :data:`EXPORTED`
with ``@cfunc`` for float32 and float64 and links them into ``libnumba_bn.so``. The C shim
(kernels/nbn_shim.c) checks arguments, allocates scratch and runs them on its threads, each call
over a range ``first:last`` of work items. The work items, the partials and the calls into
:mod:`.kernels` are those of the drivers (:mod:`.drivers`), and, as there, each item is index
arithmetic plus a call into a kernel, so the plugin computes what the JIT backend computes; only
the loop over items moved from ``prange`` to the shim.

Arguments: ``T`` is the tensor dtype, ``(outer, channels, inner)`` the canonical view; weight and
bias come with their length (``channels``, or 0 when absent). The annotations give each
argument's C type; the build generates the C declarations from them. Outputs are overwritten
(``=``); nothing allocates (``part`` and ``scratch`` come from the shim). Partials ``part`` are
``(3, parts, C)`` (count, mean, M2) or ``(2, parts, C)`` (sum_dy, sum_dy_xmu), ``parts`` being
``outer * segments`` for planes and the row chunks for rows.

=========================  =============================================  ====================
function                   items                                          writes
=========================  =============================================  ====================
train_plane_channels       channels (planes, fused)                       y, coef, statistics
stats_items                (channel, segment) or (row chunk, ch. tile)    part
train_from_parts           channels: merge in part order, coefficients    coef, statistics
normalize_items            (n, channel, block) or (row chunk, ch. tile)   y
update_running             -                                              running_mean, _var
eval_coefficients          -                                              coef
backward_plane_channels    channels (planes, fused)                       dx, coef, sums
sums_items                 as stats_items                                 part
dx_from_parts              channels: add in part order, coefficients      coef, sums
dx_items                   as normalize_items                             dx
=========================  =============================================  ====================
"""

from numba import carray

from ..stats import AFFINE_ROWS, DX_ROWS, kernel
from .drivers import _plane_item, _row_item_range, _row_items, _row_span_items
from .kernels import (
    CHANNEL_TILE,
    PLANE_BLOCK,
    ROW_CHUNK,
    ROW_SPAN,
    add_parts,
    affine_range,
    channel_segments_jit,
    dx_coefficients,
    dx_range,
    merge_parts,
    plane_channel_backward,
    plane_channel_train,
    plane_segment_stats,
    plane_segment_sums,
    plane_segments_jit,
    rows_affine,
    rows_chunk_stats,
    rows_chunk_sums,
    rows_dx,
    train_coefficients,
)
from .kernels import eval_coefficients as _eval_coefficients
from .kernels import update_running as _update_running

# C types of the arguments; T becomes float or double.
IN = "const T *"
OUT = "T *"
IN64 = "const double *"
OUT64 = "double *"
I64 = "int64_t"
F64 = "double"

#: Constants the shim needs to lay out its work items like the drivers.
CONSTANTS = {
    "AFFINE_ROWS": AFFINE_ROWS,
    "DX_ROWS": DX_ROWS,
    "PLANE_BLOCK": PLANE_BLOCK,
    "ROW_CHUNK": ROW_CHUNK,
    "CHANNEL_TILE": CHANNEL_TILE,
    "ROW_SPAN": ROW_SPAN,
}


@kernel(inline="always")
def _parts(outer, inner):
    """Number of partials per channel: (n, block) segments for planes, row chunks for rows."""
    return channel_segments_jit(outer, inner) if inner > 1 else _row_items(outer, 1)[0]


# ---------------------------------------------------------------------------------- forward
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
    """Channels first:last of the planes layout, each start to finish (statistics, y)."""
    x = carray(x_ptr, (outer, channels, inner))
    y = carray(y_ptr, (outer, channels, inner))
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    coef = carray(coef_ptr, (AFFINE_ROWS, channels))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    m2 = carray(m2_ptr, channels)
    for c in range(first, last):
        plane_channel_train(x, c, eps, weight, bias, coef, y, mean, invstd, m2)


def stats_items(
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    part_ptr: OUT64,
    scratch_ptr: OUT64,
):
    """Partials (count, mean, M2) of items first:last; ``scratch``: 2 * CHANNEL_TILE."""
    part = carray(part_ptr, (3, _parts(outer, inner), channels))
    if inner == 1:
        x2 = carray(x_ptr, (outer, channels))
        scratch = carray(scratch_ptr, (2, CHANNEL_TILE))
        _, ntiles = _row_items(outer, channels)
        for item in range(first, last):
            k, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            part[0, k, c0:c1] = rows_chunk_stats(
                x2, r0, r1, c0, c1, part[1, k, c0:c1], part[2, k, c0:c1], scratch[0], scratch[1]
            )
        return
    x = carray(x_ptr, (outer, channels, inner))
    nparts = part.shape[1]
    for item in range(first, last):
        c, g = item // nparts, item % nparts
        part[0, g, c], part[1, g, c], part[2, g, c] = plane_segment_stats(x, c, g)


def train_from_parts(
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
    """Channels first:last: merge the partials in order, then the coefficients."""
    part = carray(part_ptr, (3, _parts(outer, inner), channels))
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    coef = carray(coef_ptr, (AFFINE_ROWS, channels))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    m2 = carray(m2_ptr, channels)
    count = float(outer * inner)
    for c in range(first, last):
        _, mean[c], m2[c] = merge_parts(part, c)
        train_coefficients(c, count, mean[c], m2[c], eps, weight, bias, coef, mean, invstd)


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
    """y of items first:last: (n, channel, block) for planes, runs of whole rows for rows."""
    coef = carray(coef_ptr, (AFFINE_ROWS, channels))
    if inner == 1:
        x2, y2 = carray(x_ptr, (outer, channels)), carray(y_ptr, (outer, channels))
        _, rows = _row_span_items(outer, channels)
        for item in range(first, last):
            r0 = item * rows
            rows_affine(x2, y2, r0, min(r0 + rows, outer), 0, channels, coef)
        return
    size = outer * channels * inner
    x_flat, y_flat = carray(x_ptr, size), carray(y_ptr, size)
    nblk = plane_segments_jit(inner)
    for item in range(first, last):
        c, start, stop = _plane_item(item, channels, nblk, inner)
        affine_range(x_flat, y_flat, start, stop, coef, c)


def update_running(
    channels: I64,
    running_mean_ptr: OUT,
    running_var_ptr: OUT,
    count: F64,
    mean_ptr: IN64,
    m2_ptr: IN64,
    momentum: F64,
):
    """PyTorch's running update: momentum weights the batch, unbiased variance."""
    running_mean, running_var = (
        carray(running_mean_ptr, channels),
        carray(running_var_ptr, channels),
    )
    mean, m2 = carray(mean_ptr, channels), carray(m2_ptr, channels)
    _update_running(running_mean, running_var, count, mean, m2, momentum, True)


def eval_coefficients(
    channels: I64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    running_mean_ptr: IN,
    running_var_ptr: IN,
    eps: F64,
    coef_ptr: OUT,
):
    """Coefficients of the eval forward from frozen statistics, every channel."""
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    running_mean, running_var = (
        carray(running_mean_ptr, channels),
        carray(running_var_ptr, channels),
    )
    _eval_coefficients(
        weight, bias, running_mean, running_var, eps, carray(coef_ptr, (AFFINE_ROWS, channels))
    )


# --------------------------------------------------------------------------------- backward
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
    """Channels first:last of the planes layout, each start to finish (reduction, dx)."""
    dy, x = carray(dy_ptr, (outer, channels, inner)), carray(x_ptr, (outer, channels, inner))
    dx = carray(dx_ptr, (outer, channels, inner))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    weight, coef = carray(weight_ptr, n_weight), carray(coef_ptr, (DX_ROWS, channels))
    sum_dy, sum_dy_xmu = carray(sum_dy_ptr, channels), carray(sum_dy_xmu_ptr, channels)
    for c in range(first, last):
        plane_channel_backward(dy, x, c, mean, invstd, weight, coef, dx, sum_dy, sum_dy_xmu)


def sums_items(
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
    """Partials (sum_dy, sum_dy_xmu) of items first:last (the items of stats_items)."""
    mean = carray(mean_ptr, channels)
    part = carray(part_ptr, (2, _parts(outer, inner), channels))
    if inner == 1:
        dy2, x2 = carray(dy_ptr, (outer, channels)), carray(x_ptr, (outer, channels))
        _, ntiles = _row_items(outer, channels)
        for item in range(first, last):
            k, r0, r1, c0, c1 = _row_item_range(item, ntiles, outer, channels)
            rows_chunk_sums(dy2, x2, r0, r1, c0, c1, mean, part[0, k, c0:c1], part[1, k, c0:c1])
        return
    dy, x = carray(dy_ptr, (outer, channels, inner)), carray(x_ptr, (outer, channels, inner))
    nparts = part.shape[1]
    for item in range(first, last):
        c, g = item // nparts, item % nparts
        part[0, g, c], part[1, g, c] = plane_segment_sums(dy, x, c, g, mean[c])


def dx_from_parts(
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
    """Channels first:last: add the partials in order, then the dx coefficients."""
    part = carray(part_ptr, (2, _parts(outer, inner), channels))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    weight, coef = carray(weight_ptr, n_weight), carray(coef_ptr, (DX_ROWS, channels))
    sum_dy, sum_dy_xmu = carray(sum_dy_ptr, channels), carray(sum_dy_xmu_ptr, channels)
    count = float(outer * inner)
    for c in range(first, last):
        sum_dy[c], sum_dy_xmu[c] = add_parts(part, c)
        dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)


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
    """dx of items first:last (the items of normalize_items)."""
    coef = carray(coef_ptr, (DX_ROWS, channels))
    if inner == 1:
        dy2, x2 = carray(dy_ptr, (outer, channels)), carray(x_ptr, (outer, channels))
        dx2 = carray(dx_ptr, (outer, channels))
        _, rows = _row_span_items(outer, channels)
        for item in range(first, last):
            r0 = item * rows
            rows_dx(dy2, x2, dx2, r0, min(r0 + rows, outer), 0, channels, coef)
        return
    size = outer * channels * inner
    dy_flat, x_flat, dx_flat = carray(dy_ptr, size), carray(x_ptr, size), carray(dx_ptr, size)
    nblk = plane_segments_jit(inner)
    for item in range(first, last):
        c, start, stop = _plane_item(item, channels, nblk, inner)
        dx_range(dy_flat, x_flat, dx_flat, start, stop, coef, c)


#: In the order of the generated C table (nbn_kernels.h in the build directory).
EXPORTED = (
    train_plane_channels,
    stats_items,
    train_from_parts,
    normalize_items,
    update_running,
    eval_coefficients,
    backward_plane_channels,
    sums_items,
    dx_from_parts,
    dx_items,
)
