"""BatchNorm: modes, conventions, gradients, state_dict."""

import numpy as np
import pytest

import numba_bn as nbn

import naive
from conftest import assert_mean_close, random_batch


def test_defaults_are_pytorch_defaults():
    bn = nbn.BatchNorm(3)
    assert (bn.eps, bn.momentum, bn.axis, bn.training) == (1e-5, 0.1, 1, True)
    assert bn.weight.dtype == np.float32
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert bn.num_batches_tracked == 0


def test_train_mode_updates_running_stats_and_eval_mode_uses_them(rng):
    bn = nbn.BatchNorm(4, dtype=np.float64)
    x = random_batch(rng, (10, 4, 3), np.float64)
    y = bn(x)
    np.testing.assert_allclose(y, naive.forward_train(x)[0], rtol=1e-12, atol=1e-12)
    expected = naive.running_update(np.zeros(4), np.ones(4), x, 0.1)
    assert_mean_close(bn.running_mean, expected[0], x)
    np.testing.assert_allclose(bn.running_var, expected[1], rtol=1e-12)
    bn.eval()
    x2 = random_batch(rng, (5, 4, 3), np.float64)
    np.testing.assert_allclose(bn(x2), naive.forward(x2, *expected), rtol=1e-12, atol=1e-12)
    assert_mean_close(bn.running_mean, expected[0], x)  # eval: no update
    assert bn.num_batches_tracked == 1


def test_calling_a_layer_runs_its_forward_and_a_subclass_override_of_it(rng):
    """layer(x) is forward itself; a subclass that overrides forward is called through it,
    keywords included, and its assignments still reach the plans' watch."""

    class Doubled(nbn.BatchNorm):
        def forward(self, x, **keywords):
            return 2 * super().forward(x, **keywords)

    x = random_batch(rng, (10, 4, 3), np.float64)
    plain, doubled = nbn.BatchNorm(4, dtype=np.float64), Doubled(4, dtype=np.float64)
    for _ in range(3):  # the plans' path too
        np.testing.assert_array_equal(doubled(x), 2 * plain(x))
    np.testing.assert_array_equal(doubled(x, training=False), 2 * plain(x, training=False))
    np.testing.assert_array_equal(plain.forward(x, training=False), plain(x, training=False))
    doubled.eps = plain.eps = 0.5  # Watched in the subclass: the plans made before step aside
    np.testing.assert_array_equal(doubled(x), 2 * plain(x))
    np.testing.assert_allclose(plain(x), naive.forward_train(x, eps=0.5)[0], rtol=1e-12,
                               atol=1e-12)  # fmt: skip


def test_momentum_none_is_cumulative_average(rng):
    bn = nbn.BatchNorm(3, momentum=None, dtype=np.float64)
    batches = [random_batch(rng, (8, 3), np.float64) for _ in range(4)]
    for x in batches:
        bn(x)
    means = np.mean([naive.batch_stats(x)[0] for x in batches], axis=0)
    variances = np.mean([naive.batch_stats(x)[2] for x in batches], axis=0)
    assert_mean_close(bn.running_mean, means, batches)
    np.testing.assert_allclose(bn.running_var, variances, rtol=1e-12)
    assert bn.num_batches_tracked == 4


@pytest.mark.parametrize("convention, momentum, eps, axis", [
    ("keras", 0.99, 1e-3, -1), ("flax", 0.99, 1e-5, -1), ("onnx", 0.9, 1e-5, 1),
])  # fmt: skip
def test_presets_weight_the_old_value_with_biased_variance(rng, convention, momentum, eps, axis):
    bn = nbn.BatchNorm(3, convention=convention, dtype=np.float64)
    assert (bn.momentum, bn.eps, bn.axis) == (momentum, eps, axis)
    shape = (6, 4, 3) if axis == -1 else (6, 3, 4)
    x = random_batch(rng, shape, np.float64, axis=axis)
    y = bn(x)
    mean, var_biased, _ = naive.batch_stats(x, axis)
    assert_mean_close(bn.running_mean, (1 - momentum) * mean, x)
    np.testing.assert_allclose(bn.running_var, momentum + (1 - momentum) * var_biased, rtol=1e-12)
    np.testing.assert_allclose(y, naive.forward(x, mean, var_biased, eps=eps, axis=axis),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


def test_explicit_arguments_override_a_preset():
    bn = nbn.BatchNorm(3, convention="keras", momentum=0.9, eps=1e-4, axis=1)
    assert (bn.momentum, bn.eps, bn.axis) == (0.9, 1e-4, 1)


def test_torch_momentum_conversion():
    assert nbn.torch_momentum(0.9, "keras") == pytest.approx(0.1)
    assert nbn.torch_momentum(0.99, "keras") == pytest.approx(0.01)
    assert nbn.torch_momentum(0.1, "torch") == 0.1


def test_keras_momentum_0_9_equals_torch_momentum_0_1(rng):
    keras = nbn.BatchNorm(3, convention="keras", momentum=0.9, axis=1, dtype=np.float64)
    torch_like = nbn.BatchNorm(3, momentum=0.1, dtype=np.float64)
    x = random_batch(rng, (6, 3), np.float64)
    keras(x), torch_like(x)
    np.testing.assert_allclose(keras.running_mean, torch_like.running_mean, rtol=1e-12)


def test_keras_center_and_scale_toggle_bias_and_weight():
    bn = nbn.BatchNorm(3, convention="keras", center=False)
    assert bn.weight is not None and bn.bias is None
    assert list(bn.state_dict()) == ["weight", "running_mean", "running_var",
                                     "num_batches_tracked"]  # fmt: skip
    bn = nbn.BatchNorm(3, convention="keras", scale=False)
    assert bn.weight is None and bn.bias is not None


def test_track_running_stats_false_uses_batch_stats_in_eval(rng):
    bn = nbn.BatchNorm(3, track_running_stats=False, dtype=np.float64).eval()
    assert bn.running_mean is None
    x = random_batch(rng, (7, 3, 2), np.float64)
    np.testing.assert_allclose(bn(x), naive.forward_train(x)[0], rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(bn.backward(dy), naive.backward(dy, x)[0], rtol=1e-9, atol=1e-12)


def test_eval_backward_is_dy_times_weight_times_invstd(rng):
    bn = nbn.BatchNorm(3, dtype=np.float64)
    bn.weight[:] = rng.uniform(0.5, 2.0, 3)
    bn.running_var[:] = rng.uniform(0.5, 2.0, 3)
    bn.running_mean[:] = rng.standard_normal(3)
    bn.eval()
    x = random_batch(rng, (4, 3, 5), np.float64)
    bn(x)
    dy = rng.standard_normal(x.shape)
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, naive.backward_frozen(dy, bn.running_var, bn.weight),
                               rtol=1e-12)  # fmt: skip
    xhat = naive.forward(x, bn.running_mean, bn.running_var)
    # sums of signed terms: to 1e-10 of their size, or of the terms' where they cancel
    for grad, terms in ((bn.grad_weight, dy * xhat), (bn.grad_bias, dy)):
        np.testing.assert_allclose(grad, terms.sum(axis=(0, 2)), rtol=1e-10,
                                   atol=1e-10 * np.abs(terms).sum(axis=(0, 2)).max())  # fmt: skip


def test_backward_sets_grads_and_uses_last_training_forward(rng):
    bn = nbn.BatchNorm(4, dtype=np.float64)
    bn.weight[:] = rng.uniform(0.5, 2.0, 4)
    x1, x2 = random_batch(rng, (6, 4), np.float64), random_batch(rng, (9, 4), np.float64)
    bn(x1)
    bn(x2)
    dy = rng.standard_normal(x2.shape)
    dx = bn.backward(dy)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x2, bn.weight)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, dweight_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.grad_bias, dbias_ref, rtol=1e-9, atol=1e-12)


def test_not_affine_has_no_parameters_or_grads(rng):
    bn = nbn.BatchNorm(3, affine=False)
    x = random_batch(rng, (5, 3), np.float32)
    bn(x)
    bn.backward(np.ones_like(x))
    assert bn.weight is None and bn.bias is None
    assert bn.grad_weight is None and bn.grad_bias is None


def test_state_dict_round_trip_and_copies(rng):
    bn = nbn.BatchNorm(3)
    bn(random_batch(rng, (6, 3), np.float32))
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"].dtype == np.int64 and int(state["num_batches_tracked"]) == 1
    state["running_mean"][:] = 123.0  # a copy: the layer is unchanged
    assert not np.any(bn.running_mean == 123.0)
    other = nbn.BatchNorm(3).load_state_dict(bn.state_dict())
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[key], value)


def test_load_state_dict_is_all_or_nothing(rng):
    bn = nbn.BatchNorm(3)
    before = bn.state_dict()
    bad = dict(before, running_mean=np.full(3, 5.0, np.float32), running_var=np.ones(4))
    with pytest.raises(ValueError, match="running_var must have shape"):
        bn.load_state_dict(bad)
    np.testing.assert_array_equal(bn.running_mean, before["running_mean"])
    with pytest.raises(KeyError, match="missing keys \\['bias'\\]"):
        bn.load_state_dict({k: v for k, v in before.items() if k != "bias"})


def test_float64_layer_keeps_float64(rng):
    bn = nbn.BatchNorm(2, dtype=np.float64)
    y = bn(random_batch(rng, (4, 2), np.float64))
    assert y.dtype == np.float64 and bn.running_mean.dtype == np.float64


def test_repr_names_the_configuration():
    assert "convention='keras'" in repr(nbn.BatchNorm(2, convention="keras"))


def test_training_argument_overrides_the_mode_for_one_call(rng):
    """As Keras' layer(x, training=False): the mode itself stays."""
    x = random_batch(rng, (16, 3), np.float64)
    bn = nbn.BatchNorm(3, dtype=np.float64)
    bn.running_mean[:] = [1.0, 2.0, 3.0]
    y = bn(x, training=False)
    np.testing.assert_allclose(y, naive.forward(x, bn.running_mean, bn.running_var), atol=1e-12)
    assert bn.training and bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, [1.0, 2.0, 3.0])
    bn.eval()
    y = bn(x, training=True)
    np.testing.assert_allclose(y, naive.forward_train(x)[0], atol=1e-12)
    assert not bn.training and bn.num_batches_tracked == 1
