"""Fused BN+Add+ReLU against the plain op, this library's unfused calls and PyTorch's three ops.

    numba-bn bench --fused [--threads 2] [--repeat 20]      # float32, shapes A and B

Issue 13's performance table, in one run (median of ``repeat`` samples, each timed as
:func:`.measure.time_each` times the bench's cases: warm calls, blocks of calls, a pause
between implementations). Rows per shape, forward-train and backward:

* plain: forward_train / backward of batch norm alone (the 1.15x goal's denominator);
* fused: forward_train(residual=z, activation="relu") / backward(activation="relu", y=y,
  residual_out=dz);
* ours unfused: forward_train, then y += z and ReLU in NumPy (in place) / the ReLU's gradient in
  NumPy, then backward;
* torch: aten's native_batch_norm, add, relu_ / threshold_backward, native_batch_norm_backward;
* copy: a parallel copy of x (the memory limit: read N, write N).
"""

import os

import numpy as np

from ..functional import backward, forward_train
from .cases import SHAPES
from .measure import time_each
from .peers import parallel_copy

#: The issue's shapes (planes A and B of the main table).
FUSED_SHAPES = ("A", "B")


def _verify(x, z, dy, w, b, y_fused, mean, invstd):
    """The fused results against this library's three steps, before anything is timed: y bit
    for bit, the gradients to float32 rounding."""
    plain, _, _ = forward_train(x, w, b)
    if not np.array_equal(y_fused, np.maximum(plain + z, 0)):
        raise AssertionError("fused forward differs from relu(forward_train(x) + z)")
    dz = np.empty_like(x)
    dx, _, _ = backward(dy, x, mean, invstd, w, activation="relu", y=y_fused, residual_out=dz)
    gradient = np.where(y_fused > 0, dy, np.float32(0))
    dx_unfused, _, _ = backward(gradient, x, mean, invstd, w)
    if not (np.array_equal(dz, gradient) and np.allclose(dx, dx_unfused, rtol=1e-5, atol=1e-6)):
        raise AssertionError("fused backward differs from the ReLU's gradient, then backward")


def calls(shape, torch, threads):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    z, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    channels = shape[1]
    w, b = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    y_fused, mean, invstd = forward_train(x, w, b, residual=z, activation="relu")
    dz = np.empty_like(x)
    copy_dst = np.empty_like(x)
    _verify(x, z, dy, w, b, y_fused, mean, invstd)

    def unfused_forward():
        y, _, _ = forward_train(x, w, b)
        np.add(y, z, out=y)
        np.maximum(y, 0, out=y)

    def unfused_backward():
        g = np.where(y_fused > 0, dy, np.float32(0))
        backward(g, x, mean, invstd, w)

    table = {
        ("forward", "plain"): lambda: forward_train(x, w, b),
        ("forward", "fused"): lambda: forward_train(x, w, b, residual=z, activation="relu"),
        ("forward", "ours unfused"): unfused_forward,
        ("backward", "plain"): lambda: backward(dy, x, mean, invstd, w),
        ("backward", "fused"): lambda: backward(
            dy, x, mean, invstd, w, activation="relu", y=y_fused, residual_out=dz
        ),  # fmt: skip
        ("backward", "ours unfused"): unfused_backward,
        ("copy", "copy"): lambda: parallel_copy(copy_dst.reshape(-1), x.reshape(-1), threads),
    }
    if torch is not None:
        tx, tz, tdy = (torch.from_numpy(a) for a in (x, z, dy))
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        aten = torch.ops.aten
        ty = torch.relu(aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5)[0] + tz)
        _, tmean, tinvstd = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5)

        def torch_forward():
            y = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5)[0]
            return torch.relu_(y.add_(tz))

        def torch_backward():
            g = aten.threshold_backward(tdy, ty, 0)
            return aten.native_batch_norm_backward(g, tx, tw, None, None, tmean, tinvstd, True,
                                                   1e-5, [True, True, True])  # fmt: skip

        table[("forward", "torch")] = torch_forward
        table[("backward", "torch")] = torch_backward
    return table


def run(threads, repeat, torch, log=print):
    """Time and print the table (``torch`` None: without PyTorch's rows)."""
    log(f"fused BN+Add+ReLU: float32, {threads} threads, median of {repeat}; load average "
        f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    for name in FUSED_SHAPES:
        shape = SHAPES[name].dims
        samples, _ = time_each(calls(shape, torch, threads), repeat)
        ms = {key: float(np.median(s)) * 1e3 for key, s in samples.items()}
        log(f"\n{name} {shape}: parallel copy {ms[('copy', 'copy')]:.2f} ms")
        log(f"  {'op':<9}{'plain':>8}{'fused':>8}{'unfused':>9}{'torch':>8}"
            f"{'fused/plain':>13}{'unfused/fused':>15}{'torch/fused':>13}")  # fmt: skip
        for op in ("forward", "backward"):
            plain, fused, unfused = (ms[(op, k)] for k in ("plain", "fused", "ours unfused"))
            theirs = ms.get((op, "torch"), float("nan"))
            ratios = f"{fused / plain:13.2f}{unfused / fused:15.2f}{theirs / fused:13.2f}"
            log(f"  {op:<9}{plain:8.2f}{fused:8.2f}{unfused:9.2f}{theirs:8.2f}{ratios}")
    log(f"\nload average after {os.getloadavg()[0]:.2f}")
