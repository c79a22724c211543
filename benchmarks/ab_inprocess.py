"""Two checkouts of numba_bn against each other in one process: the public calls on small shapes.

    python benchmarks/ab_inprocess.py OLD_CHECKOUT NEW_CHECKOUT [--shapes 64x32,8x16x8x8]

On this project's shared 2-core machines a process can run 10-50% slower than the next one for
its whole life (stop 23: the same code's (64, 32) forward 8.8 and 14.5 us twenty minutes apart),
so two versions timed in separate processes differ by more than a per-call change of 0.2-1 us.
Here both run in one process: each checkout's ``numba_bn`` is copied under its own name
(``nbn_old``, ``nbn_new``; the package imports itself relatively) and every call is timed for
both, alternating which goes first, in rounds that each time every call once (a busy spell then
spoils one sample of many calls, not every sample of one); each cell is the minimum over the
rounds of ``min(timeit.repeat(call, number=1000, repeat=5))``. The copies keep their Numba
cache between runs (``NUMBA_CACHE_DIR``, else next to the copies in the temporary directory).
"""

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import timeit

import numpy as np

ROUNDS = 7


def load(tag, checkout, root):
    """The package of ``checkout`` imported as ``nbn_<tag>`` from a copy under ``root``."""
    name = f"nbn_{tag}"
    copy = os.path.join(root, name)
    shutil.rmtree(copy, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "*.so", "*.o")
    shutil.copytree(os.path.join(checkout, "numba_bn"), copy, ignore=ignore)  # keeps mtimes
    return importlib.import_module(name)


def calls(nbn, shape):
    """The public calls of a training step and of inference on ``shape`` (float32, axis 1)."""
    rng = np.random.default_rng(0)
    channels = shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = np.full(channels, 1.5, np.float32)
    b = np.full(channels, 0.2, np.float32)
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    _, mean, invstd = nbn.forward_train(x, w, b)
    layer, frozen = nbn.BatchNorm(channels), nbn.BatchNorm(channels).eval()
    return {
        "forward_train": lambda: nbn.forward_train(x, w, b),
        "batch_norm (running update)": lambda: nbn.batch_norm(x, rm, rv, w, b, training=True),
        "forward_eval": lambda: nbn.forward_eval(x, rm, rv, w, b),
        "backward": lambda: nbn.backward(dy, x, mean, invstd, w),
        "BatchNorm forward": lambda: layer(x),
        "BatchNorm forward + backward": lambda: (layer(x), layer.backward(dy)),
        "BatchNorm eval": lambda: frozen(x),
    }


def best_us(call):
    call()
    return min(timeit.repeat(call, number=1000, repeat=5)) / 1000 * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--shapes", default="64x32,64x256,8x16x8x8")
    args = parser.parse_args(argv)
    root = os.path.join(tempfile.gettempdir(), "numba_bn_ab_inprocess")
    os.makedirs(root, exist_ok=True)
    sys.path.insert(0, root)
    packages = {"old": load("old", args.old, root), "new": load("new", args.new, root)}
    shapes = [tuple(int(n) for n in text.split("x")) for text in args.shapes.split(",")]
    timed = {(shape, tag): calls(nbn, shape) for shape in shapes for tag, nbn in packages.items()}
    print(f"load average {os.getloadavg()[0]:.2f}; us, min of {ROUNDS} alternated rounds")
    best = {}
    for round_ in range(ROUNDS):  # every call once per round: a busy spell hits one sample
        for shape in shapes:
            for name in timed[shape, "old"]:
                for tag in ("old", "new") if round_ % 2 == 0 else ("new", "old"):
                    key = shape, name, tag
                    best[key] = min(best.get(key, float("inf")), best_us(timed[shape, tag][name]))
    print("| shape | call | old | new | new / old |\n|---|---|---|---|---|")
    for shape in shapes:
        for name in timed[shape, "old"]:
            old, new = best[shape, name, "old"], best[shape, name, "new"]
            print(f"| {shape} | {name} | {old:.2f} | {new:.2f} | {new / old:.3f} |")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
