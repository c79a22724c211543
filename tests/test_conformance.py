"""forward_train / forward_eval / backward / batch_norm against the float64 loop references."""

import numpy as np
import pytest

import numba_bn as nbn

import naive
from conftest import LAYOUTS, poison, random_batch

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def _close(actual, expected, dtype, scale=1.0):
    actual = np.asarray(actual, dtype=np.float64)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_forward_train_matches_reference(rng, shape, axis, dtype, affine):
    x = random_batch(rng, shape, dtype, axis=axis)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype) if affine else None
    bias = rng.standard_normal(channels).astype(dtype) if affine else None
    out = poison(shape, dtype)
    y, mean, invstd = nbn.forward_train(x, weight, bias, eps=1e-5, axis=axis, out=out)
    y_ref, mean_ref, invstd_ref = naive.forward_train(x, weight, bias, 1e-5, axis)
    assert y is out and y.dtype == dtype and mean.dtype == dtype and invstd.dtype == dtype
    _close(y, y_ref, dtype, scale=10)
    _close(mean, mean_ref, dtype, scale=10)
    _close(invstd, invstd_ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_forward_eval_matches_reference(rng, shape, axis, dtype):
    x = random_batch(rng, shape, dtype, axis=axis)
    channels = shape[axis]
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.1, 4.0, channels).astype(dtype)
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    y = nbn.forward_eval(x, running_mean, running_var, weight, bias, eps=1e-3, axis=axis)
    y_ref = naive.forward(x, running_mean, running_var, weight, bias, 1e-3, axis)
    _close(y, y_ref, dtype, scale=10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_backward_matches_textbook_formula(rng, shape, axis, dtype, affine):
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = random_batch(rng, shape, dtype, mean_scale=1.0, axis=axis)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype) if affine else None
    _, mean, invstd = nbn.forward_train(x, weight, axis=axis)
    out = poison(shape, dtype)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, weight, axis=axis, out=out)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x, weight, 1e-5, axis)
    assert dx is out
    # Tolerances scale with the sizes of the summed terms (sums of dy can cancel to ~0).
    xhat = np.abs(naive.forward_train(x, axis=axis)[0])
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    term_size = np.sum(np.abs(dy) * (1 + xhat), axis=reduce_axes).max()
    _close(dx, dx_ref, dtype, scale=np.abs(dx_ref).max() * 10)
    _close(dweight, dweight_ref, dtype, scale=term_size)
    _close(dbias, dbias_ref, dtype, scale=term_size)


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("shape, axis", [((16, 5), 1), ((4, 6, 5, 7), 1), ((3, 5, 4, 6), -1)])
def test_batch_norm_training_updates_running_stats_in_place(rng, shape, axis, momentum):
    x = random_batch(rng, shape, np.float64, axis=axis)
    channels = shape[axis]
    running_mean = rng.standard_normal(channels)
    running_var = rng.uniform(0.5, 2.0, channels)
    expected_mean, expected_var = naive.running_update(running_mean, running_var, x, momentum, axis)
    y = nbn.batch_norm(x, running_mean, running_var, training=True, momentum=momentum, axis=axis)
    np.testing.assert_allclose(running_mean, expected_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(running_var, expected_var, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, naive.forward_train(x, axis=axis)[0], rtol=1e-12, atol=1e-11)


def test_running_var_uses_unbiased_estimate(rng):
    x = random_batch(rng, (6, 3, 2), np.float64)
    running_mean, running_var = np.zeros(3), np.zeros(3)
    nbn.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    np.testing.assert_allclose(running_var, x.var(axis=(0, 2), ddof=1), rtol=1e-12)
    nbn.batch_norm(
        x, running_mean, running_var, training=True, momentum=1.0, unbiased_running_var=False
    )
    np.testing.assert_allclose(running_var, x.var(axis=(0, 2), ddof=0), rtol=1e-12)


def test_batch_norm_eval_uses_running_stats(rng):
    x = random_batch(rng, (5, 4, 3), np.float32)
    running_mean = rng.standard_normal(4).astype(np.float32)
    running_var = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    before = running_mean.copy(), running_var.copy()
    y = nbn.batch_norm(x, running_mean, running_var, training=False)
    np.testing.assert_allclose(y, naive.forward(x, running_mean, running_var), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])


def test_training_without_running_buffers_uses_batch_stats(rng):
    x = random_batch(rng, (9, 4), np.float64)
    y = nbn.batch_norm(x, None, None, training=True)
    np.testing.assert_allclose(y, naive.forward_train(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, axis", [((6, 4, 5, 3), 1), ((6, 5, 3, 4), -1), ((40, 7), 1)])
def test_non_contiguous_input_gives_the_same_result(rng, shape, axis):
    base = random_batch(rng, shape + (2,), np.float32, axis=axis if axis >= 0 else axis - 1)
    x = base[..., 1]  # every other element
    assert not x.flags.c_contiguous
    transposed = np.ascontiguousarray(x)
    for got, expected in zip(
        nbn.forward_train(x, axis=axis), nbn.forward_train(transposed, axis=axis), strict=True
    ):
        np.testing.assert_array_equal(got, expected)
    dy = rng.standard_normal(shape).astype(np.float32)[::1]
    _, mean, invstd = nbn.forward_train(transposed, axis=axis)
    dx = nbn.backward(dy, x, mean, invstd, axis=axis)[0]
    np.testing.assert_array_equal(dx, nbn.backward(dy, transposed, mean, invstd, axis=axis)[0])


def test_fortran_order_planes(rng):
    x = np.asfortranarray(random_batch(rng, (4, 3, 5, 6), np.float64))
    y, _, _ = nbn.forward_train(x)
    np.testing.assert_allclose(y, naive.forward_train(x)[0], rtol=1e-12, atol=1e-12)


def test_float16_input_is_computed_in_float32_and_returned_as_float16(rng):
    x = random_batch(rng, (8, 4, 6), np.float16, std_range=(0.5, 2.0))
    weight = rng.uniform(0.5, 1.5, 4).astype(np.float16)
    y, mean, invstd = nbn.forward_train(x, weight)
    assert y.dtype == np.float16 and mean.dtype == np.float32
    y_ref, mean_ref, _ = naive.forward_train(x, weight)
    np.testing.assert_allclose(y.astype(np.float64), y_ref, atol=4e-3, rtol=2e-3)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, weight)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x, weight)
    assert dx.dtype == np.float16
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, atol=5e-3, rtol=5e-3)
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-5, atol=1e-4)
    out = poison(x.shape, np.float16)
    assert nbn.forward_eval(x, mean, 1 / invstd**2, out=out) is out
    assert np.all(np.isfinite(out))


def test_empty_batch_returns_empty_and_leaves_running_stats(rng):
    x = np.empty((0, 3, 4), np.float32)
    running_mean = rng.standard_normal(3).astype(np.float32)
    running_var = rng.uniform(1, 2, 3).astype(np.float32)
    before = running_mean.copy(), running_var.copy()
    y = nbn.batch_norm(x, running_mean, running_var, training=True)
    assert y.shape == x.shape
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, dbias = nbn.backward(x, x, mean, invstd)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dbias, 0)
    assert nbn.forward_eval(x, running_mean, running_var).shape == x.shape


def test_one_value_per_channel_is_fine_in_eval(rng):
    x = random_batch(rng, (1, 3), np.float64)
    y = nbn.forward_eval(x, np.zeros(3), np.ones(3))
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-12)
