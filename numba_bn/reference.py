"""Batch norm written directly in NumPy, as one would by hand.

Used by ``numba-bn demo`` and the benchmarks twice: in float64 to check results, and in the
input dtype as the "NumPy naive" peer that the kernels are timed against. (The tests have their
own, loop-based references in tests/naive.py.)
"""

import numpy as np


def _reduce_axes(x, axis):
    axis = axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != axis), axis


def _per_channel(v, x, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    return v.reshape(shape)


def forward_train(x, weight=None, bias=None, eps=1e-5, axis=1):
    """(y, mean, invstd) with batch statistics (biased variance)."""
    axes, axis = _reduce_axes(x, axis)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - _per_channel(mean, x, axis)) * _per_channel(invstd, x, axis)
    if weight is not None:
        y = y * _per_channel(weight, x, axis)
    if bias is not None:
        y = y + _per_channel(bias, x, axis)
    return y, mean, invstd


def forward_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, axis=1):
    axis = axis % x.ndim
    invstd = 1.0 / np.sqrt(running_var + eps)
    y = (x - _per_channel(running_mean, x, axis)) * _per_channel(invstd, x, axis)
    if weight is not None:
        y = y * _per_channel(weight, x, axis)
    if bias is not None:
        y = y + _per_channel(bias, x, axis)
    return y


def backward(dy, x, mean, invstd, weight=None, axis=1):
    """(dx, dweight, dbias) of the training-mode forward (docs/backward.md)."""
    axes, axis = _reduce_axes(x, axis)
    m = x.size // x.shape[axis]
    xhat = (x - _per_channel(mean, x, axis)) * _per_channel(invstd, x, axis)
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    scale = invstd if weight is None else weight * invstd
    dx = _per_channel(scale, x, axis) * (
        dy - _per_channel(dbias / m, x, axis) - xhat * _per_channel(dweight / m, x, axis)
    )
    return dx, dweight, dbias
