"""Group, layer and instance norm (numba_bn.norms, norm_ops, norm_checks, norm_layers): against
float64 loops written here, against PyTorch's functions and modules (autograd for the
gradients), and the library's own guarantees: same statistics as batch norm's kernels on the
view, bitwise the same for 1 and 2 threads, out= written whole, bad input rejected with nothing
modified."""

import math
import re

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from numba_bn.cpu import CpuBackend
from numba_bn.norm_layers import GroupNorm, InstanceNorm, LayerNorm
from numba_bn.norms import (
    group_norm,
    group_norm_backward,
    group_norm_forward,
    instance_norm,
    instance_norm_backward,
    instance_norm_forward,
    layer_norm,
    layer_norm_backward,
    layer_norm_forward,
)

from conftest import poison

EPS = 1e-5
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


# ------------------------------------------------------------------------ float64 references
# Units are the sets of values normalised together, one per row of a (U, M) array; the affine
# arrives broadcast to the same (U, M). Two-pass statistics with math.fsum; the backward is the
# textbook chain rule through mean and variance (Ioffe & Szegedy 2015, section 3), not the
# three-term formula the kernels use.
def naive_units_forward(units, weight, bias, eps):
    y = np.empty_like(units)
    mean, invstd = np.empty(len(units)), np.empty(len(units))
    for u, values in enumerate(units):
        mu = math.fsum(values) / values.size
        var = math.fsum((values - mu) ** 2) / values.size
        mean[u], invstd[u] = mu, 1.0 / math.sqrt(var + eps)
        y[u] = (values - mu) * invstd[u] * weight[u] + bias[u]
    return y, mean, invstd


def naive_units_backward(dy, units, weight, eps):
    """dx, and dy * x_hat (elementwise, for the caller to reduce into dweight)."""
    dx, dy_xhat = np.empty_like(units), np.empty_like(units)
    for u, values in enumerate(units):
        m = values.size
        mu = math.fsum(values) / m
        xmu = values - mu
        var = math.fsum(xmu**2) / m
        std = math.sqrt(var + eps)
        dxhat = dy[u] * weight[u]
        dvar = math.fsum(dxhat * xmu) * -0.5 * std**-3
        dmu = -math.fsum(dxhat) / std + dvar * math.fsum(-2.0 * xmu) / m
        dx[u] = dxhat / std + dvar * 2.0 * xmu / m + dmu / m
        dy_xhat[u] = dy[u] * xmu / std
    return dx, dy_xhat


def channels_first(x, axis):
    return np.moveaxis(np.asarray(x, np.float64), axis, 1)


def naive_group_norm(x, groups, weight, bias, eps=EPS, axis=1):
    xf = channels_first(x, axis)
    n, c = xf.shape[:2]
    per = xf.reshape(n, c, -1)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
    w_units = np.broadcast_to(w[None, :, None], per.shape).reshape(n * groups, -1)
    b_units = np.broadcast_to(b[None, :, None], per.shape).reshape(n * groups, -1)
    y, mean, invstd = naive_units_forward(per.reshape(n * groups, -1), w_units, b_units, eps)
    y = np.moveaxis(y.reshape(xf.shape), 1, axis)
    return y, mean.reshape(n, groups), invstd.reshape(n, groups)


def naive_group_backward(dy, x, groups, weight, eps=EPS, axis=1):
    xf, gf = channels_first(x, axis), channels_first(dy, axis)
    n, c = xf.shape[:2]
    per = xf.reshape(n, c, -1)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    w_units = np.broadcast_to(w[None, :, None], per.shape).reshape(n * groups, -1)
    dx, dy_xhat = naive_units_backward(gf.reshape(n * groups, -1), per.reshape(n * groups, -1),
                                       w_units, eps)  # fmt: skip
    dweight = dy_xhat.reshape(per.shape).sum(axis=(0, 2))
    dbias = gf.reshape(per.shape).sum(axis=(0, 2))
    return np.moveaxis(dx.reshape(xf.shape), 1, axis), dweight, dbias


def naive_layer_norm(x, shape, weight, bias, eps=EPS):
    x = np.asarray(x, np.float64)
    units = x.reshape(-1, math.prod(shape))
    w = np.ones(units.shape[1]) if weight is None else np.asarray(weight, np.float64).ravel()
    b = np.zeros(units.shape[1]) if bias is None else np.asarray(bias, np.float64).ravel()
    y, mean, invstd = naive_units_forward(units, np.broadcast_to(w, units.shape),
                                          np.broadcast_to(b, units.shape), eps)  # fmt: skip
    lead = x.shape[: x.ndim - len(shape)]
    return y.reshape(x.shape), mean.reshape(lead), invstd.reshape(lead)


def naive_layer_backward(dy, x, shape, weight, eps=EPS):
    x = np.asarray(x, np.float64)
    units = x.reshape(-1, math.prod(shape))
    w = np.ones(units.shape[1]) if weight is None else np.asarray(weight, np.float64).ravel()
    gu = np.asarray(dy, np.float64).reshape(units.shape)
    dx, dy_xhat = naive_units_backward(gu, units, np.broadcast_to(w, units.shape), eps)
    return dx.reshape(x.shape), dy_xhat.sum(0).reshape(shape), gu.sum(0).reshape(shape)


# ----------------------------------------------------------------------------------- helpers
def make(rng, shape, dtype, loc=None, scale=None):
    """Values with a non-zero mean and a scale that varies from call to call."""
    loc = rng.uniform(-5, 5) if loc is None else loc
    scale = 10.0 ** rng.uniform(-1, 1) if scale is None else scale
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def tensor(a, grad=False):
    return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


def dx_scale(dy, weight, invstd):
    """The size of dx's terms, |dy * weight * invstd|, which its rounding error scales with
    (a group of equal values has dx = 0 from terms of this size)."""
    w = 1.0 if weight is None else np.abs(np.asarray(weight, np.float64)).max()
    return np.abs(np.asarray(dy, np.float64)).max() * w * np.asarray(invstd, np.float64).max()


def grad_scale(expected, dy):
    """The scale of a parameter gradient's error: its size, or |dy| where it sums to ~0."""
    return max(10 * np.abs(expected).max(), np.abs(np.asarray(dy, np.float64)).max())


def close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol["rtol"],
                               atol=tol["atol"] * scale)  # fmt: skip


@pytest.fixture
def threads():
    """numba's thread count, restored after the test."""
    before = numba.get_num_threads()
    yield numba.set_num_threads
    numba.set_num_threads(before)


GROUP_CASES = [  # shape (channels on axis 1), groups
    ((2, 6, 5), 3),
    ((3, 8, 4, 5), 4),
    ((2, 12, 3, 2, 3), 2),
    ((4, 6), 6),  # no spatial dimensions
    ((64, 24), 4),  # no spatial dimensions, groups of several channels: one value a plane
    ((1, 4, 70, 70), 1),  # one group, planes longer than a PLANE_BLOCK
    ((5, 16, 9, 9), 8),
]


# ------------------------------------------------------------------------------- group norm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "groups"), GROUP_CASES)
def test_group_norm_matches_float64_loops(shape, groups, dtype):
    rng = np.random.default_rng(hash((shape, groups)) % 2**32)
    x = make(rng, shape, dtype)
    weight, bias = make(rng, shape[1], dtype, 0.5, 1.0), make(rng, shape[1], dtype, 0.0, 1.0)
    y, mean, invstd = group_norm_forward(x, groups, weight, bias)
    ref_y, ref_mean, ref_invstd = naive_group_norm(x, groups, weight, bias)
    assert y.dtype == dtype and mean.shape == invstd.shape == (shape[0], groups)
    close(y, ref_y, dtype)
    close(mean, ref_mean, dtype, np.abs(ref_mean).max())
    close(invstd, ref_invstd, dtype, np.abs(ref_invstd).max())
    dy = make(rng, shape, dtype, 0.3, 1.0)
    dx, dweight, dbias = group_norm_backward(dy, x, mean, invstd, groups, weight)
    ref_dx, ref_dweight, ref_dbias = naive_group_backward(dy, x, groups, weight)
    close(dx, ref_dx, dtype, dx_scale(dy, weight, ref_invstd))
    close(dweight, ref_dweight, dtype, grad_scale(ref_dweight, dy))
    close(dbias, ref_dbias, dtype, grad_scale(ref_dbias, dy))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "groups"), GROUP_CASES[:4])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch_with_autograd(shape, groups, dtype, affine):
    rng = np.random.default_rng(7)
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.0, 1.0)
    weight = make(rng, shape[1], dtype, 1.0, 0.5) if affine else None
    bias = make(rng, shape[1], dtype, 0.0, 0.5) if affine else None
    y, mean, invstd = group_norm_forward(x, groups, weight, bias)
    tx, tw, tb = tensor(x, True), *(None if v is None else tensor(v, True) for v in (weight, bias))
    ty = F.group_norm(tx, groups, tw, tb, EPS)
    ty.backward(tensor(dy))
    close(y, ty.detach().numpy(), dtype)
    n, c = shape[:2]
    _, t_mean, t_rstd = torch.ops.aten.native_group_norm(tensor(x), None, None, n, c,
                                                        x[0, 0].size, groups, EPS)  # fmt: skip
    close(mean, t_mean.numpy(), dtype, np.abs(t_mean.numpy()).max())
    close(invstd, t_rstd.numpy(), dtype, np.abs(t_rstd.numpy()).max())
    dx, dweight, dbias = group_norm_backward(dy, x, mean, invstd, groups, weight)
    close(dx, tx.grad.numpy(), dtype, dx_scale(dy, weight, t_rstd.numpy()))
    if affine:
        close(dweight, tw.grad.numpy(), dtype, grad_scale(tw.grad.numpy(), dy))
        close(dbias, tb.grad.numpy(), dtype, grad_scale(tb.grad.numpy(), dy))


@pytest.mark.parametrize("axis", [-1, 2])
def test_group_norm_channels_last_through_axis(axis):
    rng = np.random.default_rng(11)
    first = make(rng, (3, 8, 5, 6), np.float32)
    x = np.ascontiguousarray(np.moveaxis(first, 1, axis))
    weight, bias = make(rng, 8, np.float32, 1.0, 0.5), make(rng, 8, np.float32, 0.0, 0.5)
    dy_first = make(rng, first.shape, np.float32, 0.0, 1.0)
    dy = np.ascontiguousarray(np.moveaxis(dy_first, 1, axis))
    y, mean, invstd = group_norm_forward(x, 4, weight, bias, axis=axis)
    y1, mean1, invstd1 = group_norm_forward(first, 4, weight, bias)
    np.testing.assert_array_equal(y, np.moveaxis(y1, 1, axis))  # one copy to channels first
    np.testing.assert_array_equal(mean, mean1)
    dx, dweight, dbias = group_norm_backward(dy, x, mean, invstd, 4, weight, axis=axis)
    dx1, dweight1, dbias1 = group_norm_backward(dy_first, first, mean1, invstd1, 4, weight)
    np.testing.assert_array_equal(dx, np.moveaxis(dx1, 1, axis))
    np.testing.assert_array_equal(dweight, dweight1)
    assert y.flags.c_contiguous and dx.flags.c_contiguous


def test_group_norm_with_zero_weights_keeps_the_gradient_of_x():
    """The weight sits inside the group sums: a zero weight must not be divided back out."""
    rng = np.random.default_rng(3)
    x, dy = make(rng, (2, 4, 6), np.float64), make(rng, (2, 4, 6), np.float64, 0.0, 1.0)
    weight = np.array([0.0, 1.5, 0.0, -2.0])
    _, mean, invstd = group_norm_forward(x, 2, weight)
    dx, dweight, _ = group_norm_backward(dy, x, mean, invstd, 2, weight)
    ref_dx, ref_dweight, _ = naive_group_backward(dy, x, 2, weight)
    assert np.isfinite(dx).all() and np.abs(dx).max() > 0
    close(dx, ref_dx, np.float64)
    close(dweight, ref_dweight, np.float64, 10)


@pytest.mark.parametrize("op", ["group", "layer"])
def test_exact_for_a_large_mean_and_a_small_spread(op):
    """float32 x = 1e4 + 1e-2 * noise: x - mean needs the mean to float64 accuracy (hi + lo),
    forward and backward. The layers keep the float64 statistics (a float32 mean is off by
    1e-4 here, 1% of the spread: the functions' float32 statistics would not do)."""
    rng = np.random.default_rng(5)
    x = make(rng, (2, 4, 32, 32), np.float32, 1e4, 1e-2)
    dy = make(rng, x.shape, np.float32, 0.0, 1.0)
    if op == "group":
        layer = GroupNorm(2, 4, affine=False)
        ref_y, _, ref_invstd = naive_group_norm(x, 2, None, None)
        ref_dx = naive_group_backward(dy, x, 2, None)[0]
    else:
        layer = LayerNorm((32, 32), elementwise_affine=False)
        ref_y, _, ref_invstd = naive_layer_norm(x, (32, 32), None, None)
        ref_dx = naive_layer_backward(dy, x, (32, 32), None)[0]
    y = layer(x)
    dx = layer.backward(dy)
    np.testing.assert_allclose(y, ref_y, atol=2e-5)
    close(dx, ref_dx, np.float32, dx_scale(dy, None, ref_invstd))


def test_group_statistics_are_batch_norms_on_the_grouped_view():
    """Same kernel, same merge order: bitwise the statistics of CpuBackend.batch_stats."""
    rng = np.random.default_rng(9)
    x = make(rng, (3, 8, 40, 40), np.float32)
    _, mean, invstd = group_norm_forward(x, 4)
    view = x.reshape(1, 12, -1)
    batch_mean, m2 = np.empty(12), np.empty(12)
    count = CpuBackend().batch_stats(view, mean=batch_mean, m2=m2)
    np.testing.assert_array_equal(mean.ravel(), batch_mean.astype(np.float32))
    np.testing.assert_array_equal(
        invstd.ravel(), (1 / np.sqrt(m2 / count + EPS)).astype(np.float32)
    )


# ------------------------------------------------------------------------------- layer norm
LAYER_CASES = [  # shape, normalized_shape
    ((4, 10), (10,)),
    ((2, 3, 17), (17,)),
    ((3, 5, 6), (5, 6)),
    ((2, 3, 4, 5), (3, 4, 5)),
    ((6, 5000), 5000),  # rows longer than a PLANE_BLOCK
    ((7,), (7,)),  # no leading dimensions
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "normalized"), LAYER_CASES)
def test_layer_norm_matches_float64_loops(shape, normalized, dtype):
    rng = np.random.default_rng(hash(shape) % 2**32)
    dims = (normalized,) if isinstance(normalized, int) else normalized
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.2, 1.0)
    weight, bias = make(rng, dims, dtype, 1.0, 0.5), make(rng, dims, dtype, 0.0, 0.5)
    y, mean, invstd = layer_norm_forward(x, normalized, weight, bias)
    ref_y, ref_mean, ref_invstd = naive_layer_norm(x, dims, weight, bias)
    assert mean.shape == shape[: len(shape) - len(dims)] and y.dtype == dtype
    close(y, ref_y, dtype)
    close(mean, ref_mean, dtype, np.abs(ref_mean).max())
    close(invstd, ref_invstd, dtype, np.abs(ref_invstd).max())
    dx, dweight, dbias = layer_norm_backward(dy, x, mean, invstd, normalized, weight)
    ref_dx, ref_dweight, ref_dbias = naive_layer_backward(dy, x, dims, weight)
    assert dweight.shape == dbias.shape == dims
    close(dx, ref_dx, dtype, dx_scale(dy, weight, ref_invstd))
    close(dweight, ref_dweight, dtype, grad_scale(ref_dweight, dy))
    close(dbias, ref_dbias, dtype, grad_scale(ref_dbias, dy))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "normalized"), LAYER_CASES[:4])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_matches_torch_with_autograd(shape, normalized, dtype, affine):
    rng = np.random.default_rng(13)
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.0, 1.0)
    weight = make(rng, normalized, dtype, 1.0, 0.5) if affine != "none" else None
    bias = make(rng, normalized, dtype, 0.0, 0.5) if affine == "both" else None
    y, mean, invstd = layer_norm_forward(x, normalized, weight, bias)
    tx, tw, tb = tensor(x, True), *(None if v is None else tensor(v, True) for v in (weight, bias))
    ty = F.layer_norm(tx, normalized, tw, tb, EPS)
    ty.backward(tensor(dy))
    close(y, ty.detach().numpy(), dtype)
    dx, dweight, dbias = layer_norm_backward(dy, x, mean, invstd, normalized, weight)
    close(dx, tx.grad.numpy(), dtype, dx_scale(dy, weight, invstd))
    if tw is not None:
        close(dweight, tw.grad.numpy(), dtype, grad_scale(tw.grad.numpy(), dy))
    if tb is not None:
        close(dbias, tb.grad.numpy(), dtype, grad_scale(tb.grad.numpy(), dy))


def test_layer_statistics_are_batch_norms_on_the_row_view():
    rng = np.random.default_rng(17)
    x = make(rng, (6, 7, 900), np.float32)
    _, mean, _ = layer_norm_forward(x, 900)
    batch_mean, m2 = np.empty(42), np.empty(42)
    CpuBackend().batch_stats(x.reshape(1, 42, 900), mean=batch_mean, m2=m2)
    np.testing.assert_array_equal(mean.ravel(), batch_mean.astype(np.float32))


# ---------------------------------------------------------------------------- instance norm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 7), (3, 4, 5, 6), (2, 2, 3, 4, 5)])
def test_instance_norm_matches_torch_with_running_stats(shape, dtype):
    rng = np.random.default_rng(19)
    channels = shape[1]
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.0, 1.0)
    weight, bias = make(rng, channels, dtype, 1.0, 0.5), make(rng, channels, dtype, 0.0, 0.5)
    running_mean, running_var = make(rng, channels, dtype, 0.5, 0.1), np.full(channels, 2, dtype)
    t_mean, t_var = tensor(running_mean), tensor(running_var)
    y, mean, invstd = instance_norm_forward(x, running_mean, running_var, weight, bias,
                                            momentum=0.3)  # fmt: skip
    tx, tw, tb = tensor(x, True), tensor(weight, True), tensor(bias, True)
    ty = F.instance_norm(tx, t_mean, t_var, tw, tb, use_input_stats=True, momentum=0.3, eps=EPS)
    ty.backward(tensor(dy))
    close(y, ty.detach().numpy(), dtype)
    close(running_mean, t_mean.numpy(), dtype, 10)
    close(running_var, t_var.numpy(), dtype, 10)
    assert mean.shape == invstd.shape == shape[:2]
    dx, dweight, dbias = instance_norm_backward(dy, x, mean, invstd, weight)
    close(dx, tx.grad.numpy(), dtype, dx_scale(dy, weight, invstd))
    close(dweight, tw.grad.numpy(), dtype, grad_scale(tw.grad.numpy(), dy))
    close(dbias, tb.grad.numpy(), dtype, grad_scale(tb.grad.numpy(), dy))
    # frozen: the running statistics normalise
    y_eval = instance_norm(x, running_mean, running_var, weight, bias, use_input_stats=False)
    t_eval = F.instance_norm(tensor(x), t_mean, t_var, tensor(weight), tensor(bias),
                             use_input_stats=False, eps=EPS)  # fmt: skip
    close(y_eval, t_eval.numpy(), dtype)


def test_instance_norm_is_group_norm_with_a_group_per_channel():
    rng = np.random.default_rng(23)
    x = make(rng, (3, 6, 11, 4), np.float32)
    weight, bias = make(rng, 6, np.float32), make(rng, 6, np.float32)
    y, mean, invstd = instance_norm_forward(x, weight=weight, bias=bias)
    y_group, mean_group, _ = group_norm_forward(x, 6, weight, bias)
    np.testing.assert_array_equal(y, y_group)
    np.testing.assert_array_equal(mean, mean_group)


def test_instance_norm_channels_last():
    rng = np.random.default_rng(29)
    first = make(rng, (2, 5, 6, 7), np.float64)
    x = np.ascontiguousarray(np.moveaxis(first, 1, -1))
    y = instance_norm(x, axis=-1)
    close(np.moveaxis(y, -1, 1), F.instance_norm(tensor(first)).numpy(), np.float64)


# One sample, (C, *spatial): PyTorch's InstanceNorm1d/2d/3d tell it from a batch by its rank,
# which spatial_dims gives here.
SAMPLE_CASES = [(torch.nn.InstanceNorm1d, (4, 9)), (torch.nn.InstanceNorm2d, (4, 5, 6)),
                (torch.nn.InstanceNorm3d, (4, 3, 4, 5))]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("module_type", "shape"), SAMPLE_CASES)
def test_one_sample_is_normalised_as_torch_modules_do(module_type, shape, dtype):
    """The module unsqueezes the sample, runs the functional, squeezes: outputs, autograd's
    gradients and the running update must agree, with statistics (C,)."""
    rng = np.random.default_rng(97)
    channels, spatial = shape[0], len(shape) - 1
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.0, 1.0)
    weight, bias = make(rng, channels, dtype, 1.0, 0.5), make(rng, channels, dtype, 0.0, 0.5)
    running_mean, running_var = make(rng, channels, dtype, 0.5, 0.1), np.full(channels, 2, dtype)
    module = module_type(channels, affine=True, track_running_stats=True, momentum=0.3).double()
    with torch.no_grad():
        module.weight.copy_(tensor(weight)), module.bias.copy_(tensor(bias))
        (
            module.running_mean.copy_(tensor(running_mean)),
            module.running_var.copy_(tensor(running_var)),
        )
    tx = tensor(x, True)
    ty = module(tx)
    ty.backward(tensor(dy))
    y, mean, invstd = instance_norm_forward(x, running_mean, running_var, weight, bias,
                                            momentum=0.3, spatial_dims=spatial)  # fmt: skip
    assert y.shape == shape and mean.shape == invstd.shape == (channels,)
    close(y, ty.detach().numpy(), dtype)
    close(running_mean, module.running_mean.numpy(), dtype, 10)
    close(running_var, module.running_var.numpy(), dtype, 10)
    dx, dweight, dbias = instance_norm_backward(dy, x, mean, invstd, weight,
                                                spatial_dims=spatial)  # fmt: skip
    assert dx.shape == shape and dweight.shape == dbias.shape == (channels,)
    close(dx, tx.grad.numpy(), dtype, dx_scale(dy, weight, invstd))
    close(dweight, module.weight.grad.numpy(), dtype, grad_scale(module.weight.grad.numpy(), dy))
    close(dbias, module.bias.grad.numpy(), dtype, grad_scale(module.bias.grad.numpy(), dy))
    module.eval()
    y_eval = instance_norm(x, running_mean, running_var, weight, bias, use_input_stats=False,
                           spatial_dims=spatial)  # fmt: skip
    close(y_eval, module(tensor(x)).detach().numpy(), dtype)


@pytest.mark.parametrize("axis", [1, -1])
def test_one_sample_is_bitwise_a_batch_of_one(axis):
    rng = np.random.default_rng(101)
    x = make(rng, (5, 6, 7), np.float32)  # channels first (axis 1) or last (axis -1) of a batch
    dy = make(rng, x.shape, np.float32, 0.0, 1.0)
    weight = make(rng, 5 if axis == 1 else 7, np.float32, 1.0, 0.5)
    buffers = [np.zeros(weight.size, np.float32), np.ones(weight.size, np.float32)]
    batch_buffers = [b.copy() for b in buffers]
    y, mean, invstd = instance_norm_forward(x, *buffers, weight, weight, axis=axis,
                                            spatial_dims=2)  # fmt: skip
    y1, mean1, invstd1 = instance_norm_forward(x[None], *batch_buffers, weight, weight,
                                               axis=axis)  # fmt: skip
    np.testing.assert_array_equal(y, y1[0])
    np.testing.assert_array_equal(mean, mean1[0])
    np.testing.assert_array_equal(invstd, invstd1[0])
    for buffer, batch_buffer in zip(buffers, batch_buffers, strict=True):
        np.testing.assert_array_equal(buffer, batch_buffer)
    grads = instance_norm_backward(dy, x, mean, invstd, weight, axis=axis, spatial_dims=2)
    grads1 = instance_norm_backward(dy[None], x[None], mean1, invstd1, weight, axis=axis)
    np.testing.assert_array_equal(grads[0], grads1[0][0])
    for grad, grad1 in zip(grads[1:], grads1[1:], strict=True):
        np.testing.assert_array_equal(grad, grad1)
    # a batch is still a batch with spatial_dims
    y2 = instance_norm(x[None].repeat(2, 0), weight=weight, bias=weight, axis=axis, spatial_dims=2)
    np.testing.assert_array_equal(y2[1], y)


def test_one_sample_out_is_written_whole_and_may_be_x():
    rng = np.random.default_rng(103)
    x, dy = make(rng, (3, 8, 5), np.float64), make(rng, (3, 8, 5), np.float64, 0.0, 1.0)
    expected, mean, invstd = instance_norm_forward(x, spatial_dims=2)
    out = np.full(x.shape, np.nan)
    assert instance_norm(x, spatial_dims=2, out=out) is out
    np.testing.assert_array_equal(out, expected)
    expected_dx = instance_norm_backward(dy, x, mean, invstd, spatial_dims=2)[0]
    out = np.full(x.shape, np.nan)
    assert instance_norm_backward(dy, x, mean, invstd, spatial_dims=2, out=out)[0] is out
    np.testing.assert_array_equal(out, expected_dx)
    assert instance_norm(x, spatial_dims=2, out=x) is x  # the batch of one is a view of x
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize(("module_type", "shape"), SAMPLE_CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_instance_layer_takes_one_sample_as_torch_modules(module_type, shape, affine):
    rng = np.random.default_rng(107)
    channels, spatial = shape[0], len(shape) - 1
    module = module_type(channels, affine=affine, track_running_stats=True,
                         momentum=0.2).double()  # fmt: skip
    layer = InstanceNorm(channels, affine=affine, track_running_stats=True, momentum=0.2,
                         dtype=np.float64, spatial_dims=spatial)  # fmt: skip
    if affine:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, channels, dtype=torch.float64))
            module.bias.copy_(torch.linspace(-1, 1, channels, dtype=torch.float64))
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    for sample_shape in (shape, (3, *shape)):  # one sample, then a batch, as the module takes
        _same_step(layer, module, rng, sample_shape)
    close(layer.running_mean, module.running_mean.numpy(), np.float64)
    close(layer.running_var, module.running_var.numpy(), np.float64)
    layer.eval(), module.eval()  # the running statistics normalise; a frozen backward
    _same_step(layer, module, rng, shape)


# ------------------------------------------------------------------------------- float16
@pytest.mark.parametrize("op", ["group", "layer", "instance"])
def test_float16_is_computed_in_float32(op):
    rng = np.random.default_rng(31)
    x16 = make(rng, (2, 8, 6, 5), np.float16, 2.0, 3.0)
    dy16 = make(rng, x16.shape, np.float16, 0.0, 1.0)
    w = make(rng, (6, 5) if op == "layer" else 8, np.float16, 1.0, 0.5)
    tx, tw = tensor(x16.astype(np.float32), True), tensor(w.astype(np.float32), True)
    if op == "group":
        y, mean, invstd = group_norm_forward(x16, 4, w, w)
        dx, dweight, _ = group_norm_backward(dy16, x16, mean, invstd, 4, w)
        ty = F.group_norm(tx, 4, tw, tw.detach(), EPS)
    elif op == "layer":
        y, mean, invstd = layer_norm_forward(x16, (6, 5), w, w)
        dx, dweight, _ = layer_norm_backward(dy16, x16, mean, invstd, (6, 5), w)
        ty = F.layer_norm(tx, (6, 5), tw, tw.detach(), EPS)
    else:
        y, mean, invstd = instance_norm_forward(x16, weight=w, bias=w)
        dx, dweight, _ = instance_norm_backward(dy16, x16, mean, invstd, w)
        ty = F.instance_norm(tx, weight=tw, bias=tw.detach(), eps=EPS)
    ty.backward(tensor(dy16.astype(np.float32)))
    assert y.dtype == dx.dtype == np.float16 and mean.dtype == dweight.dtype == np.float32
    np.testing.assert_allclose(y.astype(np.float32), ty.detach().numpy(), rtol=2e-3, atol=4e-3)
    np.testing.assert_allclose(dx.astype(np.float32), tx.grad.numpy(), rtol=2e-3, atol=4e-3)
    np.testing.assert_allclose(dweight, tw.grad.numpy(), rtol=2e-3, atol=0.05)


# ------------------------------------------------------------------------ out= and threads
def _all_ops(rng, dtype, axis=1):
    """(name, call(out)) of every forward and backward, on one input."""
    shape = (2, 6, 5, 4) if axis == 1 else (2, 5, 4, 6)
    x, dy = make(rng, shape, dtype), make(rng, shape, dtype, 0.0, 1.0)
    w = make(rng, 6, dtype, 1.0, 0.5)
    lw = make(rng, shape[2:], dtype, 1.0, 0.5)
    _, gm, gi = group_norm_forward(x, 3, w, w, axis=axis)
    _, lm, li = layer_norm_forward(x, shape[2:], lw, lw)
    _, im, ii = instance_norm_forward(x, weight=w, bias=w, axis=axis)
    return (
        [
            ("group", lambda out: group_norm(x, 3, w, w, axis=axis, out=out)),
            (
                "group_backward",
                lambda out: group_norm_backward(dy, x, gm, gi, 3, w, axis=axis, out=out)[0],
            ),  # fmt: skip
            ("layer", lambda out: layer_norm(x, shape[2:], lw, lw, out=out)),
            (
                "layer_backward",
                lambda out: layer_norm_backward(dy, x, lm, li, shape[2:], lw, out=out)[0],
            ),  # fmt: skip
            ("instance", lambda out: instance_norm(x, weight=w, bias=w, axis=axis, out=out)),
            (
                "instance_backward",
                lambda out: instance_norm_backward(dy, x, im, ii, w, axis=axis, out=out)[0],
            ),  # fmt: skip
        ],
        x,
    )


@pytest.mark.parametrize(("dtype", "axis"), [(np.float32, 1), (np.float64, -1), (np.float16, 1)])
def test_out_is_written_whole(dtype, axis):
    rng = np.random.default_rng(37)
    ops, x = _all_ops(rng, dtype, axis)
    for name, call in ops:
        expected = call(None)
        out = np.full(x.shape, np.nan, dtype)
        result = call(out)
        assert result is out, name
        np.testing.assert_array_equal(out, expected, err_msg=name)


def test_forward_in_place():
    rng = np.random.default_rng(41)
    x = make(rng, (3, 4, 9), np.float32)
    expected = group_norm(x, 2)
    assert group_norm(x, 2, out=x) is x
    np.testing.assert_array_equal(x, expected)
    x = make(rng, (3, 4, 9), np.float32)
    expected = layer_norm(x, (4, 9))
    layer_norm(x, (4, 9), out=x)
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("shape", [(3, 8, 5, 4), (40, 16)])  # planes; (N, C): rows of values
def test_in_place_of_an_input_gets_the_bits_it_gets_apart(shape):
    """dx into dy or into x (``out``), and y into x: the bits of a result into a new array (each
    value is read before the result is written at its index; with dx into dy, group norm's runs
    and layer norm's weighted rows, and layer norm's affine with weight and bias into x, read
    and write one array: kernels.one_memory)."""
    rng = np.random.default_rng(43)
    x, dy = make(rng, shape, np.float32), make(rng, shape, np.float32, 0.0, 1.0)
    w, lw = make(rng, shape[1], np.float32, 1.0, 0.5), make(rng, shape[1:], np.float32, 1.0, 0.5)
    _, mean, invstd = group_norm_forward(x, 4, w)
    _, row_mean, row_invstd = layer_norm_forward(x, shape[1:], lw)
    calls = {
        "group": lambda dy, x, out: group_norm_backward(dy, x, mean, invstd, 4, w, out=out),
        "layer": lambda dy, x, out: layer_norm_backward(
            dy, x, row_mean, row_invstd, shape[1:], lw, out=out
        ),  # fmt: skip
    }
    for name, call in calls.items():
        expected = call(dy, x, None)
        assert np.all(np.isfinite(expected[0])), name
        into_dy, into_x = dy.copy(), x.copy()
        for got in (call(into_dy, x, into_dy), call(dy, into_x, into_x)):
            assert got[0] is into_dy or got[0] is into_x, name
            for value, want in zip(got, expected, strict=True):
                np.testing.assert_array_equal(value, want, err_msg=name)
    lb = make(rng, shape[1:], np.float32, 0.0, 0.5)
    for forward in (lambda x, out: group_norm(x, 4, w, w, out=out),
                    lambda x, out: layer_norm(x, shape[1:], lw, lb, out=out)):  # fmt: skip
        into_x = x.copy()
        assert forward(into_x, into_x) is into_x
        np.testing.assert_array_equal(into_x, forward(x, None))


def _plain_and_checked(monkeypatch, rng, dtype, into):
    """(name, results of a plain call, results of the same call through the checks): eps as
    np.float64 is not a Python float, so the second call takes the checked path. The plain
    calls run with the checked functions made to fail, so they must not reach them. ``into``:
    the calls write into out= arrays (poisoned first), which they must return."""
    from numba_bn import norm_ops

    x, dy = make(rng, (3, 8, 5, 4), dtype), make(rng, (3, 8, 5, 4), dtype, 0.0, 1.0)
    w, b = make(rng, 8, dtype, 1.0, 0.5), make(rng, 8, dtype, 0.0, 0.5)
    lw, lb = make(rng, (5, 4), dtype, 1.0, 0.5), make(rng, (5, 4), dtype, 0.0, 0.5)
    outs = []

    def out():
        if not into:
            return None
        outs.append(poison(x.shape, dtype))
        return outs[-1]

    def calls(eps):
        buffers = [np.full(8, 0.5, dtype), np.full(8, 2.0, dtype)]
        y, gm, gi = group_norm_forward(x, 4, w, b, eps, out=out())
        yield "group", (y, gm, gi, *group_norm_backward(dy, x, gm, gi, 4, w, out=out()))
        y, lm, li = layer_norm_forward(x, (5, 4), lw, lb, eps, out=out())
        yield "layer", (y, lm, li, *layer_norm_backward(dy, x, lm, li, (5, 4), lw, out=out()))
        y, im, ii = instance_norm_forward(x, *buffers, w, b, momentum=0.25, eps=eps, out=out())
        grads = instance_norm_backward(dy, x, im, ii, w, out=out())
        yield "instance", (y, im, ii, *grads, *buffers)

    checked = dict(calls(np.float64(EPS)))
    for name in ("group_forward", "group_backward", "layer_forward", "layer_backward"):
        monkeypatch.setattr(norm_ops, f"_checked_{name}", None)  # calling it raises TypeError
    monkeypatch.setattr(norm_ops, "ChannelsFirst", None)
    outs.clear()
    plain = dict(calls(EPS))
    if into:  # what each call wrote into and returned: y, dx of each norm
        results = [plain[name][i] for name in ("group", "layer", "instance") for i in (0, 3)]
        assert len(outs) == 6 and all(a is b for a, b in zip(results, outs, strict=True))
    return [(name, plain[name], checked[name]) for name in checked]


@pytest.mark.parametrize("into", [False, True], ids=["new arrays", "out="])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_calls_take_no_checks_and_give_the_checked_bits(monkeypatch, dtype, into):
    cases = _plain_and_checked(monkeypatch, np.random.default_rng(79), dtype, into)
    for name, plain, checked in cases:
        assert len(plain) == len(checked), name
        for one, other in zip(plain, checked, strict=True):
            assert one.dtype == other.dtype and one.shape == other.shape, name
            np.testing.assert_array_equal(one, other, err_msg=name)


PARALLEL_CASES = [  # large enough for the cost model to use every thread
    ("group", (8, 32, 24, 24), 8),
    ("group", (1, 4, 128, 128), 2),  # fewer groups than 2 * threads: the split steps
    ("group", (512, 256), 8),  # no spatial dimensions: one value a plane
    ("instance", (4, 16, 48, 48), None),
    ("layer", (256, 2, 300), (2, 300)),
    ("layer", (4, 40000), (40000,)),
]


@pytest.mark.parametrize(("op", "shape", "arg"), PARALLEL_CASES)
def test_one_and_two_threads_agree_bitwise(threads, op, shape, arg):
    rng = np.random.default_rng(43)
    x, dy = make(rng, shape, np.float32), make(rng, shape, np.float32, 0.0, 1.0)
    channels = shape[1]
    results = []
    for count in (1, 2):
        threads(count)
        if op == "layer":
            w = np.linspace(0.5, 1.5, math.prod(arg), dtype=np.float32).reshape(arg)
            y, mean, invstd = layer_norm_forward(x, arg, w, w)
            grads = layer_norm_backward(dy, x, mean, invstd, arg, w)
        else:
            w = np.linspace(0.5, 1.5, channels, dtype=np.float32)
            groups = channels if arg is None else arg
            y, mean, invstd = group_norm_forward(x, groups, w, w)
            grads = group_norm_backward(dy, x, mean, invstd, groups, w)
        results.append((y, mean, invstd, *grads))
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


# ------------------------------------------------------------------------------------ layers
def _same_step(layer, module, rng, shape):
    """One forward and backward of the layer and the float64 torch module on the same x, dy:
    y, dx and every parameter's gradient agree."""
    x, dy = make(rng, shape, np.float64), make(rng, shape, np.float64, 0.0, 1.0)
    tx = tensor(x, True)
    module.zero_grad()
    ty = module(tx)
    ty.backward(tensor(dy))
    close(layer(x), ty.detach().numpy(), np.float64)
    close(layer.backward(dy), tx.grad.numpy(), np.float64)
    for name, parameter in module.named_parameters():
        close(getattr(layer, "grad_" + name), parameter.grad.numpy(), np.float64, 10)


def _torch_module(layer):
    if isinstance(layer, GroupNorm):
        return torch.nn.GroupNorm(layer.num_groups, layer.num_channels, affine=layer.affine)
    if isinstance(layer, LayerNorm):
        return torch.nn.LayerNorm(layer.normalized_shape, bias=layer.bias is not None)
    return None


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (GroupNorm(4, 8, dtype=np.float64), (3, 8, 5, 5)),
        (GroupNorm(2, 6, affine=False, dtype=np.float64), (2, 6, 7)),
        (LayerNorm((5, 6), dtype=np.float64), (3, 4, 5, 6)),
        (LayerNorm(7, bias=False, dtype=np.float64), (2, 7)),
    ],
    ids=["group", "group-no-affine", "layer", "layer-no-bias"],
)
def test_layer_matches_torch_module(layer, shape):
    rng = np.random.default_rng(47)
    module = _torch_module(layer).double()
    assert list(layer.state_dict()) == list(module.state_dict())
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    _same_step(layer, module, rng, shape)
    if layer.weight is None:
        assert layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize(
    ("module_type", "shape"),
    [
        (torch.nn.InstanceNorm1d, (3, 4, 9)),
        (torch.nn.InstanceNorm2d, (2, 4, 5, 6)),
        (torch.nn.InstanceNorm3d, (2, 4, 3, 4, 5)),
    ],  # fmt: skip
)
@pytest.mark.parametrize("affine", [True, False])
def test_instance_layer_matches_torch_modules(module_type, shape, affine):
    rng = np.random.default_rng(53)
    module = module_type(4, affine=affine, track_running_stats=True, momentum=0.2).double()
    layer = InstanceNorm(4, affine=affine, track_running_stats=True, momentum=0.2,
                         dtype=np.float64)  # fmt: skip
    assert list(layer.state_dict()) == list(module.state_dict())
    if affine:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
            module.bias.copy_(torch.linspace(-1, 1, 4, dtype=torch.float64))
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
    for _ in range(2):  # training steps: outputs, gradients, running statistics
        _same_step(layer, module, rng, shape)
    close(layer.running_mean, module.running_mean.numpy(), np.float64)
    close(layer.running_var, module.running_var.numpy(), np.float64)
    assert layer.state_dict()["num_batches_tracked"] == module.num_batches_tracked.item() == 0
    layer.eval(), module.eval()  # the running statistics normalise; a frozen backward
    _same_step(layer, module, rng, shape)
    close(layer.running_mean, module.running_mean.numpy(), np.float64)


def test_instance_layer_without_running_stats_uses_input_stats_in_eval():
    rng = np.random.default_rng(59)
    x = make(rng, (2, 3, 10), np.float32)
    layer = InstanceNorm(3).eval()
    assert layer.state_dict() == {}
    np.testing.assert_array_equal(layer(x), instance_norm(x))


def test_layer_backward_once_per_forward():
    rng = np.random.default_rng(61)
    layer = GroupNorm(2, 4)
    x = make(rng, (2, 4, 3), np.float32)
    layer(x)
    layer.backward(np.ones_like(x))
    with pytest.raises(RuntimeError, match="forward call first"):
        layer.backward(np.ones_like(x))
    layer(x, out=x)
    with pytest.raises(RuntimeError, match="overwrote"):
        layer.backward(np.ones_like(x))


def test_layer_float16_parameters_and_gradients():
    rng = np.random.default_rng(67)
    layer = LayerNorm(6, dtype=np.float16)
    x = make(rng, (4, 6), np.float16)
    y = layer(x)
    layer.backward(np.ones_like(x))
    assert y.dtype == layer.grad_weight.dtype == layer.grad_bias.dtype == np.float16
    np.testing.assert_allclose(layer.grad_bias, 4.0)


# --------------------------------------------------------------------------------- bad input
def _bad_calls(x, out, running_mean, running_var):
    """(expected error, message fragment, call) of every argument a call can get wrong; with
    ``out=None`` (but for the out= errors) the calls look plain and must still be explained."""
    w = np.ones(6, np.float32)
    lw = np.ones((5, 4), np.float32)
    mean, invstd = np.zeros((2, 3)), np.ones((2, 3))
    dy = np.ones_like(x)
    run = {"running_mean": running_mean, "running_var": running_var}
    return [
        (ValueError, "num_groups=4 must divide", lambda: group_norm(x, 4, out=out)),
        (ValueError, "num_groups must be >= 1", lambda: group_norm(x, 0, out=out)),
        (TypeError, "num_groups must be an integer", lambda: group_norm(x, 1.5, out=out)),
        (ValueError, "weight must have shape", lambda: group_norm(x, 3, w[:5], out=out)),
        (TypeError, "bias has dtype float64",
         lambda: group_norm(x, 3, w, w.astype(float), out=out)),
        (TypeError, "x must be float16", lambda: group_norm(x.astype(int), 3, out=out)),
        (ValueError, "eps must be > 0", lambda: group_norm(x, 3, eps=0.0, out=out)),
        (ValueError, "axis must not be 0", lambda: group_norm(x, 2, axis=0, out=out)),
        (ValueError, "axis=4 is out of range", lambda: group_norm(x, 3, axis=4, out=out)),
        (ValueError, "out must have the shape", lambda: group_norm(x, 3, out=part(out, np.s_[:1]))),
        (ValueError, "out overlaps x", lambda: _call_overlapping(x)),
        (ValueError, "dy must have the shape",
         lambda: group_norm_backward(dy[:1], x, mean, invstd, 3, out=out)),
        (ValueError, "mean must have shape (2, 3)",
         lambda: group_norm_backward(dy, x, mean[:1], invstd, 3, out=out)),
        (ValueError, "normalized_shape=(4, 5) must be the trailing",
         lambda: layer_norm(x, (4, 5), out=out)),
        (ValueError, "normalized_shape must be one or more",
         lambda: layer_norm(x, (), out=out)),
        (ValueError, "weight must have shape normalized_shape",
         lambda: layer_norm(x, (5, 4), lw.T, out=out)),
        (ValueError, "invstd must have shape (2, 6)",
         lambda: layer_norm_backward(dy, x, np.zeros((2, 6)), invstd, (5, 4), out=out)),
        (ValueError, "running_mean and running_var must be given together",
         lambda: instance_norm(x, running_mean, None, out=out)),
        (ValueError, "momentum must be in", lambda: instance_norm(x, **run, momentum=2, out=out)),
        (ValueError, "running_var must have shape",
         lambda: instance_norm(x, running_mean, running_var[:3], out=out)),
        (ValueError, "running_mean must be writable",
         lambda: instance_norm(x, _read_only(running_mean), running_var, out=out)),
        (ValueError, "more than 1 spatial element",
         lambda: instance_norm(np.ascontiguousarray(x[:, :, :1, :1]), **run,
                               out=part(out, np.s_[:, :, :1, :1]))),
        (ValueError, "required when use_input_stats=False",
         lambda: instance_norm(x, use_input_stats=False, out=out)),
        (ValueError, "weight must have shape",
         lambda: instance_norm(x, **run, weight=w[:2], out=out)),
        (ValueError, "x must have 3 dimensions (a batch) or 2 (one sample) for spatial_dims=1",
         lambda: instance_norm(x, **run, spatial_dims=1, out=out)),
        (ValueError, "spatial_dims must be >= 1",
         lambda: instance_norm(x[0], **run, spatial_dims=0, out=part(out, np.s_[0]))),
        (TypeError, "spatial_dims must be an integer",
         lambda: instance_norm(x[0], **run, spatial_dims=2.0, out=part(out, np.s_[0]))),
        (ValueError, "out must have the shape and dtype of x, (6, 5, 4)",
         lambda: instance_norm(x[0], **run, spatial_dims=2, out=out)),
        (ValueError, "running_var must have shape",
         lambda: instance_norm(x[0], running_mean, running_var[:3], spatial_dims=2,
                               out=part(out, np.s_[0]))),
        (ValueError, "more than 1 spatial element",
         lambda: instance_norm(np.ascontiguousarray(x[0, :, :1, :1]), **run, spatial_dims=2,
                               out=part(out, np.s_[0, :, :1, :1]))),
        (ValueError, "x must have 4 dimensions (a batch) or 3 (one sample) for spatial_dims=2",
         lambda: instance_norm_backward(dy[0, 0], x[0, 0], mean[0], invstd[0], spatial_dims=2,
                                        out=part(out, np.s_[0, 0]))),
        (ValueError, "dy must have the shape of x, (6, 5, 4)",
         lambda: instance_norm_backward(dy, x[0], mean[0], invstd[0], spatial_dims=2,
                                        out=part(out, np.s_[0]))),
        (ValueError, "mean must have shape (6,)",
         lambda: instance_norm_backward(dy[0], x[0], np.zeros((1, 6)), np.ones(6),
                                        spatial_dims=2, out=part(out, np.s_[0]))),
        (ValueError, "out must have the shape and dtype of x, (6, 5, 4)",
         lambda: instance_norm_backward(dy[0], x[0], np.zeros(6), np.ones(6), spatial_dims=2,
                                        out=out)),
    ]  # fmt: skip


def _call_overlapping(x):
    """group_norm of a copy of x into an out= that shares its memory one element apart."""
    buffer = np.full(x.size + 1, np.nan, x.dtype)
    buffer[:-1] = x.ravel()
    group_norm(buffer[:-1].reshape(x.shape), 3, out=buffer[1:].reshape(x.shape))


def part(out, index):
    """out[index] (a copy where that is not C-contiguous), None when out is None."""
    if out is None:
        return None
    view = out[index]
    return view if view.flags.c_contiguous else view.copy()


def _read_only(a):
    a = a.view()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("with_out", [True, False], ids=["out", "no-out"])
def test_bad_input_raises_and_modifies_nothing(with_out):
    """Without out= the calls are what the plain path takes up (NumPy float32 x, Python
    scalars): it must hand every one of them to the checks, which explain it."""
    rng = np.random.default_rng(71)
    x = make(rng, (2, 6, 5, 4), np.float32)
    x_before = x.copy()
    out = np.full(x.shape, np.nan, np.float32)
    running_mean, running_var = np.zeros(6, np.float32), np.ones(6, np.float32)
    calls = _bad_calls(x, out if with_out else None, running_mean, running_var)
    for error, fragment, call in calls:
        if not with_out and fragment.startswith("out "):
            continue
        with pytest.raises(error, match=re.escape(fragment)):
            call()
        assert np.isnan(out).all(), fragment
        np.testing.assert_array_equal(running_mean, 0.0)
        np.testing.assert_array_equal(running_var, 1.0)
        np.testing.assert_array_equal(x, x_before)


def test_layer_constructors_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups"):
        GroupNorm(4, 6)
    with pytest.raises(TypeError, match="num_features must be an integer"):
        InstanceNorm(2.0)
    with pytest.raises(ValueError, match="normalized_shape must be one or more"):
        LayerNorm((3, -1))
    with pytest.raises(TypeError, match="dtype must be float16"):
        LayerNorm(3, dtype=np.int32)
    with pytest.raises(ValueError, match="momentum must be in"):
        InstanceNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="spatial_dims must be >= 1"):
        InstanceNorm(3, spatial_dims=0)


def test_layers_reject_inputs_that_do_not_fit_and_keep_their_state():
    layer = InstanceNorm(4, affine=True, track_running_stats=True)
    before = {k: np.copy(v) for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="expects 4 channels"):
        layer(np.ones((2, 3, 5), np.float32))
    with pytest.raises(TypeError, match=r"InstanceNorm\(dtype=float32\) got x of dtype float64"):
        layer(np.ones((2, 4, 5)))
    with pytest.raises(ValueError, match="weight must have shape"):
        layer.load_state_dict({**before, "weight": np.ones(3)})
    with pytest.raises(KeyError, match="missing keys"):
        layer.load_state_dict({"weight": np.ones(4)})
    sample_layer = InstanceNorm(4, affine=True, track_running_stats=True, spatial_dims=1)
    sample_layer.load_state_dict(before)
    with pytest.raises(ValueError, match=r"x must have 3 dimensions \(a batch\) or 2"):
        sample_layer(np.ones((1, 2, 4, 5), np.float32))
    with pytest.raises(ValueError, match="expects 4 channels on axis 1, got x of shape"):
        sample_layer(np.ones((3, 5), np.float32))  # one sample of 3 channels
    for key, value in sample_layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    with pytest.warns(UserWarning, match="expects 4 channels"):
        InstanceNorm(4)(np.ones((2, 3, 5), np.float32))  # as PyTorch: no per-channel arrays


def test_layer_norm_refuses_cuda_arrays_with_the_reason():
    class DeviceArray:  # what numba_bn.memory takes for a CUDA array
        __cuda_array_interface__ = {}

    refused = r"{} is a CUDA array: layer norm runs on the CPU only"
    with pytest.raises(TypeError, match=refused.format("x")):
        layer_norm(DeviceArray(), 1)
    with pytest.raises(TypeError, match=refused.format("weight")):
        layer_norm(np.ones((2, 3)), 3, DeviceArray())
    with pytest.raises(TypeError, match=refused.format("x")):
        LayerNorm(3)(DeviceArray())


def test_group_and_instance_norm_refuse_arrays_on_two_sides_before_touching_cuda():
    """They take CUDA arrays (tests/gpu_norms_suite.py), all on one side."""

    class DeviceArray:
        __cuda_array_interface__ = {}

    with pytest.raises(ValueError, match=r"x is on the CUDA device, weight is in host memory"):
        group_norm(DeviceArray(), 1, np.ones(3))
    with pytest.raises(ValueError, match=r"x is on the CUDA device, running_mean, running_var"):
        instance_norm(DeviceArray(), np.zeros(3), np.ones(3))


@pytest.mark.parametrize(("n", "channels", "groups"), [(1, 6, 3), (7, 24, 4), (64, 256, 8)])
def test_group_parameter_sums_are_numpys_reduction_over_the_samples(n, channels, groups):
    """The driver's dweight, dbias: sum_dy_xmu * invstd per (n, c), then a sum over n in
    sample order from 0, bit for bit what the NumPy reduction it replaced gave (-0.0 sums
    included)."""
    from numba_bn.cpu.norm_kernels import group_parameter_sums

    rng = np.random.default_rng(n)
    sums = rng.normal(0.5, 3.0, (2, n * channels)) * 10.0 ** rng.integers(-3, 4, (2, n * channels))
    sums[:, :channels] = -0.0  # the first sample's sums -0.0, and channel 0's in every
    sums[:, channels::channels] = -0.0  # sample: +0.0 from 0, as NumPy's
    invstd = rng.uniform(0.1, 5.0, n * groups)
    grads = np.full((2, channels), np.nan)
    group_parameter_sums(sums[0], sums[1], invstd, channels // groups, grads[0], grads[1])
    products = sums.copy()
    products.reshape(2, n, groups, channels // groups)[1] *= invstd.reshape(n, groups, 1)
    dbias, dweight = np.add.reduce(products.reshape(2, n, channels), axis=1)
    assert np.array_equal(grads[0].view(np.uint64), dweight.view(np.uint64))
    assert np.array_equal(grads[1].view(np.uint64), dbias.view(np.uint64))
