"""Property tests: random shapes, axes and scales against the float64 loop references."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import numba_bn as nbn

import naive


@st.composite
def batches(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:  # training needs two values per channel
        shape = (shape[0] + 1,) + shape[1:] if axis % ndim else shape + (2,)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    offset = draw(st.sampled_from([0.0, 1.0, -30.0, 1e3]))
    log_std = draw(st.floats(-2, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (offset + 10**log_std * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, axis


@settings(max_examples=60, deadline=None)
@given(batches())
def test_forward_and_backward_match_reference(batch):
    x, dy, axis = batch
    dtype = x.dtype.type
    tol = 5e-4 if dtype == np.float32 else 1e-9
    y, mean, invstd = nbn.forward_train(x, axis=axis)
    y_ref, mean_ref, invstd_ref = naive.forward_train(x, axis=axis)
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(mean, mean_ref, rtol=tol, atol=tol * np.abs(mean_ref).max())
    np.testing.assert_allclose(invstd, invstd_ref, rtol=tol)
    dx, _, dbias = nbn.backward(dy, x, mean, invstd, axis=axis)
    dx_ref, _, dbias_ref = naive.backward(dy, x, axis=axis)
    dx_scale = np.abs(dy).max() * invstd_ref.max()
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol * dx_scale * 10)
    np.testing.assert_allclose(dbias, dbias_ref, atol=tol * np.abs(dy).sum())


@settings(max_examples=30, deadline=None)
@given(batches(), st.floats(0.0, 1.0))
def test_running_update_matches_reference(batch, momentum):
    x, _, axis = batch
    channels = x.shape[axis]
    running_mean = np.linspace(-1, 1, channels).astype(x.dtype)
    running_var = np.linspace(0.5, 2, channels).astype(x.dtype)
    expected = naive.running_update(running_mean, running_var, x, momentum, axis)
    nbn.batch_norm(x, running_mean, running_var, training=True, momentum=momentum, axis=axis)
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(running_mean, expected[0], rtol=tol, atol=tol * 1e3)
    np.testing.assert_allclose(running_var, expected[1], rtol=tol * 10, atol=tol)
