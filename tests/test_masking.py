"""Masked statistics (mask=) against float64 references: NumPy over the selected values, torch
autograd of the masked formula (gradients, any axis), and Keras 3's mask (channels-last)."""

import os

import numpy as np
import pytest

import numba_bn as nbn

from conftest import assert_mean_close, poison, random_batch

torch = pytest.importorskip("torch")

CASES = [((12, 5), 1), ((4, 3, 7), 1), ((3, 5, 4, 6), -1), ((2, 4, 3, 5), 2)]


def _mask(rng, shape, axis):
    positions = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
    mask = rng.random(positions) < 0.6
    mask.flat[:2] = True  # at least two values per channel
    return mask


def _torch_masked(x, mask, weight, bias, eps, axis):
    """(y, mean, var) of masked batch norm in float64 torch, differentiable."""
    m = torch.tensor(np.expand_dims(mask, axis % x.ndim), dtype=torch.float64)
    reduce = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    n = m.sum(dim=reduce)
    mean = (x * m).sum(dim=reduce) / n
    var = (((x - mean.reshape(shape)) ** 2) * m).sum(dim=reduce) / n
    x_hat = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
    return x_hat * weight.reshape(shape) + bias.reshape(shape), mean, var


@pytest.mark.parametrize("shape, axis", CASES)
def test_masked_forward_and_backward_match_autograd(rng, shape, axis):
    x = random_batch(rng, shape, np.float64, axis=axis)
    dy = rng.standard_normal(shape)
    mask = _mask(rng, shape, axis)
    channels = shape[axis]
    weight, bias = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
    out = poison(shape, x.dtype)
    y, mean, invstd = nbn.forward_train(x, weight, bias, axis=axis, mask=mask, out=out)
    assert y is out
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, weight, axis=axis, mask=mask)

    xt = torch.tensor(x, requires_grad=True)
    wt, bt = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    yt, mean_t, var_t = _torch_masked(xt, mask, wt, bt, 1e-5, axis)
    (yt * torch.tensor(dy)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mean, mean_t.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var_t.detach().numpy() + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dweight, wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dbias, bt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_the_running_update_takes_the_masked_unbiased_variance(rng):
    x = random_batch(rng, (10, 3, 4), np.float64)
    mask = _mask(rng, x.shape, 1)
    running_mean, running_var = np.zeros(3), np.ones(3)
    nbn.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, mask=mask)
    values = np.moveaxis(x, 1, -1)[mask]
    assert_mean_close(running_mean, values.mean(axis=0), values)
    np.testing.assert_allclose(running_var, values.var(axis=0, ddof=1), rtol=1e-12)


def test_the_layer_takes_a_mask_and_its_backward(rng):
    x = random_batch(rng, (6, 5, 3), np.float64, axis=-1)
    dy = rng.standard_normal(x.shape)
    mask = _mask(rng, x.shape, -1)
    bn = nbn.BatchNorm(3, axis=-1, dtype=np.float64)
    y = bn(x, mask=mask)
    dx = bn.backward(dy)
    y_ref, mean, invstd = nbn.forward_train(x, bn.weight, bn.bias, axis=-1, mask=mask)
    np.testing.assert_array_equal(y, y_ref)
    dx_ref, dweight, dbias = nbn.backward(dy, x, mean, invstd, bn.weight, axis=-1, mask=mask)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, dweight, rtol=1e-12, atol=1e-12)
    bn.eval()
    np.testing.assert_array_equal(bn(x, mask=mask), bn(x))  # eval: running statistics


def test_an_all_false_mask_changes_no_running_statistic(rng):
    x = random_batch(rng, (6, 3), np.float64)
    bn = nbn.BatchNorm(3, dtype=np.float64)
    y = bn(x, mask=np.zeros(6, bool))
    assert np.isnan(y).all()
    np.testing.assert_array_equal(bn.running_mean, 0.0)
    np.testing.assert_array_equal(bn.running_var, 1.0)


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (np.ones((5,), bool), ValueError, r"shape of x without the channel axis, \(6, 4\)"),
        (np.ones((6, 4)), TypeError, "boolean"),
    ],
)
def test_bad_masks_are_named(rng, mask, error, message):
    x = random_batch(rng, (6, 3, 4), np.float64)
    running_mean = np.zeros(3)
    with pytest.raises(error, match=message):
        nbn.batch_norm(x, running_mean, np.ones(3), training=True, mask=mask)
    np.testing.assert_array_equal(running_mean, 0.0)


def test_keras_mask_channels_last(rng):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    x = random_batch(rng, (4, 9, 3), np.float32, axis=-1)
    mask = _mask(rng, x.shape, -1)
    reference = keras.layers.BatchNormalization(axis=-1, momentum=0.9, epsilon=1e-3)
    bn = nbn.BatchNorm(3, convention="keras", momentum=0.9, eps=1e-3)
    for _ in range(3):
        expected = keras.ops.convert_to_numpy(reference(x, training=True, mask=mask))
        np.testing.assert_allclose(bn(x, mask=mask), expected, rtol=1e-4, atol=1e-4)
    for ours, theirs in ((bn.running_mean, reference.moving_mean),
                         (bn.running_var, reference.moving_variance)):  # fmt: skip
        np.testing.assert_allclose(ours, keras.ops.convert_to_numpy(theirs), rtol=1e-5, atol=1e-5)
