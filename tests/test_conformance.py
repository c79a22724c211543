"""The conformance suite: every backend against the float64 loop references of tests/naive.py.

Each test takes the ``backend`` fixture (tests/conftest.py), one per backend under test: "cpu";
"c-plugin", the portable C library, built once per session; "cuda" where numba.cuda runs (a GPU,
or the simulator: tests/test_cuda.py runs this file under NUMBA_ENABLE_CUDASIM=1), with launch
sizes shrunk so that these small shapes span several blocks. NBN_TEST_BACKENDS picks some:

    NBN_TEST_BACKENDS=cpu python -m pytest tests/test_conformance.py
    NUMBA_ENABLE_CUDASIM=1 NBN_TEST_BACKENDS=cuda python -m pytest tests/test_conformance.py
"""

import numpy as np
import pytest

import numba_bn as nbn

import naive
from conftest import LAYOUTS, random_batch

# LAYOUTS and a plane split across blocks on "cuda"
CASES = [*LAYOUTS, ((1, 2, 40), 1)]
CASE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CASES]
TOL = {np.float32: 2e-5, np.float64: 1e-12}  # every backend, "cuda" too (another summing order)


def _close(actual, expected, tolerance, scale=1.0):
    actual = np.asarray(actual, dtype=np.float64)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


def _reduced_axes(shape, axis):
    return tuple(a for a in range(len(shape)) if a != axis % len(shape))


# ------------------------------------------------------------------------------ the three steps
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_forward_train_matches_reference(rng, backend, shape, axis, dtype, affine):
    x = random_batch(rng, shape, dtype, axis=axis)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype) if affine else None
    bias = rng.standard_normal(channels).astype(dtype) if affine else None
    out = backend.poisoned(shape, dtype)
    y, mean, invstd = nbn.forward_train(
        *backend.on(x, weight, bias), eps=1e-5, axis=axis, out=out, **backend.call
    )
    assert y is out
    y, mean, invstd = backend.host(y, mean, invstd)
    y_ref, mean_ref, invstd_ref = naive.forward_train(x, weight, bias, 1e-5, axis)
    assert y.dtype == dtype and mean.dtype == dtype and invstd.dtype == dtype
    _close(y, y_ref, TOL[dtype], scale=10)
    _close(mean, mean_ref, TOL[dtype], scale=10)
    _close(invstd, invstd_ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_forward_eval_matches_reference(rng, backend, shape, axis, dtype):
    x = random_batch(rng, shape, dtype, axis=axis)
    channels = shape[axis]
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.1, 4.0, channels).astype(dtype)
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    out = backend.poisoned(shape, dtype)
    y = nbn.forward_eval(
        *backend.on(x, running_mean, running_var, weight, bias), eps=1e-3, axis=axis, out=out,
        **backend.call,
    )  # fmt: skip
    assert y is out
    y_ref = naive.forward(x, running_mean, running_var, weight, bias, 1e-3, axis)
    _close(backend.host(y), y_ref, TOL[dtype], scale=10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_backward_matches_textbook_formula(rng, backend, shape, axis, dtype, affine):
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = random_batch(rng, shape, dtype, mean_scale=1.0, axis=axis)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype) if affine else None
    x_d, dy_d, w_d = backend.on(x, dy, weight)
    _, mean, invstd = nbn.forward_train(x_d, w_d, axis=axis, **backend.call)
    out = backend.poisoned(shape, dtype)
    dx, dweight, dbias = nbn.backward(
        dy_d, x_d, mean, invstd, w_d, axis=axis, out=out, **backend.call
    )
    assert dx is out
    dx, dweight, dbias = backend.host(dx, dweight, dbias)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x, weight, 1e-5, axis)
    # Tolerances scale with the sizes of the summed terms (sums of dy can cancel to ~0).
    xhat = np.abs(naive.forward_train(x, axis=axis)[0])
    term_size = np.sum(np.abs(dy) * (1 + xhat), axis=_reduced_axes(shape, axis)).max()
    _close(dx, dx_ref, TOL[dtype], scale=np.abs(dx_ref).max() * 10)
    _close(dweight, dweight_ref, TOL[dtype], scale=term_size)
    _close(dbias, dbias_ref, TOL[dtype], scale=term_size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), CASES[:3], ids=CASE_IDS[:3])
def test_eval_mode_backward_uses_frozen_statistics(rng, backend, shape, axis, dtype):
    """BatchNorm.eval(): dx = dy * weight * invstd of the running variance; the gradients of
    weight and bias are the sums of dy * x_hat and dy with x_hat from the running statistics."""
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    bn = nbn.BatchNorm(channels, axis=axis, dtype=dtype, **backend.call).eval()
    running_var = rng.uniform(0.5, 3, channels).astype(dtype)
    bn.load_state_dict({"running_var": running_var}, strict=False)
    x_d, dy_d = backend.on(x, dy)
    bn(x_d)
    dx = backend.host(bn.backward(dy_d))
    dx_ref = naive.backward_frozen(dy, running_var, None, bn.eps, axis)
    _close(dx, dx_ref, TOL[dtype], scale=np.abs(dx_ref).max())
    xhat = naive.forward(x, np.zeros(channels), running_var, eps=bn.eps, axis=axis)
    reduced = _reduced_axes(shape, axis)
    dweight_ref = (dy.astype(np.float64) * xhat).sum(axis=reduced)
    dbias_ref = dy.astype(np.float64).sum(axis=reduced)
    term_size = np.sum(np.abs(dy) * (1 + np.abs(xhat)), axis=reduced).max()
    _close(backend.host(bn.grad_weight), dweight_ref, TOL[dtype], scale=term_size)
    _close(backend.host(bn.grad_bias), dbias_ref, TOL[dtype], scale=term_size)


# ----------------------------------------------------------------------- running statistics
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "axis", "unbiased"),
    [(*case, True) for case in CASES] + [(*CASES[1], False)],
    ids=[*CASE_IDS, f"{CASE_IDS[1]}-biased"],
)
def test_running_statistics_follow_the_update_rule(rng, backend, shape, axis, dtype, unbiased):
    """r = (1 - momentum) r + momentum s, in place, with the unbiased batch variance by default
    and the biased one with unbiased_running_var=False; y uses the batch statistics."""
    x = random_batch(rng, shape, dtype, axis=axis)
    channels = shape[axis]
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, channels).astype(dtype)
    expected = naive.running_update(running_mean, running_var, x, 0.3, axis, unbiased)
    x_d, mean_d, var_d = backend.on(x, running_mean, running_var)
    biased = {} if unbiased else {"unbiased_running_var": False}
    y = nbn.batch_norm(
        x_d, mean_d, var_d, training=True, momentum=0.3, axis=axis, **biased, **backend.call
    )
    _close(backend.host(mean_d), expected[0], TOL[dtype], scale=10)
    _close(backend.host(var_d), expected[1], TOL[dtype], scale=10)
    _close(backend.host(y), naive.forward_train(x, axis=axis)[0], TOL[dtype], scale=10)


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37])
@pytest.mark.parametrize(("shape", "axis"), [((16, 5), 1), ((4, 6, 5, 7), 1), ((3, 5, 4, 6), -1)])
def test_running_statistics_at_any_momentum(rng, backend, shape, axis, momentum):
    """0 keeps the running statistics, 1 replaces them by the batch's, and anything between."""
    x = random_batch(rng, shape, np.float64, axis=axis)
    channels = shape[axis]
    running_mean = rng.standard_normal(channels)
    running_var = rng.uniform(0.5, 2.0, channels)
    expected_mean, expected_var = naive.running_update(running_mean, running_var, x, momentum, axis)
    x_d, mean_d, var_d = backend.on(x, running_mean, running_var)
    nbn.batch_norm(x_d, mean_d, var_d, training=True, momentum=momentum, axis=axis, **backend.call)
    _close(backend.host(mean_d), expected_mean, TOL[np.float64])
    _close(backend.host(var_d), expected_var, TOL[np.float64])


def test_batch_norm_eval_uses_running_stats(rng, backend):
    x = random_batch(rng, (5, 4, 3), np.float32)
    running_mean = rng.standard_normal(4).astype(np.float32)
    running_var = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    before = running_mean.copy(), running_var.copy()  # on the host, on() gives these arrays
    x_d, mean_d, var_d = backend.on(x, running_mean, running_var)
    y = nbn.batch_norm(x_d, mean_d, var_d, training=False, **backend.call)
    _close(backend.host(y), naive.forward(x, *before), 2e-5)
    np.testing.assert_array_equal(backend.host(mean_d), before[0])
    np.testing.assert_array_equal(backend.host(var_d), before[1])


def test_training_without_running_buffers_uses_batch_stats(rng, backend):
    x = random_batch(rng, (9, 4), np.float64)
    y = nbn.batch_norm(backend.on(x), None, None, training=True, **backend.call)
    _close(backend.host(y), naive.forward_train(x)[0], TOL[np.float64])


# -------------------------------------------------------------------------- memory layouts
# Host arrays on every backend: device="cuda" copies them over, while a CUDA device array must be
# C-contiguous by design (tests/gpu_suite.py: test_non_contiguous_device_input_is_rejected).
@pytest.mark.parametrize(("shape", "axis"), [((6, 4, 5, 3), 1), ((6, 5, 3, 4), -1), ((40, 7), 1)])
def test_non_contiguous_input_gives_the_same_result(rng, backend, shape, axis):
    base = random_batch(rng, shape + (2,), np.float32, axis=axis if axis >= 0 else axis - 1)
    x = base[..., 1]  # every other element
    assert not x.flags.c_contiguous
    contiguous = np.ascontiguousarray(x)
    for got, expected in zip(
        nbn.forward_train(x, axis=axis, **backend.call),
        nbn.forward_train(contiguous, axis=axis, **backend.call),
        strict=True,
    ):
        np.testing.assert_array_equal(got, expected)
    dy = rng.standard_normal(shape + (2,)).astype(np.float32)[..., 0]
    _, mean, invstd = nbn.forward_train(contiguous, axis=axis, **backend.call)
    dx = nbn.backward(dy, x, mean, invstd, axis=axis, **backend.call)[0]
    expected = nbn.backward(np.ascontiguousarray(dy), contiguous, mean, invstd, axis=axis,
                            **backend.call)[0]  # fmt: skip
    np.testing.assert_array_equal(dx, expected)


def test_fortran_order_planes(rng, backend):
    x = np.asfortranarray(random_batch(rng, (4, 3, 5, 6), np.float64))
    y, _, _ = nbn.forward_train(x, **backend.call)
    _close(y, naive.forward_train(x)[0], TOL[np.float64])


# -------------------------------------------------------------------------------- precision
def test_float16_input_is_computed_in_float32_and_returned_as_float16(rng, backend):
    x = random_batch(rng, (8, 4, 6), np.float16, std_range=(0.5, 2.0))
    weight = rng.uniform(0.5, 1.5, 4).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    x_d, w_d, dy_d = backend.on(x, weight, dy)
    y, mean, invstd = nbn.forward_train(x_d, w_d, **backend.call)
    assert backend.host(y).dtype == np.float16 and backend.host(mean).dtype == np.float32
    y_ref, mean_ref, _ = naive.forward_train(x, weight)
    np.testing.assert_allclose(backend.host(y).astype(np.float64), y_ref, atol=4e-3, rtol=2e-3)
    np.testing.assert_allclose(backend.host(mean), mean_ref, rtol=1e-6, atol=1e-6)
    dx, dweight, dbias = backend.host(*nbn.backward(dy_d, x_d, mean, invstd, w_d, **backend.call))
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x, weight)
    assert dx.dtype == np.float16
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, atol=5e-3, rtol=5e-3)
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-5, atol=1e-4)
    running_var = backend.on((1 / backend.host(invstd).astype(np.float64) ** 2).astype(np.float32))
    out = backend.poisoned(x.shape, np.float16)
    assert nbn.forward_eval(x_d, mean, running_var, out=out, **backend.call) is out
    assert np.all(np.isfinite(backend.host(out)))


def test_float16_running_statistics_are_updated_in_float16(rng, backend):
    x = random_batch(rng, (4, 3, 5), np.float16)
    x_d, mean_d, var_d = backend.on(x, np.zeros(3, np.float16), np.ones(3, np.float16))
    y = nbn.batch_norm(x_d, mean_d, var_d, training=True, **backend.call)
    assert backend.host(y).dtype == np.float16 and backend.host(mean_d).dtype == np.float16
    np.testing.assert_allclose(backend.host(y), naive.forward_train(x)[0], atol=4e-3)
    expected = naive.running_update(np.zeros(3), np.ones(3), x, 0.1)
    # float16 rounds a running mean below 2^-14 (subnormal) to a spacing of 2^-24, not 2^-11 of it
    np.testing.assert_allclose(backend.host(mean_d), expected[0], rtol=2e-3, atol=2.0**-24)
    np.testing.assert_allclose(backend.host(var_d), expected[1], rtol=2e-3)


def test_float32_keeps_precision_when_the_mean_dwarfs_the_spread(rng, backend):
    x = (1e4 + 1e-2 * rng.standard_normal((64, 3, 5))).astype(np.float32)
    y, mean, _ = backend.host(*nbn.forward_train(backend.on(x), **backend.call))
    y_ref, mean_ref, _ = naive.forward_train(x)
    np.testing.assert_allclose(y, y_ref, atol=2e-4)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-7)


def test_constant_channel_normalises_to_bias(backend):
    x = np.full((4, 2, 3), 7.0)
    bias = np.array([0.5, -1.0])
    y, mean, invstd = backend.host(*nbn.forward_train(*backend.on(x, None, bias), **backend.call))
    np.testing.assert_array_equal(y, np.broadcast_to(bias[None, :, None], x.shape))
    np.testing.assert_array_equal(invstd, 1 / np.sqrt(1e-5))
    np.testing.assert_array_equal(mean, 7.0)


# -------------------------------------------------------------------------- NaN, edge sizes
def test_nan_propagates_into_output_and_running_statistics(rng, backend):
    x = rng.standard_normal((5, 3, 4))
    x[2, 1, 3] = np.nan
    x_d, mean_d, var_d = backend.on(x, np.zeros(3), np.ones(3))
    y = backend.host(nbn.batch_norm(x_d, mean_d, var_d, training=True, **backend.call))
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    for running in backend.host(mean_d, var_d):
        assert np.isnan(running[1]) and np.isfinite(running[[0, 2]]).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the simulator's inf - inf
def test_nan_policy_raise_leaves_running_statistics_untouched(rng, backend):
    x = rng.standard_normal((5, 3, 4))
    x[0, 2, 0] = np.inf
    x_d, mean_d, var_d = backend.on(x, np.full(3, 0.25), np.full(3, 2.0))
    with pytest.raises(ValueError, match="not finite"):
        nbn.batch_norm(x_d, mean_d, var_d, training=True, nan_policy="raise", **backend.call)
    np.testing.assert_array_equal(backend.host(mean_d), 0.25)
    np.testing.assert_array_equal(backend.host(var_d), 2.0)


def test_empty_batch_gives_empty_output_and_nan_statistics(backend):
    y, mean, invstd = nbn.forward_train(backend.on(np.empty((0, 3, 4), np.float32)), **backend.call)
    y, mean, invstd = backend.host(y, mean, invstd)
    assert y.shape == (0, 3, 4)
    assert np.isnan(mean).all() and np.isnan(invstd).all()


def test_empty_batch_leaves_running_stats_and_has_zero_gradients(rng, backend):
    x = np.empty((0, 3, 4), np.float32)
    running_mean = rng.standard_normal(3).astype(np.float32)
    running_var = rng.uniform(1, 2, 3).astype(np.float32)
    before = running_mean.copy(), running_var.copy()  # on the host, on() gives these arrays
    x_d, mean_d, var_d = backend.on(x, running_mean, running_var)
    y = nbn.batch_norm(x_d, mean_d, var_d, training=True, **backend.call)
    assert backend.host(y).shape == x.shape
    np.testing.assert_array_equal(backend.host(mean_d), before[0])
    np.testing.assert_array_equal(backend.host(var_d), before[1])
    _, mean, invstd = nbn.forward_train(x_d, **backend.call)
    dx, dweight, dbias = backend.host(*nbn.backward(x_d, x_d, mean, invstd, **backend.call))
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dweight, 0)
    np.testing.assert_array_equal(dbias, 0)
    assert backend.host(nbn.forward_eval(x_d, mean_d, var_d, **backend.call)).shape == x.shape


def test_single_value_per_channel_is_rejected_in_training(backend):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nbn.forward_train(backend.on(np.ones((1, 3))), **backend.call)


def test_one_value_per_channel_is_fine_in_eval(rng, backend):
    x = random_batch(rng, (1, 3), np.float64)
    y = nbn.forward_eval(*backend.on(x, np.zeros(3), np.ones(3)), **backend.call)
    _close(backend.host(y), x / np.sqrt(1 + 1e-5), TOL[np.float64])
