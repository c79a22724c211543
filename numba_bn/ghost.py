"""Ghost batch normalisation (Hoffer, Hubara & Soudry, 2017): the batch axis split into virtual
batches of ``k`` consecutive samples, each normalised with its own statistics.

The split is ``x.reshape(N // k, k, ...)``, as PyTorch code writes it; TF-Keras'
``virtual_batch_size`` grouped the samples the same way. Each ghost batch is a C-contiguous slice
of x along axis 0, so every step is the plain operation of :mod:`numba_bn.ops` on a slice: no
new numerics. The running statistics take one update per call, from the mean over the ghost
batches of their means and of their variances (unbiased per ghost batch or biased, as the
convention's running variance).
"""

from typing import NamedTuple

import numpy as np

from .memory import is_device_array
from .ops import batch_backward, batch_forward


class GhostResult(NamedTuple):
    """y, and per ghost batch (rows) the float64 mean, invstd and M2 (G, C); values per channel
    of one ghost batch."""

    y: object
    mean: object
    invstd: object
    m2: object
    count: int


def check_virtual_batch_size(value):
    """None, or the size of a ghost batch as a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"virtual_batch_size must be a positive integer or None, got {value!r}")
    return int(value)


def ghost_slices(x, size, axis):
    """The slices of the ghost batches of ``x`` along axis 0; ValueError when ``size`` does not
    divide the batch or the channels are on axis 0."""
    if is_device_array(x) or not isinstance(x, np.ndarray):
        raise TypeError("virtual_batch_size needs x as a NumPy array (CUDA arrays: not yet)")
    if x.ndim < 2 or axis % x.ndim == 0:
        raise ValueError(
            f"virtual_batch_size splits the batch axis 0, which must not be the channel axis "
            f"(axis={axis}, x of shape {x.shape})"
        )
    if x.shape[0] % size:
        raise ValueError(
            f"virtual_batch_size={size} must divide the batch of {x.shape[0]} samples (axis 0)"
        )
    return [slice(start, start + size) for start in range(0, x.shape[0], size)]


def ghost_forward(x, size, weight, bias, eps, axis, *, nan_policy, backend):
    """Each ghost batch of ``x`` normalised with its own statistics (:class:`GhostResult`)."""
    pieces = ghost_slices(x, size, axis)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    channels = x.shape[axis]
    stats = np.empty((3, len(pieces), channels))
    count = 0
    for g, piece in enumerate(pieces):
        result = batch_forward(x[piece], weight, bias, eps, axis, nan_policy=nan_policy,
                               out=y[piece], backend=backend)  # fmt: skip
        stats[:, g] = result.mean, result.invstd, result.m2
        count = result.count
    return GhostResult(y, stats[0], stats[1], stats[2], count)


def batch_statistics(result, unbiased):
    """(mean of the ghost means, mean of the ghost variances), float64 (C,)."""
    if not len(result.mean):
        return None
    variances = result.m2 / (result.count - 1 if unbiased else result.count)
    return result.mean.mean(axis=0), variances.mean(axis=0)


def ghost_backward(dy, x, result, size, weight, axis, *, backend):
    """(dx, sum_dy, sum_dx_hat_dy): the exact backward of each ghost batch, its sums over every
    ghost batch (dweight = sum over ghosts of invstd * sum_dy_xmu)."""
    pieces = ghost_slices(x, size, axis)
    dy, x = np.ascontiguousarray(dy), np.ascontiguousarray(x)
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
    dx = np.empty_like(x)
    channels = x.shape[axis]
    sum_dy, dweight = np.zeros(channels), np.zeros(channels)
    for g, piece in enumerate(pieces):
        part = batch_backward(
            dy[piece], x[piece], result.mean[g], result.invstd[g], weight, axis, out=dx[piece],
            backend=backend,
        )  # fmt: skip
        sum_dy += part.sum_dy
        dweight += result.invstd[g] * part.sum_dy_xmu
    return dx, sum_dy, dweight
