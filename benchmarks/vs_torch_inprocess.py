"""numba_bn's public calls against PyTorch's aten ops in one process, alternated: x torch.

    python benchmarks/vs_torch_inprocess.py [--shapes 64x32,8x16x8x8 | sweep] [--threads 2]

``numba-bn bench --sweep`` times each implementation in a block of its own, seconds apart, and
on this project's shared 2-core machines a cell's ratio to PyTorch moves by up to 2x between two
runs minutes apart (benchmarks/README.md, stop 37). Here every call of both libraries is timed
once per round, alternating which goes first, and each cell is the minimum over the rounds (as
in :mod:`ab_inprocess`, whose inputs and timing this reuses): a busy spell spoils one sample of
both, not a whole column. PyTorch's calls are the aten ops ``numba-bn bench`` times
(``native_batch_norm``, ``native_batch_norm_backward``), on the same memory; the layer's row is
a training step, forward with the running update and backward, against the same two aten ops
with running buffers, each step holding its forward's output through its backward (a 26 MB
output freed first let PyTorch's backward reuse its pages: 0.92x on channels-last, stop 66).
x torch = PyTorch's time / numba_bn's.
"""

import argparse
import os

import numba
import numpy as np
from ab_inprocess import ROUNDS, SWEEP, alternated_best, inputs, label, parse_shape

import numba_bn as nbn


def pairs(torch, x, dy, axis):
    """{call: (numba_bn's, PyTorch's)} on ``x``, ``dy`` (channels on ``axis``)."""
    channels = x.shape[axis]
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(channels) + 1.0).astype(x.dtype)
    b = rng.standard_normal(channels).astype(x.dtype)
    rm, rv = np.zeros(channels, x.dtype), np.ones(channels, x.dtype)
    _, mean, invstd = nbn.forward_train(x, w, b, axis=axis)
    layer = nbn.BatchNorm(channels, axis=axis)
    layer.weight[:], layer.bias[:] = w, b
    # PyTorch normalises axis 1: a channels-last array is handed over as its NCHW view
    tx, tdy = (torch.from_numpy(a) for a in (x, dy))
    if axis % x.ndim == x.ndim - 1 and x.ndim > 2:
        order = (0, x.ndim - 1, *range(1, x.ndim - 1))
        tx, tdy = tx.permute(order), tdy.permute(order)
    elif axis % x.ndim != 1:
        raise SystemExit(f"axis {axis} of {x.shape}: only channels on axis 1 or last are timed")
    tw, tb, trm, trv = (torch.from_numpy(a.copy()) for a in (w, b, rm, rv))
    aten = torch.ops.aten
    _, tmean, tinvstd = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5)
    grads = [True, True, True]

    def torch_step():  # its output held through the backward, as the layer's step holds y
        out = aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
        return out, aten.native_batch_norm_backward(tdy, tx, tw, trm, trv, tmean, tinvstd, True,
                                                    1e-5, grads)  # fmt: skip

    return {
        "forward_train": (
            lambda: nbn.forward_train(x, w, b, axis=axis),
            lambda: aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5),
        ),
        "forward_eval": (
            lambda: nbn.forward_eval(x, rm, rv, w, b, axis=axis),
            lambda: aten.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, 1e-5),
        ),
        "backward": (
            lambda: nbn.backward(dy, x, mean, invstd, w, axis=axis),
            lambda: aten.native_batch_norm_backward(
                tdy, tx, tw, None, None, tmean, tinvstd, True, 1e-5, grads
            ),  # fmt: skip
        ),
        "BatchNorm step": (lambda: (layer(x), layer.backward(dy)), torch_step),
    }


def compare(torch, threads, cases, pairs_of, label_of, column):
    """Time the calls ``pairs_of(case)`` ({call: (numba_bn's, PyTorch's)}) of every case, all
    alternated (:func:`ab_inprocess.alternated_best`), and print a row per call: ``column``
    names the cases' column, ``label_of(case)`` its cells."""
    timed = {}
    for case in cases:
        for name, (ours, theirs) in pairs_of(case).items():
            timed.setdefault((case, "numba_bn"), {})[name] = ours
            timed.setdefault((case, "torch"), {})[name] = theirs
    print(f"load average {os.getloadavg()[0]:.2f}; us, min of {ROUNDS} alternated rounds; "
          f"torch {torch.__version__}, {threads} threads")  # fmt: skip
    best = alternated_best(timed, cases, ("numba_bn", "torch"))
    print(f"| {column} | call | numba_bn | torch | x torch |\n|---|---|---|---|---|")
    for case in cases:
        for name in timed[case, "numba_bn"]:
            ours, theirs = best[case, name, "numba_bn"], best[case, name, "torch"]
            print(f"| {label_of(case)} | {name} | {ours:.4g} | {theirs:.4g} | "
                  f"{theirs / ours:.2f} |")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="64x32,64x256,8x16x8x8", help="or: sweep")
    parser.add_argument("--threads", type=int, default=2, help="numba and torch threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    texts = (SWEEP if args.shapes == "sweep" else args.shapes).split(",")
    shapes = [parse_shape(text) for text in texts]
    compare(torch, args.threads, shapes, lambda shape: pairs(torch, *inputs(shape[0]), shape[1]),
            label, "shape")  # fmt: skip


if __name__ == "__main__":
    main()
