"""The numerics in one place (numba_bn/stats.py), against float64 sums and the textbook formulas."""

import math

import numba
import numpy as np
import pytest
from numba.core import cgutils
from numba.extending import intrinsic

from numba_bn.cpu.kernels import ROW_BLOCK, ROW_BLOCK_ONE_PASS, rows_chunk_stats, runs_sums
from numba_bn.stats import (
    AFFINE_ROWS,
    DX_ROWS,
    borrowed,
    chan_merge,
    empty,
    finalize,
    flat,
    imax,
    imin,
    invstd_of,
    kernel,
    overflow_limit,
    prescale,
    release,
    running_update,
    runs_stats,
    shaped,
    split_hi_lo,
)

from conftest import random_batch


def _exact(values):
    """(count, mean, M2) of ``values`` from math.fsum: two-pass, in float64."""
    values = np.asarray(values, np.float64).ravel()
    mean = math.fsum(values) / values.size
    return float(values.size), mean, math.fsum((values - mean) ** 2)


@pytest.mark.parametrize("split", [1, 7, 500, 999])
def test_chan_merge_of_two_parts_is_the_statistic_of_the_whole(rng, split):
    values = random_batch(rng, (1000, 1), np.float64).ravel() * 1e3 + 1e6
    merged = chan_merge(*_exact(values[:split]), *_exact(values[split:]))
    count, mean, m2 = _exact(values)
    assert merged[0] == count
    assert merged[1] == pytest.approx(mean, rel=1e-15)
    assert merged[2] == pytest.approx(m2, rel=1e-11)


def test_chan_merge_with_an_empty_side_returns_the_other_unchanged():
    state = (5.0, 2.5, 7.25)
    assert chan_merge(0.0, 0.0, 0.0, *state) == state
    assert chan_merge(*state, 0.0, 0.0, 0.0) == state
    assert chan_merge(0.0, 0.0, 0.0, 0.0, 0.0, 0.0) == (0.0, 0.0, 0.0)


def test_chan_merge_in_any_grouping_agrees(rng):
    parts = np.array_split(rng.standard_normal(997) * 3.0 - 40.0, 9)
    states = [_exact(p) for p in parts]
    left = states[0]
    for state in states[1:]:
        left = chan_merge(*left, *state)
    pairs = states
    while len(pairs) > 1:
        pairs = [chan_merge(*pairs[i], *pairs[i + 1]) if i + 1 < len(pairs) else pairs[i]
                 for i in range(0, len(pairs), 2)]  # fmt: skip
    np.testing.assert_allclose(left, pairs[0], rtol=1e-12)
    np.testing.assert_allclose(left, _exact(np.concatenate(parts)), rtol=1e-12)


def _runs(flat, start, length, stride, runs):
    """The values of ``runs`` runs of ``length``, ``stride`` apart from ``start``, in order."""
    return np.concatenate([flat[start + k * stride : start + k * stride + length]
                           for k in range(runs)])  # fmt: skip


# runs are taken four at a time, then one by one: fewer than four, four, four and the rest
@pytest.mark.parametrize("runs", [1, 3, 4, 7, 9, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_runs_stats_reads_runs_at_a_stride(rng, dtype, runs):
    """Runs of 5 values, 11 apart: the layout of one channel's short planes."""
    start, length, stride = 3, 5, 11
    flat = random_batch(rng, (start + runs * stride, 1), dtype).ravel()
    count, mean, m2 = runs_stats(flat, start, length, stride, runs)
    ref = _exact(_runs(flat, start, length, stride, runs))
    assert count == ref[0]
    assert mean == pytest.approx(ref[1], rel=1e-14)
    assert m2 == pytest.approx(ref[2], rel=1e-12)


@pytest.mark.parametrize("runs", [1, 3, 4, 7, 9, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_runs_sums_reads_runs_at_a_stride(rng, dtype, runs):
    """The backward's sums over the same layout: sum dy and sum dy * (x - mean), in float64."""
    start, length, stride, mean = 2, 7, 13, 1.75
    dy = random_batch(rng, (start + runs * stride, 1), dtype, mean_scale=1.0).ravel()
    x = random_batch(rng, (start + runs * stride, 1), dtype).ravel()
    sum_dy, sum_dy_xmu = runs_sums(dy, x, start, length, stride, runs, mean)
    picked_dy = _runs(dy, start, length, stride, runs).astype(np.float64)
    products = picked_dy * (_runs(x, start, length, stride, runs).astype(np.float64) - mean)
    for got, terms in ((sum_dy, picked_dy), (sum_dy_xmu, products)):
        # float64 sums of at most 448 terms in any order: within 448 * 2^-53 of the sum of |terms|
        assert abs(got - math.fsum(terms)) <= 1e-13 * math.fsum(np.abs(terms))


def _rows_chunk(x, r0, r1, c0, c1):
    """rows_chunk_stats of x[r0:r1, c0:c1], its scratch poisoned: (count, mean, M2)."""
    width = c1 - c0
    mean, m2, block = np.full(width, np.nan), np.full(width, np.nan), np.full((3, width), np.nan)
    count = rows_chunk_stats(x, r0, r1, c0, c1, mean, m2, block[0], block[1], block[2])
    return count, mean, m2


# rows in whole blocks of four and of ROW_BLOCK (float64's), with a tail of each, fewer than
# four, and over a float32 block (ROW_BLOCK_ONE_PASS) with a tail
@pytest.mark.parametrize("rows", [3, 4 * ROW_BLOCK, 2 * ROW_BLOCK + 7, 97, ROW_BLOCK_ONE_PASS + 37])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_chunk_stats_is_the_exact_statistic_of_each_column(rng, dtype, rows):
    """float32 blocks take one pass shifted by their first row, float64 ones two passes: both
    within float64 rounding of the fsum statistics, on a tile inside a wider array."""
    x = random_batch(rng, (rows + 5, 40), dtype)
    r0, r1, c0, c1 = 2, rows + 2, 3, 37
    count, mean, m2 = _rows_chunk(x, r0, r1, c0, c1)
    assert count == rows
    for j in range(c1 - c0):
        ref = _exact(x[r0:r1, c0 + j])
        assert mean[j] == pytest.approx(ref[1], rel=1e-14, abs=1e-14 * math.sqrt(ref[2] / rows))
        assert m2[j] == pytest.approx(ref[2], rel=1e-12)


def test_rows_chunk_stats_one_pass_keeps_float64_accuracy_when_the_shift_is_an_outlier(rng):
    """The shift of a float32 block is its first row: an outlier there (the worst case, S2 up to
    (n + 1) M2, n = ROW_BLOCK_ONE_PASS), a mean of 1e4 against a spread of 1e-2, and a constant
    column still give M2 to float64 accuracy, not float32's (6e-8): within (n + 1) times the
    rounding of n float64 additions, 1.2e-10 (measured up to 1.7e-12 over 40 seeds; on the first
    column E[x^2] - E[x]^2 in float64 is off by 7e-5)."""
    n = ROW_BLOCK_ONE_PASS
    x = (1e4 + 1e-2 * rng.standard_normal((2 * n + 5, 3))).astype(np.float32)
    x[::n, 1] = 3e4  # every block's first row
    x[:, 2] = 7.0
    count, mean, m2 = _rows_chunk(x, 0, x.shape[0], 0, 3)
    for j in range(2):
        ref = _exact(x[:, j])
        assert mean[j] == pytest.approx(ref[1], rel=1e-15)
        assert m2[j] == pytest.approx(ref[2], rel=(n + 1) * n * 2.0**-53)
    assert (mean[2], m2[2]) == (7.0, 0.0)


@pytest.mark.parametrize("length, runs", [(4096, 1), (64, 9)])
def test_runs_stats_one_pass_keeps_float64_accuracy_on_float32(rng, length, runs):
    """A float32 block is summed in one pass, shifted by its first value. On a mean of 1e4
    against a spread of 1e-2 (E[x^2] - E[x]^2 loses 12 digits there) M2 keeps float64 accuracy;
    with an outlier as the shift, the worst case (S2 up to (n + 1) M2), it loses at most
    log2(n + 1) bits of float64's 53, still far below float32's resolution."""
    flat = (1e4 + 1e-2 * rng.standard_normal(length * runs)).astype(np.float32)
    count = length * runs
    for outlier, rel in ((False, 1e-12), (True, (count + 1) * 1e-14)):
        if outlier:
            flat[0] = 3e4
        got = runs_stats(flat, 0, length, length, runs)
        ref = _exact(flat)
        assert got[1] == pytest.approx(ref[1], rel=1e-15)
        assert got[2] == pytest.approx(ref[2], rel=rel)
    constant = np.full(count, 7.0, np.float32)
    assert runs_stats(constant, 0, length, length, runs) == (count, 7.0, 0.0)


def test_runs_stats_of_nothing_is_zero():
    assert runs_stats(np.ones(4), 0, 0, 4, 3) == (0.0, 0.0, 0.0)


def test_finalize_gives_invstd_of_the_biased_variance():
    count, m2, eps = 8.0, 12.0, 1e-3
    assert finalize(count, m2, eps) == pytest.approx(1.0 / math.sqrt(m2 / count + eps))
    invstd = np.empty(2)
    invstd_of(count, np.array([m2, 0.0]), eps, invstd)
    assert invstd[0] == finalize(count, m2, eps)
    assert invstd[1] == 1.0 / math.sqrt(eps)


@pytest.mark.parametrize("unbiased", [True, False])
def test_running_update_weighs_the_new_batch_with_momentum(unbiased):
    """PyTorch's rule with the unbiased variance; Keras' with the biased one."""
    running_mean, running_var = np.array([1.0, -2.0]), np.array([4.0, 0.5])
    count, mean, m2, momentum = 5.0, np.array([3.0, 0.0]), np.array([8.0, 2.0]), 0.1
    var = m2 / (count - 1.0) if unbiased else m2 / count
    expected = (0.9 * running_mean + 0.1 * mean, 0.9 * running_var + 0.1 * var)
    running_update(running_mean, running_var, count, mean, m2, momentum, unbiased)
    np.testing.assert_allclose(running_mean, expected[0], rtol=1e-15)
    np.testing.assert_allclose(running_var, expected[1], rtol=1e-15)


def test_finalize_with_zero_variance_and_eps_is_inf_not_an_exception():
    assert finalize(4.0, 0.0, 0.0) == math.inf


def test_kernel_division_by_zero_follows_ieee():
    @kernel
    def ratio(a, b):
        return a / b

    assert ratio(1.0, 0.0) == math.inf
    assert math.isnan(ratio(0.0, 0.0))


def test_split_hi_lo_keeps_the_float64_value_in_float32_parts():
    out = np.zeros((2, 1), np.float32)
    value = 1e4 + 1.0 / 3.0
    split_hi_lo(value, out, 0, 0)
    assert out[0, 0] == np.float32(value)
    assert float(out[0, 0]) + float(out[1, 0]) == pytest.approx(value, rel=1e-14)


@kernel
def _choices(a, b, ua, ub):
    return imin(a, b), imax(a, b), imin(ua, ub), imax(ua, ub), imin(a, 7), imax(7, a)


def test_imin_and_imax_choose_as_min_and_max_do():
    top = 2**63 + 5  # unsigned above int64's range: a signed comparison takes it for negative
    for a, b in [(3, -5), (-5, 3), (4, 4), (2**40, -(2**40)), (7, 9)]:
        ua, ub = np.uint64(top if a > 0 else abs(a)), np.uint64(abs(b))
        expected = (min(a, b), max(a, b), min(int(ua), int(ub)), max(int(ua), int(ub)),
                    min(a, 7), max(7, a))  # fmt: skip
        assert _choices(a, b, ua, ub) == expected


def test_imin_takes_integers_of_one_signedness_only():
    with pytest.raises(numba.TypingError):
        kernel(lambda a, b: imin(a, b))(np.int64(1), np.uint64(2))
    with pytest.raises(numba.TypingError):
        kernel(lambda a, b: imax(a, b))(1, 2.0)


@kernel
def _allocated(x, n):
    a, b = empty((2, n), x.dtype), empty((3, n, 0), np.float64)
    a[:] = 1.5
    return a, b, empty((n,), np.float32)


def test_empty_allocates_as_np_empty_and_frees():
    from numba.core.runtime import _nrt_python as nrt  # Numba's allocation counters

    enabled = nrt.memsys_stats_enabled()
    nrt.memsys_enable_stats()
    try:
        for dtype in (np.float32, np.float64):
            _allocated(np.ones(1, dtype), 4)  # compiled
            before = (nrt.memsys_get_stats_alloc(), nrt.memsys_get_stats_free())
            a, b, c = _allocated(np.ones(1, dtype), 5)
            assert (a.shape, a.dtype, b.shape, b.dtype, c.shape, c.dtype) == (
                (2, 5), dtype, (3, 5, 0), np.float64, (5,), np.float32)  # fmt: skip
            assert all(v.flags.c_contiguous and v.flags.writeable for v in (a, b, c))
            assert (a == 1.5).all()
            del a, b, c
            after = (nrt.memsys_get_stats_alloc(), nrt.memsys_get_stats_free())
            assert after[0] - before[0] == after[1] - before[1] >= 3  # all freed
    finally:
        if not enabled:
            nrt.memsys_disable_stats()
    with pytest.raises(numba.TypingError):
        kernel(lambda n: empty(n, np.float64))(3.0)


@kernel(_nrt=False)
def _unmanaged(n):
    """empty without Numba's runtime (the drivers'): a 0-d, a 2-D and an empty array, written,
    read and released."""
    a, b, c = empty((), np.float64), empty((n, 3), np.float32), empty((0, n), np.float64)
    a[()] = 2.0
    b[n - 1, 2] = 5.0
    total = a[()] + b[n - 1, 2] + a.size + b.size + c.size
    release(a)
    release(b)
    release(c)
    return total


def test_empty_without_the_runtime_allocates_every_rank_and_release_frees_it():
    from numba.core.runtime import _nrt_python as nrt

    enabled = nrt.memsys_stats_enabled()
    nrt.memsys_enable_stats()
    try:
        assert _unmanaged(4) == 2.0 + 5.0 + 1 + 12 + 0  # compiled
        before = (nrt.memsys_get_stats_alloc(), nrt.memsys_get_stats_free())
        assert _unmanaged(5) == 2.0 + 5.0 + 1 + 15 + 0
        after = (nrt.memsys_get_stats_alloc(), nrt.memsys_get_stats_free())
        assert after[0] - before[0] == after[1] - before[1] == 3
    finally:
        if not enabled:
            nrt.memsys_disable_stats()


@intrinsic
def _holds_reference(typingctx, array):
    """Whether ``array`` holds a reference to its memory (a meminfo)."""

    def codegen(context, builder, sig, args):
        proxy = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0])
        return cgutils.is_not_null(builder, proxy.meminfo)

    return numba.types.boolean(array), codegen


@kernel
def _views(x):
    """x (3-D) through borrowed, flat and shaped views: whether each holds a reference (x and
    Numba's reshape for comparison), copies of their values and their strides, written
    through."""
    b, f, s = borrowed(x), flat(x), shaped(x, (x.shape[0], x.shape[1] * x.shape[2]))
    held = (_holds_reference(x), _holds_reference(x.reshape(x.size)), _holds_reference(b),
            _holds_reference(f), _holds_reference(s))  # fmt: skip
    values = (b.copy(), f.copy(), s.copy())
    strides = (b.strides, f.strides, s.strides)
    b[0, 0, 0], f[1], s[-1, -1] = -1.0, -2.0, -3.0
    return held, values, strides


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_borrowed_views_hold_no_reference_and_are_the_arrays_views(rng, dtype):
    x = random_batch(rng, (3, 4, 5), dtype)
    expected = x.copy(), x.ravel().copy(), x.reshape(3, 20).copy()
    held, values, strides = _views(x)
    assert held == (True, True, False, False, False)
    for got, want in zip(values, expected, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)  # their shapes too
    assert strides == tuple(want.strides for want in expected)
    assert (x[0, 0, 0], x.ravel()[1], x[-1, -1, -1]) == (-1.0, -2.0, -3.0)


@kernel(parallel=True)
def _stored_in_parallel(x, a, b, c):
    for i in numba.prange(a.size):
        borrowed(a)[i] = flat(x)[i] * 2.0
        flat(b)[i] = x[0, i] + 1.0
        shaped(c, (1, c.size))[0, i] = i


def test_stores_through_views_survive_numbas_parfor_passes(rng):
    """The parfor passes remove stores to an array nothing reads after them; a view's stores are
    its array's (numba_bn.stats._aliases_its_array). Without that, every store here was
    removed: the partials of the parallel drivers were never written."""
    x = random_batch(rng, (1, 64), np.float64)
    a, b, c = (np.zeros(64) for _ in range(3))
    _stored_in_parallel(x, a, b, c)
    np.testing.assert_array_equal(a, x[0] * 2.0)
    np.testing.assert_array_equal(b, x[0] + 1.0)
    np.testing.assert_array_equal(c, np.arange(64.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_overflow_limit_is_max_times_eps_over_8_of_the_arrays_dtype(dtype):
    info = np.finfo(dtype)
    limit = kernel(lambda values: overflow_limit(values))(np.empty(1, dtype))
    assert type(limit) is float and limit == float(info.max) * float(info.eps) / 8


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prescale_is_one_unless_x_minus_mean_could_overflow(dtype):
    """x - mean overflows only for |mean| within an ulp of the maximum (|x| <= max)."""
    coef = np.zeros((AFFINE_ROWS, 1), dtype)
    info = np.finfo(dtype)
    top = float(info.max)
    assert prescale(0.0, coef) == 1.0
    assert prescale(-1e30, coef) == 1.0
    limit = top * float(info.eps) / 8
    assert prescale(0.99 * limit, coef) == 1.0
    assert prescale(-limit, coef) == 0.25
    assert prescale(0.5 * top, coef) == 0.25
    # the worst case below the limit: x = max and mean just under it, opposite signs
    mean = dtype(-0.99 * limit)
    with np.errstate(over="raise"):
        assert np.isfinite(info.max - mean)
    assert DX_ROWS == AFFINE_ROWS + 1
