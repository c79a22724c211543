"""float64 references written as plain loops over (outer, C, inner), independent of the library.

Each reference loops over channels and computes statistics with the two-pass textbook formulas
in float64 (math.fsum for the sums), so it shares no code or algorithm with the kernels.
"""

import math

import numpy as np


def _view(x, axis):
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    return x.reshape(math.prod(x.shape[:axis]), x.shape[axis], -1), axis


def batch_stats(x, axis=1):
    """Per-channel mean, biased and unbiased variance."""
    v, _ = _view(x, axis)
    channels = v.shape[1]
    mean, var_b, var_u = np.empty(channels), np.empty(channels), np.empty(channels)
    for c in range(channels):
        values = v[:, c, :].ravel()
        m = len(values)
        mean[c] = math.fsum(values) / m
        sq = math.fsum((values - mean[c]) ** 2)
        var_b[c] = sq / m
        var_u[c] = sq / (m - 1) if m > 1 else math.nan
    return mean, var_b, var_u


def forward(x, mean, var, weight=None, bias=None, eps=1e-5, axis=1):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, channel by channel."""
    v, axis = _view(x, axis)
    y = np.empty_like(v)
    for c in range(v.shape[1]):
        w = 1.0 if weight is None else float(weight[c])
        b = 0.0 if bias is None else float(bias[c])
        y[:, c, :] = (v[:, c, :] - mean[c]) / math.sqrt(var[c] + eps) * w + b
    return y.reshape(np.shape(x))


def forward_train(x, weight=None, bias=None, eps=1e-5, axis=1):
    mean, var_b, _ = batch_stats(x, axis)
    return forward(x, mean, var_b, weight, bias, eps, axis), mean, 1.0 / np.sqrt(var_b + eps)


def running_update(running_mean, running_var, x, momentum, axis=1, unbiased=True):
    """PyTorch's rule: r = (1 - momentum) * r + momentum * batch (unbiased variance)."""
    mean, var_b, var_u = batch_stats(x, axis)
    var = var_u if unbiased else var_b
    new_mean = [(1 - momentum) * r + momentum * m for r, m in zip(running_mean, mean, strict=True)]
    new_var = [(1 - momentum) * r + momentum * s for r, s in zip(running_var, var, strict=True)]
    return np.array(new_mean), np.array(new_var)


def backward(dy, x, weight=None, eps=1e-5, axis=1):
    """Training-mode backward from the textbook formula (Ioffe & Szegedy 2015, section 3).

    dvar = sum(dxhat * (x - mu)) * -1/2 (var + eps)^-3/2,
    dmu  = sum(dxhat) * -1/sqrt(var + eps) + dvar * sum(-2 (x - mu)) / m,
    dx   = dxhat / sqrt(var + eps) + dvar * 2 (x - mu) / m + dmu / m.
    """
    xv, axis = _view(x, axis)
    gv, _ = _view(dy, axis)
    mean, var_b, _ = batch_stats(x, axis)
    dx = np.empty_like(xv)
    dweight, dbias = np.empty(xv.shape[1]), np.empty(xv.shape[1])
    for c in range(xv.shape[1]):
        xc, gc = xv[:, c, :], gv[:, c, :]
        m = xc.size
        w = 1.0 if weight is None else float(weight[c])
        xmu = xc - mean[c]
        std = math.sqrt(var_b[c] + eps)
        dxhat = gc * w
        dvar = math.fsum((dxhat * xmu).ravel()) * -0.5 * std**-3
        dmu = -math.fsum(dxhat.ravel()) / std + dvar * math.fsum((-2.0 * xmu).ravel()) / m
        dx[:, c, :] = dxhat / std + dvar * 2.0 * xmu / m + dmu / m
        dweight[c] = math.fsum((gc * xmu / std).ravel())
        dbias[c] = math.fsum(gc.ravel())
    return dx.reshape(np.shape(x)), dweight, dbias


def backward_frozen(dy, running_var, weight=None, eps=1e-5, axis=1):
    """Eval-mode backward: dx = dy * weight / sqrt(running_var + eps)."""
    gv, axis = _view(dy, axis)
    dx = np.empty_like(gv)
    for c in range(gv.shape[1]):
        w = 1.0 if weight is None else float(weight[c])
        dx[:, c, :] = gv[:, c, :] * w / math.sqrt(float(running_var[c]) + eps)
    return dx.reshape(np.shape(dy))
