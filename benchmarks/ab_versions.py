"""Time two versions of numba_bn against each other: run once per checkout, compare the JSON.

    PYTHONPATH=/path/to/old/checkout python benchmarks/ab_versions.py > old.json
    PYTHONPATH=/path/to/new/checkout python benchmarks/ab_versions.py > new.json

Alternate the two a few times and compare minima: on a shared machine single runs move by 20%.
Prints the median microseconds of forward_train, forward_eval and backward (functional API,
float32, ``out=`` buffers) and of ``np.copyto`` (the memory-bound floor) per shape, as JSON.
"""

import json
import time

import numpy as np

import numba_bn as nbn

SHAPES = {
    "A (32,64,56,56)": ((32, 64, 56, 56), 1),
    "B (64,256,14,14)": ((64, 256, 14, 14), 1),
    "C (4096,1024)": ((4096, 1024), 1),
    "D (32,56,56,64) NHWC": ((32, 56, 56, 64), -1),
    "(256,512)": ((256, 512), 1),
}


def median_us(function, budget=0.6):
    """Median time of one call, over repeats of a batch calibrated to take >= 20 ms."""
    function()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            function()
        elapsed = time.perf_counter() - start
        if elapsed > 0.02:
            break
        calls *= 2
    samples = []
    for _ in range(max(5, int(budget / elapsed))):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - start) / calls)
    return float(np.median(samples)) * 1e6


def time_shape(rng, shape, axis):
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    channels = shape[axis]
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    _, mean, invstd = nbn.forward_train(x, axis=axis)
    return {
        "fwd": median_us(lambda: nbn.forward_train(x, axis=axis, out=y)),
        "eval": median_us(lambda: nbn.forward_eval(x, running_mean, running_var, axis=axis, out=y)),
        "bwd": median_us(lambda: nbn.backward(dy, x, mean, invstd, axis=axis, out=dx)),
        "copy": median_us(lambda: np.copyto(y, x)),
    }


def main():
    rng = np.random.default_rng(0)
    print(json.dumps({name: time_shape(rng, *case) for name, case in SHAPES.items()}))


if __name__ == "__main__":
    main()
