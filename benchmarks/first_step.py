"""A cold first training step, each run a new process with an empty Numba cache of its own.

forward_train, backward and forward_eval of a float32 batch, timed from before
``import numba_bn``, with the backward and eval compiled ahead in a forked worker ("fork"), in
a new interpreter ("spawn": the child keeps a second Python thread alive, which rules out the
fork), or not at all ("off": NUMBA_BN_COMPILE_AHEAD=0); the modes alternate within each round
(README, "First call"; benchmarks/README.md, stop 43). Check ``uptime`` first.

    python benchmarks/first_step.py --shape 64,32 --rounds 3 --modes fork,spawn,off
    python benchmarks/first_step.py --checkouts OLD_CHECKOUT,NEW_CHECKOUT --modes fork,off

``--checkouts`` alternates checkouts of numba_bn within each round too (each child imports the
checkout's package: its directory first on PYTHONPATH, and a working directory outside every
checkout, since ``python -c`` puts the working directory first on sys.path); without it the
children import the installed numba_bn (this checkout for an editable install).
"""

import argparse
import os
import subprocess
import sys
import tempfile

STEP = """
import sys, time
start = time.perf_counter()
if sys.argv[1] == "spawn":
    import threading
    threading.Thread(target=threading.Event().wait, daemon=True).start()
import numpy as np, numba_bn as nbn
imported = time.perf_counter()
shape = tuple(int(n) for n in sys.argv[2].split(","))
rng = np.random.default_rng(0)
x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
dy = rng.standard_normal(shape).astype(np.float32)
y, mean, invstd = nbn.forward_train(x)
forward = time.perf_counter()
nbn.backward(dy, x, mean, invstd)
backward = time.perf_counter()
nbn.forward_eval(x, mean, 1 / invstd**2)
end = time.perf_counter()
print(f"{sys.argv[1]:5s} import {imported - start:.2f} forward_train {forward - imported:.2f} "
      f"backward {backward - forward:.2f} forward_eval {end - backward:.2f} "
      f"total {end - start:.2f} s", flush=True)
nbn.ahead.settle()  # the next child starts with no worker of this one still compiling
print(f"worker done at {time.perf_counter() - start:.2f} s")
print(nbn.__file__)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,32", help="batch shape, channels on axis 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="fork,spawn,off", help="fork, spawn, off")
    parser.add_argument("--checkouts", default="", help="checkouts to alternate, comma-separated")
    args = parser.parse_args()
    checkouts = [os.path.abspath(path) for path in args.checkouts.split(",") if path] or [None]
    print(f"load average {os.getloadavg()[0]:.2f}; shape ({args.shape}) float32", flush=True)
    if sys.dont_write_bytecode:  # the children inherit it: a checkout without .pyc compiles
        print("PYTHONDONTWRITEBYTECODE is set: a checkout without bytecode files compiles "
              "numba_bn's modules at each import (+0.04-0.08 s; README, 'First call')")  # fmt: skip
    for _ in range(args.rounds):
        for checkout in checkouts:
            for mode in args.modes.split(","):
                print(("" if checkout is None else f"{checkout}: ") + step(checkout, mode, args),
                      flush=True)  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f}")


def step(checkout, mode, args):
    """The child's line: a cold first step of ``checkout`` (None: the installed numba_bn) in
    ``mode``, with an empty Numba cache, run from that cache's directory."""
    with tempfile.TemporaryDirectory(
        prefix="numba_bn_first_step_", ignore_cleanup_errors=True
    ) as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_BN_QUIET="1",
                   NUMBA_BN_COMPILE_AHEAD="0" if mode == "off" else "1")  # fmt: skip
        if checkout is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [checkout, env.get("PYTHONPATH")]))
        command = [sys.executable, "-c", STEP, mode, args.shape]
        output = subprocess.run(command, env=env, cwd=cache, check=True, capture_output=True,
                                text=True).stdout  # fmt: skip
        line, done, imported = output.split("\n")[:3]  # timings, the worker's end, the file
        if checkout is not None and not imported.startswith(os.path.join(checkout, "")):
            raise RuntimeError(f"the child imported {imported}, not the checkout {checkout}")
        return f"{line};{done.strip().removeprefix('worker')}"


if __name__ == "__main__":
    main()
