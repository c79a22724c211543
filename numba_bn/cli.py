"""The ``numba-bn`` command: ``demo``, ``info`` and the subcommands registered in COMMANDS.

The training example is not one of them: it is a program to read and copy, and lives with its
sources in examples/train_digits/ (not in the installed package); see docs/train_demo.md.

Bad input is a :class:`UsageError` from a command (or argparse's own): argparse's usage line of
that subcommand and one ``numba-bn <command>: error: ...`` line on stderr, exit status 2.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__

#: What ``numba-bn --help`` says (this module's docstring is for developers).
DESCRIPTION = (
    "Batch normalization for NumPy, CUDA arrays and C, from compiled Numba kernels: check and "
    "time a batch (demo), report versions and the machine (info), build the C library "
    "(build-plugin), benchmark against memcpy, NumPy and PyTorch (bench), compile ahead of the "
    "first call (warmup). numba-bn COMMAND --help describes each."
)


class UsageError(ValueError):
    """Bad command-line input found by a command: main() reports it as argparse does."""


def writable_directory(path, option):
    """``path`` made if missing, or UsageError naming ``option`` when it is not a writable
    directory."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {str(path)!r} cannot be made: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(path)!r} is not a writable directory")
    return path


def writable_file(path, option):
    """UsageError naming ``option`` unless ``path`` can be written (its directory exists and is
    writable, and it is not a directory); checked before a long run, not after."""
    path = Path(path)
    parent = path.parent  # "." for a bare file name
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a directory, not a file")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(path)!r}: its directory is missing or not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {str(path)!r} is not writable")
    return path


# --------------------------------------------------------------------------------------- demo
def _demo_arguments(parser):
    from .bench.demo import add_arguments

    add_arguments(parser)


def _demo(args):
    from .bench.demo import command

    return command(args)


# --------------------------------------------------------------------------------------- info
def _info_arguments(parser):
    pass


def _info(args):
    import platform

    import llvmlite
    import llvmlite.binding as llvm
    import numba

    import numba_bn as nbn
    from numba_bn import ahead
    from numba_bn.capi import calls
    from numba_bn.cpu import serial_below, wake_ns
    from numba_bn.cpu.threads import choose_threading_layer
    from numba_bn.cuda import cuda_target

    layer = choose_threading_layer()
    threads, wake = numba.get_num_threads(), wake_ns(layer)
    parallel = (f"a launch priced {wake / 1e3:g} us: forward_train on {threads} threads from "
                f"{serial_below('forward_train', threads, wake) / 1e3:.0f}K elements"
                if threads > 1 else "1 thread: every call serial")  # fmt: skip
    features = sorted(
        f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f[0] == "+"
    )
    simd = [f for f in features if f.startswith(("sse4", "avx", "fma"))]
    try:
        from numba import cuda

        cuda_available = cuda.is_available()
    except Exception as exc:  # pragma: no cover - depends on the machine
        cuda_available = f"no ({exc})"
    rows = [
        ("numba_bn", nbn.__version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("numba", numba.__version__),
        ("llvmlite", llvmlite.__version__),
        ("threading layer", layer),
        ("threads", threads),
        ("parallel", parallel),
        ("cpu", llvm.get_host_cpu_name()),
        ("simd", " ".join(simd)),
        ("cuda target", cuda_target()),
        ("cuda available", cuda_available),
        ("cache dir", numba.config.CACHE_DIR or "(next to the package sources)"),
        ("compiled calls", calls.in_use or f"off (use_compiled_calls, {calls.ENVIRONMENT})"),
        ("compile ahead", ahead.status()),
    ]
    for name, value in rows:
        print(f"{name:<16} {value}")
    return 0


# ------------------------------------------------------------------------------- build-plugin
def _build_plugin_arguments(parser):
    from .capi.build import add_arguments

    add_arguments(parser)


def _build_plugin(args):
    from .capi.build import run_from_args

    return run_from_args(args)


# -------------------------------------------------------------------------------------- bench
def _bench_arguments(parser):
    from .bench import add_arguments

    add_arguments(parser)


def _bench(args):
    from .bench import command

    return command(args)


# ------------------------------------------------------------------------------------- warmup
def _warmup_arguments(parser):
    parser.add_argument(
        "--dtype", action="extend", nargs="+", choices=("float32", "float64"),
        help="dtypes to compile for (default: both)",
    )  # fmt: skip
    parser.add_argument(
        "--distributed", action="store_true",
        help="also SyncBatchNorm's split steps (batch_stats, normalize, backward_sums, "
        "backward_dx); needs no MPI",
    )  # fmt: skip
    parser.add_argument(
        "--norms", action="store_true",
        help="also group, layer and instance norm's drivers (numba_bn.norms); not by default: "
        "about 30 s more from a cold cache (docs/norms.md)",
    )  # fmt: skip
    parser.add_argument(
        "--jobs", type=_positive_int, default=default_jobs(), metavar="N",
        help="compile in N worker processes at once (Numba compiles one function at a time in "
        "a process): about N times faster up to the cores; steps are reported as they end "
        f"(default: the CPUs this process may use, at most {MOST_DEFAULT_JOBS})",
    )  # fmt: skip


#: warmup's default --jobs at most: each worker holds its own Numba and LLVM (~0.4 GB)
MOST_DEFAULT_JOBS = 4


def default_jobs():
    """warmup's --jobs by default: a worker per CPU this process may use, MOST_DEFAULT_JOBS at
    most (188 s instead of 323 for the steps with --distributed on 2 cores, README)."""
    from .compiling import usable_cpus

    return min(usable_cpus(), MOST_DEFAULT_JOBS)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _warmup(args):
    import numba

    from .compiling import cache_location, cache_path, silenced
    from .warmup import Step, label, plan, warmup

    dtypes = tuple(dict.fromkeys(args.dtype or ("float32", "float64")))
    steps = len(plan(dtypes, args.distributed, args.norms))
    in_workers = args.jobs > 1 and cache_path() is not None  # else warmup runs them here
    workers = f" in {args.jobs} worker processes" if in_workers else ""
    print(f"numba-bn warmup: {steps} steps{workers}, {numba.get_num_threads()} Numba threads; "
          f"machine code cached in {cache_location()}")  # fmt: skip

    def progress(step):  # a step's name before it runs, its time and outcome after
        if isinstance(step, Step):
            print(step.line() if in_workers else f" {step.outcome()}", flush=True)
        else:
            print(label(*step), end="", flush=True)

    start = time.perf_counter()
    with silenced():  # the per-step lines say what compiled
        timings = warmup(dtypes, distributed=args.distributed, norms=args.norms,
                         progress=progress, jobs=args.jobs)  # fmt: skip
    sources = [step.source for step in timings.steps]
    counts = ", ".join(f"{sources.count(s)} {s}" for s in ("compiled", "from cache", "in memory"))
    if in_workers:
        seconds = f"{time.perf_counter() - start:.1f} s ({timings:.1f} s of steps)"
    else:
        seconds = f"{timings:.1f} s"
    print(f"{seconds}, {steps} steps: {counts}")
    return 0


# ------------------------------------------------------------------------------------ commands
COMMANDS = {
    "demo": (
        _demo_arguments,
        _demo,
        "check a batch through BatchNorm (train, backward, eval), then time it as bench does",
    ),
    "info": (_info_arguments, _info, "versions, threading layer, CPU, CUDA"),
    "build-plugin": (
        _build_plugin_arguments,
        _build_plugin,
        "build the C library libnumba_bn.so and its header from the kernels",
    ),
    "bench": (_bench_arguments, _bench, "verify, then time against memcpy, NumPy and PyTorch"),
    "warmup": (
        _warmup_arguments,
        _warmup,
        "compile the kernels ahead of the first call (or load them from Numba's cache)",
    ),
}


def parsers():
    """The ``numba-bn`` parser and a parser per command (``{name: parser}``)."""
    parser = argparse.ArgumentParser(prog="numba-bn", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"numba-bn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(commands[name])
    return parser, commands


def main(argv=None):
    parser, commands = parsers()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except UsageError as exc:  # usage line, "numba-bn <command>: error: ...", exit status 2
        commands[args.command].error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
