"""Measure the CPU backend's serial/parallel cost model (numba_bn/cpu/__init__.py).

    python benchmarks/serial_parallel.py [--threads 2]

For each step, times the serial and the parallel twin of its driver on prepared buffers, rows
(N, 256) and planes (N, 64, 196) of float32 at growing N, and fits

    serial(n)   = NS_PER_ELEMENT * n
    parallel(n) = WAKE_NS + NS_PER_ELEMENT * n / threads

with medians throughout (of short repeats, then over the sizes), so that a busy moment drops
out. Prints the fitted numbers and the size where parallel starts to pay. Run it on a quiet
machine (check `uptime`) and copy the numbers into numba_bn/cpu/__init__.py (but relu_grad's:
it takes its cost inside a training step there, where its inputs are not in cache).

The wake-up is that of the pool Numba runs: OpenMP's by default here (WAKE_NS). The other
prices (WAKE_NS_BY_LAYER, WAKE_NS_OMP_SLEEPING) come from runs with NUMBA_THREADING_LAYER=tbb
(`pip install tbb`) or workqueue, and with OMP_WAIT_POLICY=passive or GOMP_SPINCOUNT=0.
"""

import argparse
import os
import timeit

import numba
import numpy as np

from numba_bn.cpu import drivers
from numba_bn.cpu.items import MEMORY_PLANES, MEMORY_ROWS

LAYOUTS = {"rows": lambda n: (n, 256, 1), "planes": lambda n: (max(1, n // 64), 64, 196)}
SIZES = [1 << k for k in range(12, 20)]  # elements, 4K to 512K


def arguments(step, shape):
    """The positional arguments of ``step``'s drivers on fresh float32 buffers of ``shape``."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) + 3).astype(np.float32)
    out = np.empty_like(x)
    channels = shape[1]
    vec = [np.ones(channels) for _ in range(4)]
    f32 = np.ones(channels, np.float32)
    none, no_rows = np.empty(0, np.float32), np.empty((2, 0), np.float32)  # saved, grads
    train = (x, f32, f32, 1e-5, none, none, 0.1, True, False, out, *vec[:3], x, no_rows)
    return {
        "forward_train": train,
        "forward_eval": (x, f32, f32, f32, f32, 1e-5, out, x),
        "backward": (x, x, vec[0], vec[1], f32, out, vec[2], vec[3], no_rows),
        "batch_stats": (x, vec[0], vec[1]),
        "normalize": (x, vec[0], vec[1], f32, f32, out, x),
        "backward_sums": (x, x, vec[0], vec[1], vec[2]),
        "backward_dx": (x, x, vec[0], vec[1], f32, vec[2], vec[3], float(x.size), out),
        "relu_grad": (x.reshape(x.size), x.reshape(x.size), out.reshape(out.size)),
    }[step]


def seconds(function, args):
    function(*args)
    number = max(1, int(2e-3 / max(1e-7, timeit.timeit(lambda: function(*args), number=1))))
    times = timeit.repeat(lambda: function(*args), number=number, repeat=15)
    return float(np.median(times)) / number


def fit(sizes, serial, parallel, threads):
    """(ns per element, wake ns): the median serial time per element, then the median of what
    each parallel time costs beyond its share of that work (medians: robust to a busy moment)."""
    n = np.asarray(sizes, float)
    ns = float(np.median(np.asarray(serial) * 1e9 / n))
    wake = float(np.median(np.asarray(parallel) * 1e9 - ns * n / threads))
    return ns, wake


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}")
    wakes = []
    for step in ("forward_train", "forward_eval", "backward", "batch_stats", "normalize",
                 "backward_sums", "backward_dx", "relu_grad"):  # fmt: skip
        fits = []
        for layout, shape_of in LAYOUTS.items():
            # the partition numba_bn.cpu picks for these inputs: planes of 64 channels fuse
            name = step
            if step in ("forward_train", "backward"):
                name += "_fused" if layout == "planes" else "_split"
            memory = MEMORY_ROWS if layout == "rows" else MEMORY_PLANES
            parallel_driver, serial_driver = drivers.driver(name, memory)
            serial, parallel = [], []
            for size in SIZES:
                call = arguments(step, shape_of(size // 256 if layout == "rows" else size // 196))
                serial.append(seconds(serial_driver, call))
                parallel.append(seconds(parallel_driver, call))
            ns, wake = fit(SIZES, serial, parallel, args.threads)
            fits.append(ns)
            wakes.append(wake)
            pays = wake / (ns * (1 - 1 / args.threads))
            print(f"{step:<14} {layout:<7} {ns:6.3f} ns/element  wake {wake / 1e3:6.1f} us  "
                  f"parallel pays from {pays / 1e3:7.1f}K elements")  # fmt: skip
        print(f"{step:<14} mean    {np.mean(fits):6.3f} ns/element")
    layer = numba.threading_layer()
    print(f"median wake {np.median(wakes) / 1e3:.1f} us ({layer} layer)")


if __name__ == "__main__":
    main()
