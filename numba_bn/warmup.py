"""Compile (or load from Numba's cache) every kernel specialisation ahead of the first call."""

import time

import numpy as np


def warmup(dtypes=(np.float32, np.float64)):
    """Run each kernel once per memory shape, serial and parallel; returns the seconds taken.

    Numba compiles on first use; with its on-disk cache (NUMBA_CACHE_DIR) a later process loads
    the machine code instead, which is what this measures when called again in a new process.
    """
    from .cpu import PARALLEL_MIN_ELEMENTS
    from .functional import backward, forward_eval, forward_train

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    big = PARALLEL_MIN_ELEMENTS // 8 + 1  # inputs of PARALLEL_MIN_ELEMENTS take the parallel twins
    shapes = [(4, 8, 3), (4, 8), (4, 2, 3)]  # planes fused, rows, planes split: serial twins
    shapes += [(8, 8, big // 8), (big, 8), (8, 2, big // 2)]  # the same, parallel twins
    for dtype in dtypes:
        for shape in shapes:
            x = rng.standard_normal(shape).astype(dtype)
            y, mean, invstd = forward_train(x)
            forward_eval(x, mean, 1.0 / invstd**2)
            backward(y, x, mean, invstd)
    return time.perf_counter() - start
