"""The plots of ``numba-bn bench --plot``: a bar chart of time / memcpy per shape, and with
--sweep time against size on log-log axes. matplotlib is imported only when one is drawn."""

import numpy as np

from .cases import OPS
from .peers import COPIES
from .report import BASELINE, LIMIT, index_results, is_planes, peer_columns, shapes_by_size


def bar_chart(results, names, path, title):
    """Time / memcpy time per shape, one panel per operation, one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = index_results(results)
    shapes = [
        s for s in dict.fromkeys(r.shape.name for r in results) if (s, "memcpy", LIMIT) in index
    ]
    shown = [n for n in names if n not in (LIMIT, *COPIES)]
    panel_width = max(4.5, 0.9 * len(shapes) + 1.0)
    fig, axes = plt.subplots(1, len(OPS), figsize=(panel_width * len(OPS), 4.5), sharey=True)
    width = 0.8 / max(len(shown), 1)
    for ax, op in zip(axes, OPS, strict=True):
        for k, name in enumerate(shown):
            ratios = [
                index[s, op, name].median / index[s, "memcpy", LIMIT].median
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


def size_plot(results, names, path, title):
    """--sweep: median time against elements on log-log axes, one panel per operation and
    memory shape (rows: (N, C) and channels-last; planes: NCHW), one line per implementation,
    memcpy as the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = index_results(results)
    shapes = shapes_by_size(results)
    families = [
        (label, [s for s in shapes if is_planes(s) == planes])
        for label, planes in (("rows: (N, C), channels-last", False), ("planes: NCHW", True))
    ]
    families = [(label, members) for label, members in families if members]
    shown = [n for n in names if n == BASELINE] + peer_columns(names)
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(
        len(families),
        len(OPS),
        figsize=(5.0 * len(OPS), 4.2 * len(families)),
        sharex=True,  # rows and planes of one size one above the other
        squeeze=False,
    )
    for row, (label, members) in zip(axes, families, strict=True):
        for ax, op in zip(row, OPS, strict=True):
            floor = [(s.elements, index[s.name, "memcpy", LIMIT].median * 1e6)
                     for s in members if (s.name, "memcpy", LIMIT) in index]  # fmt: skip
            if floor:
                sizes, times = zip(*floor, strict=True)
                ax.plot(sizes, times, "k--", marker="_", markersize=12, label="memcpy (floor)")
                ax.fill_between(sizes, min(times) / 2, times, color="0.9")
            for k, name in enumerate(shown):  # one colour per implementation in every panel
                points = [(s.elements, index[s.name, op, name].median * 1e6)
                          for s in members if (s.name, op, name) in index]  # fmt: skip
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", color=f"C{k}", label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{op}, {label}", fontsize=10)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="major", linewidth=0.4)
        row[0].set_ylabel("us per call (median)")
    for ax in axes[-1]:
        ax.set_xlabel("elements")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
