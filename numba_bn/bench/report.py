"""What ``numba-bn bench`` prints and writes: tables, pytest-benchmark JSON, a bar chart."""

import datetime
import os
import platform
import subprocess

import numpy as np

from .. import __version__
from .cases import OPS

BASELINE = "numba_bn"
KERNELS = "numba_bn kernels"
TABLE_LEGEND = (
    "ms per call (median); /memcpy = time / memcpy time; x peer = numba_bn's speed-up over it"
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


def _index(results):
    return {(r.shape.name, r.op, r.name): r for r in results}


def main_table(results, names):
    """One row per (shape, operation): memcpy, numba_bn in ms, GB/s and x memcpy, and each peer
    in ms, x memcpy and numba_bn's speed-up over it."""
    index = _index(results)
    peers = [n for n in names if n not in (BASELINE, "memcpy")]
    header = ["shape", "op", "memcpy ms", "GB/s"]
    if BASELINE in names:
        header += [f"{BASELINE} ms", "GB/s", "/memcpy"]
    for peer in peers:
        header += [f"{peer} ms", "/memcpy"] + ([f"x {peer}"] if BASELINE in names else [])
    rows = []
    for shape in dict.fromkeys(r.shape.name for r in results):
        memcpy = index.get((shape, "memcpy", "memcpy"))
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
                if BASELINE in names:
                    row.append(f"{theirs.median / ours.median:.2f}")
            rows.append(row)
    return markdown(header, rows)


def _ratio(result, memcpy):
    return f"{result.median / memcpy.median:.2f}" if memcpy else "-"


def overhead_table(results, names):
    """Small shapes: the fastest sample in microseconds per call (scheduling noise only adds
    time), and what validation, allocation and dispatch add to numba_bn's kernels (the public
    call minus the backend called on prepared buffers)."""
    index = _index(results)
    small = list(dict.fromkeys(r.shape.name for r in results if r.shape.small))
    if not small or BASELINE not in names:
        return ""
    others = [n for n in names if n != BASELINE]
    header = ["shape", "op", f"{BASELINE} us", "kernels us", "API adds us"]
    header += [f"{n} us" for n in others]
    rows = []
    for shape in small:
        for op in OPS:
            ours, kernels = index[shape, op, BASELINE], index[shape, op, KERNELS]
            row = [shape, op, _us(ours.best), _us(kernels.best), _us(ours.best - kernels.best)]
            for name in others:
                theirs = index[shape, "memcpy" if name == "memcpy" else op, name]
                row.append(_us(theirs.best))
            rows.append(row)
    return markdown(header, rows)


def load_lines(load_before, load_after, threads):
    """The 1-minute load average around the timed runs, and a warning when other processes were
    already using the CPUs that ``threads`` threads needed."""
    cpus = os.cpu_count()
    lines = [
        f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {cpus} CPUs"
    ]
    if load_before > cpus - threads + 0.5:
        lines += [
            f"WARNING: other processes were using the CPUs before this run ({threads} threads on "
            f"{cpus} CPUs):",
            "parallel calls may have waited for CPU time; rerun on a quiet machine before taking "
            "these numbers as final.",
        ]
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
    memcpy = {r.shape.name: r for r in results if r.op == "memcpy"}
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


# --------------------------------------------------------------------------------------- plot
def bar_chart(results, names, path, title):
    """Time / memcpy time per shape, one panel per operation, one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _index(results)
    shapes = [
        s for s in dict.fromkeys(r.shape.name for r in results) if (s, "memcpy", "memcpy") in index
    ]
    shown = [n for n in names if n != "memcpy"]
    panel_width = max(4.5, 0.9 * len(shapes) + 1.0)
    fig, axes = plt.subplots(1, len(OPS), figsize=(panel_width * len(OPS), 4.5), sharey=True)
    width = 0.8 / max(len(shown), 1)
    for ax, op in zip(axes, OPS, strict=True):
        for k, name in enumerate(shown):
            ratios = [
                index[s, op, name].median / index[s, "memcpy", "memcpy"].median
                if (s, op, name) in index
                else np.nan
                for s in shapes
            ]
            ax.bar(np.arange(len(shapes)) + k * width, ratios, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="memcpy")
        ax.set_xticks(np.arange(len(shapes)) + width * (len(shown) - 1) / 2, shapes)
        ax.tick_params(axis="x", labelrotation=30)
        ax.set_yscale("log")
        ax.set_title(op)
    axes[0].set_ylabel("time / memcpy time (lower is better)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
