"""Fused batch norm + residual add + ReLU (issue 13): ``y = activation(BN(x) + residual)`` in
one pass, and its backward, on every backend, against PyTorch autograd of
``relu(batch_norm(x) + z)`` in float64.

Where a float32 value of y lies within rounding of 0, our ReLU and the float64 reference's may
disagree on it; so the reference backward takes the gradient through *our* y's mask (a formula
of the test's own, ``np.where(y > 0, dy, 0)``), and the forward check holds y itself to the
reference. In float64 the reference is plain autograd.
"""

import numpy as np
import pytest
import torch

import numba_bn as nbn

from conftest import LAYOUTS, poison, random_batch

LAYOUT_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in LAYOUTS]
TOL = {np.float32: 3e-5, np.float64: 1e-11}
EPILOGUES = [(None, True), ("relu", False), ("relu", True)]  # (activation, with a residual)
EPILOGUE_IDS = ["add", "relu", "add-relu"]


def _channels_first(array, axis):
    return np.moveaxis(array, axis, 1)


def _torch_reference(x, z, weight, bias, dy, axis, activation, *, mask_from=None, frozen=None):
    """(y, dx, dz, dweight, dbias) of activation(batch_norm(x) + z) by torch autograd in
    float64; ``mask_from``: take the ReLU's gradient mask from this y instead (see above);
    ``frozen``: (running_mean, running_var) for the eval-mode op."""

    def tensor(a, grad=False):
        if a is None:
            return None
        t = torch.tensor(np.ascontiguousarray(a), dtype=torch.float64)
        return t.requires_grad_() if grad else t

    tx = tensor(_channels_first(x, axis), True)
    tz = None if z is None else tensor(_channels_first(z, axis), True)
    tw, tb = tensor(weight, True), tensor(bias, True)
    stats = (None, None) if frozen is None else tuple(tensor(v) for v in frozen)
    pre = torch.nn.functional.batch_norm(tx, *stats, tw, tb, training=frozen is None, eps=1e-5)
    if tz is not None:
        pre = pre + tz
    y = torch.relu(pre) if activation == "relu" else pre
    gradient = _channels_first(dy, axis).astype(np.float64)
    if activation == "relu" and mask_from is not None:
        gradient = np.where(_channels_first(mask_from, axis) > 0, gradient, 0.0)
        pre.backward(torch.tensor(gradient))
    else:
        y.backward(torch.tensor(gradient))

    def back(t):
        return None if t is None else np.moveaxis(t.detach().numpy(), 1, axis)

    dz = None if tz is None else back(tz.grad)
    return back(y), back(tx.grad), dz, tw.grad.numpy(), tb.grad.numpy()


def _close(actual, expected, dtype, scale=1.0):
    actual = np.asarray(actual, dtype=np.float64)
    assert np.all(np.isfinite(actual))
    tolerance = TOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


def _inputs(rng, shape, axis, dtype):
    x = random_batch(rng, shape, dtype, axis=axis)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    z = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, z, weight, bias, dy


# --------------------------------------------------------------------- functional, every backend
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("activation", "with_residual"), EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_fused_train_matches_torch_autograd(rng, backend, shape, axis, dtype, activation,
                                            with_residual):  # fmt: skip
    x, z, weight, bias, dy = _inputs(rng, shape, axis, dtype)
    z = z if with_residual else None
    x_d, z_d, w_d, b_d, dy_d = backend.on(x, z, weight, bias, dy)
    out = backend.poisoned(shape, dtype)
    y, mean, invstd = nbn.forward_train(x_d, w_d, b_d, axis=axis, out=out, residual=z_d,
                                        activation=activation, **backend.call)  # fmt: skip
    assert y is out
    residual_out = backend.poisoned(shape, dtype) if with_residual else None
    dx, dweight, dbias = nbn.backward(dy_d, x_d, mean, invstd, w_d, axis=axis,
                                      activation=activation, y=y, residual_out=residual_out,
                                      **backend.call)  # fmt: skip
    y, dx, dweight, dbias = backend.host(y, dx, dweight, dbias)
    mask_from = y if dtype == np.float32 else None
    y_ref, dx_ref, dz_ref, dw_ref, db_ref = _torch_reference(
        x, z, weight, bias, dy, axis, activation, mask_from=mask_from
    )
    _close(y, y_ref, dtype, scale=10)
    _close(dx, dx_ref, dtype, scale=10)
    _close(dweight, dw_ref, dtype, scale=100)
    _close(dbias, db_ref, dtype, scale=100)
    if with_residual:
        _close(backend.host(residual_out), dz_ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("activation", "with_residual"), EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:4], ids=LAYOUT_IDS[:4])
def test_fused_eval_matches_torch(rng, backend, shape, axis, dtype, activation, with_residual):
    x, z, weight, bias, _ = _inputs(rng, shape, axis, dtype)
    z = z if with_residual else None
    channels = shape[axis]
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.5, 4.0, channels).astype(dtype)
    on = backend.on(x, z, weight, bias, running_mean, running_var)
    x_d, z_d, w_d, b_d, rm_d, rv_d = on
    out = backend.poisoned(shape, dtype)
    y = nbn.forward_eval(x_d, rm_d, rv_d, w_d, b_d, axis=axis, out=out, residual=z_d,
                         activation=activation, **backend.call)  # fmt: skip
    assert y is out
    y_ref = _torch_reference(x, z, weight, bias, np.zeros_like(x), axis, activation,
                             frozen=(running_mean, running_var))[0]  # fmt: skip
    _close(backend.host(y), y_ref, dtype, scale=10)


def test_fused_is_the_composition_bit_for_bit(rng):
    """The epilogue adds and clamps the very value the plain pass stores: bitwise equal to
    relu(forward_train(x) + z) done in three steps, on rows and planes, fused and split."""
    for shape in [(64, 48), (16, 8, 9, 9), (2, 3, 5000), (4, 64, 6, 6)]:
        for dtype in (np.float32, np.float64):
            x, z, weight, bias, _ = _inputs(rng, shape, 1, dtype)
            y, _, _ = nbn.forward_train(x, weight, bias, residual=z, activation="relu")
            plain, _, _ = nbn.forward_train(x, weight, bias)
            composed = plain + z
            composed[composed < 0] = 0
            np.testing.assert_array_equal(y, composed)


def test_relu_keeps_nan_and_its_gradient_stops_there():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]], np.float32)
    z = np.array([[np.nan, 0.0], [0.0, -10.0], [0.0, 10.0]], np.float32)
    y, mean, invstd = nbn.forward_train(x, residual=z, activation="relu")
    assert np.isnan(y[0, 0]) and y[1, 1] == 0 and y[2, 1] > 0
    residual_out = poison(x.shape, np.float32)
    nbn.backward(np.ones_like(x), x, mean, invstd, activation="relu", y=y,
                 residual_out=residual_out)  # fmt: skip
    # torch's threshold_backward: the gradient passes where y > 0 only (not at NaN, not at 0)
    np.testing.assert_array_equal(residual_out, np.where(y > 0, 1.0, 0.0).astype(np.float32))


def test_out_may_be_x_or_the_residual(rng):
    x, z, weight, bias, _ = _inputs(rng, (8, 6, 5, 5), 1, np.float32)
    expected, _, _ = nbn.forward_train(x, weight, bias, residual=z, activation="relu")
    for target in ("x", "residual"):
        x_in, z_in = x.copy(), z.copy()
        out = x_in if target == "x" else z_in
        y, _, _ = nbn.forward_train(x_in, weight, bias, residual=z_in, activation="relu", out=out)
        assert y is out
        np.testing.assert_array_equal(y, expected)


def test_float16_computes_in_float32(rng):
    x, z, weight, bias, dy = _inputs(rng, (16, 4, 3, 3), 1, np.float32)
    x16, z16, dy16 = (a.astype(np.float16) for a in (x, z, dy))
    y, mean, invstd = nbn.forward_train(x16, weight, bias, residual=z16, activation="relu")
    assert y.dtype == np.float16
    residual_out = poison(x.shape, np.float16)
    dx, _, _ = nbn.backward(dy16, x16, mean, invstd, weight, activation="relu", y=y,
                            residual_out=residual_out)  # fmt: skip
    y_ref, dx_ref, dz_ref, _, _ = _torch_reference(
        x16.astype(np.float64), z16.astype(np.float64), weight, bias, dy16, 1, "relu",
        mask_from=y.astype(np.float64),
    )  # fmt: skip
    np.testing.assert_allclose(y.astype(np.float64), y_ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(residual_out.astype(np.float64), dz_ref, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("mode", ["train", "eval", "mask", "ghost"])
def test_layer_fused_matches_torch(rng, mode):
    shape, channels = (16, 6, 4, 4), 6
    x, z, _, _, dy = _inputs(rng, shape, 1, np.float64)
    options = {"virtual_batch_size": 4} if mode == "ghost" else {}
    bn = nbn.BatchNorm(channels, dtype=np.float64, activation="relu", **options)
    bn.weight[:] = rng.uniform(0.5, 2.0, channels)
    bn.bias[:] = rng.standard_normal(channels)
    if mode == "eval":
        bn.running_mean[:] = rng.standard_normal(channels)
        bn.running_var[:] = rng.uniform(0.5, 2.0, channels)
        bn.eval()
    if mode == "mask":
        y = bn(x, residual=z, mask=np.ones((16, 4, 4), bool))
    else:
        y = bn(x, residual=z)
    dx = bn.backward(dy)
    parts = [slice(4 * k, 4 * k + 4) for k in range(4)] if mode == "ghost" else [slice(None)]
    frozen = (bn.running_mean, bn.running_var) if mode == "eval" else None
    dw, db = 0.0, 0.0
    for part in parts:
        y_ref, dx_ref, dz_ref, dw_ref, db_ref = _torch_reference(
            x[part], z[part], bn.weight, bn.bias, dy[part], 1, "relu", frozen=frozen
        )
        _close(y[part], y_ref, np.float64, scale=10)
        _close(dx[part], dx_ref, np.float64, scale=10)
        _close(bn.grad_residual[part], dz_ref, np.float64)
        dw, db = dw + dw_ref, db + db_ref
    _close(bn.grad_weight, dw, np.float64, scale=100)
    _close(bn.grad_bias, db, np.float64, scale=100)


def test_layer_without_residual_has_no_residual_gradient(rng):
    bn = nbn.BatchNorm(4, activation="relu")
    x = random_batch(rng, (8, 4), np.float32)
    y = bn(x)
    assert (y >= 0).all()
    bn.backward(np.ones_like(x))
    assert bn.grad_residual is None
    bn2 = nbn.BatchNorm(4)  # a residual alone: its gradient is dy
    bn2(x, residual=x)
    dy = random_batch(rng, (8, 4), np.float32)
    bn2.backward(dy)
    np.testing.assert_array_equal(bn2.grad_residual, dy)
    assert bn2.grad_residual is not dy


# ------------------------------------------------------------------------------ bad input
def _bad_forward_cases(x, z):
    return [
        ({"activation": "gelu"}, ValueError, "activation"),
        ({"activation": 1}, ValueError, "activation"),
        ({"residual": z[:-1]}, ValueError, "residual"),
        ({"residual": z.astype(np.float64)}, TypeError, "residual"),
        ({"residual": z, "out": z[::-1]}, ValueError, "out"),
    ]


def test_bad_forward_input_is_explained_and_changes_nothing(rng):
    x, z, weight, bias, _ = _inputs(rng, (8, 3, 4), 1, np.float32)
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    for kwargs, error, name in _bad_forward_cases(x, z):
        before = [a.copy() for a in (x, z, running_mean, running_var)]
        out = kwargs.pop("out", None)
        out_before = None if out is None else out.copy()
        for call, extra in (
            (nbn.batch_norm, {"weight": weight, "bias": bias, "training": True}),
            (nbn.forward_eval, {}),
        ):
            with pytest.raises(error, match=name):
                call(x, running_mean, running_var, out=out, **extra, **kwargs)
        for a, b in zip((x, z, running_mean, running_var), before, strict=True):
            np.testing.assert_array_equal(a, b)
        if out is not None:
            np.testing.assert_array_equal(out, out_before)
    with pytest.raises(ValueError, match="activation"):
        nbn.BatchNorm(3, activation="tanh")


def test_bad_backward_input_is_explained_and_changes_nothing(rng):
    x, z, weight, bias, dy = _inputs(rng, (8, 3, 4), 1, np.float32)
    y, mean, invstd = nbn.forward_train(x, weight, bias, residual=z, activation="relu")
    residual_out = poison(x.shape, np.float32)
    dx_out = poison(x.shape, np.float32)
    cases = [
        ({"activation": "relu"}, ValueError, "y is required"),
        ({"activation": "relu", "y": y[:-1]}, ValueError, "y must have the shape"),
        ({"activation": "relu", "y": y.astype(np.float64)}, TypeError, "y must have the dtype"),
        ({"activation": "swish", "y": y}, ValueError, "activation"),
        ({"activation": "relu", "y": y, "residual_out": x}, ValueError, "residual_out shares"),
        ({"activation": "relu", "y": y, "residual_out": dy}, ValueError, "residual_out shares"),
        ({"activation": "relu", "y": y, "residual_out": y}, ValueError, "residual_out shares"),
        (
            {"activation": "relu", "y": y, "residual_out": dx_out, "out": dx_out},
            ValueError,
            "residual_out shares",
        ),  # fmt: skip
        ({"residual_out": residual_out[:-1]}, ValueError, "residual_out must have the shape"),
        # a later argument is wrong: residual_out must still be untouched
        (
            {"activation": "relu", "y": y, "residual_out": residual_out, "weight": weight[:2]},
            ValueError,
            "weight",
        ),  # fmt: skip
    ]
    for kwargs, error, message in cases:
        kwargs = dict(kwargs)
        w = kwargs.pop("weight", weight)
        snapshot = [a.copy() for a in (x, dy, y, dx_out)]
        with pytest.raises(error, match=message):
            nbn.backward(dy, x, mean, invstd, w, **kwargs)
        for a, b in zip((x, dy, y, dx_out), snapshot, strict=True):
            np.testing.assert_array_equal(a, b)
        assert np.isnan(residual_out).all()
