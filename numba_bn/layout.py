"""Any array and channel axis -> the canonical ``(outer, C, inner)`` view.

For a C-contiguous array the view is a reshape, whatever the axis:
``outer = prod(shape[:axis])``, ``C = shape[axis]``, ``inner = prod(shape[axis + 1:])``.
(N, C) is (N, C, 1); NCHW is (N, C, H*W); channels-last NHWC with axis -1 is (N*H*W, C, 1).
Non-contiguous inputs are copied once into C order (checks.Prepared, through the backend's
memory), the only copy the library makes of x.
"""

import math

import numpy as np


def check_axis(axis, name="axis"):
    """``axis`` as an int; TypeError for anything but an integer (1.5, [1, 2], True)."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(axis).__name__} {axis!r}")
    return int(axis)


def normalize_axis(axis, ndim, name="axis"):
    """Return ``axis`` as a non-negative index into ``ndim`` dimensions, or raise ValueError."""
    axis = check_axis(axis, name)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an input with {ndim} dimensions")
    return int(axis) % ndim


def canonical_shape(shape, axis):
    """(outer, C, inner) of ``shape`` with channels on (non-negative) ``axis``."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
