"""bfloat16 (issue 15): ``ml_dtypes.bfloat16`` arrays and torch bfloat16 CPU tensors are computed
in float32, like float16, and come back in bfloat16; statistics come back in float32.

The expected values are the float32 computation on the bfloat16 values upcast, rounded to
bfloat16: a result may differ from that by one bfloat16 ulp at most. ml_dtypes is optional:
without it a torch bfloat16 tensor is refused with the extra to install.
"""

import subprocess
import sys

import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import hostcall

from conftest import random_batch

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

try:
    import torch
except ImportError:  # the ml_dtypes tests run without it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

LAYOUTS = [((16, 5), 1), ((4, 3, 6), 1), ((3, 4, 5, 6), -1)]
PARAMETER_DTYPES = [BF16, np.dtype(np.float32)]  # as float16 allows: x's dtype or float32
BF16_TOLERANCE = {"rtol": 2.0**-7, "atol": 2.0**-7}  # 8 significant bits, after rounding twice


def _ordered(a):
    """The bits of bfloat16 values as integers in the order of the values, so that neighbouring
    bfloat16 numbers differ by 1."""
    bits = np.asarray(a).astype(BF16).view(np.uint16).astype(np.int32)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def assert_within_one_ulp(actual, expected32):
    """``actual`` (bfloat16) equals ``expected32`` (float32) rounded to bfloat16, or is next
    to it."""
    assert actual.dtype == BF16 and actual.shape == expected32.shape
    assert expected32.dtype == np.float32
    assert np.isfinite(expected32).all()
    assert np.abs(_ordered(actual) - _ordered(expected32)).max(initial=0) <= 1


def _case(rng, shape, axis, parameter_dtype):
    """bfloat16 x and dy, per-channel vectors in ``parameter_dtype`` (bfloat16 or float32)."""
    channels = shape[axis]
    return {
        "x": random_batch(rng, shape, np.float32, axis=axis).astype(BF16),
        "dy": random_batch(rng, shape, np.float32, mean_scale=1.0, axis=axis).astype(BF16),
        "weight": rng.uniform(0.5, 2.0, channels).astype(parameter_dtype),
        "bias": rng.standard_normal(channels).astype(parameter_dtype),
        "running_mean": rng.standard_normal(channels).astype(parameter_dtype),
        "running_var": rng.uniform(0.5, 2.0, channels).astype(parameter_dtype),
    }


def _upcast(case):
    return {name: value.astype(np.float32) for name, value in case.items()}


# ------------------------------------------------------------------------ ml_dtypes arrays
@pytest.mark.parametrize("parameter_dtype", PARAMETER_DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_forward_train_of_bfloat16_is_the_float32_result_rounded(rng, shape, axis,
                                                                 parameter_dtype):  # fmt: skip
    case = _case(rng, shape, axis, parameter_dtype)
    f32 = _upcast(case)
    y, mean, invstd = nbn.forward_train(case["x"], case["weight"], case["bias"], axis=axis)
    y32, mean32, invstd32 = nbn.forward_train(f32["x"], f32["weight"], f32["bias"], axis=axis)
    assert type(y) is np.ndarray
    assert_within_one_ulp(y, y32)
    assert mean.dtype == invstd.dtype == np.float32  # statistics in float32, as for float16
    np.testing.assert_allclose(mean, mean32, rtol=1e-6)
    np.testing.assert_allclose(invstd, invstd32, rtol=1e-6)


@pytest.mark.parametrize("parameter_dtype", PARAMETER_DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_forward_eval_of_bfloat16_is_the_float32_result_rounded(rng, shape, axis,
                                                                parameter_dtype):  # fmt: skip
    case = _case(rng, shape, axis, parameter_dtype)
    f32 = _upcast(case)
    names = ("x", "running_mean", "running_var", "weight", "bias")
    y = nbn.forward_eval(*(case[n] for n in names), axis=axis)
    assert_within_one_ulp(y, nbn.forward_eval(*(f32[n] for n in names), axis=axis))


@pytest.mark.parametrize("parameter_dtype", PARAMETER_DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_backward_of_bfloat16_is_the_float32_result_rounded(rng, shape, axis, parameter_dtype):
    case = _case(rng, shape, axis, parameter_dtype)
    f32 = _upcast(case)
    _, mean, invstd = nbn.forward_train(case["x"], case["weight"], case["bias"], axis=axis)
    dx, dweight, dbias = nbn.backward(case["dy"], case["x"], mean, invstd, case["weight"],
                                      axis=axis)  # fmt: skip
    dx32, dweight32, dbias32 = nbn.backward(f32["dy"], f32["x"], mean, invstd, f32["weight"],
                                            axis=axis)  # fmt: skip
    assert_within_one_ulp(dx, dx32)
    assert dweight.dtype == dbias.dtype == np.float32
    np.testing.assert_allclose(dweight, dweight32, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbias, dbias32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_bfloat16_running_buffers_are_updated_in_place_in_bfloat16(rng, shape, axis):
    case = _case(rng, shape, axis, BF16)
    f32 = _upcast(case)
    buffers = [case["running_mean"], case["running_var"]]
    before = [b.copy() for b in buffers]
    buffers32 = [f32["running_mean"], f32["running_var"]]
    y = nbn.batch_norm(case["x"], *buffers, case["weight"], case["bias"], training=True,
                       momentum=0.3, axis=axis)  # fmt: skip
    y32 = nbn.batch_norm(f32["x"], *buffers32, f32["weight"], f32["bias"], training=True,
                         momentum=0.3, axis=axis)  # fmt: skip
    assert_within_one_ulp(y, y32)
    for buffer, old, buffer32 in zip(buffers, before, buffers32, strict=True):
        assert buffer.dtype == BF16
        assert not np.array_equal(buffer, old)
        assert_within_one_ulp(buffer, buffer32)


def test_bfloat16_out_is_written_in_bfloat16(rng):
    case = _case(rng, (8, 3, 4), 1, BF16)
    names = ("x", "running_mean", "running_var", "weight", "bias")
    out = np.full(case["x"].shape, np.nan, BF16)
    y = nbn.forward_eval(*(case[n] for n in names), out=out)
    assert y is out
    assert_within_one_ulp(out, nbn.forward_eval(*(_upcast(case)[n] for n in names)))


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_layer_of_dtype_bfloat16_is_the_float32_layer_rounded(rng, shape, axis):
    channels = shape[axis]
    x = random_batch(rng, shape, np.float32, axis=axis).astype(BF16)
    dy = random_batch(rng, shape, np.float32, mean_scale=1.0, axis=axis).astype(BF16)
    bn = nbn.BatchNorm(channels, axis=axis, dtype=ml_dtypes.bfloat16)
    bn32 = nbn.BatchNorm(channels, axis=axis, dtype=np.float32)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(bn, name).dtype == BF16  # parameters and buffers in bfloat16, as float16
    assert_within_one_ulp(bn(x), bn32(x.astype(np.float32)))
    assert_within_one_ulp(bn.backward(dy), bn32.backward(dy.astype(np.float32)))
    for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
        assert_within_one_ulp(getattr(bn, name), getattr(bn32, name))
    bn.eval(), bn32.eval()
    for name in ("running_mean", "running_var"):  # eval takes the bfloat16 statistics upcast
        setattr(bn32, name, getattr(bn, name).astype(np.float32))
    assert_within_one_ulp(bn(x), bn32(x.astype(np.float32)))


def test_plain_call_does_not_take_bfloat16():
    x = np.ones((4, 3), BF16)
    assert hostcall.canonical_view(x, 1) is None  # the checks convert it


def test_bfloat16_x_with_float64_parameters_is_refused_and_nothing_is_written(rng):
    case = _case(rng, (8, 3), 1, BF16)
    buffers = [case["running_mean"], case["running_var"]]
    before = [b.copy() for b in buffers]
    with pytest.raises(TypeError, match="weight has dtype float64; expected bfloat16 or float32"):
        nbn.batch_norm(case["x"], *buffers, case["weight"].astype(np.float64), training=True)
    for buffer, old in zip(buffers, before, strict=True):
        np.testing.assert_array_equal(buffer, old)


def test_non_finite_bfloat16_batch_leaves_bfloat16_buffers_unchanged(rng):
    case = _case(rng, (8, 3), 1, BF16)
    case["x"][2, 1] = np.nan
    buffers = [case["running_mean"], case["running_var"]]
    before = [b.copy() for b in buffers]
    with pytest.raises(ValueError, match="running statistics were not updated"):
        nbn.batch_norm(case["x"], *buffers, training=True, nan_policy="raise")
    for buffer, old in zip(buffers, before, strict=True):
        np.testing.assert_array_equal(buffer, old)


def test_importing_numba_bn_does_not_import_ml_dtypes():
    code = "import sys, numba_bn; print('ml_dtypes' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=300)  # fmt: skip
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------- torch tensors
def _torch_case(rng, shape, axis):
    """bfloat16 tensors with memory of their own, and their float32 upcasts."""
    case = _case(rng, shape, axis, BF16)
    tensors = {name: torch.from_numpy(value.astype(np.float32)).bfloat16()
               for name, value in case.items()}  # fmt: skip
    return tensors, {name: t.float() for name, t in tensors.items()}


def _torch_reference(f32, axis, training, momentum=0.1):
    """torch's batch_norm on the float32 upcast, channels moved to dimension 1."""
    x = f32["x"].movedim(axis, 1)
    running = [f32["running_mean"].clone(), f32["running_var"].clone()]
    y = torch.nn.functional.batch_norm(x, *running, f32["weight"], f32["bias"],
                                       training=training, momentum=momentum, eps=1e-5)  # fmt: skip
    return y.movedim(1, axis), running


@needs_torch
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_torch_bfloat16_tensors_match_torch_batch_norm_and_update_in_place(rng, shape, axis):
    t, f32 = _torch_case(rng, shape, axis)
    buffers = [t["running_mean"], t["running_var"]]
    addresses = [b.data_ptr() for b in buffers]
    before = [b.clone() for b in buffers]
    y = nbn.batch_norm(t["x"], *buffers, t["weight"], t["bias"], training=True, momentum=0.3,
                       axis=axis)  # fmt: skip
    expected_y, expected_running = _torch_reference(f32, axis, training=True, momentum=0.3)
    assert type(y) is np.ndarray and y.dtype == BF16  # NumPy for host inputs, in bfloat16
    np.testing.assert_allclose(y.astype(np.float32), expected_y.numpy(), **BF16_TOLERANCE)
    for buffer, address, old, expected in zip(buffers, addresses, before, expected_running,
                                              strict=True):  # fmt: skip
        assert buffer.dtype == torch.bfloat16 and buffer.data_ptr() == address
        assert not torch.equal(buffer, old)
        assert_within_one_ulp(buffer.view(torch.int16).numpy().view(BF16), expected.numpy())


@needs_torch
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_torch_bfloat16_eval_and_backward_give_the_ml_dtypes_results(rng, shape, axis):
    t, _ = _torch_case(rng, shape, axis)
    arrays = {name: tensor.view(torch.int16).numpy().view(BF16) for name, tensor in t.items()}
    names = ("x", "running_mean", "running_var", "weight", "bias")
    y = nbn.forward_eval(*(t[n] for n in names), axis=axis)
    np.testing.assert_array_equal(y, nbn.forward_eval(*(arrays[n] for n in names), axis=axis))
    _, mean, invstd = nbn.forward_train(arrays["x"], axis=axis)
    for a, e in zip(nbn.backward(t["dy"], t["x"], mean, invstd, t["weight"], axis=axis),
                    nbn.backward(arrays["dy"], arrays["x"], mean, invstd, arrays["weight"],
                                 axis=axis), strict=True):  # fmt: skip
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(a, e)


@needs_torch
def test_torch_bfloat16_out_is_written_in_place(rng):
    t, f32 = _torch_case(rng, (8, 3, 4), 1)
    out = torch.full(t["x"].shape, float("nan"), dtype=torch.bfloat16)
    names = ("x", "running_mean", "running_var", "weight", "bias")
    nbn.forward_eval(*(t[n] for n in names), out=out)
    expected, _ = _torch_reference(f32, 1, training=False)
    np.testing.assert_allclose(out.float().numpy(), expected.numpy(), **BF16_TOLERANCE)


@needs_torch
def test_layer_of_dtype_bfloat16_takes_torch_bfloat16_tensors(rng):
    t, f32 = _torch_case(rng, (8, 3, 4), 1)
    bn = nbn.BatchNorm(3, dtype=ml_dtypes.bfloat16)
    y = bn(t["x"])
    expected, _ = _torch_reference(
        {**f32, "running_mean": torch.zeros(3), "running_var": torch.ones(3),
         "weight": torch.ones(3), "bias": torch.zeros(3)}, 1, training=True)  # fmt: skip
    np.testing.assert_allclose(y.astype(np.float32), expected.numpy(), **BF16_TOLERANCE)
    assert bn.backward(t["dy"]).dtype == BF16


@needs_torch
def test_torch_bfloat16_tensor_that_requires_grad_asks_for_detach():
    x = torch.ones(4, 3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(TypeError, match=r"requires grad: pass x\.detach\(\)"):
        nbn.forward_train(x)


@needs_torch
def test_torch_bfloat16_without_ml_dtypes_names_x_and_the_extra(rng, monkeypatch):
    t, _ = _torch_case(rng, (8, 3), 1)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` raises ImportError
    with pytest.raises(TypeError, match=r'x is a torch bfloat16 tensor.*pip install "numba-bn'
                                        r'\[bfloat16\]"'):  # fmt: skip
        nbn.forward_train(t["x"])


@needs_torch
def test_torch_bfloat16_buffers_without_ml_dtypes_are_named_and_left_unchanged(rng, monkeypatch):
    t, _ = _torch_case(rng, (8, 3), 1)
    x = t["x"].float().numpy()
    buffers = [t["running_mean"], t["running_var"]]
    before = [b.clone() for b in buffers]
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(TypeError, match=r'running_mean is a torch bfloat16 tensor.*"numba-bn'):
        nbn.batch_norm(x, *buffers, training=True)
    for buffer, old in zip(buffers, before, strict=True):
        assert torch.equal(buffer, old)
