"""What ``numba-bn bench`` prints and writes: tables and pytest-benchmark JSON (the plots are
in :mod:`.plots`).

"memcpy" in every table and plot is the limit: per shape, the faster of the two copies timed
in the same run (np.copyto on one thread, a prange copy on the benchmark's threads).
"""

import datetime
import os
import platform
import subprocess

import numpy as np

from .. import __version__
from ..layout import canonical_shape
from .cases import OPS
from .peers import COPIES

BASELINE = "numba_bn"
KERNELS = "numba_bn kernels"
LIMIT = "memcpy"
TABLE_LEGEND = (
    "ms per call (median; inputs up to 128 KiB whose calls all take under 1 ms sampled in "
    "rounds of every call); memcpy = the faster of np.copyto (1 thread) and a parallel copy; "
    "/memcpy = time / memcpy time; x peer = numba_bn's speed-up over it"
)
SWEEP_LEGEND = (
    "us per call (median; inputs up to 128 KiB whose calls all take under 1 ms sampled in "
    "rounds of every call); memcpy = the faster of np.copyto (1 thread) and a parallel copy "
    "('by'); /memcpy = time / memcpy time; x peer = the peer's time / this row's time (the "
    "row's speed-up over it)"
)


def _significant(value, digits=3):
    return np.format_float_positional(value, precision=digits, unique=False, fractional=False)


def _ms(seconds):
    return _significant(seconds * 1e3).rstrip(".")


def _us(seconds):
    return f"{seconds * 1e6:.1f}"


def markdown(header, rows):
    """A markdown table with padded columns (reads in a terminal, pastes into a README)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def index_results(results):
    """{(shape name, op, implementation): Result}, with (shape, "memcpy", "memcpy") the faster
    of the copies."""
    index = {(r.shape.name, r.op, r.name): r for r in results}
    for shape in dict.fromkeys(r.shape.name for r in results):
        copies = [index[shape, "memcpy", c] for c in COPIES if (shape, "memcpy", c) in index]
        if copies:
            index[shape, "memcpy", LIMIT] = min(copies, key=lambda r: r.median)
    return index


def peer_columns(names):
    """The implementations that get columns of their own: not numba_bn, not the copies."""
    return [n for n in names if n not in (BASELINE, LIMIT, *COPIES)]


def main_table(results, names, speedups=True):
    """One row per (shape, operation): memcpy, numba_bn in ms, GB/s and x memcpy, and each peer
    in ms, x memcpy and (unless ``speedups`` is False) numba_bn's speed-up over it."""
    index = index_results(results)
    peers = peer_columns(names)
    header = ["shape", "op", "memcpy ms", "GB/s"]
    if BASELINE in names:
        header += [f"{BASELINE} ms", "GB/s", "/memcpy"]
    speedups = speedups and BASELINE in names
    for peer in peers:
        header += [f"{peer} ms", "/memcpy"] + ([f"x {peer}"] if speedups else [])
    rows = []
    for shape in dict.fromkeys(r.shape.name for r in results):
        memcpy = index.get((shape, "memcpy", LIMIT))
        for op in OPS:
            if not any((shape, op, n) in index for n in names):
                continue
            row = [shape, op]
            row += [_ms(memcpy.median), f"{memcpy.gb_per_s:.1f}"] if memcpy else ["-", "-"]
            ours = index.get((shape, op, BASELINE))
            if BASELINE in names:
                row += [_ms(ours.median), f"{ours.gb_per_s:.1f}", _ratio(ours, memcpy)]
            for peer in peers:
                theirs = index[shape, op, peer]
                row += [_ms(theirs.median), _ratio(theirs, memcpy)]
                if speedups:
                    row.append(f"{theirs.median / ours.median:.2f}")
            rows.append(row)
    return markdown(header, rows)


def _ratio(result, memcpy):
    return f"{result.median / memcpy.median:.2f}" if memcpy else "-"


def overhead_table(results, names):
    """Small shapes: the fastest sample in microseconds per call (scheduling noise only adds
    time), and what validation, allocation and dispatch add to numba_bn's kernels (the public
    call minus the backend called on prepared buffers)."""
    index = index_results(results)
    small = list(dict.fromkeys(r.shape.name for r in results if r.shape.small))
    if not small or BASELINE not in names:
        return ""
    others = peer_columns(names) + [c for c in COPIES if c in names]
    header = ["shape", "op", f"{BASELINE} us", "kernels us", "API adds us"]
    header += [f"{n} us" for n in others]
    rows = []
    for shape in small:
        for op in OPS:
            ours, kernels = index[shape, op, BASELINE], index[shape, op, KERNELS]
            row = [shape, op, _us(ours.best), _us(kernels.best), _us(ours.best - kernels.best)]
            for name in others:
                theirs = index[shape, "memcpy" if name in COPIES else op, name]
                row.append(_us(theirs.best))
            rows.append(row)
    return markdown(header, rows)


def sweep_table(results, names):
    """One row per (shape, implementation): us per call of each operation, each over memcpy,
    and the speed-up over torch (every operation) and NumPy (forward-train)."""
    index = index_results(results)
    shown = [n for n in names if n == BASELINE] + peer_columns(names)
    short = {"forward-train": "fwd", "eval": "eval", "backward": "bwd"}
    header = ["shape", "elements", "memcpy us", "by", "impl"]
    header += [f"{short[op]} us" for op in OPS] + [f"{short[op]} /memcpy" for op in OPS]
    speedups = [("torch", op) for op in OPS] + [("numpy", "forward-train")]
    speedups = [(peer, op) for peer, op in speedups if peer in names]
    header += [f"x {peer} {short[op]}" for peer, op in speedups]
    rows = []
    for shape in shapes_by_size(results):
        memcpy = index.get((shape.name, "memcpy", LIMIT))
        first = True
        for name in shown:
            if not any((shape.name, op, name) in index for op in OPS):
                continue
            timed = [index.get((shape.name, op, name)) for op in OPS]
            row = ["", "", "", ""]  # the shape's cells, on its first row only
            if first:
                limit = [_significant_us(memcpy.median), memcpy.name] if memcpy else ["-", "-"]
                row = [_dims(shape), shape.elements, *limit]
            row += [name] + [_significant_us(r.median) if r else "-" for r in timed]
            row += [_ratio(r, memcpy) if r else "-" for r in timed]
            for peer, op in speedups:
                ours, theirs = index.get((shape.name, op, name)), index.get((shape.name, op, peer))
                compared = ours is not None and theirs is not None and peer != name
                row.append(f"{theirs.median / ours.median:.2f}" if compared else "-")
            rows.append(row)
            first = False
    return markdown(header, rows)


def _significant_us(seconds):
    return _significant(seconds * 1e6).rstrip(".")


def shapes_by_size(results):
    """The shapes of ``results``: (N, C) and channels-last rows, then NCHW planes, each family
    from the fewest elements up."""
    shapes = {r.shape.name: r.shape for r in results}.values()
    return sorted(shapes, key=lambda s: (is_planes(s), s.elements, s.name))


def is_planes(shape):
    return canonical_shape(shape.dims, shape.axis % len(shape.dims))[2] > 1


def _dims(shape):
    dims = "(" + ", ".join(str(d) for d in shape.dims) + ")"
    return dims if shape.axis == 1 else f"{dims} axis {shape.axis}"


def load_lines(load_before, load_after, threads, warn=True):
    """The 1-minute load average around the timed runs, and (``warn``) a warning when other
    processes were already using the CPUs that ``threads`` threads needed."""
    cpus = os.cpu_count()
    lines = [
        f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {cpus} CPUs"
        f"; {threads} threads"
    ]
    if warn and load_before > cpus - threads + 0.5:
        lines += [
            f"WARNING: other processes were using the CPUs before this run ({threads} threads on "
            f"{cpus} CPUs):",
            "parallel calls may have waited for CPU time; rerun on a quiet machine before taking "
            "these numbers as final.",
        ]
    return lines


BUSY_LOAD_PER_CPU = 0.75  # numba-bn demo shows no speed-up above this 1-minute load per CPU


def busy_warning(load, cpus):
    """The warning that replaces speed-ups when the 1-minute ``load`` is above
    BUSY_LOAD_PER_CPU x ``cpus``; None on a quiet enough machine."""
    if load <= BUSY_LOAD_PER_CPU * cpus:
        return None
    return (
        f"machine busy (load {load:.2f} on {cpus} CPUs): timings not meaningful; "
        "speed-ups not shown"
    )


def speedup_line(results, ours, peer):
    """ "ours is N x faster than peer": forward-train, eval and backward, from the medians."""
    index = index_results(results)
    shape = results[0].shape.name
    ratios = [
        f"{op} {index[shape, op, peer].median / index[shape, op, ours].median:.1f}x"
        for op in OPS
        if (shape, op, ours) in index and (shape, op, peer) in index
    ]
    return f"speed-up of {ours} over {peer}: " + ", ".join(ratios)


#: How a race's line names the epilogue of a forward (numba_bn/cpu/kernels.py's codes)
_EPILOGUES = {0: "", 1: " + residual", 2: " + relu", 3: " + residual + relu"}


def race_lines(races):
    """The planes partitions and the twins (serial or parallel) the CPU backend timed in this
    process and kept (numba_bn.cpu.RACES), a line each; none when it timed none."""
    if not races:
        return []
    lines = ["partitions and thread counts timed in this run, each one's fastest call "
             "(numba_bn/cpu/race.py):"]  # fmt: skip
    for (step, shape, dtype, epilogue, threads), race in races.items():
        timed = ", ".join(f"{name} {_significant(race[name]).rstrip('.')} us"
                          for name in sorted(set(race) - {"rule", "kept"}))  # fmt: skip
        lines.append(
            f"  {step}{_EPILOGUES[epilogue]} {shape} {dtype} on {threads} threads: {timed}: "
            f"kept {race['kept']} "
            f"(the {'rule' if race['rule'] in ('fused', 'split') else 'cost model'}'s: "
            f"{race['rule']})"
        )
    return lines


def first_call_lines(first_call):
    cold, warm = first_call["cold"], first_call["warm"]
    shapes = " and ".join(f"{dims} axis {axis}" for dims, axis in first_call["shapes"])
    return [
        f"first call of forward-train + eval + backward on {shapes}, in a fresh process:",
        f"  cold Numba cache (compile): {cold['first_call_s']:.2f} s"
        f"   (import numba_bn {cold['import_s']:.2f} s)",
        f"  warm Numba cache (load):    {warm['first_call_s']:.2f} s"
        f"   (import numba_bn {warm['import_s']:.2f} s)",
    ]


# --------------------------------------------------------------------------------------- JSON
def _stats(samples, iterations):
    """pytest-benchmark's Stats fields (quartiles by linear interpolation)."""
    data = np.sort(np.asarray(samples, np.float64))
    mean, stddev = float(data.mean()), float(data.std(ddof=1)) if data.size > 1 else 0.0
    q1, q3 = (float(q) for q in np.percentile(data, [25, 75]))
    iqr = q3 - q1
    low, high = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    stddev_outliers = int(np.sum((data < mean - stddev) | (data > mean + stddev)))
    iqr_outliers = int(np.sum((data < low) | (data > high)))
    return {
        "min": float(data[0]),
        "max": float(data[-1]),
        "mean": mean,
        "stddev": stddev,
        "rounds": int(data.size),
        "median": float(np.median(data)),
        "iqr": iqr,
        "q1": q1,
        "q3": q3,
        "iqr_outliers": iqr_outliers,
        "stddev_outliers": stddev_outliers,
        "outliers": f"{stddev_outliers};{iqr_outliers}",
        "ld15iqr": float(data[data >= low][0]),
        "hd15iqr": float(data[data <= high][-1]),
        "ops": float(data.size / data.sum()),
        "total": float(data.sum()),
        "iterations": int(iterations),
    }


def _commit_info():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"id": None, "dirty": None, "project": "numba_bn"}
    return {"id": commit, "dirty": bool(dirty), "project": "numba_bn"}


def pytest_benchmark_json(results, settings, first_call=None):
    """A dict in pytest-benchmark's --benchmark-json format (``pytest-benchmark compare`` reads
    it), plus a "numba_bn" section with the settings and first-call times."""
    index = index_results(results)
    memcpy = {shape: r for (shape, op, name), r in index.items() if name == LIMIT}
    benchmarks = []
    for r in results:
        param = f"{r.shape.name}-{r.name.replace(' ', '_')}"
        extra = {
            "dims": list(r.shape.dims),
            "axis": r.shape.axis,
            "layout": r.shape.layout,
            "dtype": str(r.dtype),
            "threads": settings["threads"],
            "bytes_moved": r.bytes,
            "gb_per_s": r.gb_per_s,
            "relative_error": r.error,
        }
        if r.shape.name in memcpy:
            extra["ratio_to_memcpy"] = r.median / memcpy[r.shape.name].median
        benchmarks.append(
            {
                "group": r.shape.name,
                "name": f"{r.op}[{param}]",
                "fullname": f"numba-bn bench::{r.op}[{param}]",
                "params": {"shape": r.shape.name, "impl": r.name, "op": r.op},
                "param": param,
                "extra_info": extra,
                "options": {
                    "disable_gc": False,
                    "timer": "perf_counter",
                    "min_rounds": settings["repeat"],
                    "max_time": None,
                    "min_time": None,
                    "warmup": True,
                },
                "stats": _stats(r.samples, r.iterations),
            }
        )
    return {
        "machine_info": {
            "node": platform.node(),
            "processor": platform.processor(),
            "machine": platform.machine(),
            "python_implementation": platform.python_implementation(),
            "python_version": platform.python_version(),
            "release": platform.release(),
            "system": platform.system(),
            "cpu": {"count": os.cpu_count()},
        },
        "commit_info": _commit_info(),
        "benchmarks": benchmarks,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": f"numba_bn {__version__}",
        "numba_bn": {**settings, "first_call": first_call},
    }
