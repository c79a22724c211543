"""Channel ranges (numba_bn/cpu/channels.py) against the per-channel kernels: the same bits for
every channel, whichever kernel, loop or vector lane computed them."""

import numpy as np
import pytest

from numba_bn.cpu import channels
from numba_bn.stats import AFFINE_ROWS, DX_ROWS, chan_merge, prescale

DTYPES = [np.float32, np.float64]


def _means(rng, dtype, channels_):
    """Ordinary means, and means either side of prescale's threshold (pre = 1 / 4)."""
    info = np.finfo(dtype)
    limit = float(info.max) * float(info.eps) * 0.125
    mean = rng.normal(0.0, 50.0, channels_)
    edge = [limit, -limit, np.nextafter(limit, 0), np.nextafter(-limit, 0), 0.9 * float(info.max)]
    mean[: len(edge)] = edge
    return mean


def _partials(rng, parts, channels_, count=64.0):
    part = np.empty((3, parts, channels_))
    part[0] = count
    part[1] = rng.normal(3.0, 2.0, (parts, channels_))
    part[2] = rng.uniform(0.0, 40.0, (parts, channels_))
    return part


def _bits_equal(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_the_range_kernels_threshold_is_prescales():
    for dtype in DTYPES:
        coef = np.empty((AFFINE_ROWS, 1), dtype)
        info = np.finfo(dtype)
        limit = float(info.max) * float(info.eps) * 0.125
        for mean in (limit, np.nextafter(limit, 0), -limit, 0.0):
            assert prescale(mean, coef) == (0.25 if abs(mean) >= limit else 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [0, 1, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_train_channels_give_the_per_channel_bits(rng, dtype, parts, affine):
    c_total, c0, c1 = 70, 3, 67
    part = _partials(rng, parts, c_total)
    weight = rng.uniform(0.5, 2.0, c_total).astype(dtype) if affine else np.empty(0, dtype)
    bias = rng.normal(0.0, 1.0, c_total).astype(dtype) if affine else np.empty(0, dtype)
    count, eps = 64.0 * parts, 1e-5
    got = [np.full(c_total, np.nan) for _ in range(3)]
    coef = np.full((AFFINE_ROWS, c_total), np.nan, dtype)
    channels.train_channels(c0, c1, part, count, eps, weight, bias, coef, *got)
    want = [np.full(c_total, np.nan) for _ in range(3)]
    want_coef = np.full((AFFINE_ROWS, c_total), np.nan, dtype)
    for c in range(c0, c1):
        n, mean, m2 = 0.0, 0.0, 0.0
        for k in range(parts):
            n, mean, m2 = chan_merge(n, mean, m2, *part[:, k, c])
        want[2][c] = m2
        channels.train_coefficients(c, count, mean, m2, eps, weight, bias, want_coef, *want[:2])
    for a, b in zip([*got, coef], [*want, want_coef], strict=True):
        assert _bits_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_coefficients_give_the_per_channel_bits(rng, dtype, affine):
    c_total = 45
    running_mean = _means(rng, dtype, c_total).astype(dtype)
    running_var = rng.uniform(0.0, 9.0, c_total).astype(dtype)
    weight = rng.uniform(0.5, 2.0, c_total).astype(dtype) if affine else np.empty(0, dtype)
    bias = rng.normal(0.0, 1.0, c_total).astype(dtype) if affine else np.empty(0, dtype)
    coef = np.empty((AFFINE_ROWS, c_total), dtype)
    channels.eval_coefficients(weight, bias, running_mean, running_var, 1e-3, coef)
    want = np.empty_like(coef)
    for c in range(c_total):
        invstd = 1.0 / np.sqrt(np.float64(running_var[c]) + 1e-3)
        channels.affine_coefficients(c, running_mean[c], invstd, weight, bias, want)
    assert _bits_equal(coef, want)
    assert (coef[4, :5] != 1).any(), "no channel took the 1/4 prescale"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [1, 4])
def test_dx_channels_give_the_per_channel_bits(rng, dtype, parts):
    c_total, c0, c1 = 40, 0, 40
    part = rng.normal(0.0, 10.0, (2, parts, c_total))
    mean = _means(rng, dtype, c_total)
    invstd = rng.uniform(0.1, 3.0, c_total)
    weight = rng.uniform(0.5, 2.0, c_total).astype(dtype)
    count = 100.0
    sums = [np.empty(c_total), np.empty(c_total)]
    coef = np.empty((DX_ROWS, c_total), dtype)
    channels.dx_channels(c0, c1, part, count, mean, invstd, weight, coef, *sums)
    want = np.empty_like(coef)
    for c in range(c_total):
        sum_dy, sum_dy_xmu = 0.0, 0.0
        for k in range(parts):
            sum_dy += part[0, k, c]
            sum_dy_xmu += part[1, k, c]
        assert sums[0][c] == sum_dy and sums[1][c] == sum_dy_xmu
        channels.dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy, sum_dy_xmu, want)
    assert _bits_equal(coef, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_coefficient_ranges_give_the_per_channel_bits(rng, dtype, affine):
    c_total, count = 37, 50.0
    mean = _means(rng, dtype, c_total)
    invstd = rng.uniform(0.1, 3.0, c_total)
    sum_dy, sum_dy_xmu = rng.normal(0.0, 5.0, c_total), rng.normal(0.0, 5.0, c_total)
    weight = rng.uniform(0.5, 2.0, c_total).astype(dtype) if affine else np.empty(0, dtype)
    bias = rng.normal(0.0, 1.0, c_total).astype(dtype) if affine else np.empty(0, dtype)
    coef, want = np.empty((AFFINE_ROWS, c_total), dtype), np.empty((AFFINE_ROWS, c_total), dtype)
    channels.affine_coefficient_range(0, c_total, mean, invstd, weight, bias, coef)
    for c in range(c_total):
        channels.affine_coefficients(c, mean[c], invstd[c], weight, bias, want)
    assert _bits_equal(coef, want)
    coef, want = np.empty((DX_ROWS, c_total), dtype), np.empty((DX_ROWS, c_total), dtype)
    channels.dx_coefficient_range(0, c_total, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef)
    for c in range(c_total):
        channels.dx_coefficients(
            c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], want
        )
    assert _bits_equal(coef, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_affine_coefficients_give_the_per_channel_bits(rng, dtype, affine):
    """Group norm's coefficients (the channels of groups g0:g1 share their group's mean and
    invstd; weight and bias (C,) per sample) against affine_coefficients channel by channel on
    the weight and bias tiled to N*C, from a group in the middle of a sample to one in another."""
    samples, groups, group_channels, g0, g1 = 4, 3, 5, 2, 11  # groups per sample
    c_total = samples * groups * group_channels
    mean = _means(rng, dtype, samples * groups)
    invstd = rng.uniform(0.1, 3.0, samples * groups)
    per_sample = groups * group_channels
    weight = rng.uniform(0.5, 2.0, per_sample).astype(dtype) if affine else np.empty(0, dtype)
    bias = rng.normal(0.0, 1.0, per_sample).astype(dtype) if affine else np.empty(0, dtype)
    coef = np.full((AFFINE_ROWS, c_total), np.nan, dtype)
    channels.group_affine_coefficients(g0, g1, group_channels, mean, invstd, weight, bias, coef)
    want = np.full((AFFINE_ROWS, c_total), np.nan, dtype)
    tiled_weight, tiled_bias = np.tile(weight, samples), np.tile(bias, samples)
    for c in range(g0 * group_channels, g1 * group_channels):
        g = c // group_channels
        channels.affine_coefficients(c, mean[g], invstd[g], tiled_weight, tiled_bias, want)
    assert _bits_equal(coef, want)
