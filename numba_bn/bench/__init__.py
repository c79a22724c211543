"""``numba-bn bench``: numba_bn against the memory limit (memcpy) and its peers, verified first.

For each shape: every implementation's forward-train, eval and backward is checked against the
float64 reference (:mod:`.cases`), then every (operation, implementation) pair and the two
copies are timed in this one process, one after another (:mod:`.measure`); the median seconds
per call are reported with ratios to memcpy (the faster copy) and to each peer (:mod:`.report`,
:mod:`.plots`). The implementations are in :mod:`.peers`; torch is imported only here, and only
when installed.

Two reports: by default one row per (shape, operation) in ms with GB/s of the byte model;
``--sweep`` runs the speed issue's sizes, one row per (shape, implementation) in us, with the
BatchNorm layer next to the functions, and ``--plot`` draws time against size.

``--fused`` and ``--norms`` print instead the tables of the fused BN+Add+ReLU (:mod:`.fused`)
and of group and layer norm (:mod:`.norms`), each verified before it is timed.

Byte model: memcpy, forward-train and eval move 1 read + 1 write of the tensor; backward
2 reads + 1 write. The pytest-benchmark suites in benchmarks/ reuse these modules.
"""

import importlib.util
import json
import os
import time

import numpy as np

from .. import cpu
from ..capi import calls
from ..capi.calls import use_compiled_calls
from .cases import SHAPES, Case, parse_shapes
from .measure import VerificationError, cold_and_warm_first_call, run_case
from .peers import DEFAULT_PEERS, PEERS, implementations, import_torch
from .plots import bar_chart, size_plot
from .report import (
    SWEEP_LEGEND,
    TABLE_LEGEND,
    first_call_lines,
    load_lines,
    main_table,
    overhead_table,
    pytest_benchmark_json,
    race_lines,
    sweep_table,
)

BYTE_MODEL = (
    "byte model: memcpy, forward-train and eval = 1 read + 1 write of the tensor; "
    "backward = 2 reads + 1 write; GB/s = those bytes / median time"
)


def add_arguments(parser):
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated names from "
        + ", ".join(f"{n} {s.dims}" for n, s in SHAPES.items())
        + "; or 'default' (A,B,C,D,small-nchw,small-nc), 'small', 'sweep', 'all' "
        "(default: 'default', or 'sweep' with --sweep)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="the speed issue's sizes from (64, 32) to (32, 56, 56, 64) (or --shapes), one row "
        "per shape and implementation in us, the BatchNorm layer included; --plot draws time "
        "against size",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64"],
        help="dtype of the inputs (default float32)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="numba and torch threads (2)")
    parser.add_argument("--repeat", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument(
        "--impls",
        default=None,
        help=f"implementations to run, from {','.join(PEERS)} (default {','.join(DEFAULT_PEERS)}"
        "; --sweep adds BatchNorm; torch only if installed; memcpy = np.copyto and a parallel "
        "copy, the faster is the limit)",
    )
    parser.add_argument("--json", metavar="FILE", help="write pytest-benchmark JSON here")
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="bar chart of time / memcpy; with --sweep, time against size on log-log axes "
        "(needs matplotlib)",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="instead: fused BN+Add+ReLU on shapes A and B against the plain op, this library's "
        "unfused calls and PyTorch's three ops, forward and backward (numba_bn.bench.fused)",
    )
    parser.add_argument(
        "--norms",
        action="store_true",
        help="instead: group norm (32, 64, 56, 56) G=32 and layer norm (64, 512, 768) against "
        "PyTorch, NumPy and a memcpy (numba_bn.bench.norms)",
    )
    parser.add_argument(
        "--compiled-calls",
        metavar="DIR",
        help="time numba_bn's functions with the compiled calls of the plugin built in DIR "
        "(numba-bn build-plugin --out DIR; numba_bn.use_compiled_calls); without it, those of "
        "NUMBA_BN_COMPILED_CALLS when it is set",
    )
    parser.add_argument(
        "--no-first-call",
        action="store_true",
        help="skip timing the first call with a cold and a warm Numba cache (new processes)",
    )


def has_matplotlib():
    """Whether --plot can draw (checked before the benchmark runs, not after)."""
    return importlib.util.find_spec("matplotlib") is not None


def set_threads(threads, torch=None):
    """numba's (and torch's) thread count; ValueError beyond NUMBA_NUM_THREADS."""
    import numba

    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(
            f"--threads must be in [1, {numba.config.NUMBA_NUM_THREADS}] (NUMBA_NUM_THREADS), "
            f"got {threads}"
        )
    numba.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)


def command(args, log=print):
    """Run the benchmark as the CLI asks; 0 on success, 1 when a check fails; bad input is a
    UsageError (numba_bn.cli)."""
    from ..cli import UsageError, writable_file

    if args.fused or args.norms:
        return _other_tables(args, log)
    shapes = args.shapes or ("sweep" if args.sweep else "default")
    impls = args.impls or ",".join(PEERS if args.sweep else DEFAULT_PEERS)
    try:
        names = parse_shapes(shapes)
        wanted = [n.strip() for n in impls.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(PEERS))
        if unknown:
            raise ValueError(f"--impls takes names from {', '.join(PEERS)}, got {unknown}")
        if args.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
        if args.plot and not has_matplotlib():
            raise ValueError("--plot needs matplotlib, not installed: pip install matplotlib")
        for option, path in (("--json", args.json), ("--plot", args.plot)):
            if path is not None:
                writable_file(path, option)
        torch = import_torch() if "torch" in wanted else None
        set_threads(args.threads, torch)
        if args.compiled_calls is not None:
            use_compiled_calls(args.compiled_calls)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # UsageError is a ValueError
        message = f"--compiled-calls: {exc}" if not isinstance(exc, ValueError) else str(exc)
        raise UsageError(message) from None
    given, args.compiled_calls = args.compiled_calls, calls.in_use  # or NUMBA_BN_COMPILED_CALLS's
    try:
        return _timed_tables(args, shapes, impls, names, wanted, torch, log)
    finally:
        if given is not None:
            use_compiled_calls(None)


def _timed_tables(args, shapes, impls, names, wanted, torch, log):
    """Verify and time every shape, print the tables, save what --json and --plot ask for."""
    chosen = implementations(wanted, args.threads, torch)
    names_chosen = [i.name for i in chosen]
    dtype = np.dtype(args.dtype)
    log(
        f"numba-bn bench: {dtype}, {args.threads} threads, median of {args.repeat} "
        "hot runs per call, one process"
    )
    log("implementations: " + "; ".join(_describe(wanted, torch, dtype, args.threads)))
    if args.compiled_calls is not None:
        log(
            f"compiled calls from {args.compiled_calls}: numba_bn's plain float32 calls of serial "
            "size run through the C library's extension (use_compiled_calls)"
        )
    log(BYTE_MODEL)

    load_before = os.getloadavg()[0]
    results = []
    for name in names:
        start = time.perf_counter()
        case = Case(SHAPES[name], dtype)
        try:
            shape_results, worst = run_case(case, chosen, args.repeat)
        except VerificationError as exc:
            log(f"CHECK FAILED, nothing timed: {exc}")
            return 1
        results += shape_results
        checked = ", ".join(f"{n} {e:.1e}" for n, e in worst.items())
        log(
            f"{SHAPES[name]}, {case.x.nbytes / 1e6:.1f} MB: verified (largest relative error "
            f"vs float64: {checked}), timed in {time.perf_counter() - start:.1f} s"
        )
        del case
    load_after = os.getloadavg()[0]

    log("\n" + "\n".join(load_lines(load_before, load_after, args.threads)))
    if args.sweep:
        log(f"\n{SWEEP_LEGEND}\n")
        log(sweep_table(results, names_chosen))
    else:
        log(f"\n{TABLE_LEGEND}\n")
        log(main_table(results, names_chosen))
    overhead = overhead_table(results, names_chosen)
    if overhead:
        log("\nper-call overhead on the small shapes: fastest of the timed samples, us per call;")
        log("kernels = numba_bn's CPU backend on prepared buffers, so 'API adds' = validation +")
        log("allocation + dispatch")
        if args.compiled_calls is not None:
            log("(the compiled calls skip the backend's Numba dispatch: 'API adds' may be < 0)")
        log("")
        log(overhead)
    races = race_lines(cpu.RACES)
    if races:
        log("\n" + "\n".join(races))
    first_call = None
    if not args.no_first_call:
        first_call = cold_and_warm_first_call(dtype, args.threads)
        log("\n" + "\n".join(first_call_lines(first_call)))

    settings = {
        "command": (
            f"numba-bn bench{' --sweep' if args.sweep else ''} --shapes {shapes} --dtype {dtype} "
            f"--threads {args.threads} --repeat {args.repeat} --impls {impls}"
            + (f" --compiled-calls {args.compiled_calls}" if args.compiled_calls else "")
        ),
        "compiled_calls": args.compiled_calls,
        "dtype": str(dtype),
        "threads": args.threads,
        "repeat": args.repeat,
        "shapes": names,
        "implementations": names_chosen,
        "torch": None if torch is None else torch.__version__,
        "byte_model": BYTE_MODEL,
        "load_average": [load_before, load_after],
    }
    _save(args, results, names_chosen, settings, first_call, log)
    return 0


def _other_tables(args, log):
    """The fused op's and the other normalisations' tables (float32, with torch if installed)."""
    from ..cli import UsageError
    from . import fused, norms

    try:
        if args.repeat < 1:
            raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
        torch = import_torch()
        set_threads(args.threads, torch)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.fused:
        fused.run(args.threads, args.repeat, torch, log)
    if args.norms:
        norms.run(args.threads, args.repeat, torch, log)
    return 0


def _describe(wanted, torch, dtype, threads):
    import numba

    from .. import __version__

    lines = [f"numba_bn {__version__} (numba {numba.__version__})"]
    if "torch" in wanted and torch is None:
        lines.append("torch not installed: its columns are absent")
    elif "torch" in wanted:
        lines.append(
            f"torch {torch.__version__} (aten.native_batch_norm, native_batch_norm_backward)"
        )
    if "numpy" in wanted:
        lines.append(f"numpy {np.__version__} (naive: numba_bn/reference.py in {dtype})")
    if "BatchNorm" in wanted:
        lines.append(
            "BatchNorm = numba_bn.BatchNorm: bn(x) in train and eval mode, bn.backward(dy)"
        )
    if "memcpy" in wanted:
        lines.append(
            "memcpy = the faster of np.copyto (1 thread) and a numba prange copy "
            f"on {threads} thread(s), into a preallocated array"
        )
    return lines


def _save(args, results, names, settings, first_call, log):
    """The JSON and the plot, when asked for."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(pytest_benchmark_json(results, settings, first_call), f, indent=2)
        log(f"\nwrote {args.json} (pytest-benchmark JSON)")
    if args.plot:  # matplotlib's presence was checked before anything ran
        title = f"numba-bn bench, {settings['dtype']}, threads: {args.threads}"
        (size_plot if args.sweep else bar_chart)(results, names, args.plot, title)
        log(f"wrote {args.plot}")
