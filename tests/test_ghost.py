"""Ghost batch normalisation (BatchNorm(virtual_batch_size=k)) against the float64 references of
tests/naive.py applied to each ghost batch."""

import numpy as np
import pytest

import numba_bn as nbn

import naive
from conftest import poison, random_batch


def _ghosts(x, k):
    return [x[i : i + k] for i in range(0, len(x), k)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape, axis, k, convention",
    [((12, 5), 1, 4, "torch"), ((8, 3, 5, 2), 1, 2, "torch"), ((6, 4, 3), -1, 3, "keras")],
)
def test_each_ghost_batch_is_normalised_with_its_own_statistics(rng, shape, axis, k, convention,
                                                                dtype):  # fmt: skip
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = random_batch(rng, shape, dtype, mean_scale=1.0, axis=axis)
    channels = shape[axis]
    bn = nbn.BatchNorm(channels, axis=axis, dtype=dtype, convention=convention,
                       virtual_batch_size=k)  # fmt: skip
    bn.weight[:] = rng.uniform(0.5, 2, channels)
    bn.bias[:] = rng.standard_normal(channels)
    running = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    y = bn(x)
    dx = bn.backward(dy)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    reduce = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    means, variances, dweight, dbias = [], [], 0.0, 0.0
    for g, (xg, dyg) in enumerate(zip(_ghosts(x, k), _ghosts(dy, k), strict=True)):
        rows = slice(g * k, (g + 1) * k)
        expected = naive.forward_train(xg, bn.weight, bn.bias, bn.eps, axis)[0]
        np.testing.assert_allclose(y[rows], expected, rtol=tol, atol=tol * 10)
        dx_ref, dw_ref, db_ref = naive.backward(dyg, xg, bn.weight, bn.eps, axis)
        np.testing.assert_allclose(dx[rows], dx_ref, rtol=tol * 10, atol=tol * 10)
        dweight, dbias = dweight + dw_ref, dbias + db_ref
        x64 = xg.astype(np.float64)
        means.append(x64.mean(axis=reduce))
        variances.append(x64.var(axis=reduce, ddof=1 if convention == "torch" else 0))
    scale = np.abs(dbias).max() + 10
    np.testing.assert_allclose(bn.grad_weight, dweight, rtol=tol * 10, atol=tol * scale)
    np.testing.assert_allclose(bn.grad_bias, dbias, rtol=tol * 10, atol=tol * scale)
    weight = bn.convention.new_batch_weight(bn.momentum, 1)
    expected_mean = (1 - weight) * running[0] + weight * np.mean(means, axis=0)
    expected_var = (1 - weight) * running[1] + weight * np.mean(variances, axis=0)
    np.testing.assert_allclose(bn.running_mean, expected_mean, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.running_var, expected_var, rtol=tol, atol=tol)
    assert bn.num_batches_tracked == 1


def test_ghost_batches_write_out_and_eval_mode_is_unchanged(rng):
    x = random_batch(rng, (8, 3), np.float64)
    bn = nbn.BatchNorm(3, dtype=np.float64, virtual_batch_size=4)
    out = poison(x.shape, np.float64)
    assert bn(x, out=out) is out
    np.testing.assert_allclose(out[:4], naive.forward_train(x[:4])[0], atol=1e-12)
    bn.eval()
    y = bn(x)  # eval: the running statistics, whatever the ghost size
    np.testing.assert_allclose(y, naive.forward(x, bn.running_mean, bn.running_var), atol=1e-12)


ONES = np.ones((6, 3), np.float32)


@pytest.mark.parametrize(
    "make, call, message",
    [
        (lambda: nbn.BatchNorm(3, virtual_batch_size=4), lambda bn: bn(ONES),
         "virtual_batch_size=4 must divide the batch of 6 samples"),
        (lambda: nbn.BatchNorm(6, axis=0, virtual_batch_size=2), lambda bn: bn(ONES),
         "must not be the channel axis"),
        (lambda: nbn.BatchNorm(3, virtual_batch_size=0), None, "positive integer"),
        (lambda: nbn.BatchNorm(3, virtual_batch_size=2.0), None, "positive integer"),
    ],
)  # fmt: skip
def test_bad_ghost_sizes_are_named(make, call, message):
    with pytest.raises(ValueError, match=message):
        bn = make()
        before = bn.running_mean.copy()
        try:
            call(bn)
        finally:
            np.testing.assert_array_equal(bn.running_mean, before)
            assert bn.num_batches_tracked == 0
