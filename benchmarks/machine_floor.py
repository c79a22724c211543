"""What straightforward Numba code reaches on this machine, next to numba_bn's own passes.

    python benchmarks/machine_floor.py [--shapes 64x256,256x512,1024x1024] [--threads 2]

For float32 (N, C) batches: a bare elementwise loop ``y = (x - a) * b`` and bare float64 column
sums (four rows per update of the accumulators, no shift), each serial and in a ``prange``
over ``threads`` equal row ranges, against ``np.copyto`` and the serial and parallel twins of
numba_bn's normalize and batch_stats drivers on the same buffers. Each cell is the fastest of 5
blocks of back-to-back calls (ab_inprocess.best_us), in us; the drivers are called through
Numba's dispatcher. A pass
near its bare loop has little left to take; one far from it has (benchmarks/README.md, "Stop
62"). The sums' row ranges must hold a multiple of four rows.
"""

import argparse

import numba
import numpy as np
from ab_inprocess import best_us
from numba import njit, prange

from numba_bn.cpu import _driver
from numba_bn.cpu.threads import launcher

REDUCE = {"reassoc", "contract", "nsz", "arcp"}


@njit(fastmath=True)
def _affine_rows(x, y, a, b, r0, r1):
    for i in range(r0, r1):
        for j in range(x.shape[1]):
            y[i, j] = (x[i, j] - a[j]) * b[j]


@njit(fastmath=REDUCE)
def _sums_rows(x, s1, s2, r0, r1):
    """Column sums and sums of squares in float64, four rows an update (r1 - r0 divisible by 4)."""
    for j in range(x.shape[1]):
        s1[j], s2[j] = 0.0, 0.0
    for i in range(r0, r1, 4):
        for j in range(x.shape[1]):
            a0, a1 = np.float64(x[i, j]), np.float64(x[i + 1, j])
            a2, a3 = np.float64(x[i + 2, j]), np.float64(x[i + 3, j])
            s1[j] += (a0 + a1) + (a2 + a3)
            s2[j] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)


@njit(fastmath=True)
def affine_serial(x, y, a, b):
    _affine_rows(x, y, a, b, 0, x.shape[0])


@njit(parallel=True, fastmath=True)
def affine_parallel(x, y, a, b, parts):
    for p in prange(parts):
        _affine_rows(x, y, a, b, p * x.shape[0] // parts, (p + 1) * x.shape[0] // parts)


@njit(fastmath=REDUCE)
def sums_serial(x, s1, s2):
    _sums_rows(x, s1, s2, 0, x.shape[0])


@njit(parallel=True, fastmath=REDUCE)
def sums_parallel(x, s1, s2, parts):
    """Each part's rows into its own row of s1, s2 (parts, C): the sums are not merged."""
    for p in prange(parts):
        _sums_rows(x, s1[p], s2[p], p * x.shape[0] // parts, (p + 1) * x.shape[0] // parts)


def cells(shape, threads):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    y = np.empty_like(x)
    channels = shape[1]
    a, b = rng.standard_normal(channels).astype(np.float32), np.ones(channels, np.float32)
    s1, s2 = np.empty((threads, channels)), np.empty((threads, channels))
    view = x.reshape(shape[0], channels, 1)
    weight, bias = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    mean, invstd, m2 = np.zeros(channels), np.ones(channels), np.empty(channels)
    ours = {}
    for count in (1, threads):
        for step, args in (("normalize", (view, mean, invstd, weight, bias, y.reshape(view.shape),
                                          view)),  # fmt: skip
                           ("batch_stats", (view, mean, m2))):  # fmt: skip
            dispatcher, _ = _driver(step, view, count)
            run = launcher(dispatcher) if count > 1 else dispatcher
            ours[step, count] = best_us(lambda run=run, args=args: run(*args))
    return {
        "np.copyto": best_us(lambda: np.copyto(y, x)),
        "bare affine, serial": best_us(lambda: affine_serial(x, y, a, b)),
        f"bare affine, {threads} threads": best_us(lambda: affine_parallel(x, y, a, b, threads)),
        "normalize driver, serial": ours["normalize", 1],
        f"normalize driver, {threads} threads": ours["normalize", threads],
        "bare float64 sums, serial": best_us(lambda: sums_serial(x, s1[0], s2[0])),
        f"bare float64 sums, {threads} threads": best_us(lambda: sums_parallel(x, s1, s2, threads)),
        "batch_stats driver, serial": ours["batch_stats", 1],
        f"batch_stats driver, {threads} threads": ours["batch_stats", threads],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="64x256,256x512,1024x1024")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    table = {shape: cells(shape, args.threads) for shape in shapes}
    print("us, the fastest of 5 blocks; float32 (N, C)")
    print("| pass | " + " | ".join(str(s) for s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for name in table[shapes[0]]:
        print(f"| {name} | " + " | ".join(f"{table[s][name]:.1f}" for s in shapes) + " |")


if __name__ == "__main__":
    main()
