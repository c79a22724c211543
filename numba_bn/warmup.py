"""Compile (or load from Numba's cache) the drivers ahead of the first call, step by step.

A step is one operation on one dtype, memory shape and twin, run through the public functions
on a small batch of that shape: it compiles the drivers that call would compile, or loads them
from Numba's on-disk cache (NUMBA_CACHE_DIR). Serial twins run inputs below the cost model's
threshold (numba_bn.cpu); parallel twins, warmed when Numba has two threads or more, run
inputs of ``cpu.parallel_min_elements()``. A dtype's ``fronts`` steps compile the fronts of its
plain calls (:mod:`numba_bn.cpu.fronts`) for x of each rank of FRONT_RANKS. ``numba-bn
warmup`` prints a line per step.

Group, layer and instance norm (:mod:`numba_bn.norms`) have drivers of their own
(:mod:`numba_bn.cpu.norm_kernels`; instance norm runs group norm's): ``norms=True`` adds their
steps, NORM_OPERATIONS. They are opt-in: a program that uses batch norm only would spend their
compile (34 s from a cold cache on 2 cores, benchmarks/README.md) for nothing.

``jobs`` > 1 runs the steps in that many worker processes at once (Numba compiles one function
at a time in a process), a group of steps that share drivers per worker at a time
(:func:`groups`); they fill the on-disk cache, which saves each entry under a lock
(:func:`numba_bn.codecache.lock_cache_saves`), and this process loads the drivers on their
first calls.
"""

import contextlib
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numba
import numpy as np
from numpy.typing import DTypeLike

from . import ahead, compiling

#: Memory shapes of the canonical (outer, C, inner) view, and what partitions them: rows
#: (inner == 1), planes split into segments (few channels), short planes (numba_bn.cpu.kernels:
#: rows of (outer, C * inner)), planes one channel per item.
LAYOUTS = ("rows", "planes", "short", "fused")
OPERATIONS = ("forward_train", "backward", "forward_eval")
#: The ranks of x whose fronts (numba_bn/cpu/fronts.py: the checks of a plain call like one
#: before, compiled per dtype and rank of x) a dtype's steps compile: an MLP's (N, C) and a
#: convolution's (N, C, H, W). Their steps' twin column is "-": a front calls either twin.
FRONT_RANKS = (2, 4)
#: The steps of SyncBatchNorm (numba_bn.distributed): the split steps with an exchange between.
SYNC_OPERATIONS = ("sync forward_train", "sync backward", "sync eval backward")
#: The norms' steps, with the memory shape of the view their drivers see.
NORM_OPERATIONS = (
    ("group_norm forward", "groups"),
    ("group_norm backward", "groups"),
    ("layer_norm forward", "rows"),
    ("layer_norm backward", "rows"),
)


def label(operation, dtype, layout, twin):
    """The columns naming a step: ``forward_train        float32  rows    serial``."""
    return f"{operation:<20} {dtype:<8} {layout:<7} {twin:<9}"


class Step(NamedTuple):
    """One warm-up step: what ran, how long it took, and where its drivers came from:
    ``"compiled"`` (one at least), ``"from cache"`` (Numba's on-disk cache) or ``"in memory"``
    (an earlier step, or call, of this process had them ready)."""

    operation: str
    dtype: str
    layout: str
    twin: str
    seconds: float
    source: str

    @property
    def compiled(self) -> bool:
        return self.source == "compiled"

    def outcome(self) -> str:
        return f"{self.seconds:7.2f} s  {self.source}"

    def line(self) -> str:
        return f"{label(*self[:4])} {self.outcome()}"


def _cache_loads():
    """How many times the drivers' machine code (batch norm's and the norms') has come from
    Numba's cache in this process."""
    from .cpu import drivers, fronts, norm_kernels  # noqa: F401 (the norms' drivers made)

    return sum(sum(dispatcher.stats.cache_hits.values())
               for dispatcher in (*drivers.dispatchers(), *fronts.dispatchers()))  # fmt: skip


class Timings(float):
    """The seconds warm-up took (a float, as before), with its :class:`Step` list in ``steps``."""

    steps: tuple[Step, ...]

    def __new__(cls, steps: Sequence[Step]) -> "Timings":
        total = super().__new__(cls, sum(step.seconds for step in steps))
        total.steps = tuple(steps)
        return total


def _shape(layout, parallel, threads):
    """A (N, C) or (N, C, L) batch of ``layout`` whose steps run on the twin asked for."""
    from .cpu import parallel_min_elements
    from .cpu.items import (
        FUSED_BACKWARD_MIN_ELEMENTS,
        FUSED_FORWARD_MIN_INNER,
        FUSED_SERIAL_MIN_ELEMENTS,
    )
    from .cpu.kernels import SHORT_MIN_OUTER, SHORT_PLANE

    if layout == "rows":
        channels, inner = 8, 1
    elif layout == "planes":  # fewer channels than 2 * threads: split into segments
        channels, inner = 1, SHORT_PLANE
    elif layout == "short":
        channels, inner = 2, 4
    else:  # 2 * threads channels or more, long planes: one channel per item (items.is_fused)
        channels, inner = max(8, 2 * threads), FUSED_FORWARD_MIN_INNER
    if layout == "fused":  # the backward fuses from FUSED_BACKWARD_MIN_ELEMENTS on
        least = FUSED_BACKWARD_MIN_ELEMENTS if parallel else FUSED_SERIAL_MIN_ELEMENTS
        outer = -(-least // (channels * inner))
    else:  # serial: SHORT_MIN_OUTER planes a channel, so that a short layout is short
        outer = -(-parallel_min_elements() // (channels * inner)) if parallel else SHORT_MIN_OUTER
    return (outer, channels) if inner == 1 else (outer, channels, inner)


def _norm(operation, x, parallel):
    """A norm's forward or backward on ``x`` (N, C, L): group norm in 4 groups (and, in
    parallel, one sample in one group: fewer groups than threads take batch norm's split
    steps), layer norm over L."""
    from .norms import (
        group_norm_backward,
        group_norm_forward,
        layer_norm_backward,
        layer_norm_forward,
    )

    if operation.startswith("layer_norm"):
        y, mean, invstd = layer_norm_forward(x, x.shape[-1])
        if operation.endswith("backward"):
            layer_norm_backward(y, x, mean, invstd, x.shape[-1])
        return
    inputs = [(x, 4)] + ([(x.reshape(1, 2, -1), 1)] if parallel else [])
    for values, groups in inputs:
        y, mean, invstd = group_norm_forward(values, groups)
        if operation.endswith("backward"):
            group_norm_backward(y, values, mean, invstd, groups)


def _plain(operation, x):
    from .functional import backward, forward_eval, forward_train

    if operation == "forward_train":
        return forward_train(x)
    y, mean, invstd = forward_train(x)
    if operation == "backward":
        return backward(y, x, mean, invstd)
    return forward_eval(x, mean, 1.0 / invstd**2)


def _sync(operation, x):
    """SyncBatchNorm's calls on one process: the split steps around a one-rank exchange."""
    from .distributed import OneProcess, RankExchange
    from .ops import batch_backward, batch_forward, frozen_backward

    exchange = RankExchange(OneProcess())
    channels = x.shape[1]
    weight, bias = np.ones(channels, x.dtype), np.zeros(channels, x.dtype)
    running_mean, running_var = np.zeros(channels, x.dtype), np.ones(channels, x.dtype)
    if operation == "sync eval backward":
        return frozen_backward(x, x, running_mean, running_var, weight, 1e-5, 1, exchange=exchange)
    result = batch_forward(x, weight, bias, 1e-5, 1, running_mean=running_mean,
                           running_var=running_var, exchange=exchange)  # fmt: skip
    if operation == "sync backward":
        batch_backward(x, x, result.mean, result.invstd, weight, 1, exchange=exchange)
    return result


def plan(
    dtypes: Iterable[DTypeLike] = (np.float32, np.float64),
    distributed: bool = False,
    norms: bool = False,
) -> list[tuple[str, str, str, str]]:
    """The steps :func:`warmup` runs, as (operation, dtype, layout, twin) tuples."""
    twins = ("serial", "parallel") if numba.get_num_threads() > 1 else ("serial",)
    steps = []
    for dtype in dtypes:
        name = np.dtype(dtype).name
        steps += [("fronts", name, f"{rank}-D", "-") for rank in FRONT_RANKS]
        for twin in twins:
            for layout in LAYOUTS:
                if layout == "fused" and twin == "serial" and len(twins) > 1:
                    continue  # one thread fuses only inputs too big for the serial twin
                steps += [(operation, name, layout, twin) for operation in OPERATIONS]
            if distributed:  # the split steps have no fused variant
                for layout in ("rows", "planes", "short"):
                    steps += [(operation, name, layout, twin) for operation in SYNC_OPERATIONS]
            if norms:
                steps += [(operation, name, layout, twin) for operation, layout in NORM_OPERATIONS]
    return steps


def warmup(
    dtypes: Iterable[DTypeLike] = (np.float32, np.float64),
    *,
    distributed: bool = False,
    norms: bool = False,
    progress: Callable[[tuple[str, str, str, str] | Step], object] | None = None,
    jobs: int = 1,
) -> Timings:
    """Run every step of :func:`plan`; returns the seconds taken, with the steps.

    The result is a float (the total) whose ``steps`` hold a :class:`Step` each: what ran, its
    seconds, and whether its drivers compiled, came from Numba's cache or were in memory.
    ``distributed`` adds SyncBatchNorm's split steps (no MPI needed), ``norms`` group, layer and
    instance norm's (NORM_OPERATIONS). ``progress``, when given, is called with each step's
    (operation, dtype, layout, twin) before it runs and with its :class:`Step` after.

    ``jobs`` > 1: the steps run in that many worker processes into Numba's on-disk cache (the
    total is then the sum of their seconds, more than the time it took; the steps keep the
    plan's order), and ``progress`` gets each :class:`Step` as it ends, in that order; this
    process loads the drivers from the cache on their first calls. With Numba's cache off, the
    steps run here, one at a time.
    """
    return run_steps(plan(dtypes, distributed, norms), progress=progress, jobs=jobs)


def run_steps(
    steps: Iterable[tuple[str, str, str, str]],
    *,
    progress: Callable[[tuple[str, str, str, str] | Step], object] | None = None,
    jobs: int = 1,
) -> Timings:
    """Run the given steps of :func:`plan` (a part of one, say), as :func:`warmup` does."""
    if type(jobs) is not int or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    steps = [tuple(step) for step in steps]
    if jobs > 1 and len(steps) > 1 and compiling.cache_path() is not None:
        return _run_in_workers(steps, jobs, progress)  # (what workers compile goes to the cache)
    threads = numba.get_num_threads()
    rng = np.random.default_rng(0)
    done = []
    for operation, dtype, layout, twin in steps:
        if progress is not None:
            progress((operation, dtype, layout, twin))
        parallel = twin == "parallel"
        norm = layout == "groups" or operation.startswith("layer_norm")
        if operation != "fronts":
            shape = _norm_shape(parallel) if norm else _shape(layout, parallel, threads)
            x = (rng.standard_normal(shape) + 2.0).astype(dtype)
        loads = _cache_loads()
        with compiling.recording() as compiled, ahead.off():  # the steps compile here
            start = time.perf_counter()
            if operation == "fronts":
                from .cpu import fronts

                fronts.compile_ahead(np.dtype(dtype), int(layout.removesuffix("-D")))
            elif norm:
                _norm(operation, x, parallel)
            elif operation.startswith("sync"):
                _sync(operation, x)
            else:
                _plain(operation, x)
            seconds = time.perf_counter() - start
        if compiled:
            source = "compiled"
        elif _cache_loads() > loads:
            source = "from cache"
        else:
            source = "in memory"
        step = Step(operation, dtype, layout, twin, seconds, source)
        done.append(step)
        if progress is not None:
            progress(step)
    return Timings(done)


def _norm_shape(parallel):
    """(N, 8, L) for the norms' steps: 4 groups of 2 channels, layer norm's rows of L; in
    parallel at least ``cpu.parallel_min_elements()`` (every step parallel with 2 threads or
    more)."""
    from .cpu import parallel_min_elements

    return (-(-parallel_min_elements() // 48), 8, 6) if parallel else (4, 8, 6)


# --------------------------------------------------------------------------- worker processes
def groups(steps: Sequence[tuple[str, str, str, str]]) -> list[list[tuple[str, str, str, str]]]:
    """``steps`` in groups that run in one worker, each in the plan's order: one per dtype,
    twin and memory shape (the "fused" layout's steps with "planes": their eval and split
    drivers are the same functions), so that no two workers compile one driver for one dtype,
    and a backward finds its forward compiled. Parallel twins first (the slower compiles)."""
    keyed = {}
    for step in steps:
        _, dtype, layout, twin = step
        keyed.setdefault((dtype, "planes" if layout == "fused" else layout, twin), []).append(step)
    return sorted(keyed.values(), key=lambda group: group[0][3] != "parallel")


_WORKER = "from numba_bn.warmup import _serve; _serve()"


def _run_in_workers(steps, jobs, progress):
    """run_steps in ``jobs`` worker processes (:func:`_serve`), a group of :func:`groups` at a
    time each, handed out as workers finish their last."""
    todo = queue.SimpleQueue()
    for group in groups(steps):
        todo.put(group)
    env = compiling.child_environment()
    command = [sys.executable, "-c", _WORKER, str(numba.get_num_threads()),
               "1" if compiling.quiet() else "0"]  # fmt: skip
    done, failures, report = [], [], threading.Lock()

    def work():
        worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=env, text=True)  # fmt: skip
        with worker:
            while not failures:
                try:
                    group = todo.get_nowait()
                except queue.Empty:
                    break
                worker.stdin.write(json.dumps(group) + "\n")
                worker.stdin.flush()
                answer = worker.stdout.readline()
                if not answer:
                    failures.append(f"a warm-up worker (pid {worker.pid}) ended during {group[0]}")
                    break
                with report:
                    for fields in json.loads(answer):
                        step = Step(*fields)
                        done.append(step)
                        if progress is not None:
                            progress(step)
            worker.stdin.close()
        if worker.returncode and not failures:
            failures.append(f"a warm-up worker (pid {worker.pid}) exited with {worker.returncode}")

    threads = [threading.Thread(target=work) for _ in range(min(jobs, todo.qsize()))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError("; ".join(failures) + " (its error is on stderr above)")
    order = {step: i for i, step in enumerate(steps)}
    return Timings(sorted(done, key=lambda step: order[tuple(step[:4])]))


def _serve():
    """A warm-up worker (:func:`_run_in_workers`): argv gives the Numba threads and whether the
    compile lines are off; each line on stdin is a group of steps, answered with their Steps
    as one JSON line on stdout (anything else printed goes to stderr)."""
    answers, sys.stdout = sys.stdout, sys.stderr
    numba.set_num_threads(int(sys.argv[1]))
    quiet = sys.argv[2] == "1"
    for line in sys.stdin:
        group = [tuple(step) for step in json.loads(line)]
        with compiling.silenced() if quiet else contextlib.nullcontext():
            timings = run_steps(group)
        answers.write(json.dumps([list(step) for step in timings.steps]) + "\n")
        answers.flush()
