"""Group, instance and layer norm on the CPU: drivers over batch norm's kernels, and the
elementwise loops batch norm has no use for.

Views (channels first, C-contiguous; :mod:`numba_bn.norms` brings any other layout here):

* group norm (instance norm is ``G = C``): statistics of group ``ng = n * G + g`` are those of
  channel ``ng`` of the view ``(1, N*G, C/G*S)``, by batch norm's own kernel
  (:func:`.kernels.plane_channel_stats`, the merge order of ``CpuBackend.batch_stats`` on that
  view, so the same bits); the affine and the backward sums are per channel ``nc = n * C + c`` of
  the view ``(1, N*C, S)``, with weight and bias (C,) as given (a group's channels are those
  of its sample, :func:`.channels.sample_channel`);
* layer norm: statistics of row ``n`` are those of channel ``n`` of ``(1, N, F)``; the affine is
  per element of a row (``weight[f]``), which no per-channel pass expresses.

Variants (each a ``prange`` driver with a serial twin, as :mod:`.drivers`):

==========================  =================================================  ===================
driver                      computes                                           traffic
==========================  =================================================  ===================
group_forward               per group: statistics, its channels' affine rows   read x, write y
                            (group_affine_coefficients); then y of the groups  (groups in L2)
group_backward              per group: channel sums (plane_channel_sums), the  read dy, x; write dx
                            group's dx terms; then dx (weighted_dx_groups)
layer_forward               per row: statistics; then y (layer_affine_rows)    read x, write y
layer_backward              per row: sums, then dx and the column partials     read dy, x; write dx
                            of dweight, dbias (layer_row_dx)
==========================  =================================================  ===================

Group norm's affine is batch norm's affine_planes on the (1, N*C, S) view (so the same bits as
``CpuBackend.normalize``). New hot loops: batch norm's dx pass is
``(dy - mean_dy - xmu * proj) * k`` with ``k = weight * invstd``; in a group the weight sits
inside the sums (``g = weight[c] * dy``), so dx is ``(dy * w - mean_g - xmu * proj) * invstd``
(dividing the weight back out of the sums fails for a zero weight): weighted_dx_groups, the
group's terms (GROUP_DX_ROWS) and each channel's weight. Layer norm's weight varies along the row:
layer_affine_rows, layer_row_dx.

Outputs are overwritten (``=``). Work items cover whole groups or rows, whose results do not
depend on the item; the one cross-row reduction (layer norm's dweight, dbias) goes through
partials over fixed row chunks that depend on the shape only, added in chunk order: results are
bitwise the same for any number of threads.
"""

import numpy as np
from numba import prange, uint64

from ..stats import (
    AFFINE_ROWS,
    CONTRACT_FASTMATH,
    REDUCE_FASTMATH,
    apart,
    borrowed,
    callee,
    empty,
    finalize,
    flat,
    kernel,
    prescale,
    release,
    split_hi_lo,
)
from .channels import group_affine_coefficients, next_sample_channel, sample_channel
from .drivers import twins
from .kernels import (
    EPILOGUE_NONE,
    affine_planes,
    one_memory,
    plane_channel_stats,
    plane_channel_sums,
)

#: Rows of the group dx terms (a column per group): mean_hi, mean_lo, proj, mean_g, pre, invstd.
GROUP_DX_ROWS = 6
#: Elements a work item of the group and row drivers spans at least (whole groups or rows).
ITEM_SPAN = 1 << 14
#: Layer norm backward: at most this many row chunks, and at most PART_BUDGET float64 partials
#: per column sum (the chunks depend on the shape only, never on the threads).
MAX_PARTS = 64
PART_BUDGET = 1 << 20
#: Rows a chunk spans at least (fewer rows only in a chunk of all of them): a chunk zeroes its
#: partials, 2 * width float64, and add_parts reads them back, as much traffic as a row of dy
#: and x each; with a row per chunk (64 rows of 256: 64 chunks) that was most of the backward.
MIN_PART_ROWS = 16


# ------------------------------------------------------------------------------- counting
@kernel(inline="always")
def units_per_item(unit_size):
    """Groups (or rows) of ``unit_size`` elements per work item."""
    return max(1, ITEM_SPAN // max(1, unit_size))


def part_rows(rows, width):
    """Rows per chunk of layer norm's column partials: a function of the shape only."""
    parts = max(1, min(MAX_PARTS, PART_BUDGET // max(1, width), -(-rows // MIN_PART_ROWS)))
    return max(1, -(-rows // parts))


part_rows_jit = kernel(inline="always")(part_rows)


@kernel(inline="always")
def unit_items(units, per):
    """Work items of ``per`` units (groups or rows) each over ``units``: the JIT drivers' prange
    and the C library's norm_plan count them here."""
    return -(-units // per)


@kernel(inline="always")
def unit_range(item, per, units):
    """Units [u0, u1) of work item ``item`` (the JIT drivers and the C range drivers)."""
    u0 = item * per
    return u0, min(u0 + per, units)


# ------------------------------------------------------------------------------- group norm
@callee
def group_train_range(x, g0, g1, group_channels, eps, weight, bias, coef, y, mean, invstd, m2):
    """Groups g0:g1 of ``x`` (1, N*G, C/G*S): mean, invstd, m2 (=, float64), their channels'
    affine rows (columns n*C + c of ``coef``), then y of all their channels in one call: per
    group, a call for its channels' coefficients and one for its planes cost more than the
    work on an (N, C) batch's group of single values (64 ns a channel on (64, 256))."""
    inner = x.shape[2] // group_channels
    x_flat, y_flat = flat(x), flat(y)
    for ng in range(g0, g1):
        count, mu, group_m2 = plane_channel_stats(x_flat, x.shape, ng)
        mean[ng], invstd[ng], m2[ng] = mu, finalize(count, group_m2, eps), group_m2
    group_affine_coefficients(g0, g1, group_channels, mean, invstd, weight, bias, coef)
    affine_planes(x_flat, y_flat, g0 * group_channels, g1 * group_channels, 1, inner, coef,
                  x_flat, EPILOGUE_NONE)  # fmt: skip


@callee
def group_dx_coefficients(g0, g1, group_channels, count, mean, invstd, weight, sum_dy,
                          sum_dy_xmu, coef):  # fmt: skip
    """The dx terms (GROUP_DX_ROWS) of groups g0:g1, column ng of ``coef`` for group ng, from
    its channels' float64 sums; see docs/backward.md, "Group, instance and layer norm":
    dx = (dy * w - mean_g - xmu * proj) * invstd, xmu = (x * pre - mean_hi) - mean_lo, with the
    weight w of the channel (weighted_dx_groups). Indices unsigned (see group_backward_range)."""
    channels, width = weight.size, uint64(group_channels)
    s0 = sample_channel(g0, group_channels, channels)
    for ng in range(g0, g1):
        c0, w0 = uint64(ng) * width, uint64(s0)
        sum_g, sum_g_xmu = 0.0, 0.0  # the sums of g = weight * dy over the group
        for j in range(width):
            w = weight[w0 + j] if weight.size else 1.0
            sum_g += w * sum_dy[c0 + j]
            sum_g_xmu += w * sum_dy_xmu[c0 + j]
        s0 = next_sample_channel(s0, group_channels, channels)
        mu, inv = mean[ng], invstd[ng]
        pre = prescale(mu, coef)
        split_hi_lo(mu * pre, coef, 0, ng)
        coef[2, ng] = inv * inv * sum_g_xmu / count / pre  # term 3, per unit of the scaled xmu
        coef[3, ng] = sum_g / count  # term 2
        coef[4, ng] = pre
        coef[5, ng] = inv  # final scale


@callee(fastmath=CONTRACT_FASTMATH)
def weighted_dx_groups(dy, x, dx, g0, g1, group_channels, inner, coef, weight):
    """dx = (dy * w - mean_g - xmu * proj) * invstd over the channels of groups g0:g1 of flat
    arrays: the group's terms from column ng of ``coef``, w from ``weight`` (C,) (1 when
    zero-length: dy * 1 is dy). Channels of one value (an (N, C) batch) in one loop over the
    group's values, which vectorises. dx may be dy (in place; planes of one value: two
    arrays)."""
    one = x.dtype.type(1.0)
    in_place = one_memory(dy, dx)  # (kernels.one_memory: dx into dy, one array)
    s0 = sample_channel(g0, group_channels, weight.size)
    for ng in range(g0, g1):
        mean_hi, mean_lo, proj, mean_g = coef[0, ng], coef[1, ng], coef[2, ng], coef[3, ng]
        pre, k = coef[4, ng], coef[5, ng]
        w0 = uint64(s0)
        s0 = next_sample_channel(s0, group_channels, weight.size)
        first = uint64(ng * group_channels * inner)
        if inner == 1:
            for j in range(uint64(group_channels)):
                w = weight[w0 + j] if weight.size else one
                xmu = (x[first + j] * pre - mean_hi) - mean_lo
                dx[first + j] = ((dy[first + j] * w - mean_g) - xmu * proj) * k
            continue
        for j in range(uint64(group_channels)):
            w = weight[w0 + j] if weight.size else one
            start = first + j * uint64(inner)
            if in_place:
                _group_dx_run(dx, x, dx, start, inner, w, mean_hi, mean_lo, proj, mean_g, pre, k)
            else:
                _group_dx_run(dy, x, dx, start, inner, w, mean_hi, mean_lo, proj, mean_g, pre, k)


@kernel(inline="always")
def _group_dx_run(dy, x, dx, start, inner, w, mean_hi, mean_lo, proj, mean_g, pre, k):
    for i in range(start, start + uint64(inner)):
        xmu = (x[i] * pre - mean_hi) - mean_lo
        dx[i] = ((dy[i] * w - mean_g) - xmu * proj) * k


@callee
def group_backward_range(dy, x, g0, g1, group_channels, mean, invstd, weight, coef, dx, sum_dy,
                         sum_dy_xmu):  # fmt: skip
    """Groups g0:g1 of (1, N*C, S) views: per channel sum_dy, sum_dy_xmu (=, float64), then the
    groups' dx terms, then dx of all their channels in one call (calls per group cost more than
    the work on an (N, C) batch's group of single values)."""
    inner = x.shape[2]
    count = float(group_channels * inner)
    dy_flat, x_flat, dx_flat = flat(dy), flat(x), flat(dx)
    if inner == 1:
        # an (N, C) batch has one value a plane: its sums are that value's, added to 0.0 as
        # plane_channel_sums adds them (the same bits, without two calls a value: ~70 ns)
        # (unsigned indices: with signed ones of unknown sign the loop stayed scalar, 1.6 ns a
        # value, as group_parameter_sums' did)
        for ng in range(g0, g1):
            first, mu = uint64(ng * group_channels), mean[ng]
            for c in range(first, first + uint64(group_channels)):
                g = np.float64(dy_flat[c])
                sum_dy[c] = 0.0 + g
                sum_dy_xmu[c] = 0.0 + g * (x_flat[c] - mu)
    else:
        for ng in range(g0, g1):
            for c in range(ng * group_channels, (ng + 1) * group_channels):
                sum_dy[c], sum_dy_xmu[c] = plane_channel_sums(dy_flat, x_flat, x.shape, c,
                                                              mean[ng])  # fmt: skip
    group_dx_coefficients(g0, g1, group_channels, count, mean, invstd, weight, sum_dy,
                          sum_dy_xmu, coef)  # fmt: skip
    weighted_dx_groups(dy_flat, x_flat, dx_flat, g0, g1, group_channels, inner, coef, weight)


def _group_forward(x, group_channels, eps, weight, bias, y, mean, invstd, m2):
    """Group norm forward on ``x``, ``y`` (1, N*G, C/G*S): mean, invstd, m2 (N*G,) float64 (=);
    weight, bias (C,) in x's dtype, or zero-length."""
    groups = x.shape[1]
    per = units_per_item(x.shape[2])
    coef = empty((AFFINE_ROWS, groups * group_channels), x.dtype)
    for item in prange(unit_items(groups, per)):
        g0, g1 = unit_range(item, per, groups)
        group_train_range(borrowed(x), g0, g1, group_channels, eps, borrowed(weight),
                          borrowed(bias), borrowed(coef), borrowed(y), borrowed(mean),
                          borrowed(invstd), borrowed(m2))  # fmt: skip
    release(coef)


def _group_backward(dy, x, group_channels, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, dweight,
                    dbias):  # fmt: skip
    """Group norm backward on (1, N*C, S) views: dx, sum_dy, sum_dy_xmu (N*C,) float64 (=) per
    channel of each sample, and from them dweight, dbias (C,) float64 (=)."""
    groups = mean.size
    per = units_per_item(group_channels * x.shape[2])
    coef = empty((GROUP_DX_ROWS, groups), x.dtype)
    for item in prange(unit_items(groups, per)):
        g0, g1 = unit_range(item, per, groups)
        group_backward_range(borrowed(dy), borrowed(x), g0, g1, group_channels, borrowed(mean),
                             borrowed(invstd), borrowed(weight), borrowed(coef), borrowed(dx),
                             borrowed(sum_dy), borrowed(sum_dy_xmu))  # fmt: skip
    release(coef)
    group_parameter_sums(sum_dy, sum_dy_xmu, invstd, group_channels, dweight, dbias)


@kernel(inline="always")
def group_parameter_sums(sum_dy, sum_dy_xmu, invstd, group_channels, dweight, dbias):
    """dweight, dbias (=, float64 (C,)) from the per-(n, c) sums (N*C,) and invstd (N*G,):
    sum_dy_xmu * invstd rounded per (n, c), then each channel's sums over the samples in sample
    order, from 0 (as the C library's group_norm_backward). In the driver: as NumPy calls
    (np.add.reduce over n, the same bits) they cost 6 us of an (8, 16, 8, 8) backward and ~20
    of a (64, 256) one; the CUDA path's host step calls it from Python
    (norm_steps.parameter_sums)."""
    channels, width = uint64(dbias.size), uint64(group_channels)
    for c in range(channels):
        dbias[c] = 0.0
        dweight[c] = 0.0
    ng = uint64(0)  # the group of p0 + g0
    for p0 in range(uint64(0), uint64(sum_dy.size), channels):  # a sample's channels
        for c in range(channels):
            dbias[c] += sum_dy[p0 + c]
        for g0 in range(uint64(0), channels, width):
            inv = invstd[ng]
            for c in range(g0, g0 + width):
                dweight[c] += sum_dy_xmu[p0 + c] * inv
            ng += uint64(1)


# ------------------------------------------------------------------------------- layer norm
@kernel(inline="always")
def _row_coefficients(mean, invstd, x):
    """(mean_hi, mean_lo, scale, pre) of a row in x's dtype: y = ((x*pre - hi) - lo) * scale."""
    cast = x.dtype.type
    pre = prescale(mean, x)
    hi = cast(mean * pre)
    lo = cast(mean * pre - np.float64(hi))
    return hi, lo, cast(invstd / pre), cast(pre)


@kernel(inline="always")
def _affine_row(x, y, start, width, mean_hi, mean_lo, scale, pre, weight, bias):
    """y = x_hat * weight[f] + bias[f] over [start, start + width) of flat x, y."""
    first = uint64(start)
    if weight.size and bias.size:
        _affine_row_weighted(x, y, first, width, mean_hi, mean_lo, scale, pre, weight, bias)
    elif weight.size:
        for f in range(uint64(width)):
            y[first + f] = (((x[first + f] * pre - mean_hi) - mean_lo) * scale) * weight[f]
    elif bias.size:
        for f in range(uint64(width)):
            y[first + f] = ((x[first + f] * pre - mean_hi) - mean_lo) * scale + bias[f]
    else:
        for f in range(uint64(width)):
            y[first + f] = ((x[first + f] * pre - mean_hi) - mean_lo) * scale


@kernel(inline="always")
def _affine_row_weighted(x, y, first, width, mean_hi, mean_lo, scale, pre, weight, bias):
    for f in range(uint64(width)):
        x_hat = ((x[first + f] * pre - mean_hi) - mean_lo) * scale
        y[first + f] = x_hat * weight[f] + bias[f]


@callee(fastmath=CONTRACT_FASTMATH)
def layer_affine_rows(x, y, r0, r1, width, mean, invstd, weight, bias):
    """y over rows r0:r1 of flat x, y from their float64 ``mean`` and ``invstd``: one call for
    a work item's rows (a call a row cost ~20 ns, the affine of a row of 8 values). The rows'
    coefficients (_row_coefficients) are the same under contraction: their one product,
    ``mean * pre``, is exact (pre is 1 or 1/4), so no fused multiply-add rounds differently.
    y may be x (in place, kernels.one_memory: with a weight and a bias, one array)."""
    in_place = weight.size > 0 and bias.size > 0 and one_memory(x, y)
    for r in range(r0, r1):
        mean_hi, mean_lo, scale, pre = _row_coefficients(mean[r], invstd[r], x)
        if in_place:
            first = uint64(r * width)
            _affine_row_weighted(y, y, first, width, mean_hi, mean_lo, scale, pre, weight, bias)
        else:
            _affine_row(x, y, r * width, width, mean_hi, mean_lo, scale, pre, weight, bias)


@callee
def layer_train_rows(x, r0, r1, eps, weight, bias, y, mean, invstd):
    """Rows r0:r1 of ``x`` (1, N, F): mean, invstd (=, float64), then y."""
    x_flat = flat(x)
    for r in range(r0, r1):
        count, mu, m2 = plane_channel_stats(x_flat, x.shape, r)
        mean[r], invstd[r] = mu, finalize(count, m2, eps)
    layer_affine_rows(x_flat, flat(y), r0, r1, x.shape[2], mean, invstd, weight, bias)


@callee(fastmath=REDUCE_FASTMATH)
def layer_row_sums(dy, x, start, width, mean, weight):
    """(sum g, sum g * (x - mean)) over a row, g = dy * weight[f], in float64."""
    first = uint64(start)
    sum_g, sum_g_xmu = 0.0, 0.0
    if weight.size:
        for f in range(uint64(width)):
            g = np.float64(dy[first + f]) * weight[f]
            sum_g += g
            sum_g_xmu += g * (x[first + f] - mean)
    else:
        for f in range(uint64(width)):
            g = np.float64(dy[first + f])
            sum_g += g
            sum_g_xmu += g * (x[first + f] - mean)
    return sum_g, sum_g_xmu


@kernel(inline="always")
def layer_row_dx(dy, x, dx, start, width, mean_hi, mean_lo, pre, k, mean_g, proj, mean,
                 invstd, weight, col_dy, col_dy_xhat):  # fmt: skip
    """dx = (dy * weight[f] - mean_g - xmu * proj) * k over a row; adds (+=) the row's dy and
    dy * x_hat (float64, x_hat from the float64 mean and invstd) to the column partials.

    Two loops, each value's arithmetic as in one: a loop that stores to dx and to both partials
    has too many pairs of arrays that may overlap for LLVM to check them and vectorise (it ran a
    value at a time, ~1 ns, where the two take ~0.3; dy and x come back from L1)."""
    first = uint64(start)
    for f in range(uint64(width)):
        g = dy[first + f]
        col_dy[f] += g
        col_dy_xhat[f] += g * ((x[first + f] - mean) * invstd)
    if weight.size and one_memory(dy, dx):  # in place (kernels.one_memory): one array
        _row_dx_weighted(dx, x, dx, first, width, mean_hi, mean_lo, pre, k, mean_g, proj, weight)
    elif weight.size:
        _row_dx_weighted(dy, x, dx, first, width, mean_hi, mean_lo, pre, k, mean_g, proj, weight)
    else:
        for f in range(uint64(width)):
            xmu = (x[first + f] * pre - mean_hi) - mean_lo
            dx[first + f] = ((dy[first + f] - mean_g) - xmu * proj) * k


@kernel(inline="always")
def _row_dx_weighted(dy, x, dx, first, width, mean_hi, mean_lo, pre, k, mean_g, proj, weight):
    for f in range(uint64(width)):
        xmu = (x[first + f] * pre - mean_hi) - mean_lo
        dx[first + f] = ((dy[first + f] * weight[f] - mean_g) - xmu * proj) * k


@callee(fastmath=CONTRACT_FASTMATH)
def layer_backward_rows(dy, x, r0, r1, mean, invstd, weight, dx, part):
    """Rows r0:r1 of (1, N, F) views: dx, and the chunk's column partials ``part`` (=, float64,
    (2, F)) of dbias (sum dy) and dweight (sum dy * x_hat). Contracted as layer_row_dx is, the
    row's dx inlined (a call a row cost as much as a row of 8 values): its coefficients add no
    product (_row_coefficients: see layer_affine_rows), and the sums are apart."""
    width = x.shape[2]
    cast = x.dtype.type
    dy_flat, x_flat, dx_flat = flat(dy), flat(x), flat(dx)
    col_dy, col_dy_xhat = part[0], part[1]
    for f in range(width):
        col_dy[f] = 0.0
        col_dy_xhat[f] = 0.0
    for r in range(r0, r1):
        mu, inv = mean[r], invstd[r]
        sum_g, sum_g_xmu = apart(layer_row_sums, (dy_flat, x_flat, r * width, width, mu, weight))
        mean_hi, mean_lo, _, pre = _row_coefficients(mu, inv, x)
        mean_g = cast(sum_g / width)  # term 2
        proj = cast(inv * inv * sum_g_xmu / width / np.float64(pre))  # term 3
        layer_row_dx(dy_flat, x_flat, dx_flat, r * width, width, mean_hi, mean_lo, pre,
                     cast(inv), mean_g, proj, mu, inv, weight, col_dy,
                     col_dy_xhat)  # fmt: skip


@callee
def add_parts(part, dweight, dbias):
    """dweight, dbias (=, float64) from the column partials (chunks, 2, F), in chunk order."""
    for f in range(dbias.size):
        dbias[f] = 0.0
        dweight[f] = 0.0
    for k in range(part.shape[0]):
        for f in range(dbias.size):
            dbias[f] += part[k, 0, f]
        for f in range(dbias.size):
            dweight[f] += part[k, 1, f]


def _layer_forward(x, eps, weight, bias, y, mean, invstd):
    """Layer norm forward on ``x``, ``y`` (1, N, F): mean, invstd (N,) float64 (=); weight and
    bias (F,) in x's dtype, or zero-length."""
    rows = x.shape[1]
    per = units_per_item(x.shape[2])
    for item in prange(unit_items(rows, per)):
        r0, r1 = unit_range(item, per, rows)
        layer_train_rows(borrowed(x), r0, r1, eps, borrowed(weight), borrowed(bias), borrowed(y),
                         borrowed(mean), borrowed(invstd))  # fmt: skip


def _layer_backward(dy, x, mean, invstd, weight, dx, dweight, dbias):
    """Layer norm backward on (1, N, F) views: dx, and dweight, dbias (F,) float64 (=)."""
    rows, width = x.shape[1], x.shape[2]
    per = part_rows_jit(rows, width)
    chunks = unit_items(rows, per)
    part = empty((chunks, 2, width), np.float64)
    for item in prange(chunks):
        r0, r1 = unit_range(item, per, rows)
        layer_backward_rows(borrowed(dy), borrowed(x), r0, r1, borrowed(mean), borrowed(invstd),
                            borrowed(weight), borrowed(dx), borrowed(part)[item])  # fmt: skip
    add_parts(part, dweight, dbias)
    release(part)


group_forward, group_forward_serial = twins(_group_forward)
group_backward, group_backward_serial = twins(_group_backward)
layer_forward, layer_forward_serial = twins(_layer_forward)
layer_backward, layer_backward_serial = twins(_layer_backward)
