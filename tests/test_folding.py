"""Folding batch norm into the neighbouring layer: against torch.nn.utils.fusion, and against the
unfolded network evaluated in float64 (NumPy convolutions written here)."""

import numpy as np
import pytest

import numba_bn as nbn

from conftest import random_batch

torch = pytest.importorskip("torch")
fusion = pytest.importorskip("torch.nn.utils.fusion")


def _bn_state(rng, channels, dtype=np.float32):
    return (
        rng.normal(0, 3, channels).astype(dtype),  # running_mean
        rng.uniform(0.1, 5, channels).astype(dtype),  # running_var
        rng.uniform(0.5, 2, channels).astype(dtype),  # bn_weight
        rng.normal(0, 1, channels).astype(dtype),  # bn_bias
    )


def _torch(*arrays):
    return [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def conv2d(x, weight, bias=None, padding=0):
    """NCHW x, OIHW weight, stride 1, zero padding: float64 loops over the taps."""
    x = np.pad(np.asarray(x, np.float64), [(0, 0), (0, 0), (padding,) * 2, (padding,) * 2])
    out_channels, _, kh, kw = weight.shape
    height, width = x.shape[2] - kh + 1, x.shape[3] - kw + 1
    y = np.zeros((x.shape[0], out_channels, height, width))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum(
                "nchw,oc->nohw", x[:, :, i : i + height, j : j + width], weight[:, :, i, j]
            )
    return y if bias is None else y + np.asarray(bias, np.float64)[None, :, None, None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_into_a_convolution_matches_torch(rng, dtype, with_bias):
    weight = rng.standard_normal((6, 4, 3, 3)).astype(dtype)
    bias = rng.standard_normal(6).astype(dtype) if with_bias else None
    state = _bn_state(rng, 6, dtype)
    folded_w, folded_b = nbn.fold_into(weight, bias, *state, eps=1e-3)
    expected_w, expected_b = fusion.fuse_conv_bn_weights(*_torch(weight, bias, *state[:2]), 1e-3,
                                                         *_torch(*state[2:]))  # fmt: skip
    assert folded_w.dtype == dtype and folded_b.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(folded_w, expected_w.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(folded_b, expected_b.detach().numpy(), rtol=tol, atol=tol * 10)


def test_fold_into_a_transposed_convolution_matches_torch(rng):
    weight = rng.standard_normal((4, 6, 3, 3))  # (in, out, kh, kw)
    state = _bn_state(rng, 6, np.float64)
    folded_w, folded_b = nbn.fold_into(weight, None, *state, eps=1e-5, axis=1)
    expected_w, expected_b = fusion.fuse_conv_bn_weights(
        *_torch(weight, None, *state[:2]), 1e-5, *_torch(*state[2:]), transpose=True
    )
    np.testing.assert_allclose(folded_w, expected_w.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(folded_b, expected_b.detach().numpy(), rtol=1e-13, atol=1e-13)


def test_fold_into_a_linear_layer_matches_torch(rng):
    weight, bias = rng.standard_normal((5, 7)), rng.standard_normal(5)
    state = _bn_state(rng, 5, np.float64)
    folded_w, folded_b = nbn.fold_into(weight, bias, *state)
    expected_w, expected_b = fusion.fuse_linear_bn_weights(*_torch(weight, bias, *state[:2]), 1e-5,
                                                           *_torch(*state[2:]))  # fmt: skip
    np.testing.assert_allclose(folded_w, expected_w.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(folded_b, expected_b.detach().numpy(), rtol=1e-13, atol=1e-13)


def test_a_folded_conv_bn_relu_block_gives_the_unfolded_eval_outputs(rng):
    x = random_batch(rng, (2, 3, 9, 8), np.float64)
    weight, bias = rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    state = _bn_state(rng, 5, np.float64)
    unfolded = nbn.forward_eval(conv2d(x, weight, bias, padding=1), *state, eps=1e-5)
    folded_w, folded_b = nbn.fold_into(weight, bias, *state, eps=1e-5)
    folded = conv2d(x, folded_w, folded_b, padding=1)
    np.testing.assert_allclose(np.maximum(folded, 0), np.maximum(unfolded, 0), atol=1e-12)


def test_fold_into_hwio_and_keras_dense_kernels(rng):
    """Channels-last weights: the output axis is the last one."""
    x = random_batch(rng, (6, 4), np.float64)
    kernel, bias = rng.standard_normal((4, 3)), rng.standard_normal(3)  # Keras Dense (in, out)
    state = _bn_state(rng, 3, np.float64)
    folded_w, folded_b = nbn.fold_into(kernel, bias, *state, axis=-1)
    expected = nbn.forward_eval(x @ kernel + bias, *state)
    np.testing.assert_allclose(x @ folded_w + folded_b, expected, atol=1e-12)
    hwio = rng.standard_normal((3, 3, 4, 3))
    folded_w, _ = nbn.fold_into(hwio, None, *state, axis=-1)
    folded_oihw = nbn.fold_into(hwio.transpose(3, 2, 0, 1), None, *state)[0]
    np.testing.assert_allclose(folded_w.transpose(3, 2, 0, 1), folded_oihw, rtol=1e-15)


@pytest.mark.parametrize(
    "shape, axis, out_axis",
    [((5, 4), 1, 0), ((4, 5), 0, 1), ((5, 4, 1, 1), 1, 0), ((1, 1, 4, 5), 2, 3)],
    ids=["linear", "keras-dense", "1x1-oihw", "1x1-hwio"],
)
def test_fold_into_next_is_exact_for_linear_layers_and_1x1_convolutions(rng, shape, axis, out_axis):
    x = random_batch(rng, (3, 4, 2, 3), np.float64)
    weight, bias = rng.standard_normal(shape), rng.standard_normal(shape[out_axis])
    state = _bn_state(rng, 4, np.float64)
    matrix = np.moveaxis(weight, (out_axis, axis), (0, 1)).reshape(shape[out_axis], 4)

    def layer(inputs, w_matrix, b):  # the layer as (out, in) on the channel axis of NCHW
        return np.einsum("nchw,oc->nohw", inputs, w_matrix) + b[None, :, None, None]

    expected = layer(nbn.forward_eval(x, *state), matrix, bias)
    folded_w, folded_b = nbn.fold_into_next(weight, bias, *state, axis=axis, out_axis=out_axis)
    folded_matrix = np.moveaxis(folded_w, (out_axis, axis), (0, 1)).reshape(shape[out_axis], 4)
    np.testing.assert_allclose(layer(x, folded_matrix, folded_b), expected, atol=1e-12)


def test_fold_into_next_of_a_padded_convolution_differs_only_at_the_border(rng):
    """The docstring's caveat: padding zeros after batch norm are not BN(0)."""
    x = random_batch(rng, (2, 3, 7, 6), np.float64)
    weight, bias = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    state = _bn_state(rng, 3, np.float64)
    expected = conv2d(nbn.forward_eval(x, *state), weight, bias, padding=1)
    folded = conv2d(x, *nbn.fold_into_next(weight, bias, *state), padding=1)
    np.testing.assert_allclose(folded[:, :, 1:-1, 1:-1], expected[:, :, 1:-1, 1:-1], atol=1e-11)
    assert not np.allclose(folded[:, :, 0], expected[:, :, 0])


def test_the_layer_folds_with_its_own_state(rng):
    bn = nbn.BatchNorm(4, eps=1e-3, dtype=np.float64, convention="keras", axis=1)
    for _ in range(3):
        bn(random_batch(rng, (8, 4, 3), np.float64))
    bn.weight[:], bn.bias[:] = rng.uniform(0.5, 2, 4), rng.normal(0, 1, 4)
    x = random_batch(rng, (5, 4, 3), np.float64)
    scale, shift = bn.scale_shift()
    assert scale.dtype == np.float64 and scale.shape == (4,)
    np.testing.assert_allclose(x * scale[:, None] + shift[:, None], bn.eval()(x), atol=1e-12)
    weight = rng.standard_normal((4, 6))
    state = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    expected = nbn.fold_into(weight, None, *state, eps=1e-3)
    for got, want in zip(bn.fold_into(weight, axis=0), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)
    weight = rng.standard_normal((6, 4))
    expected = nbn.fold_into_next(weight, None, *state, eps=1e-3)
    for got, want in zip(bn.fold_into_next(weight), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)


def test_a_layer_without_running_statistics_cannot_fold():
    bn = nbn.BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bn.fold_into(np.ones((3, 2)))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda s: nbn.fold_into(np.ones((4, 2)), None, *s), ValueError, r"4 channels on axis=0"),
        (lambda s: nbn.fold_into(np.ones((3, 2), int), None, *s), TypeError, "must hold floats"),
        (lambda s: nbn.fold_into(np.ones(3), None, *s), ValueError, "at least 2 dimensions"),
        (lambda s: nbn.fold_into(np.ones((3, 2)), np.ones(2), *s), ValueError, r"bias must have"),
        (lambda s: nbn.fold_into(np.ones((3, 2)), None, *s, eps=-1.0), ValueError, "eps"),
        (lambda s: nbn.fold_into(np.ones((3, 2)), None, s[0], -s[1]), ValueError,
         r"running_var \+ eps must be > 0 to fold, got -\S+ \+ 1e-05 in channel 0"),
        (lambda s: nbn.fold_into(np.ones((3, 2)), None, s[0], s[1][:2]), ValueError,
         r"running_var must have shape \(3,\)"),
        (lambda s: nbn.fold_into_next(np.ones((2, 3)), None, *s, axis=0, out_axis=0),
         ValueError, "axis and out_axis must differ"),
        (lambda s: nbn.fold_into_next(np.ones((2, 3)), None, *s, axis=0, out_axis=1),
         ValueError, r"2 channels on axis=0"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(rng, call, error, message):
    state = _bn_state(rng, 3, np.float64)
    before = [a.copy() for a in state]
    with pytest.raises(error, match=message):
        call(state)
    for a, b in zip(state, before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_example_of_docs_deployment_runs():
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, re.DOTALL)
    assert len(blocks) == 2  # the folded conv-BN-ReLU block, then the fused residual block
    namespace = {"conv2d": conv2d}
    for code in blocks:  # one session, as a reader runs them
        exec(compile(code, "docs/deployment.md", "exec"), namespace)
