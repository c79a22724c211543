"""What a training loop meets at the edges (issue 10): empty batches, in-place outputs,
eps = 0, values near the float32 maximum, corrupted checkpoints, inputs NumPy cannot hold.

References are PyTorch 2.13 on the CPU and the float64 loops of tests/naive.py.
"""

import gc
import pickle
import sys
import weakref

import numpy as np
import pytest
import torch

import numba_bn as nbn

import naive
from conftest import LAYOUTS, assert_mean_close, random_batch

F32_MAX = float(np.finfo(np.float32).max)

# Inputs large enough for the parallel drivers (numba_bn.cpu's cost model), planes with enough
# channels for the fused one-channel-per-item path, and the small serial ones of LAYOUTS.
PATH_SHAPES = [((64, 8, 256), 1), ((8, 16, 32, 32), 1), ((12288, 12), 1), ((8, 16, 16, 4), -1)]


def _torch_layer(channels, **options):
    return torch.nn.BatchNorm1d(channels, **options).double()


# ------------------------------------------------------------------------------ empty batches
def test_empty_batch_gives_zero_gradients_in_the_layer():
    bn = nbn.BatchNorm(3, dtype=np.float64)
    bn(np.empty((0, 3)))
    bn.backward(np.empty((0, 3)))
    ref = _torch_layer(3)
    x = torch.empty((0, 3), dtype=torch.float64, requires_grad=True)
    ref(x).sum().backward()
    np.testing.assert_array_equal(bn.grad_weight, ref.weight.grad.numpy())
    np.testing.assert_array_equal(bn.grad_bias, ref.bias.grad.numpy())
    np.testing.assert_array_equal(bn.grad_weight, np.zeros(3))


@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 5), (3, 4, 0)])
def test_empty_batch_gives_zero_dweight_in_the_functional_backward(shape):
    x = np.empty(shape, np.float32)
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, dbias = nbn.backward(np.empty(shape, np.float32), x, mean, invstd)
    assert dx.shape == shape
    np.testing.assert_array_equal(dweight, np.zeros(4, np.float32))
    np.testing.assert_array_equal(dbias, np.zeros(4, np.float32))


def test_empty_batch_counts_in_num_batches_tracked_like_torch(rng):
    """torch counts an empty batch and leaves the statistics; with momentum=None the next
    batch then weighs 1/3, not 1/2."""
    ours = nbn.BatchNorm(3, momentum=None, dtype=np.float64)
    ref = _torch_layer(3, momentum=None)
    seen = []
    for rows in (6, 0, 5):
        x = random_batch(rng, (rows, 3))
        seen.append(x)
        ours(x)
        ref(torch.from_numpy(x))
        assert ours.num_batches_tracked == int(ref.num_batches_tracked)
        assert_mean_close(ours.running_mean, ref.running_mean.numpy(), np.concatenate(seen))
        np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), rtol=1e-12)
    assert ours.num_batches_tracked == 3


def test_sgd_step_after_an_empty_batch_keeps_weights_finite(rng):
    bn = nbn.BatchNorm(4)
    bn(np.empty((0, 4), np.float32))
    bn.backward(np.empty((0, 4), np.float32))
    bn.weight -= 0.1 * bn.grad_weight
    bn.bias -= 0.1 * bn.grad_bias
    assert np.isfinite(bn.weight).all() and np.isfinite(bn.bias).all()


# ------------------------------------------------------------------------------- out= and x
def test_training_forward_refuses_out_sharing_memory_with_x(rng):
    bn = nbn.BatchNorm(5)
    x = random_batch(rng, (16, 5), np.float32)
    x_before = x.copy()
    with pytest.raises(ValueError, match="out shares memory with x"):
        bn.forward(x, out=x)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(bn.running_mean, np.zeros(5, np.float32))
    assert bn.num_batches_tracked == 0


def test_eval_forward_in_place_is_allowed_but_its_backward_raises(rng):
    bn = nbn.BatchNorm(5).eval()
    x = random_batch(rng, (16, 5), np.float32)
    expected = nbn.forward_eval(x, bn.running_mean, bn.running_var)
    y = bn.forward(x, out=x)
    assert y is x
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(RuntimeError, match="overwrote"):
        bn.backward(np.ones_like(x))


def _overlapping(rng, shape, shift):
    """(x, out): two C-contiguous views of one buffer, ``shift`` elements apart."""
    size = int(np.prod(shape))
    buffer = random_batch(rng, (size + shift,), np.float32, axis=0)
    return buffer[shift:].reshape(shape), buffer[:size].reshape(shape)


@pytest.mark.parametrize("shape, axis", LAYOUTS[:5])
def test_out_partly_overlapping_x_raises_and_modifies_nothing(rng, shape, axis):
    x, out = _overlapping(rng, shape, shift=shape[axis])
    base = x.base.copy()
    channels = shape[axis]
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    for call in (
        lambda: nbn.forward_train(x, axis=axis, out=out),
        lambda: nbn.forward_eval(x, running_mean, running_var, axis=axis, out=out),
        lambda: nbn.batch_norm(x, running_mean, running_var, training=True, axis=axis, out=out),
    ):
        with pytest.raises(ValueError, match="out overlaps x without being x itself"):
            call()
        np.testing.assert_array_equal(x.base, base)
    np.testing.assert_array_equal(running_mean, 0.0)
    np.testing.assert_array_equal(running_var, 1.0)


def test_backward_out_partly_overlapping_dy_raises(rng):
    x = random_batch(rng, (8, 3, 5), np.float32)
    _, mean, invstd = nbn.forward_train(x)
    dy, out = _overlapping(rng, x.shape, shift=7)
    base = dy.base.copy()
    with pytest.raises(ValueError, match="out overlaps dy"):
        nbn.backward(dy, x, mean, invstd, out=out)
    np.testing.assert_array_equal(dy.base, base)


@pytest.mark.parametrize("shape, axis", PATH_SHAPES)
def test_backward_in_place_on_dy_is_exact(rng, shape, axis):
    x = random_batch(rng, shape, np.float64, axis=axis)
    dy = random_batch(rng, shape, np.float64, mean_scale=0.5, axis=axis)
    _, mean, invstd = nbn.forward_train(x, axis=axis)
    expected, _, _ = nbn.backward(dy, x, mean, invstd, axis=axis)
    dx, _, _ = nbn.backward(dy, x, mean, invstd, axis=axis, out=dy)
    assert dx is dy
    np.testing.assert_array_equal(dx, expected)


# ------------------------------------------------------------------ nan_policy="raise" and out=
@pytest.mark.parametrize("shape, axis", LAYOUTS + PATH_SHAPES)
@pytest.mark.parametrize("in_place", [True, False])
def test_nan_policy_raise_leaves_out_and_x_as_they_were(rng, shape, axis, in_place):
    x = random_batch(rng, shape, np.float32, axis=axis)
    x.reshape(-1)[x.size // 2] = np.nan
    x_before = x.copy()
    out = x if in_place else np.full(shape, 7.0, np.float32)
    out_before = out.copy()
    channels = shape[axis]
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nbn.batch_norm(x, running_mean, running_var, training=True, axis=axis, out=out,
                       nan_policy="raise")  # fmt: skip
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(out, out_before)
    np.testing.assert_array_equal(running_mean, 0.0)
    np.testing.assert_array_equal(running_var, 1.0)


def test_nan_policy_raise_in_the_layer_leaves_out_as_it_was(rng):
    bn = nbn.BatchNorm(16, nan_policy="raise")
    x = random_batch(rng, (4, 16, 32, 32), np.float32)
    x[1, 3, 4, 5] = np.inf
    out = np.full(x.shape, 7.0, np.float32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        bn.forward(x, out=out)
    np.testing.assert_array_equal(out, 7.0)
    assert bn.num_batches_tracked == 0


# ------------------------------------------------------------------------------------ eps = 0
@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_training_refuses_eps_that_is_not_positive(rng, eps):
    x = random_batch(rng, (8, 3), np.float32)
    match = "eps must be > 0 when training" if eps == 0 else "eps must be >= 0"
    with pytest.raises(ValueError, match=match):
        nbn.forward_train(x, eps=eps)
    bn = nbn.BatchNorm(3, eps=0.0)  # an eval-only layer (a converted model) may have eps = 0
    with pytest.raises(ValueError, match="eps must be > 0 when training"):
        bn(x)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_var, 1.0)


@pytest.mark.parametrize("shape, axis", LAYOUTS[:3] + PATH_SHAPES)
def test_eval_with_zero_eps_and_zero_running_var_follows_ieee(rng, shape, axis):
    """A dead channel (running variance 0, as after a ReLU that never fires) with eps = 0:
    inf where x differs from the running mean, NaN where it equals it; no exception."""
    x = random_batch(rng, shape, np.float32, axis=axis)
    channels = shape[axis]
    running_mean = np.zeros(channels, np.float32)
    running_var = np.ones(channels, np.float32)
    running_var[0] = 0.0
    x_channel_0 = np.moveaxis(x, axis, 0)[0]
    x_channel_0.reshape(-1)[0] = 0.0
    with np.errstate(all="ignore"):
        expected = np.float32(x_channel_0) / np.float32(0.0)
    y = nbn.forward_eval(x, running_mean, running_var, eps=0.0, axis=axis)
    np.testing.assert_array_equal(np.moveaxis(y, axis, 0)[0], expected)
    assert np.isfinite(np.moveaxis(y, axis, 0)[1:]).all()
    bn = nbn.BatchNorm(channels, eps=0.0, axis=axis).eval()
    bn.running_var[:] = running_var
    np.testing.assert_array_equal(bn(x), y)
    dx = bn.backward(np.ones_like(x))
    assert np.isinf(np.moveaxis(dx, axis, 0)[0]).all()


# --------------------------------------------------------------------- near the float32 maximum
def _near_max_batch(rng, shape, axis):
    """float32 values within 2x of the maximum, so that x - mean exceeds it: a quarter of each
    channel at +0.9 max, the rest at -0.9 max (mean -0.45 max), with a little noise.

    Exactly a quarter (at least one value) at random places, not each value with probability
    1/4: a channel of 16 values then came out all one sign in ~1% of draws, its spread only the
    noise (std ~1e-4 |mean|), and the float32 mean handed to the backward is off by ~1e-4 std
    there, beyond the tolerance (seed 4190813771 of CI)."""
    x = random_batch(rng, shape, np.float64, axis=axis)
    draws = np.moveaxis(rng.random(shape), axis, -1)
    ranks = draws.reshape(-1, shape[axis]).argsort(axis=0).argsort(axis=0).reshape(draws.shape)
    positive = np.moveaxis(ranks < max(1, ranks.size // shape[axis] // 4), -1, axis)
    sign = np.where(positive, 1.0, -1.0)
    return (sign * 0.9 * F32_MAX * (1.0 + 0.01 * np.tanh(x))).astype(np.float32)


@pytest.mark.parametrize("shape, axis", LAYOUTS[:4] + PATH_SHAPES)
def test_float32_near_its_maximum_gives_the_float64_answer(rng, shape, axis):
    x = _near_max_batch(rng, shape, axis)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, channels).astype(np.float32)
    y, mean, invstd = nbn.forward_train(x, weight, bias, axis=axis)
    y_ref, _, _ = naive.forward_train(x, weight, bias, axis=axis)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = (random_batch(rng, shape, np.float64, axis=axis) * 1e30).astype(np.float32)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, weight, axis=axis)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x, weight, axis=axis)
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5 * np.abs(dx_ref).max())
    # mean and invstd come back in float32: mean's rounding (2^-24 |mean|) times sum(dy) shifts a
    # channel's dweight by up to ~1e-6 of the largest one, whatever the channel's own size
    np.testing.assert_allclose(
        dweight, dweight_ref, rtol=1e-4, atol=1e-5 * np.abs(dweight_ref).max()
    )
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-4)


def test_float32_eval_near_its_maximum_gives_the_float64_answer(rng):
    x = np.full((6, 3), 0.95 * F32_MAX, np.float32)
    x[::2] *= -1
    running_mean = np.array([-0.9 * F32_MAX, 1.0, 0.9 * F32_MAX], np.float32)
    running_var = np.full(3, 1e38, np.float32)
    y = nbn.forward_eval(x, running_mean, running_var)
    y_ref = naive.forward(x, running_mean, running_var)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)


@pytest.mark.parametrize("shape, axis", LAYOUTS[:4] + PATH_SHAPES)
def test_ordinary_inputs_take_no_prescale(rng, shape, axis):
    """pre = 1 leaves the elementwise pass bitwise as the plain formula computes it."""
    x = random_batch(rng, shape, np.float32, axis=axis)
    y, _, invstd = nbn.forward_train(x, axis=axis, eps=1e-3)
    xv = np.moveaxis(x, axis, -1).astype(np.float64)
    # the float64 mean, not the float32 one returned: its rounding (2^-24 |mean|) times invstd
    # reaches 3e-6 for a mean of 5 and a spread of 0.1, which the kernel does not make
    mean = xv.reshape(-1, xv.shape[-1]).mean(axis=0)
    expected = ((xv - mean) * invstd.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(np.moveaxis(y, axis, -1), expected, rtol=2e-6, atol=2e-6)


# ------------------------------------------------------------------------ corrupted checkpoints
def test_negative_running_var_in_eval_names_the_channel(rng):
    x = random_batch(rng, (8, 4, 3), np.float32)
    running_mean, running_var = np.zeros(4, np.float32), np.ones(4, np.float32)
    running_var[2] = -0.5
    match = r"running_var must be >= 0, got -0.5 in channel 2"
    with pytest.raises(ValueError, match=match):
        nbn.forward_eval(x, running_mean, running_var)
    with pytest.raises(ValueError, match=match):
        nbn.batch_norm(x, running_mean, running_var, training=False)
    bn = nbn.BatchNorm(4).eval()
    bn.running_var = running_var
    out = np.full(x.shape, 7.0, np.float32)
    with pytest.raises(ValueError, match=match):
        bn.forward(x, out=out)
    np.testing.assert_array_equal(out, 7.0)


@pytest.mark.parametrize("shape, axis", [((8, 4, 3), 1), *PATH_SHAPES])
@pytest.mark.parametrize("epilogue", [{}, {"residual": True, "activation": "relu"}])
def test_a_plain_eval_with_a_negative_running_var_writes_nothing(rng, shape, axis, epilogue):
    """The plain call finds the negative variance in the kernel (the last channel, so that the
    search reads every one) and writes nothing: out= keeps its values, serial or parallel."""
    x = random_batch(rng, shape, np.float32, axis=axis)
    channels = shape[axis]
    running_mean = rng.standard_normal(channels).astype(np.float32)
    running_var = rng.uniform(0.5, 2, channels).astype(np.float32)
    nbn.forward_eval(x, running_mean, running_var, axis=axis)  # the same plan, valid
    running_var[-1] = -0.5
    kept = running_mean.copy(), running_var.copy()
    residual = random_batch(rng, shape, np.float32, axis=axis) if epilogue else None
    out = np.full(x.shape, 7.0, np.float32)
    match = rf"running_var must be >= 0, got -0.5 in channel {channels - 1}"
    with pytest.raises(ValueError, match=match):
        nbn.forward_eval(x, running_mean, running_var, axis=axis, out=out, residual=residual,
                         activation=epilogue.get("activation"))  # fmt: skip
    np.testing.assert_array_equal(out, 7.0)
    np.testing.assert_array_equal(running_mean, kept[0])
    np.testing.assert_array_equal(running_var, kept[1])


def test_load_state_dict_refuses_a_negative_num_batches_tracked():
    bn = nbn.BatchNorm(3, momentum=None)
    state = bn.state_dict()
    state["num_batches_tracked"] = np.array(-2, np.int64)
    state["running_mean"] = np.full(3, 5.0, np.float32)
    with pytest.raises(ValueError, match="num_batches_tracked must be a non-negative integer"):
        bn.load_state_dict(state)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0.0)


# ------------------------------------------------------------------ inputs NumPy cannot hold
def test_masked_array_is_refused_in_the_layer(rng):
    bn = nbn.BatchNorm(3)
    x = np.ma.masked_array(random_batch(rng, (8, 3), np.float32), mask=np.eye(8, 3))
    with pytest.raises(TypeError, match="x is a numpy.ma.MaskedArray: masks are not supported"):
        bn(x)
    np.testing.assert_array_equal(bn.running_mean, 0.0)


def test_ragged_list_names_x():
    with pytest.raises(ValueError, match="x must be an array or a rectangular nested sequence"):
        nbn.forward_train([[1.0, 2.0, 3.0], [1.0, 2.0]])


def test_torch_tensor_that_requires_grad_says_detach(rng):
    x = torch.from_numpy(random_batch(rng, (8, 3), np.float32)).requires_grad_(True)
    with pytest.raises(TypeError, match=r"x is a torch tensor that requires grad: pass x.detach"):
        nbn.forward_train(x)
    np.testing.assert_allclose(nbn.forward_train(x.detach())[0], naive.forward_train(
        x.detach().numpy())[0], rtol=1e-5, atol=1e-5)  # fmt: skip


def test_torch_bfloat16_tensor_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # without the bfloat16 extra
    x = torch.ones((8, 3), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"x is a torch bfloat16 tensor.*x.float\(\)"):
        nbn.forward_train(x)


# ---------------------------------------------------------------------------- layer messages
def test_layer_names_its_channel_count_not_a_weight_the_user_never_passed():
    bn = nbn.BatchNorm(8)
    with pytest.raises(ValueError, match=r"BatchNorm\(num_features=8\) got 7 channels on axis 1"):
        bn(np.ones((4, 7), np.float32))


def test_layer_says_to_use_dtype_or_cast():
    bn = nbn.BatchNorm(3)
    with pytest.raises(TypeError, match=r"dtype=np.float64 or cast x \(x.astype\(np.float32\)\)"):
        bn(np.ones((4, 3)))


@pytest.mark.parametrize("axis", [1.5, [1, 2], True, "1"])
def test_layer_refuses_a_non_integer_axis_at_construction(axis):
    with pytest.raises(TypeError, match="axis must be an integer"):
        nbn.BatchNorm(3, axis=axis)


# ------------------------------------------------------------------------ state and saved input
def test_pickle_holds_the_state_not_the_saved_batch(rng):
    bn = nbn.BatchNorm(8)
    x = random_batch(rng, (64, 8, 64, 64), np.float32)  # 8 MiB
    bn(x)
    data = pickle.dumps(bn)
    assert len(data) < 10_000
    copy = pickle.loads(data)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(copy.state_dict()[key], value)
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        copy.backward(np.ones_like(x))


@pytest.mark.parametrize("training", [True, False])
def test_backward_releases_the_saved_input(rng, training):
    bn = nbn.BatchNorm(4).train(training)
    x = random_batch(rng, (16, 4), np.float32)
    alive = weakref.ref(x)
    bn(x)
    bn.backward(np.ones_like(x))
    del x
    gc.collect()
    assert alive() is None
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        bn.backward(np.ones((16, 4), np.float32))


def test_reset_running_stats_and_parameters_as_torch(rng):
    ours, ref = nbn.BatchNorm(3, dtype=np.float64), _torch_layer(3)
    x = random_batch(rng, (10, 3))
    ours(x), ref(torch.from_numpy(x))
    ours.weight[:] = ref.weight.data.numpy()[:] = [2.0, 3.0, 4.0]
    ours.reset_running_stats(), ref.reset_running_stats()
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[key], value.numpy())
    assert ours.weight[1] == 3.0
    ours.reset_parameters(), ref.reset_parameters()
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[key], value.numpy())
