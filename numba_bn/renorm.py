"""Batch Renormalization (Ioffe, 2017) with Keras 3's formulas.

In training, the batch statistics normalise as usual and a per-channel correction maps them onto
the moving ones, held constant in the backward:

    stddev = sqrt(var + eps)                     (biased batch variance)
    floor = max(renorm_stddev, sqrt(eps))
    r = stddev / floor,   d = (mean - renorm_mean) / floor
    r, d clipped to renorm_clipping's rmin, rmax, dmax (a missing key: no clip)
    y = x_hat * (gamma * r) + (gamma * d + beta)

so a renorm forward is the eval-mode affine pass with the batch's mean and variance and the
composed scale and shift. Then, from the statistics before the update (every "momentum" the
weight of the old value, as in Keras):

    renorm_mean   <- renorm_mean * renorm_momentum + mean * (1 - renorm_momentum)
    renorm_stddev <- renorm_stddev * renorm_momentum + stddev * (1 - renorm_momentum)
    moving_mean   <- moving_mean * momentum + mean * (1 - momentum)         (running_mean)
    moving_stddev <- moving_stddev * momentum + stddev * (1 - momentum)
    moving_variance = max(moving_stddev^2 - eps, 0)                          (running_var)

Computed here in float64 (Keras computes in float32).
"""

import math

import numpy as np

CLIPPING_KEYS = ("rmin", "rmax", "dmax")
BUFFERS = ("renorm_mean", "renorm_stddev", "moving_stddev")


def check_clipping(clipping):
    """``renorm_clipping`` as a dict of floats; ValueError for unknown keys or rmax < rmin."""
    clipping = dict(clipping or {})
    unknown = sorted(set(clipping) - set(CLIPPING_KEYS))
    if unknown:
        raise ValueError(f"renorm_clipping has unknown keys {unknown}; known: {CLIPPING_KEYS}")
    for key, value in clipping.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"renorm_clipping[{key!r}] must be a number, got {value!r}")
        clipping[key] = float(value)
    if clipping.get("dmax", 0.0) < 0:
        raise ValueError(f"renorm_clipping['dmax'] must be >= 0, got {clipping['dmax']}")
    if "rmin" in clipping and "rmax" in clipping and clipping["rmax"] < clipping["rmin"]:
        raise ValueError(
            f"renorm_clipping needs rmax >= rmin, got rmin={clipping['rmin']}, "
            f"rmax={clipping['rmax']}"
        )
    return clipping


def corrections(mean, var, eps, renorm_mean, renorm_stddev, clipping):
    """(r, d, stddev), float64 (C,), from the batch's mean and biased variance."""
    stddev = np.sqrt(var + eps)
    floor = np.maximum(np.asarray(renorm_stddev, np.float64), math.sqrt(eps))
    r = stddev / floor
    d = (mean - renorm_mean) / floor
    if "rmin" in clipping:
        r = np.maximum(r, clipping["rmin"])
    if "rmax" in clipping:
        r = np.minimum(r, clipping["rmax"])
    if "dmax" in clipping:
        d = np.clip(d, -clipping["dmax"], clipping["dmax"])
    return r, d, stddev


def composed_affine(r, d, gamma, beta):
    """(scale, shift) float64 of ``x_hat * (gamma * r) + (gamma * d + beta)``."""
    gamma = 1.0 if gamma is None else np.asarray(gamma, np.float64)
    beta = 0.0 if beta is None else np.asarray(beta, np.float64)
    return gamma * r, gamma * d + beta


def moving_average(old, new, old_weight):
    return old * old_weight + new * (1.0 - old_weight)
