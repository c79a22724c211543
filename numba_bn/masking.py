"""Masked batch statistics: statistics over the True positions of a mask, y everywhere.

A mask (padding in sequences, say) has the shape of x without the channel axis (Keras' rule,
for any channel axis) or broadcasts to it. The statistics are those of the selected values; every
position is normalised with them; the running update takes the masked statistics. The backward
is exact: every output depends on the masked mean and variance, so the reductions run over all
positions while only selected positions feed the statistics:

    dx = w * invstd * (dy - m * sum(dy) / n - m * x_hat * sum(dy * x_hat) / n)

with m the mask (1 or 0) and n the number of selected values per channel.

This is the exchange of :mod:`numba_bn.ops` (where SyncBatchNorm's ranks meet): the training
forward's statistics are replaced by the masked ones, and the backward's count by n; a position
outside the mask then takes ``dx = w * invstd * dy``. No new kernels.

Differences from Keras: no ``+ 1e-7`` in the divisor; an all-False mask leaves the running
statistics as they were (Keras decays them toward 0) and gives NaN statistics (and y), as a
batch of no values does.
"""

import numpy as np

from .layout import normalize_axis
from .memory import host_view, is_device_array
from .moments import moments
from .ops import TrainResult, batch_backward, batch_forward


def check_mask(mask, x, axis):
    """The mask broadcast to x's shape without the channel axis (booleans), and that axis."""
    if is_device_array(mask) or is_device_array(x):
        raise TypeError("mask= runs on host (NumPy) arrays")
    x_shape = np.shape(x)
    axis = normalize_axis(axis, len(x_shape))
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    positions = x_shape[:axis] + x_shape[axis + 1 :]
    try:
        return np.broadcast_to(mask, positions), axis
    except ValueError:
        raise ValueError(
            f"mask must have the shape of x without the channel axis, {positions}, or broadcast "
            f"to it, got {mask.shape}"
        ) from None


def selected(x, mask, axis):
    """The selected values as an (n, C) array (a copy), and the mask as x's shape (booleans)."""
    channels_last = np.moveaxis(np.asarray(x), axis, -1)
    return channels_last[mask], np.expand_dims(mask, axis)


class MaskedStatistics:
    """:class:`numba_bn.ops.Exchange` that puts the masked statistics in place of the batch's."""

    def __init__(self, values, backend):
        self.moments = moments(values, axis=1, backend=backend)

    def batch_stats(self, dtype, count, mean, m2):
        if self.moments.count == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 value per channel "
                "selected by mask"
            )
        return self.moments.count, self.moments.mean, self.moments.m2

    def sums(self, dtype, count, sum_dy, sum_dy_xmu, *, frozen):
        return self.moments.count, sum_dy, sum_dy_xmu


class SelectedCount:
    """The backward's exchange: sums over every position, the count of the selected values."""

    def __init__(self, count):
        self.count = count

    def sums(self, dtype, count, sum_dy, sum_dy_xmu, *, frozen):
        return self.count, sum_dy, sum_dy_xmu


def outside_gradient(dx, dy, mask_full, invstd, weight, axis):
    """dx (=) at positions outside the mask: ``w * invstd * dy`` (the statistics do not depend
    on those x)."""
    shape = [1] * dy.ndim
    shape[axis] = -1
    scale = np.asarray(invstd, np.float64) * (1.0 if weight is None else weight)
    outside = (dy * scale.reshape(shape)).astype(dx.dtype)
    np.copyto(dx, outside, where=~mask_full)
    return dx


def masked_batch_forward(x, weight, bias, eps, axis, mask, *, running_mean=None,
                         running_var=None, momentum=0.1, unbiased=True, nan_policy="propagate",
                         out=None, backend="cpu", residual=None, activation=None):  # fmt: skip
    """ops.batch_forward with the statistics of the positions ``mask`` selects."""
    x, mask = host_view(x), host_view(mask)  # torch CPU tensors, DLPack objects: NumPy's views
    mask, axis = check_mask(mask, x, axis)
    values, _ = selected(x, mask, axis)
    exchange = MaskedStatistics(values, backend)
    epilogue = {"residual": residual, "activation": activation}
    if exchange.moments.count == 0:  # nothing selected: NaN statistics, as a batch of no values
        result = batch_forward(x, weight, bias, eps, axis, nan_policy=nan_policy, out=out,
                               backend=backend, **epilogue)  # fmt: skip
        result.y[...] = np.nan
        nan = np.full(np.shape(result.mean), np.nan)
        return TrainResult(result.y, nan, nan, nan, 0)
    return batch_forward(
        x, weight, bias, eps, axis, running_mean=running_mean, running_var=running_var,
        momentum=momentum, unbiased=unbiased, nan_policy=nan_policy, out=out, backend=backend,
        exchange=exchange, **epilogue,
    )  # fmt: skip


def masked_batch_backward(dy, x, mean, invstd, weight, axis, mask, *, out=None, backend="cpu",
                          activation=None, y=None, residual_out=None):  # fmt: skip
    """ops.batch_backward of a masked forward (see the module's formula); through the
    epilogue's activation first, as ops.batch_backward."""
    dy, x, mask, y = (host_view(value) for value in (dy, x, mask, y))
    mask, axis = check_mask(mask, x, axis)
    count = int(np.count_nonzero(mask))
    result = batch_backward(dy, x, mean, invstd, weight, axis, out=out, backend=backend,
                            exchange=SelectedCount(count), activation=activation, y=y,
                            residual_out=residual_out)  # fmt: skip
    grad = np.asarray(dy)
    if activation is not None:  # checked by batch_backward: the gradient that reached BN
        grad = np.where(np.asarray(y) > 0, grad, grad.dtype.type(0))
    outside_gradient(result.dx, grad, np.expand_dims(mask, axis), invstd, weight, axis)
    return result
