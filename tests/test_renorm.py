"""Batch Renormalization (BatchNorm(renorm=True)) against Keras 3 (forward and every moving
statistic, to float32 precision: Keras computes in float32) and against float64 autograd of the
same formulas with r and d held constant (gradients).

Keras' BatchNormalization computes in float32 whatever its input (its compute dtype is
result_type(x.dtype, "float32"), float32 for float64 too) and takes a batch's variance as
E[x^2] - E[x]^2, which loses about (mean / std)^2 ulps. Where r is clipped, that error reaches the
output (unclipped, r * x_hat = (x - mean) / renorm_stddev, and it cancels). The batches compared
with Keras keep a channel's mean within a few of its spreads: with this file's usual batches
(means up to 50 spreads) 2% of seeds failed at 2e-4 on channels Keras got wrong by 3e-4."""

import os

import numpy as np
import pytest

import numba_bn as nbn

from conftest import random_batch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
torch = pytest.importorskip("torch")

CLIPPING = {"rmin": 0.7, "rmax": 1.6, "dmax": 0.8}
# Keras' torch backend converts with np.array(tensor), which NumPy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


def _keras_batch(rng, shape):
    """Channels last, each channel's mean within 2 of its spreads (see the docstring above)."""
    return random_batch(rng, shape, np.float32, mean_scale=1.0, std_range=(0.5, 10.0), axis=-1)


@pytest.mark.parametrize("clipping", [None, CLIPPING, {"rmax": 1.2}], ids=["none", "all", "rmax"])
def test_forward_and_moving_statistics_follow_keras(rng, clipping):
    channels = 4
    options = dict(momentum=0.9, renorm=True, renorm_clipping=clipping, renorm_momentum=0.8)
    reference = keras.layers.BatchNormalization(axis=-1, epsilon=1e-3, **options)
    reference.build((None, 3, channels))
    bn = nbn.BatchNorm(channels, convention="keras", eps=1e-3, **options)
    gamma, beta = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
    reference.gamma.assign(gamma.astype(np.float32))
    reference.beta.assign(beta.astype(np.float32))
    bn.weight[:], bn.bias[:] = gamma, beta
    for step in range(5):  # batches that drift: the corrections move away from 1 and 0
        x = _keras_batch(rng, (16, 3, channels)) * (1 + step) + step
        expected = _numpy(reference(x, training=True))
        y = bn(x)
        np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4 * (1 + step))
        for ours, theirs in (
            (bn.running_mean, reference.moving_mean),
            (bn.running_var, reference.moving_variance),
            (bn.renorm_mean, reference.renorm_mean),
            (bn.renorm_stddev, reference.renorm_stddev),
            (bn.moving_stddev, reference.moving_stddev),
        ):
            np.testing.assert_allclose(ours, _numpy(theirs), rtol=2e-5, atol=2e-5 * (1 + step))
    bn.eval()
    x = _keras_batch(rng, (8, 3, channels))
    np.testing.assert_allclose(bn(x), _numpy(reference(x, training=False)), rtol=2e-4, atol=2e-4)


def test_gradients_hold_r_and_d_constant(rng):
    channels, eps = 3, 1e-3
    bn = nbn.BatchNorm(channels, convention="keras", eps=eps, axis=1, dtype=np.float64,
                       renorm=True, renorm_clipping=CLIPPING)  # fmt: skip
    bn.renorm_mean[:], bn.renorm_stddev[:] = rng.normal(0, 1, channels), rng.uniform(1, 3, channels)
    bn.weight[:], bn.bias[:] = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
    renorm_mean, renorm_stddev = bn.renorm_mean.copy(), bn.renorm_stddev.copy()
    x = random_batch(rng, (6, channels, 5), np.float64)
    dy = rng.standard_normal(x.shape)
    y = bn(x)
    dx = bn.backward(dy)

    xt = torch.tensor(x, requires_grad=True)
    gamma = torch.tensor(bn.weight, requires_grad=True)
    beta = torch.tensor(bn.bias, requires_grad=True)
    mean = xt.mean(dim=(0, 2))
    var = xt.var(dim=(0, 2), unbiased=False)
    stddev = torch.sqrt(var + eps)
    floor = torch.clamp(torch.tensor(renorm_stddev), min=eps**0.5)
    r = torch.clamp(stddev / floor, CLIPPING["rmin"], CLIPPING["rmax"]).detach()
    d = torch.clamp((mean - torch.tensor(renorm_mean)) / floor, -0.8, 0.8).detach()
    x_hat = (xt - mean[None, :, None]) / stddev[None, :, None]
    expected = (x_hat * r[None, :, None] + d[None, :, None]) * gamma[None, :, None]
    expected = expected + beta[None, :, None]
    (expected * torch.tensor(dy)).sum().backward()
    assert not np.allclose(r.numpy(), 1.0)  # the corrections are in play
    np.testing.assert_allclose(y, expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.grad_weight, gamma.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.grad_bias, beta.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_renorm_buffers_are_in_the_state_dict():
    bn = nbn.BatchNorm(3, convention="keras", renorm=True)
    state = bn.state_dict()
    assert {"renorm_mean", "renorm_stddev", "moving_stddev"} <= set(state)
    state["renorm_stddev"] = np.full(3, 2.0)
    other = nbn.BatchNorm(3, convention="keras", renorm=True).load_state_dict(state)
    np.testing.assert_array_equal(other.renorm_stddev, 2.0)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(renorm=True), "convention='keras', 'flax' or 'onnx', got convention='torch'"),
        (dict(renorm=True, convention="keras", renorm_clipping={"rmn": 1}), "unknown keys"),
        (dict(renorm=True, convention="keras", renorm_clipping={"rmin": 2, "rmax": 1}),
         "rmax >= rmin"),
        (dict(renorm=True, convention="keras", track_running_stats=False), "track_running_stats"),
        (dict(renorm=True, convention="keras", renorm_momentum=1.5), "renorm_momentum"),
    ],
)  # fmt: skip
def test_bad_renorm_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        nbn.BatchNorm(3, **options)
