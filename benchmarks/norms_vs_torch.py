"""Group and layer norm's public calls against PyTorch's aten ops in one process, alternated.

    python benchmarks/norms_vs_torch.py [--cases group:64x256:8,layer:8x16x8x8:1] [--threads 2]

A case is ``group:SHAPE:G`` (G groups, channels on axis 1) or ``layer:SHAPE:K`` (normalised
over the last K dimensions); the default is benchmarks/README.md's "Stop 49" table. As
:mod:`vs_torch_inprocess` does for batch norm: every call of both libraries timed once per
round, alternating which goes first, each cell the minimum over the rounds; PyTorch's calls are
``native_group_norm``, ``native_layer_norm`` and their ``_backward`` on the same memory, with
weight and bias. x torch = PyTorch's time / numba_bn's. For two versions of numba_bn, run it
once with each on PYTHONPATH (from a directory outside both checkouts).
"""

import argparse
import math

import numba
import numpy as np
from ab_inprocess import inputs
from vs_torch_inprocess import compare

import numba_bn as nbn

CASES = ("group:64x256:8,group:256x512:8,group:8x16x8x8:4,group:16x32x16x16:8,layer:64x256:1,"
         "layer:8x16x8x8:1,layer:16x32x16x16:1,layer:256x512:1,layer:8x16x8x8:3")  # fmt: skip


def parse_case(text):
    """(kind, shape, k) of ``kind:AxBxC:k``."""
    kind, dims, k = text.split(":")
    if kind not in ("group", "layer"):
        raise SystemExit(f"{text}: a case is group:SHAPE:G or layer:SHAPE:K")
    return kind, tuple(int(n) for n in dims.split("x")), int(k)


def pairs(torch, kind, x, dy, k):
    """{call: (numba_bn's, PyTorch's)} of one case."""
    aten, rng = torch.ops.aten, np.random.default_rng(1)
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    if kind == "group":
        n, channels, inner = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        w = (rng.standard_normal(channels) + 1.0).astype(x.dtype)
        b = rng.standard_normal(channels).astype(x.dtype)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        _, mean, invstd = nbn.group_norm_forward(x, k, w, b)
        _, tmean, trstd = aten.native_group_norm(tx, tw, tb, n, channels, inner, k, 1e-5)
        return {
            "forward": (
                lambda: nbn.group_norm_forward(x, k, w, b),
                lambda: aten.native_group_norm(tx, tw, tb, n, channels, inner, k, 1e-5),
            ),
            "backward": (
                lambda: nbn.group_norm_backward(dy, x, mean, invstd, k, w),
                lambda: aten.native_group_norm_backward(
                    tdy, tx, tmean, trstd, tw, n, channels, inner, k, [True, True, True]
                ),  # fmt: skip
            ),
        }
    normalized = x.shape[x.ndim - k :]
    w = (rng.standard_normal(normalized) + 1.0).astype(x.dtype)
    b = rng.standard_normal(normalized).astype(x.dtype)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    _, mean, invstd = nbn.layer_norm_forward(x, normalized, w, b)
    _, tmean, trstd = aten.native_layer_norm(tx, list(normalized), tw, tb, 1e-5)
    return {
        "forward": (
            lambda: nbn.layer_norm_forward(x, normalized, w, b),
            lambda: aten.native_layer_norm(tx, list(normalized), tw, tb, 1e-5),
        ),
        "backward": (
            lambda: nbn.layer_norm_backward(dy, x, mean, invstd, normalized, w),
            lambda: aten.native_layer_norm_backward(
                tdy, tx, list(normalized), tmean, trstd, tw, tb, [True, True, True]
            ),  # fmt: skip
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES, help="kind:SHAPE:k, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="numba and torch threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    cases = [parse_case(text) for text in args.cases.split(",")]
    compare(torch, args.threads, cases, lambda case: pairs(torch, case[0], *inputs(case[1]),
            case[2]), case_label, "case")  # fmt: skip


def case_label(case):
    """A table's case cell."""
    kind, shape, k = case
    return f"{kind} {shape}, " + (f"{k} groups" if kind == "group" else f"over the last {k}")


if __name__ == "__main__":
    main()
