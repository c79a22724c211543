"""BatchNorm against torch.nn.BatchNorm{1,2,3}d on the CPU (torch is a test-only reference)."""

import numpy as np
import pytest

import numba_bn as nbn

import naive
from conftest import random_batch

torch = pytest.importorskip("torch")

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}  # fmt: skip
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float64: dict(rtol=1e-10, atol=1e-10)}

# channel-first shapes; channels_last=True moves the channels to the end (axis=-1) for numba_bn
CONFIGS = [
    # shape, channels_last, dtype, affine, momentum, track_running_stats
    ((32, 7), False, np.float32, True, 0.1, True),
    ((16, 5, 9), False, np.float64, False, None, True),
    ((8, 6, 5, 7), False, np.float32, True, None, True),
    ((8, 6, 5, 7), True, np.float32, True, 0.1, True),
    ((4, 3, 3, 4, 5), False, np.float64, True, 0.1, True),
    ((5, 4, 6, 3), True, np.float64, False, 0.1, True),
    ((12, 3, 10), False, np.float32, True, 0.1, False),
    ((6, 40, 4, 4), False, np.float32, True, 0.3, True),
]


def _ours_layout(array, channels_last):
    return np.ascontiguousarray(np.moveaxis(array, 1, -1)) if channels_last else array


def _to_np(tensor, channels_last):
    return _ours_layout(tensor.detach().numpy(), channels_last)


def _sums_close(ours, theirs, dy, x_hat, dtype):
    """dweight = sum(dy * x_hat) and dbias = sum(dy) per channel (channel-first dy, x_hat) within
    the rounding of a float32 sum: torch adds in float32, so its error grows with the sum of
    the terms' magnitudes, not with the result (a channel whose terms cancel to 0.27 from +-40
    was 6e-4 off). float64: TOL as it is."""
    axes = tuple(a for a in range(dy.ndim) if a != 1)
    for (value, reference), terms in zip(zip(ours, theirs, strict=True), (dy * x_hat, dy),
                                         strict=True):  # fmt: skip
        tol = dict(TOL[dtype])
        if dtype == np.float32:
            tol["atol"] = max(tol["atol"], 2.0**-20 * np.abs(terms).sum(axis=axes).max())
        np.testing.assert_allclose(value, reference, **tol)


def _dx_close(ours, theirs, dy, x, weight, dtype):
    """dx (channel-first) within the rounding of torch's float32 backward: it forms x - mean and
    dx = k * (dy - mean(dy) - x_hat * mean(dy * x_hat)), k = weight * invstd, in float32, so its
    error grows with the terms' size k * (|dy| + |x| * invstd * |mean(dy * x_hat)|), not with
    dx's: in a channel of mean 4.8 and std 0.1 torch was 1.6e-4 off (3.9 float32 epsilons of
    that size) where ours was 3e-6 from the float64 dx. float64: TOL as it is."""
    tol = dict(TOL[dtype])
    if dtype != np.float32:
        np.testing.assert_allclose(ours, theirs, **tol, err_msg="dx")
        return
    axes = tuple(a for a in range(x.ndim) if a != 1)
    mean, var = x.mean(axis=axes, dtype=np.float64), x.var(axis=axes, dtype=np.float64)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    invstd = np.reshape(1.0 / np.sqrt(var + 1e-5), shape)
    dy64 = dy.astype(np.float64)
    projection = np.abs((dy64 * _x_hat(x, mean, var)).mean(axis=axes, keepdims=True))
    terms = np.abs(dy64).max(axis=axes, keepdims=True) + (
        np.abs(x).max(axis=axes, keepdims=True) * invstd * projection
    )
    k = invstd if weight is None else np.abs(weight).reshape(shape) * invstd
    atol = np.maximum(tol["atol"], 2.0**-18 * k * terms)
    excess = np.abs(ours.astype(np.float64) - theirs) - atol - tol["rtol"] * np.abs(theirs)
    off = np.count_nonzero(excess > 0)
    assert not off, f"dx: {off} values off, by up to {excess.max()} over the bound"


def _x_hat(x, mean, var, eps=1e-5):
    """(x - mean) / sqrt(var + eps) in float64, channel-first x, per-channel mean and var."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x.astype(np.float64) - np.reshape(mean, shape)) / np.sqrt(np.reshape(var, shape) + eps)


@pytest.mark.parametrize("shape, channels_last, dtype, affine, momentum, track", CONFIGS)
def test_training_steps_then_eval_match_torch(rng, shape, channels_last, dtype, affine, momentum,
                                              track):  # fmt: skip
    torch.manual_seed(int(rng.integers(2**31)))
    channels = shape[1]
    axis = -1 if channels_last else 1
    ours = nbn.BatchNorm(channels, momentum=momentum, affine=affine, track_running_stats=track,
                         axis=axis, dtype=dtype)  # fmt: skip
    ref = TORCH_BN[len(shape)](channels, momentum=momentum, affine=affine,
                               track_running_stats=track, dtype=TORCH_DTYPE[dtype])  # fmt: skip
    if affine:
        weight = rng.uniform(0.5, 2.0, channels).astype(dtype)
        bias = rng.standard_normal(channels).astype(dtype)
        ours.weight[:], ours.bias[:] = weight, bias
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(weight))
            ref.bias.copy_(torch.from_numpy(bias))
    tol = TOL[dtype]
    for step in range(3):
        x = random_batch(rng, shape, dtype)
        dy = random_batch(rng, shape, dtype, mean_scale=0.5)
        x_t = torch.from_numpy(x).requires_grad_(True)
        y_t = ref(x_t)
        y_t.backward(torch.from_numpy(dy))
        y = ours(_ours_layout(x, channels_last))
        dx = ours.backward(_ours_layout(dy, channels_last))
        np.testing.assert_allclose(y, _to_np(y_t, channels_last), **tol, err_msg=f"y step {step}")
        first = np.moveaxis(dx, -1, 1) if channels_last else dx
        _dx_close(first, x_t.grad.numpy(), dy, x, ours.weight if affine else None, dtype)
        if affine:
            axes = tuple(a for a in range(x.ndim) if a != 1)
            x_hat = _x_hat(
                x, x.mean(axis=axes, dtype=np.float64), x.var(axis=axes, dtype=np.float64)
            )
            grads = (ref.weight.grad.numpy(), ref.bias.grad.numpy())
            _sums_close((ours.grad_weight, ours.grad_bias), grads, dy, x_hat, dtype)
            ref.weight.grad = ref.bias.grad = None
        if track:
            np.testing.assert_allclose(ours.running_mean, ref.running_mean.numpy(), **tol)
            np.testing.assert_allclose(ours.running_var, ref.running_var.numpy(), **tol)
            assert ours.num_batches_tracked == int(ref.num_batches_tracked) == step + 1
    ours.eval()
    ref.eval()
    running = (ref.running_mean.numpy().copy(), ref.running_var.numpy().copy()) if track else None
    x = random_batch(rng, shape, dtype)
    x_t = torch.from_numpy(x).requires_grad_(True)
    y_t = ref(x_t)
    dy = random_batch(rng, shape, dtype, mean_scale=0.5)
    y_t.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(ours(_ours_layout(x, channels_last)), _to_np(y_t, channels_last),
                               **tol)  # fmt: skip
    dx = ours.backward(_ours_layout(dy, channels_last))
    np.testing.assert_allclose(dx, _to_np(x_t.grad, channels_last), **tol)
    if affine:
        axes = tuple(a for a in range(x.ndim) if a != 1)
        mean, var = running or (
            x.mean(axis=axes, dtype=np.float64),
            x.var(axis=axes, dtype=np.float64),
        )
        _sums_close((ours.grad_weight, ours.grad_bias),
                    (ref.weight.grad.numpy(), ref.bias.grad.numpy()), dy, _x_hat(x, mean, var),
                    dtype)  # fmt: skip


@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_loads_into_torch_and_back(rng, affine):
    ours = nbn.BatchNorm(6, affine=affine)
    if affine:
        ours.weight[:] = rng.uniform(0.5, 2.0, 6)
        ours.bias[:] = rng.standard_normal(6)
    for _ in range(2):
        ours(random_batch(rng, (8, 6, 4, 4), np.float32))
    state = ours.state_dict()
    ref = torch.nn.BatchNorm2d(6, affine=affine)
    assert list(state) == list(ref.state_dict())
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    ours.eval()
    ref.eval()
    x = random_batch(rng, (3, 6, 5, 5), np.float32)
    expected = ref(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours(x), expected, rtol=1e-5, atol=1e-5)
    assert int(ref.num_batches_tracked) == 2
    back = nbn.BatchNorm(6, affine=affine).load_state_dict(ref.state_dict()).eval()
    np.testing.assert_allclose(back(x), expected, rtol=1e-5, atol=1e-5)
    assert back.num_batches_tracked == 2


def test_functional_batch_norm_matches_torch_functional(rng):
    x = random_batch(rng, (10, 4, 6), np.float64)
    weight, bias = rng.uniform(0.5, 2.0, 4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y_t = torch.nn.functional.batch_norm(
        torch.from_numpy(x), rm_t, rv_t, torch.from_numpy(weight), torch.from_numpy(bias),
        training=True, momentum=0.2, eps=1e-4,
    )  # fmt: skip
    y = nbn.batch_norm(x, rm, rv, weight, bias, training=True, momentum=0.2, eps=1e-4)
    np.testing.assert_allclose(y, y_t.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(rm, rm_t.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, rv_t.numpy(), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- mixed precision
MIXED = ("float16", "bfloat16", "float32", "float64")
MIXED_TOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-12}


def _numpy_dtype(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


def _torch_like(array):
    """The same values as a torch tensor of the same dtype (exact: float64 holds every value)."""
    return torch.from_numpy(array.astype(np.float64)).to(getattr(torch, array.dtype.name))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("x_dtype", MIXED)
def test_mixed_precision_is_what_torch_allows(rng, x_dtype, training):
    """PyTorch's CPU batch norm takes parameters and running buffers in x's dtype, or in float32
    for float16/bfloat16 x, one dtype for all of them, and refuses the rest (float32 x with
    float64 parameters, say). Every combination of x, parameter and buffer dtype: what torch
    takes gives torch's y and running buffers (updated in their own dtype), what torch refuses is
    a TypeError naming an argument, with nothing modified. torch decides what is allowed; the
    values are checked against the float64 formula."""
    x = random_batch(rng, (6, 3, 5), np.float64).astype(_numpy_dtype(x_dtype))
    for param_dtype in MIXED:
        for buffer_dtype in MIXED:
            case = (x_dtype, param_dtype, buffer_dtype, training)
            buffers = [v.astype(_numpy_dtype(buffer_dtype))
                       for v in (rng.normal(0, 1, 3), rng.uniform(0.5, 2, 3))]  # fmt: skip
            params = [v.astype(_numpy_dtype(param_dtype))
                      for v in (rng.uniform(0.5, 1.5, 3), rng.normal(0, 1, 3))]  # fmt: skip
            ours = [*buffers, *params]  # running_mean, running_var, weight, bias
            theirs = [_torch_like(v) for v in ours]
            before = [v.copy() for v in ours]
            try:
                torch.nn.functional.batch_norm(_torch_like(x), *theirs, training=training)
            except RuntimeError:  # "mixed dtype (CPU): ..."
                with pytest.raises(TypeError, match=r"^(weight|bias|running_mean|running_var) "
                                   r"has dtype|must share one dtype"):  # fmt: skip
                    nbn.batch_norm(x, *ours, training=training)
                for value, old in zip(ours, before, strict=True):
                    np.testing.assert_array_equal(value, old, err_msg=str(case))
                continue
            # values: the float64 formula on the same (upcast) values, to the output dtype's
            # precision (torch's own float16 statistics are less exact than ours)
            x64, (mean64, var64, weight64, bias64) = x.astype(np.float64), before
            mean64, var64 = mean64.astype(np.float64), var64.astype(np.float64)
            y = nbn.batch_norm(x, *ours, training=training)
            assert y.dtype == x.dtype, case
            if training:
                expected = naive.forward_train(x64, weight64, bias64)[0]
                expected_buffers = naive.running_update(mean64, var64, x64, 0.1)
            else:
                expected = naive.forward(x64, mean64, var64, weight64, bias64)
                expected_buffers = (mean64, var64)
            tol = MIXED_TOL[x_dtype]
            np.testing.assert_allclose(y.astype(np.float64), expected, rtol=tol, atol=tol,
                                       err_msg=str(case))  # fmt: skip
            tol = MIXED_TOL[buffer_dtype]
            for value, reference in zip(ours[:2], expected_buffers, strict=True):
                assert value.dtype.name == buffer_dtype, case
                np.testing.assert_allclose(value.astype(np.float64), reference, rtol=tol,
                                           atol=tol, err_msg=str(case))  # fmt: skip
