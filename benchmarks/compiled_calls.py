"""The functional API's small calls with and without compiled calls, against PyTorch, in one
process (benchmarks/README.md, "Compiled calls").

    python benchmarks/compiled_calls.py PLUGIN_DIR [--shapes 64x32,8x16x8x8,...] [--rounds 5]
        [--dtype float64]

PLUGIN_DIR: the ``--out`` of ``numba-bn build-plugin`` (with ``--cpu host`` for the JIT's bits).
Each round times every call both ways (``timeit``, 2000 calls, min of 3) and PyTorch's aten ops
(``native_batch_norm`` in training and eval, ``native_batch_norm_backward``, 2 threads); the
table is the min over rounds, in us (float32 unless --dtype float64). "batch_norm train"
updates running buffers; "BatchNorm step" is a layer's training forward and backward (PyTorch:
the two aten ops a ``torch.nn.BatchNorm1d`` step runs, without autograd's bookkeeping).
"""

import argparse
import os
import timeit

import numpy as np

import numba_bn as nbn

SHAPES = "64x32,8x16x8x8,64x256,16x32x16x16,256x512"


def _cases(shape, rng, dtype):
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    channels = shape[1]
    w = rng.uniform(0.5, 2, channels).astype(dtype)
    b = rng.uniform(-1, 1, channels).astype(dtype)
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, invstd = nbn.forward_train(x, w, b)
    layer = nbn.BatchNorm(channels, dtype=dtype)
    layer.weight[:], layer.bias[:] = w, b
    buffers = running_mean.copy(), running_var.copy()  # updated by every call, as a loop's

    def layer_step():
        layer(x)
        layer.backward(dy)

    ours = {
        "fwd": lambda: nbn.forward_train(x, w, b),
        "eval": lambda: nbn.forward_eval(x, running_mean, running_var, w, b),
        "bwd": lambda: nbn.backward(dy, x, mean, invstd, w),
        "batch_norm train": lambda: nbn.batch_norm(x, *buffers, w, b, training=True),
        "BatchNorm step": layer_step,
    }
    try:
        import torch
    except ImportError:
        return ours, {}
    torch.set_num_threads(2)
    tx, tw, tb, tdy, trm, trv = map(torch.from_numpy, (x, w, b, dy, running_mean, running_var))
    aten = torch.ops.aten
    _, tmean, tinvstd = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5)
    tbuffers = trm.clone(), trv.clone()

    def torch_step():  # what torch.nn.BatchNorm's forward and backward run, without autograd
        _, save_mean, save_invstd = aten.native_batch_norm(tx, tw, tb, *tbuffers, True, 0.1, 1e-5)
        aten.native_batch_norm_backward(tdy, tx, tw, *tbuffers, save_mean, save_invstd, True,
                                        1e-5, [True, True, True])  # fmt: skip

    theirs = {
        "batch_norm train": lambda: aten.native_batch_norm(tx, tw, tb, *tbuffers, True, 0.1, 1e-5),
        "BatchNorm step": torch_step,
        "fwd": lambda: aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5),
        "eval": lambda: aten.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, 1e-5),
        "bwd": lambda: aten.native_batch_norm_backward(
            tdy, tx, tw, None, None, tmean, tinvstd, True, 1e-5, [True, True, True]
        ),
    }
    return ours, theirs


def _time(call):
    return min(timeit.repeat(call, number=2000, repeat=3)) / 2000 * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plugin", help="directory of libnumba_bn.so and the extension")
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"load average {os.getloadavg()[0]:.2f}; {args.dtype}, us per call, min over "
        f"{args.rounds} rounds"
    )
    print("| shape | op | Python path | compiled calls | ratio | torch | x torch, compiled |")
    print("|---|---|---|---|---|---|---|")
    for text in args.shapes.split(","):
        shape = tuple(int(n) for n in text.split("x"))
        ours, theirs = _cases(shape, rng, np.dtype(args.dtype))
        best = {}
        for _ in range(args.rounds):
            for way in ("python", "compiled"):
                nbn.use_compiled_calls(None if way == "python" else args.plugin)
                for op, call in ours.items():
                    best[way, op] = min(best.get((way, op), np.inf), _time(call))
            for op, call in theirs.items():
                best["torch", op] = min(best.get(("torch", op), np.inf), _time(call))
        nbn.use_compiled_calls(None)
        for op in ours:
            python, compiled = best["python", op], best["compiled", op]
            torch_us = best.get(("torch", op), np.nan)
            print(
                f"| {shape} | {op} | {python:.2f} | {compiled:.2f} | {python / compiled:.2f} "
                f"| {torch_us:.2f} | {torch_us / compiled:.2f} |",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
