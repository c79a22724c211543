"""Batch norm folded into a neighbouring linear layer, for deployment.

In eval mode batch norm is an affine map per channel, ``y = x * scale + shift`` with

    scale = bn_weight / sqrt(running_var + eps),    shift = bn_bias - running_mean * scale,

so a linear layer (dense, convolution) next to it can absorb it:

* before it (``fold_into``): ``BN(W x + b) = (scale * W) x + (b - running_mean) * scale + bn_bias``,
  the rows of W along its output-channel ``axis`` scaled;
* after it (``fold_into_next``): ``W BN(x) + b = (W * scale) x + b + W shift``, the columns of W
  along its input-channel ``axis`` scaled, and ``W shift`` summed over every axis but the
  output axis ``out_axis``.

Everything is computed in float64 and returned in the weight's dtype, as PyTorch's
``torch.nn.utils.fusion`` returns the convolution's dtype.
"""

import numpy as np
from numpy.typing import ArrayLike

from .annotations import Float64Array, HostArray
from .checks import check_eps
from .layout import normalize_axis
from .memory import is_device_array


def scale_shift(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    bn_weight: ArrayLike | None = None,
    bn_bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[Float64Array, Float64Array]:
    """``(scale, shift)``, float64 (C,): the eval-mode batch norm as ``x * scale + shift``."""
    eps = check_eps(eps, training=False)
    running_mean = _vector(running_mean, "running_mean")
    channels = running_mean.shape[0]
    running_var = _vector(running_var, "running_var", channels)
    bn_weight = _vector(bn_weight, "bn_weight", channels, default=1.0)
    bn_bias = _vector(bn_bias, "bn_bias", channels, default=0.0)
    variance = running_var + eps
    bad = np.flatnonzero(~(variance > 0))  # negative, NaN, or zero with eps = 0
    if bad.size:
        c = int(bad[0])
        raise ValueError(
            f"running_var + eps must be > 0 to fold, got {running_var[c]} + {eps} in channel {c}"
        )
    scale = bn_weight / np.sqrt(variance)
    return scale, bn_bias - running_mean * scale


def fold_into(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    bn_weight: ArrayLike | None = None,
    bn_bias: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 0,
) -> tuple[HostArray, HostArray]:
    """``(folded_weight, folded_bias)`` of a linear layer followed by batch norm (eval mode).

    ``axis`` is the output-channel axis of ``weight``: 0 for a convolution (OIHW) and a linear
    layer (out, in), 1 for a transposed convolution (in, out, ...), -1 for HWIO and a Keras
    Dense kernel (in, out). ``bias=None`` means no bias (zero). Exact up to rounding: the layer
    and the batch norm are both affine in the same output channel.
    """
    scale, shift = scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    return affine_into(weight, bias, scale, shift, axis)


def fold_into_next(
    weight: ArrayLike,
    bias: ArrayLike | None,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    bn_weight: ArrayLike | None = None,
    bn_bias: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    out_axis: int = 0,
) -> tuple[HostArray, HostArray]:
    """``(folded_weight, folded_bias)`` of batch norm (eval mode) followed by a linear layer.

    ``axis`` is the input-channel axis of ``weight`` and ``out_axis`` its output axis: a linear
    layer (out, in) is ``axis=1, out_axis=0``; a Keras Dense kernel (in, out) ``axis=0,
    out_axis=1``; a 1x1 convolution OIHW ``axis=1, out_axis=0``; HWIO ``axis=2, out_axis=3``.

    Exact for linear layers and for convolutions without padding. A padded convolution is not
    folded exactly: its border outputs read padding zeros where the unfolded network read
    ``BN(0) = shift``, while the folded bias adds ``W shift`` for every tap, so the border
    differs (a 1x1 convolution has no padding to worry about).
    """
    scale, shift = scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    return affine_into_next(weight, bias, scale, shift, axis, out_axis)


def affine_into(
    weight: ArrayLike, bias: ArrayLike | None, scale: ArrayLike, shift: ArrayLike, axis: int = 0
) -> tuple[HostArray, HostArray]:
    """:func:`fold_into` for any per-channel map ``x * scale + shift`` after the layer."""
    weight = _weight(weight)
    axis = normalize_axis(axis, weight.ndim)
    scale, shift = _vector(scale, "scale"), _vector(shift, "shift", scale.shape[0])
    channels = _matches(scale, weight, axis, "axis")
    bias = _vector(bias, "bias", channels, default=0.0)
    folded = np.asarray(weight, np.float64) * _along(scale, axis, weight.ndim)
    return folded.astype(weight.dtype), (bias * scale + shift).astype(weight.dtype)


def affine_into_next(
    weight: ArrayLike,
    bias: ArrayLike | None,
    scale: ArrayLike,
    shift: ArrayLike,
    axis: int = 1,
    out_axis: int = 0,
) -> tuple[HostArray, HostArray]:
    """:func:`fold_into_next` for any per-channel map ``x * scale + shift`` before the layer."""
    weight = _weight(weight)
    axis = normalize_axis(axis, weight.ndim)
    out_axis = normalize_axis(out_axis, weight.ndim, "out_axis")
    if axis == out_axis:
        raise ValueError(f"axis and out_axis must differ, both are {axis}")
    scale, shift = _vector(scale, "scale"), _vector(shift, "shift", scale.shape[0])
    _matches(scale, weight, axis, "axis")
    bias = _vector(bias, "bias", weight.shape[out_axis], default=0.0)
    w64 = np.asarray(weight, np.float64)
    others = tuple(a for a in range(weight.ndim) if a != out_axis)
    folded_bias = bias + (w64 * _along(shift, axis, weight.ndim)).sum(axis=others)
    folded = w64 * _along(scale, axis, weight.ndim)
    return folded.astype(weight.dtype), folded_bias.astype(weight.dtype)


# ------------------------------------------------------------------------------ arguments
def _weight(weight: ArrayLike) -> HostArray:
    if is_device_array(weight):
        raise TypeError(
            "weight is a CUDA array: fold on the host (a.copy_to_host(), cupy: a.get())"
        )
    weight = np.asarray(weight)
    if not np.issubdtype(weight.dtype, np.floating):
        raise TypeError(f"weight must hold floats, got dtype {weight.dtype}")
    if weight.ndim < 2:
        raise ValueError(f"weight must have at least 2 dimensions, got shape {weight.shape}")
    return weight


def _vector(value, name, channels=None, default=None) -> Float64Array:
    """``value`` as a float64 (C,) vector; ``default`` everywhere for None (when allowed)."""
    if value is None and default is not None:
        return np.full(channels, default)
    if value is None:
        raise ValueError(f"{name} is required")
    if is_device_array(value):
        raise TypeError(f"{name} is a CUDA array: fold on the host")
    value = np.asarray(value)
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got dtype {value.dtype}")
    if value.ndim != 1 or (channels is not None and value.shape[0] != channels):
        expected = f"({channels},)" if channels is not None else "(C,)"
        raise ValueError(f"{name} must have shape {expected}, got {value.shape}")
    return value.astype(np.float64)


def _matches(scale, weight, axis, name):
    channels = scale.shape[0]
    if weight.shape[axis] != channels:
        raise ValueError(
            f"weight has {weight.shape[axis]} channels on {name}={axis} (shape {weight.shape}), "
            f"the batch norm {channels}"
        )
    return channels


def _along(vector, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)
