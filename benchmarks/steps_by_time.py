"""Training steps (forward_train + backward) done by each time mark from a cold start, one process.

What a first step's compile costs a training loop, and what running the serial twins while a
worker compiles the parallel ones costs it (benchmarks/README.md, "Stop 47"). Use a fresh cache
per run, and alternate checkouts with PYTHONPATH, from a directory outside every checkout:

    export NUMBA_CACHE_DIR=$(mktemp -d) NUMBA_BN_QUIET=1
    PYTHONPATH=CHECKOUT python benchmarks/steps_by_time.py 1024,1024 30
"""

import time

START = time.perf_counter()  # before numba_bn's import, as a user's script starts

import sys  # noqa: E402

import numpy as np  # noqa: E402

import numba_bn as nbn  # noqa: E402
from numba_bn import ahead  # noqa: E402

MARKS = (5, 10, 15, 20, 25, 30, 45, 60)


def main():
    shape = tuple(int(n) for n in sys.argv[1].split(","))
    limit = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    marks, done, first, steps = list(MARKS), [], None, 0
    while True:
        y, mean, invstd = nbn.forward_train(x)
        nbn.backward(dy, x, mean, invstd)
        steps += 1
        now = time.perf_counter() - START
        first = now if first is None else first
        while marks and now >= marks[0]:
            done.append(f"{marks.pop(0)}s:{steps}")
        if now >= limit:
            break
    print(f"first step {first:.2f} s; steps by " + " ".join(done), flush=True)
    ahead.settle()  # the next run starts with no worker of this one still compiling


if __name__ == "__main__":
    main()
