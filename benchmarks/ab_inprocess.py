"""Two checkouts of numba_bn against each other in one process: the public calls on small shapes.

    python benchmarks/ab_inprocess.py OLD_CHECKOUT NEW_CHECKOUT [--shapes 64x32,8x16x8x8]
    python benchmarks/ab_inprocess.py OLD NEW --shapes sweep    # every size of bench --sweep
    python benchmarks/ab_inprocess.py OLD NEW --calls out       # the same calls with out=
    python benchmarks/ab_inprocess.py OLD NEW --calls in-place  # out= an input itself

On this project's shared 2-core machines a process can run 10-50% slower than the next one for
its whole life (stop 23: the same code's (64, 32) forward 8.8 and 14.5 us twenty minutes apart),
so two versions timed in separate processes differ by more than a per-call change of 0.2-1 us.
Here both run in one process: each checkout's ``numba_bn`` is copied under its own name
(``nbn_old``, ``nbn_new``; the package imports itself relatively) and every call is timed for
both, alternating which goes first, in rounds that each time every call once (a busy spell then
spoils one sample of many calls, not every sample of one); each cell is the minimum over the
rounds of ``min(timeit.repeat(call, number=n, repeat=5))``, n calls taking ~5 ms (1000 at most).
A shape ``AxBxC:-1`` puts the channels on that axis. The copies keep their Numba cache between
runs (``NUMBA_CACHE_DIR``, else next to the copies in the temporary directory).
"""

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
import timeit

import numpy as np

ROUNDS = 7
#: numba-bn bench --sweep's sizes, from an MLP batch to a 25 MB channels-last feature map
SWEEP = ("64x32,64x256,256x512,1024x1024,4096x1024,8x16x8x8,16x32x16x16,32x64x28x28,"
         "64x256x14x14,32x56x56x64:-1")  # fmt: skip


def load(tag, checkout, root):
    """The package of ``checkout`` imported as ``nbn_<tag>`` from a copy under ``root``."""
    name = f"nbn_{tag}"
    copy = os.path.join(root, name)
    shutil.rmtree(copy, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc", "*.so", "*.o")
    shutil.copytree(os.path.join(checkout, "numba_bn"), copy, ignore=ignore)  # keeps mtimes
    return importlib.import_module(name)


def inputs(shape):
    """x and dy of ``shape`` (float32), which both versions read: the same memory, so that where
    a large array landed (huge pages or not) cannot favour one of them."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    return x, rng.standard_normal(shape).astype(np.float32)


def calls(nbn, x, dy, axis):
    """The public calls of a training step and of inference on ``x`` (channels on ``axis``)."""
    channels = x.shape[axis]
    w = np.full(channels, 1.5, np.float32)
    b = np.full(channels, 0.2, np.float32)
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    _, mean, invstd = nbn.forward_train(x, w, b, axis=axis)
    layer = nbn.BatchNorm(channels, axis=axis)
    frozen = nbn.BatchNorm(channels, axis=axis).eval()
    fused = nbn.BatchNorm(channels, axis=axis, activation="relu")  # a ResNet block's last
    return {
        "forward_train": lambda: nbn.forward_train(x, w, b, axis=axis),
        "batch_norm (running update)": lambda: nbn.batch_norm(
            x, rm, rv, w, b, training=True, axis=axis
        ),  # fmt: skip
        "forward_eval": lambda: nbn.forward_eval(x, rm, rv, w, b, axis=axis),
        "backward": lambda: nbn.backward(dy, x, mean, invstd, w, axis=axis),
        "BatchNorm forward": lambda: layer(x),
        "BatchNorm forward + backward": lambda: (layer(x), layer.backward(dy)),
        "BatchNorm eval": lambda: frozen(x),
        "BatchNorm(relu) + residual, fwd + bwd": lambda: (
            fused(x, residual=dy),
            fused.backward(dy),
        ),
    }


def out_calls(nbn, x, dy, axis):
    """The functional calls (batch norm's, group and layer norm's) with ``out=`` a C-contiguous
    array of the caller's, and the layer's forward with it."""
    channels, out = x.shape[axis], np.empty_like(x)
    w = np.full(channels, 1.5, np.float32)
    b = np.full(channels, 0.2, np.float32)
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    _, mean, invstd = nbn.forward_train(x, w, b, axis=axis)
    layer = nbn.BatchNorm(channels, axis=axis)
    groups = 8 if channels % 8 == 0 else 1
    _, group_mean, group_invstd = nbn.group_norm_forward(x, groups, w, b, axis=axis)
    normalized = x.shape[-1:]
    return {
        "forward_train, out=": lambda: nbn.forward_train(x, w, b, axis=axis, out=out),
        "forward_eval, out=": lambda: nbn.forward_eval(x, rm, rv, w, b, axis=axis, out=out),
        "backward, out=": lambda: nbn.backward(dy, x, mean, invstd, w, axis=axis, out=out),
        "BatchNorm forward, out=": lambda: layer(x, out=out),
        "group_norm, out=": lambda: nbn.group_norm(x, groups, w, b, axis=axis, out=out),
        "group_norm_backward, out=": lambda: nbn.group_norm_backward(
            dy, x, group_mean, group_invstd, groups, w, axis=axis, out=out
        ),  # fmt: skip
        "layer_norm, out=": lambda: nbn.layer_norm(x, normalized, out=out),
    }


def in_place_calls(nbn, x, dy, axis):
    """Calls in place, out= an input itself (on copies of x and dy of their own), each one's
    result the same when it is called again on it: the training forward normalises (a batch
    normalised once stays so), the eval with mean 0 and variance 1 - eps is the identity, the
    backward with weight 1 / invstd a projection of dy."""
    channels = x.shape[axis]
    xs, dys = x.copy(), dy.copy()
    rm, rv = np.zeros(channels, np.float32), np.full(channels, 1 - 1e-5, np.float32)
    _, mean, invstd = nbn.forward_train(x, axis=axis)
    w = (1 / invstd).astype(np.float32)
    frozen = nbn.BatchNorm(channels, axis=axis).eval()
    frozen.running_mean[:], frozen.running_var[:] = rm, rv
    return {
        "forward_train, out=x": lambda: nbn.forward_train(xs, axis=axis, out=xs),
        "forward_eval, out=x": lambda: nbn.forward_eval(xs, rm, rv, axis=axis, out=xs),
        "backward, out=dy": lambda: nbn.backward(dys, x, mean, invstd, w, axis=axis, out=dys),
        "BatchNorm eval, out=x": lambda: frozen(xs, out=xs),
    }


CALLS = {"step": calls, "out": out_calls, "in-place": in_place_calls}


def best_us(call):
    call()
    start = time.perf_counter()
    call()
    number = max(1, min(1000, int(0.005 / (time.perf_counter() - start))))
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def alternated_best(timed, shapes, sides):
    """{(shape, name, side): us}: the minimum over ROUNDS rounds of :func:`best_us` of every
    call ``timed[shape, side][name]``, each round timing every call once, the two ``sides``
    in turns first (a busy spell then spoils one sample of many calls, not every sample of
    one)."""
    best = {}
    for round_ in range(ROUNDS):
        for shape in shapes:
            for name in timed[shape, sides[0]]:
                for side in sides if round_ % 2 == 0 else sides[::-1]:
                    key = shape, name, side
                    best[key] = min(best.get(key, float("inf")), best_us(timed[shape, side][name]))
    return best


def label(shape):
    """A table's shape cell of (shape, axis): the axis only when it is not 1."""
    return f"{shape[0]}" + (f" axis {shape[1]}" if shape[1] != 1 else "")


def parse_shape(text):
    """(shape, axis) of ``AxBxC`` (axis 1) or ``AxBxC:axis``."""
    dims, _, axis = text.partition(":")
    return tuple(int(n) for n in dims.split("x")), int(axis or 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--shapes", default="64x32,64x256,8x16x8x8", help="or: sweep")
    parser.add_argument("--calls", choices=CALLS, default="step",
                        help="a training step's and inference's; with out=; in place")  # fmt: skip
    args = parser.parse_args(argv)
    root = os.path.join(tempfile.gettempdir(), "numba_bn_ab_inprocess")
    os.makedirs(root, exist_ok=True)
    sys.path.insert(0, root)
    packages = {"old": load("old", args.old, root), "new": load("new", args.new, root)}
    texts = (SWEEP if args.shapes == "sweep" else args.shapes).split(",")
    shapes = [parse_shape(text) for text in texts]
    timed = {}
    for shape, axis in shapes:
        x, dy = inputs(shape)
        for tag, nbn in packages.items():
            timed[(shape, axis), tag] = CALLS[args.calls](nbn, x, dy, axis)
    print(f"load average {os.getloadavg()[0]:.2f}; us, min of {ROUNDS} alternated rounds")
    best = alternated_best(timed, shapes, ("old", "new"))
    print("| shape | call | old | new | new / old |\n|---|---|---|---|---|")
    for shape in shapes:
        for name in timed[shape, "old"]:
            old, new = best[shape, name, "old"], best[shape, name, "new"]
            print(f"| {label(shape)} | {name} | {old:.4g} | {new:.4g} | {new / old:.3f} |")
    print(f"load average {os.getloadavg()[0]:.2f}")
    for tag, nbn in packages.items():  # what each one's races kept (numba_bn/cpu/race.py)
        report = importlib.import_module(f"{nbn.__name__}.bench.report")
        for line in report.race_lines(nbn.cpu.RACES):
            print(f"{tag}: {line.strip()}")


if __name__ == "__main__":
    main()
