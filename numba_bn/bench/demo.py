"""``numba-bn demo``: one batch of your shape through BatchNorm, checked, then timed as
``numba-bn bench`` times its shapes.

First a ``BatchNorm`` layer runs train forward, backward and eval (its first call: compile or
cache load included), and every output, running statistics too, is compared with the float64
reference. Then :func:`.measure.run_case` verifies the functional forward-train, eval and
backward of numba_bn and of NumPy written by hand, and times them with the two copies, and
:func:`.report.main_table` prints the medians: the benchmark's path on one shape, without
PyTorch. Nothing is timed after a failed check. On a busy machine (1-minute load average above
:data:`.report.BUSY_LOAD_PER_CPU` per CPU) the times are printed with a warning instead of
speed-ups.
"""

import math
import os
import time

import numba
import numpy as np

from .. import __version__, reference
from ..layer import BatchNorm
from ..layout import canonical_shape
from . import BYTE_MODEL
from .cases import Case, Shape
from .measure import VerificationError, relative_error, run_case
from .peers import STRICT, implementations
from .report import TABLE_LEGEND, busy_warning, load_lines, main_table, speedup_line

MOMENTUM = 0.1  # PyTorch's, weighting the new batch; the reference below assumes it


def add_arguments(parser):
    parser.add_argument("--shape", default="32,64,28,28", help="input shape (default %(default)s)")
    parser.add_argument("--axis", type=int, default=1, help="channel axis (default 1)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64"],
        help="dtype of the batch (default float32)",
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=20, help="timed runs per operation (default 20)"
    )


def parse_shape(text, axis):
    """The benchmark Shape "demo" of ``--shape`` and ``--axis``; ValueError naming the argument."""
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--shape must be integers separated by commas, got {text!r}") from None
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"--shape must have 2 or more dimensions, each >= 1, got {text!r}")
    if not -len(dims) <= axis < len(dims):
        raise ValueError(f"--axis must be in [{-len(dims)}, {len(dims) - 1}], got {axis}")
    _, channels, inner = canonical_shape(dims, axis % len(dims))
    if math.prod(dims) // channels < 2:  # batch statistics need two values per channel
        raise ValueError(f"--shape must give each channel 2 or more values, got {text!r}")
    return Shape("demo", dims, axis, "planes" if inner > 1 else "rows")


def check_layer(case):
    """Train forward, backward and eval through a fresh BatchNorm on ``case``.

    Returns (seconds of those three calls, [(output, relative error against float64)]).
    """
    axis, eps = case.axis, case.eps
    bn = BatchNorm(case.channels, eps=eps, momentum=MOMENTUM, axis=axis, dtype=case.dtype)
    bn.weight[:], bn.bias[:] = case.weight, case.bias
    start = time.perf_counter()
    y = bn(case.x)
    dx = bn.backward(case.dy)
    bn.eval()
    y_eval = bn(case.x)
    seconds = time.perf_counter() - start

    # float64 statistics of the batch; running buffers start at (0, 1), and the running variance
    # takes the unbiased batch variance (PyTorch's convention, the layer's default)
    x64, dy64 = case.x.astype(np.float64), case.dy.astype(np.float64)
    w64, b64 = case.weight.astype(np.float64), case.bias.astype(np.float64)
    y_ref, mean, invstd = case.expected["forward-train"]
    dx_ref, dweight_ref, dbias_ref = reference.backward(dy64, x64, mean, invstd, w64, axis)
    count = case.x.size // case.channels
    unbiased_var = (1.0 / invstd**2 - eps) * count / (count - 1)
    running_mean = MOMENTUM * mean
    running_var = (1.0 - MOMENTUM) + MOMENTUM * unbiased_var
    eval_ref = reference.forward_eval(x64, running_mean, running_var, w64, b64, eps, axis)
    outputs = [
        ("y (train)", y, y_ref),
        ("dx", dx, dx_ref),
        ("dweight", bn.grad_weight, dweight_ref),
        ("dbias", bn.grad_bias, dbias_ref),
        ("running_mean", bn.running_mean, running_mean),
        ("running_var", bn.running_var, running_var),
        ("y (eval)", y_eval, eval_ref),
    ]
    return seconds, [(name, relative_error(value, ref)) for name, value, ref in outputs]


def command(args, log=print):
    """Run the demo as the CLI asks; 0 when every check passes, 1 when one fails; bad input is
    a UsageError (numba_bn.cli)."""
    from ..cli import UsageError

    try:
        shape = parse_shape(args.shape, args.axis)
        if args.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    dtype = np.dtype(args.dtype)
    case = Case(shape, dtype)
    log(
        f"numba_bn {__version__} demo: x {shape.dims} {dtype}, axis {shape.axis} "
        f"({shape.layout}), {case.x.nbytes / 2**20:.1f} MiB, {numba.get_num_threads()} threads"
    )

    seconds, errors = check_layer(case)
    tolerance = STRICT[dtype]
    log(
        "\nBatchNorm train forward, backward, eval against a float64 NumPy reference "
        f"(relative L2 error, tolerance {tolerance:g})"
    )
    passed = True
    for name, error in errors:
        good = error <= tolerance  # False for NaN
        passed &= good
        log(f"  {name:<13} {error:9.2e}  {'ok' if good else 'FAIL'}")
    log(f"first call, compile or cache load included: {seconds:.2f} s")
    if not passed:
        log("result: CHECK FAILED, nothing timed")
        return 1

    threads = numba.get_num_threads()
    chosen = implementations(["numba_bn", "numpy", "memcpy"], threads, torch=None)
    load_before = os.getloadavg()[0]
    try:
        results, worst = run_case(case, chosen, args.repeat)
    except VerificationError as exc:
        log(f"result: CHECK FAILED, nothing timed: {exc}")
        return 1
    load_after = os.getloadavg()[0]
    checked = ", ".join(f"{name} {error:.1e}" for name, error in worst.items())
    log(
        f"\nforward_train, forward_eval, backward verified (largest relative error vs float64: "
        f"{checked}), then timed: median of {args.repeat} hot runs per call"
    )
    log("\n".join(load_lines(load_before, load_after, threads, warn=False)))
    busy = busy_warning(load_before, os.cpu_count())
    log(BYTE_MODEL)
    log(f"{TABLE_LEGEND}; numba-bn bench adds PyTorch\n")
    names = [implementation.name for implementation in chosen]
    log(main_table(results, names, speedups=busy is None))
    log("\n" + (busy or speedup_line(results, "numba_bn", "numpy")))
    log("result: all checks passed")
    return 0
