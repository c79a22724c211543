"""Group and instance norm on CUDA arrays (numba_bn.norm_cuda), against the CPU functions on the
same inputs (tests/test_norms.py checks those against torch and float64 loops), and layer norm's
refusal. Run under NUMBA_ENABLE_CUDASIM=1 by tests/test_cuda.py (as tests/gpu_suite.py), or on a
GPU:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/gpu_norms_suite.py      # simulator
    python -m pytest tests/gpu_norms_suite.py                             # a GPU

Launch sizes are shrunk (conftest's ``tiny_launches``) so that these tiny shapes span several
blocks per group and the cross-block merge. The GPU accumulates float32 statistics in float32
(docs/cuda.md), the CPU in float64: float32 results agree to 1e-5, float64 ones to 1e-12.
"""

import numpy as np
import pytest
from numba import cuda

from numba_bn import norms
from numba_bn.memory import is_device_array
from numba_bn.norm_layers import GroupNorm, InstanceNorm, LayerNorm

from conftest import random_batch

if not cuda.is_available():
    pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("tiny_launches")

DTYPES = [np.float32, np.float64]
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# (shape, num_groups): one group, two, one per channel (instance norm's grouping)
GROUPINGS = [((2, 4, 3, 5), 1), ((2, 4, 3, 5), 2), ((2, 4, 3, 5), 4), ((3, 6, 7), 1),
             ((3, 6, 7), 2), ((3, 6, 7), 6)]  # fmt: skip


def on_device(*arrays):
    return tuple(None if a is None else cuda.to_device(a) for a in arrays)


def poisoned(shape, dtype):
    return cuda.to_device(np.full(shape, np.nan, dtype))


def assert_device_result(value, expected, like):
    """``value`` is a device array of the kind of ``like`` holding ``expected`` (a CPU result)
    to the tolerance of like's dtype, relative to each value and to the largest."""
    assert is_device_array(value) and type(value) is type(like), type(value)
    expected = np.asarray(expected)
    got = value.copy_to_host()
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.dtype, got.shape)
    tolerance = TOLERANCE[np.dtype(like.dtype)]  # float64 statistics of float32 data: 1e-5
    scale = np.abs(expected).max() if expected.size else 0.0
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * scale)


def affine(rng, channels, dtype):
    return rng.uniform(0.5, 2.0, channels).astype(dtype), rng.normal(0, 1, channels).astype(dtype)


def gradient(rng, shape, dtype):
    return (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)


# ---------------------------------------------------------------------------- group norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "groups"), GROUPINGS)
def test_group_norm_forward_matches_the_cpu(rng, shape, groups, dtype):
    x = random_batch(rng, shape, dtype)
    weight, bias = affine(rng, shape[1], dtype)
    expected = norms.group_norm_forward(x, groups, weight, bias)
    x_d, w_d, b_d = on_device(x, weight, bias)
    out = poisoned(shape, dtype)
    y, mean, invstd = norms.group_norm_forward(x_d, groups, w_d, b_d, out=out)
    assert y is out
    for value, reference in zip((y, mean, invstd), expected, strict=True):
        assert_device_result(value, reference, x_d)
    np.testing.assert_array_equal(x_d.copy_to_host(), x)  # x is read only


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "groups"), GROUPINGS)
def test_group_norm_backward_matches_the_cpu(rng, shape, groups, dtype):
    """The same x, dy and statistics on both sides: dx, dweight, dbias of the backward alone."""
    x, dy = random_batch(rng, shape, dtype), gradient(rng, shape, dtype)
    weight, _ = affine(rng, shape[1], dtype)
    _, mean, invstd = norms.group_norm_forward(x, groups, weight)
    expected = norms.group_norm_backward(dy, x, mean, invstd, groups, weight)
    dy_d, x_d, mean_d, invstd_d, w_d = on_device(dy, x, mean, invstd, weight)
    out = poisoned(shape, dtype)
    result = norms.group_norm_backward(dy_d, x_d, mean_d, invstd_d, groups, w_d, out=out)
    assert result[0] is out
    for value, reference in zip(result, expected, strict=True):
        assert_device_result(value, reference, dy_d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_without_affine_matches_the_cpu(rng, dtype):
    x, dy = random_batch(rng, (3, 6, 7), dtype), gradient(rng, (3, 6, 7), dtype)
    y, mean, invstd = norms.group_norm_forward(x, 3)
    dx, dweight, dbias = norms.group_norm_backward(dy, x, mean, invstd, 3)
    x_d, dy_d, mean_d, invstd_d = on_device(x, dy, mean, invstd)
    assert_device_result(norms.group_norm(x_d, 3), y, x_d)
    for value, reference in zip(norms.group_norm_backward(dy_d, x_d, mean_d, invstd_d, 3),
                                (dx, dweight, dbias), strict=True):  # fmt: skip
        assert_device_result(value, reference, x_d)


def test_g_is_dy_times_weight_exactly(rng):
    """The backward's g = dy * w by batch norm's normalize with mean 0, invstd 1 is the
    rounded product itself, bit for bit (NaN and infinities through)."""
    from numba_bn import dispatch

    backend = dispatch.get("cuda")
    dy = gradient(rng, (2, 4, 5), np.float32)
    dy[0, 0, :3] = np.nan, np.inf, -np.inf
    weight = rng.uniform(-3, 3, 4).astype(np.float32)
    g = cuda.device_array(dy.shape, np.float32)
    dy_d, w_d = on_device(dy, weight)
    backend.normalize(dy_d, mean=cuda.to_device(np.zeros(4)), invstd=cuda.to_device(np.ones(4)),
                      weight=w_d, bias=cuda.device_array(0, np.float32), y=g)  # fmt: skip
    np.testing.assert_array_equal(g.copy_to_host(), dy * weight[:, None])


def test_group_norm_results_come_back_as_the_callers_kind(rng, monkeypatch):
    """CuPy in, CuPy out (the stand-in of tests/gpu_suite.py), out= as the caller's own."""
    from gpu_suite import _as_kind, _stand_in_module

    _stand_in_module(monkeypatch, "cupy")
    x = random_batch(rng, (2, 4, 3), np.float64)
    dy = gradient(rng, x.shape, np.float64)
    expected = norms.group_norm_forward(x, 2)
    x_d, dy_d = (_as_kind(a, "cupy") for a in on_device(x, dy))
    y, mean, invstd = norms.group_norm_forward(x_d, 2)
    dx, dweight, dbias = norms.group_norm_backward(dy_d, x_d, mean, invstd, 2)
    for value in (y, mean, invstd, dx, dweight, dbias):
        assert type(value).__module__.startswith("cupy"), type(value)
    np.testing.assert_allclose(y.copy_to_host(), expected[0], rtol=1e-12, atol=1e-12)
    out = _as_kind(poisoned(x.shape, x.dtype), "cupy")
    assert norms.group_norm(x_d, 2, out=out) is out


# ------------------------------------------------------------------------- instance norm
@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_with_running_buffers_matches_the_cpu(rng, dtype):
    shape = (3, 4, 2, 3)
    x, dy = random_batch(rng, shape, dtype), gradient(rng, shape, dtype)
    weight, bias = affine(rng, 4, dtype)
    buffers = rng.normal(0, 1, 4).astype(dtype), rng.uniform(0.5, 2, 4).astype(dtype)
    cpu_buffers = [b.copy() for b in buffers]
    expected = norms.instance_norm_forward(x, *cpu_buffers, weight, bias, momentum=0.3)
    x_d, dy_d, w_d, b_d, rm_d, rv_d = on_device(x, dy, weight, bias, *buffers)
    out = poisoned(shape, dtype)
    result = norms.instance_norm_forward(x_d, rm_d, rv_d, w_d, b_d, momentum=0.3, out=out)
    assert result[0] is out
    for value, reference in zip((*result, rm_d, rv_d), (*expected, *cpu_buffers), strict=True):
        assert_device_result(value, reference, x_d)
    mean, invstd = expected[1:]
    grads = norms.instance_norm_backward(dy, x, mean, invstd, weight)
    mean_d, invstd_d = on_device(mean, invstd)
    out = poisoned(shape, dtype)
    result = norms.instance_norm_backward(dy_d, x_d, mean_d, invstd_d, w_d, out=out)
    assert result[0] is out
    for value, reference in zip(result, grads, strict=True):
        assert_device_result(value, reference, x_d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_with_running_statistics_matches_the_cpu(rng, dtype):
    x = random_batch(rng, (2, 3, 5), dtype)
    running = rng.normal(0, 1, 3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    expected = norms.instance_norm_forward(x, *running, use_input_stats=False)
    x_d, rm_d, rv_d = on_device(x, *running)
    result = norms.instance_norm_forward(x_d, rm_d, rv_d, use_input_stats=False)
    for value, reference in zip(result, expected, strict=True):
        assert_device_result(value, reference, x_d)
    for buffer, before in zip((rm_d, rv_d), running, strict=True):
        np.testing.assert_array_equal(buffer.copy_to_host(), before)


def test_instance_norm_takes_one_sample_with_spatial_dims(rng):
    x, dy = random_batch(rng, (3, 4, 5)), gradient(rng, (3, 4, 5), np.float64)
    expected = norms.instance_norm_forward(x, spatial_dims=2)
    grads = norms.instance_norm_backward(dy, x, *expected[1:], spatial_dims=2)
    x_d, dy_d = on_device(x, dy)
    result = norms.instance_norm_forward(x_d, spatial_dims=2)
    assert result[0].shape == x.shape and result[1].shape == (3,)
    for value, reference in zip(result, expected, strict=True):
        assert_device_result(value, reference, x_d)
    mean_d, invstd_d = on_device(*expected[1:])
    for value, reference in zip(norms.instance_norm_backward(dy_d, x_d, mean_d, invstd_d,
                                                             spatial_dims=2), grads,
                                strict=True):  # fmt: skip
        assert_device_result(value, reference, x_d)


# ---------------------------------------------------------------------------- the layers
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_layer_on_cuda_matches_the_cpu_layer(rng, dtype):
    shape = (2, 6, 3, 2)
    host, device = GroupNorm(3, 6, dtype=dtype), GroupNorm(3, 6, dtype=dtype)
    host.weight, host.bias = affine(rng, 6, dtype)
    device.load_state_dict(host.state_dict())
    x, dy = random_batch(rng, shape, dtype), gradient(rng, shape, dtype)
    x_d, dy_d = on_device(x, dy)
    assert_device_result(device(x_d), host(x), x_d)
    assert_device_result(device.backward(dy_d), host.backward(dy), x_d)
    for name in ("weight", "bias", "grad_weight", "grad_bias"):
        assert_device_result(getattr(device, name), getattr(host, name), x_d)
    state = device.state_dict()
    assert all(type(v) is np.ndarray for v in state.values())
    device.to("cpu")
    assert type(device.weight) is np.ndarray and type(device.grad_weight) is np.ndarray


@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_layer_keeps_its_running_buffers_on_the_device(rng, dtype):
    shape = (2, 3, 4, 2)
    layers = [InstanceNorm(3, affine=True, track_running_stats=True, dtype=dtype) for _ in "ab"]
    host, device = layers
    host.weight, host.bias = affine(rng, 3, dtype)
    device.load_state_dict(host.state_dict())
    device.to("cuda")
    for _ in range(2):  # two training steps
        x, dy = random_batch(rng, shape, dtype), gradient(rng, shape, dtype)
        x_d, dy_d = on_device(x, dy)
        assert_device_result(device(x_d), host(x), x_d)
        assert_device_result(device.backward(dy_d), host.backward(dy), x_d)
        for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
            assert_device_result(getattr(device, name), getattr(host, name), x_d)
    host.eval(), device.eval()  # the running statistics normalise
    x, dy = random_batch(rng, shape, dtype), gradient(rng, shape, dtype)
    x_d, dy_d = on_device(x, dy)
    assert_device_result(device(x_d), host(x), x_d)
    assert_device_result(device.backward(dy_d), host.backward(dy), x_d)
    for name in ("grad_weight", "grad_bias"):
        assert_device_result(getattr(device, name), getattr(host, name), x_d)
    with pytest.raises(ValueError, match=r"keeps its arrays on 'cuda' but x is a host"):
        device(x)


# ---------------------------------------------------------------- refusals and bad input
def test_layer_norm_refuses_cuda_arrays_naming_them(rng):
    x = random_batch(rng, (2, 3, 4))
    x_d, dy_d = on_device(x, x)
    message = r"{} is a CUDA array: layer norm runs on the CPU only"
    with pytest.raises(TypeError, match=message.format("x")):
        norms.layer_norm(x_d, 4)
    with pytest.raises(TypeError, match=message.format("x")):
        norms.layer_norm_forward(x_d, (3, 4))
    _, mean, invstd = norms.layer_norm_forward(x, 4)
    with pytest.raises(TypeError, match=message.format("dy")):
        norms.layer_norm_backward(dy_d, x, mean, invstd, 4)
    with pytest.raises(TypeError, match=message.format("x")):
        LayerNorm(4, dtype=np.float64)(x_d)
    with pytest.raises(TypeError, match=r"LayerNorm runs on the CPU only"):
        LayerNorm(4).to("cuda")


def test_bad_input_raises_before_anything_is_written(rng):
    x = random_batch(rng, (2, 4, 5))
    rm, rv = np.zeros(4), np.ones(4)
    x_d, rm_d, rv_d, w_d = on_device(x, rm, rv, np.ones(3))
    out = poisoned(x.shape, x.dtype)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        norms.instance_norm(x_d, rm_d, rv_d, w_d, out=out)
    with pytest.raises(ValueError, match=r"num_groups=3 must divide the 4 channels"):
        norms.group_norm(x_d, 3, out=out)
    with pytest.raises(ValueError, match=r"x is a CUDA array with its channels on axis -1"):
        norms.instance_norm(x_d, rm_d, rv_d, axis=-1, out=out)
    on_two_sides = r"x, running_var, out are on the CUDA device, running_mean is in host memory"
    with pytest.raises(ValueError, match=on_two_sides):
        norms.instance_norm(x_d, rm, rv_d, out=out)
    assert np.isnan(out.copy_to_host()).all()
    np.testing.assert_array_equal(rm_d.copy_to_host(), rm)
    np.testing.assert_array_equal(rv_d.copy_to_host(), rv)
