"""Per-channel work of the CPU backend: a channel's partials merged in part order, and the
coefficient rows the elementwise passes of :mod:`.kernels` read (stats.py: AFFINE_ROWS, DX_ROWS).

The same formulas at two granularities:

* one channel (``affine_coefficients``, ``train_coefficients``, ``dx_coefficients``): the fused
  planes kernels, which own a whole channel, and the drivers' per-channel loops;
* a channel range ``c0:c1`` (``merge_channels``, ``train_channels``, ``add_channels``,
  ``dx_channels``; ``eval_coefficients`` for all channels; ``affine_coefficient_range`` and
  ``dx_coefficient_range`` from per-channel statistics): the channel items of :mod:`.items`,
  one call per group of channels, and the drivers' coefficient steps.

A range kernel writes one coefficient row per loop. A loop that stores every row of a channel
writes one array at offsets a row pitch apart, which LLVM cannot prove distinct, so it stays
scalar; a row per loop vectorises across channels. Measured on 256 channels with one part each
(forward_train's channel items, serial): 31 ns a channel with a kernel call per channel (each
array argument of a call is reference-counted, twice, and the item's inlined arguments once
more), 10 ns with one call per 64 channels and scalar loops, 2.4 ns with a row per loop.
tests/test_channels.py pins the two granularities to the same bits.

Outputs are overwritten (``=``); nothing allocates. Rounding: every value is the IEEE result of
the same operations in the same order at both granularities (no fast-math flag here), so a
channel's coefficients do not depend on which kernel, or which vector lane, computed them.
"""

import math

import numpy as np
from numba import uint64

from ..stats import (
    callee,
    chan_merge,
    finalize,
    folded_shift,
    imax,
    kernel,
    prescale,
    split_hi_lo,
)


# --------------------------------------------------------------------------------- one channel
@callee
def affine_coefficients(c, mean, invstd, weight, bias, coef):
    """Channel c: ``coef`` affine rows of y = (x - mean) * invstd * weight + bias."""
    pre = prescale(mean, coef)
    split_hi_lo(mean * pre, coef, 0, c)
    coef[2, c] = (invstd * weight[c] if weight.size else invstd) / pre
    coef[3, c] = folded_shift(bias[c] if bias.size else 0.0, coef[1, c], coef[2, c])
    coef[4, c] = pre


@callee
def train_coefficients(c, count, mean, m2, eps, weight, bias, coef, save_mean, save_invstd):
    """Channel c: save (mean, invstd); ``coef`` affine rows of y from the batch statistics."""
    invstd = finalize(count, m2, eps)
    save_mean[c] = mean
    save_invstd[c] = invstd
    affine_coefficients(c, mean, invstd, weight, bias, coef)


@callee
def dx_coefficients(c, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """Channel c: ``coef`` dx rows, see kernels.dx_range."""
    pre = prescale(mean, coef)
    split_hi_lo(mean * pre, coef, 0, c)
    coef[2, c] = invstd * invstd * sum_dy_xmu / count / pre  # term 3: projection onto x_hat
    coef[3, c] = folded_shift(sum_dy / count, coef[1, c], coef[2, c])  # term 2, mean_lo folded
    coef[4, c] = invstd * weight[c] if weight.size else invstd  # final scale
    coef[5, c] = pre


# ------------------------------------------------------------------------------ channel ranges
# The same operations as above, a row per loop. Indices are unsigned (a signed one of unknown
# sign gets negative-index wraparound, which keeps LLVM from vectorising). stats.prescale's
# threshold is a constant of the dtype (stats.overflow_limit): its np.finfo(coef.dtype), inlined
# into a loop, once kept the loop scalar (measured: 10 ns a channel against 4.5).
@kernel(inline="always")
def _mean_rows(c0, c1, mean, coef, pre_row):
    """Rows 0, 1 (mean_hi, mean_lo: stats.split_hi_lo) and ``pre_row`` of channels c0:c1."""
    cast = coef.dtype.type
    for c in range(uint64(c0), uint64(c1)):
        coef[0, c] = mean[c] * prescale(mean[c], coef)
    for c in range(uint64(c0), uint64(c1)):
        value = mean[c] * prescale(mean[c], coef)
        coef[1, c] = value - np.float64(cast(value))
    for c in range(uint64(c0), uint64(c1)):
        coef[pre_row, c] = prescale(mean[c], coef)


@kernel(inline="always")
def _merge_range(c0, c1, part, mean, m2):
    """mean, m2 (=) of channels c0:c1: each channel's partials Chan-merged in part order. The
    first part's merge (a copy, unless empty) is a loop per output, which LLVM vectorises; the
    usual batch has one part (up to ROW_CHUNK rows). Further parts continue channel by channel
    from the same state."""
    if part.shape[1] == 0:
        for c in range(uint64(c0), uint64(c1)):
            mean[c] = 0.0
            m2[c] = 0.0
        return
    for c in range(uint64(c0), uint64(c1)):
        mean[c] = chan_merge(0.0, 0.0, 0.0, part[0, 0, c], part[1, 0, c], part[2, 0, c])[1]
    for c in range(uint64(c0), uint64(c1)):
        m2[c] = chan_merge(0.0, 0.0, 0.0, part[0, 0, c], part[1, 0, c], part[2, 0, c])[2]
    if part.shape[1] == 1:
        return
    for c in range(uint64(c0), uint64(c1)):
        count, mean_c, m2_c = part[0, 0, c], mean[c], m2[c]
        for k in range(1, part.shape[1]):
            count, mean_c, m2_c = chan_merge(
                count, mean_c, m2_c, part[0, k, c], part[1, k, c], part[2, k, c]
            )
        mean[c], m2[c] = mean_c, m2_c


@kernel(inline="always")
def _final_scale(invstd, weight, c):
    """invstd * weight: the affine scale (before 1 / pre), and dx's final scale k."""
    return invstd * weight[c] if weight.size else invstd


@kernel(inline="always")
def _affine_rows(c0, c1, mean, invstd, weight, bias, coef):
    """Affine rows of channels c0:c1 from float64 ``mean``, ``invstd``."""
    _mean_rows(c0, c1, mean, coef, 4)
    for c in range(uint64(c0), uint64(c1)):
        coef[2, c] = _final_scale(invstd[c], weight, c) / prescale(mean[c], coef)
    for c in range(uint64(c0), uint64(c1)):  # the shift, mean_lo folded in
        coef[3, c] = folded_shift(bias[c] if bias.size else 0.0, coef[1, c], coef[2, c])


@callee
def affine_coefficient_range(c0, c1, mean, invstd, weight, bias, coef):
    """affine_coefficients of channels c0:c1, from float64 ``mean`` and ``invstd``."""
    _affine_rows(c0, c1, mean, invstd, weight, bias, coef)


@kernel(inline="always")
def sample_channel(ng, group_channels, channels):
    """Group ``ng``'s first channel in its sample of ``channels`` (0 for none): where group
    norm's weight and bias (C,) hold its channels' values. The kernels take them as given, not
    tiled to N*C (two copies of x's size on an (N, C) batch), and step this from group to group
    (next_sample_channel) rather than take a modulo a group."""
    return ng * group_channels % channels if channels else 0


@kernel(inline="always")
def next_sample_channel(c0, group_channels, channels):
    """sample_channel of the group after one whose first channel is ``c0``."""
    c0 += group_channels
    return c0 if c0 < channels else 0


@callee
def group_affine_coefficients(g0, g1, group_channels, mean, invstd, weight, bias, coef):
    """affine_coefficients of the channels of groups g0:g1 (group norm: channel ``ng *
    group_channels + j`` has the float64 ``mean[ng]``, ``invstd[ng]`` of its group; weight and
    bias (C,) or zero-length), a row per loop over a group's channels."""
    cast = coef.dtype.type
    width, channels = uint64(group_channels), imax(weight.size, bias.size)
    s0 = sample_channel(g0, group_channels, channels)
    for ng in range(g0, g1):
        c0 = uint64(ng * group_channels)
        pre = prescale(mean[ng], coef)
        value = mean[ng] * pre
        for j in range(width):  # stats.split_hi_lo
            coef[0, c0 + j] = value
        for j in range(width):
            coef[1, c0 + j] = value - np.float64(cast(value))
        for j in range(width):
            coef[4, c0 + j] = pre
        for j in range(width):
            coef[2, c0 + j] = _final_scale(invstd[ng], weight, uint64(s0) + j) / pre
        for j in range(width):  # the shift, mean_lo folded in
            shift = bias[uint64(s0) + j] if bias.size else 0.0
            coef[3, c0 + j] = folded_shift(shift, coef[1, c0 + j], coef[2, c0 + j])
        s0 = next_sample_channel(s0, group_channels, channels)


@callee
def merge_channels(c0, c1, part, mean, m2):
    """mean, m2 (=) of channels c0:c1 from partials ``part`` (3, parts, C), in part order."""
    _merge_range(c0, c1, part, mean, m2)


@callee
def train_channels(c0, c1, part, count, eps, weight, bias, coef, save_mean, save_invstd, save_m2):
    """Channels c0:c1: merge their partials, save mean, invstd, M2 and the affine rows."""
    _merge_range(c0, c1, part, save_mean, save_m2)
    for c in range(uint64(c0), uint64(c1)):
        save_invstd[c] = finalize(count, save_m2[c], eps)
    _affine_rows(c0, c1, save_mean, save_invstd, weight, bias, coef)


@callee
def eval_coefficients(weight, bias, running_mean, running_var, eps, coef):
    """``coef`` affine rows from frozen running statistics, every channel."""
    channels = coef.shape[1]
    _mean_rows(0, channels, running_mean, coef, 4)
    for c in range(uint64(channels)):
        invstd = 1.0 / math.sqrt(running_var[c] + eps)
        coef[2, c] = _final_scale(invstd, weight, c) / prescale(running_mean[c], coef)
    for c in range(uint64(channels)):  # the shift, mean_lo folded in
        coef[3, c] = folded_shift(bias[c] if bias.size else 0.0, coef[1, c], coef[2, c])


@kernel(inline="always")
def _add_range(c0, c1, part, sum_dy, sum_dy_xmu):
    """sum_dy, sum_dy_xmu (=) of channels c0:c1: the partials added in part order."""
    for c in range(uint64(c0), uint64(c1)):
        sum_dy[c] = 0.0
    for k in range(part.shape[1]):
        for c in range(uint64(c0), uint64(c1)):
            sum_dy[c] += part[0, k, c]
    for c in range(uint64(c0), uint64(c1)):
        sum_dy_xmu[c] = 0.0
    for k in range(part.shape[1]):
        for c in range(uint64(c0), uint64(c1)):
            sum_dy_xmu[c] += part[1, k, c]


@callee
def add_channels(c0, c1, part, sum_dy, sum_dy_xmu):
    """sum_dy, sum_dy_xmu (=) of channels c0:c1 from partials ``part`` (2, parts, C)."""
    _add_range(c0, c1, part, sum_dy, sum_dy_xmu)


@kernel(inline="always")
def _dx_rows(c0, c1, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    _mean_rows(c0, c1, mean, coef, 5)
    for c in range(uint64(c0), uint64(c1)):  # term 3: projection onto x_hat
        pre = prescale(mean[c], coef)
        coef[2, c] = invstd[c] * invstd[c] * sum_dy_xmu[c] / count / pre
    for c in range(uint64(c0), uint64(c1)):  # term 2: mean of dy, mean_lo * proj folded in
        coef[3, c] = folded_shift(sum_dy[c] / count, coef[1, c], coef[2, c])
    for c in range(uint64(c0), uint64(c1)):  # final scale
        coef[4, c] = _final_scale(invstd[c], weight, c)


@callee
def dx_coefficient_range(c0, c1, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """dx_coefficients of channels c0:c1, from the per-channel float64 arguments."""
    _dx_rows(c0, c1, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef)


@callee
def dx_channels(c0, c1, part, count, mean, invstd, weight, coef, sum_dy, sum_dy_xmu):
    """Channels c0:c1: add their partials, then the dx rows."""
    _add_range(c0, c1, part, sum_dy, sum_dy_xmu)
    _dx_rows(c0, c1, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef)
