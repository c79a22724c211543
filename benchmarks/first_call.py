"""What a cold first call compiles, and for how long: every function Numba compiles for it.

Runs forward_train, backward and forward_eval once on a float32 batch in this process, with an
empty Numba cache of its own, and prints each compile from Numba's ``numba:compile`` events:
seconds excluding and including the compiles it started (a driver's typing compiles the kernels
it calls). The README's "First call" section has the totals; benchmarks/README.md (v8) what
this showed.

    python benchmarks/first_call.py --shape 64,32
"""

import argparse
import os
import tempfile
import time

if __name__ == "__main__":  # before Numba reads its configuration
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba_bn_first_call_")
    os.environ.setdefault("NUMBA_BN_QUIET", "1")

from numba.core import event  # noqa: E402


class Compiles(event.Listener):
    """(exclusive s, inclusive s, function, argument types) of each compile, nested ones too."""

    def __init__(self):
        self.stack, self.rows = [], []

    def on_start(self, ev):
        name = ev.data["dispatcher"].py_func.__qualname__
        self.stack.append([name, time.perf_counter(), 0.0, str(ev.data["args"])])

    def on_end(self, ev):
        name, start, nested, args = self.stack.pop()
        seconds = time.perf_counter() - start
        if self.stack:
            self.stack[-1][2] += seconds
        self.rows.append((seconds - nested, seconds, name, args))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,32", help="batch shape, channels on axis 1")
    parser.add_argument("--top", type=int, default=25, help="compiles to list")
    args = parser.parse_args()
    compiles = Compiles()
    event.register("numba:compile", compiles)
    start = time.perf_counter()
    import numpy as np

    import numba_bn as nbn

    shape = tuple(int(n) for n in args.shape.split(","))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    marks = [time.perf_counter()]
    y, mean, invstd = nbn.forward_train(x)
    marks.append(time.perf_counter())
    nbn.backward(y, x, mean, invstd)
    marks.append(time.perf_counter())
    nbn.forward_eval(x, mean, 1 / invstd**2)
    marks.append(time.perf_counter())
    steps = ("import", "forward_train", "backward", "forward_eval")
    times = [b - a for a, b in zip([start, *marks], marks, strict=False)]
    print(f"{shape} float32, empty cache: " + ", ".join(
        f"{step} {seconds:.2f} s" for step, seconds in zip(steps, times, strict=True)
    ) + f"; total {marks[-1] - start:.2f} s")  # fmt: skip
    rows = sorted(compiles.rows, reverse=True)
    print(f"{len(rows)} compiles, {sum(row[0] for row in rows):.2f} s; exclusive s, inclusive s:")
    for exclusive, inclusive, name, types in rows[: args.top]:
        print(f"{exclusive:6.2f} {inclusive:6.2f}  {name:40s} {types[:70]}")


if __name__ == "__main__":
    main()
