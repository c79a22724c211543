"""Train an MLP on scikit-learn's digits with and without batch norm: NumPy and numba_bn only.

The classic experiment (Ioffe & Szegedy, 2015) end to end: the same network, initial weights,
batch order and learning rate with and without a BatchNorm before each hidden activation, then a
learning rate high enough that the network without it diverges or lags. Every part of the
library takes part: training forward with batch statistics, the exact backward, running
statistics, eval mode (validation and test accuracy), state_dict. The matmuls, the loss and the
optimiser are plain NumPy with gradients written by hand (mlp.py, beside this file);
tests/test_train_demo.py checks the whole network's gradient against finite differences.
Needs scikit-learn (data) and matplotlib (plot): pip install -e ".[demo]". See docs/train_demo.md.

    python examples/train_digits/train_digits.py [--epochs 20] [--lr 0.05] [--high-lr 0.5]
        [--plot train_digits.png]
"""

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlp import MLP, SGD, accuracy, cross_entropy  # beside this file: run it as a script

from numba_bn import warmup


# -------------------------------------------------------------------------------------- data
def load_digits_split(seed=0, dtype=np.float32):
    """scikit-learn's bundled 8x8 digits (1797 images, no download), split 60/20/20.

    Pixels are scaled from 0..16 to [0, 1] and not standardised: normalising the hidden layers
    is BatchNorm's job in this experiment.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits example needs scikit-learn for its bundled data: "
            "pip install -e '.[demo]' (or pip install scikit-learn)"
        ) from exc
    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_held = len(x) // 5
    parts = {
        "test": order[:n_held],
        "val": order[n_held : 2 * n_held],
        "train": order[2 * n_held :],
    }
    return {name: (x[idx], labels[idx]) for name, idx in parts.items()}


# ---------------------------------------------------------------------------------- training
@dataclass
class History:
    batch_norm: bool
    lr: float
    train_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)
    diverged_at: int | None = None  # first epoch whose loss was not finite
    test_accuracy: float = float("nan")

    @property
    def label(self):
        return f"{'with' if self.batch_norm else 'without'} BN, lr {self.lr:g}"


class Run:
    """One model trained epoch by epoch; runs with the same seed see the same batches."""

    def __init__(self, data, sizes, batch_norm, lr, seed, batch_size, dtype):
        self.data, self.batch_size = data, batch_size
        self.model = MLP(sizes, batch_norm, seed, dtype)
        self.optimizer = SGD(self.model, lr)
        self.order_rng = np.random.default_rng(seed + 1)
        self.history = History(batch_norm, lr)

    def epoch(self):
        history = self.history
        x, labels = self.data["train"]
        order = self.order_rng.permutation(len(x))
        if history.diverged_at is not None:
            history.train_loss.append(np.nan)
            history.val_accuracy.append(np.nan)
            history.epoch_seconds.append(np.nan)
            return
        start = time.perf_counter()
        self.model.train()
        losses = []
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run overflows
            # full batches only: a training batch norm needs more than one sample
            for first in range(0, len(x) - self.batch_size + 1, self.batch_size):
                idx = order[first : first + self.batch_size]
                loss, dlogits = cross_entropy(self.model.forward(x[idx]), labels[idx])
                losses.append(loss)
                if not np.isfinite(loss):
                    history.diverged_at = len(history.train_loss) + 1
                    break
                self.model.backward(dlogits)
                self.optimizer.step()
            history.epoch_seconds.append(time.perf_counter() - start)
            history.train_loss.append(float(np.mean(losses)))
            history.val_accuracy.append(accuracy(self.model, *self.data["val"]))


@dataclass
class Result:
    runs: list  # [Run]: for each learning rate, without BN then with BN
    warmup_seconds: float
    total_seconds: float
    state_dict_round_trip: bool


def train_digits(
    epochs=20,
    lr=0.05,
    high_lr=0.5,
    batch_size=64,
    hidden=(256, 128, 64),
    seed=0,
    dtype=np.float32,
    log=print,
):
    """Train without and with BatchNorm at ``lr`` (and at ``high_lr`` unless it is None/0).

    ``log`` receives the per-epoch table lines (pass ``lambda line: None`` for silence).
    """
    start = time.perf_counter()
    data = load_digits_split(seed, dtype)
    n_train = len(data["train"][0])
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    for name, rate in (("lr", lr), ("high_lr", high_lr or 1.0)):
        if not rate > 0:
            raise ValueError(f"{name} must be > 0, got {rate}")
    if not 2 <= batch_size <= n_train:  # batch statistics need two samples per channel
        raise ValueError(f"batch_size must be in [2, {n_train}], got {batch_size}")
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden sizes must be >= 1, got {hidden}")
    sizes = (data["train"][0].shape[1], *hidden, 10)
    warmup_seconds = warmup((dtype,))
    log(
        f"digits: {len(data['train'][0])} train / {len(data['val'][0])} val / "
        f"{len(data['test'][0])} test images; MLP {'-'.join(map(str, sizes))}, SGD momentum "
        f"0.9, batch {batch_size}, {np.dtype(dtype).name}; kernels ready in {warmup_seconds:.1f} s"
    )
    runs = []
    for rate in [lr] + ([high_lr] if high_lr else []):
        pair = [Run(data, sizes, bn, rate, seed, batch_size, dtype) for bn in (False, True)]
        log(f"\nlearning rate {rate:g}")
        log(f"{'':6}{'---- without BN ----':^28}{'----- with BN ------':^28}")
        log(f"{'epoch':>5}" + f"{'loss':>10}{'val acc':>9}{'train s':>9}" * 2)
        for epoch in range(epochs):
            row = f"{epoch + 1:5d}"
            for run in pair:
                run.epoch()
                h = run.history
                if h.diverged_at is not None and h.diverged_at <= epoch:
                    row += f"{'(diverged)':>28}"
                else:
                    loss = h.train_loss[-1]
                    row += f"{loss:10.4f}" if abs(loss) < 1e4 else f"{loss:10.3g}"
                    row += f"{h.val_accuracy[-1]:9.1%}"
                    row += f"{h.epoch_seconds[-1]:9.3f}"
            log(row)
        runs += pair
    for run in runs:
        run.history.test_accuracy = accuracy(run.model, *data["test"])
    round_trip = state_dict_round_trip(runs[1].model, data["test"][0])
    return Result(runs, warmup_seconds, time.perf_counter() - start, round_trip)


def state_dict_round_trip(model, x):
    """A fresh model (another seed) given ``model.state_dict()`` predicts exactly the same."""
    fresh = MLP(model.sizes, model.batch_norm, seed=12345, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    return bool(np.array_equal(model.forward(x), fresh.forward(x)))


# -------------------------------------------------------------------------------------- plot
def save_plot(runs, path):
    """Two panels, validation accuracy and training loss per epoch; False without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend is touched
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    rates = sorted({run.history.lr for run in runs})
    for run in runs:
        h = run.history
        epochs = np.arange(1, len(h.train_loss) + 1)
        style = dict(
            color="tab:orange" if h.batch_norm else "tab:blue",
            linestyle="-" if h.lr == rates[0] else "--",
            marker="o",
            markersize=3,
        )
        end = (
            f"diverged at epoch {h.diverged_at}" if h.diverged_at else f"test {h.test_accuracy:.1%}"
        )
        ax_acc.plot(epochs, np.asarray(h.val_accuracy) * 100, label=f"{h.label} ({end})", **style)
        ax_loss.plot(epochs, h.train_loss, label=h.label, **style)
        finite = np.flatnonzero(np.isfinite(h.train_loss))
        if h.diverged_at and len(finite):
            last = finite[-1]
            ax_loss.annotate(
                "then NaN",
                (epochs[last], h.train_loss[last]),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                color=style["color"],
                fontsize=8,
            )
    ax_acc.set(
        xlabel="epoch", ylabel="validation accuracy (%, eval mode)", title="validation accuracy"
    )
    ax_loss.set(
        xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log", title="training loss"
    )
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle("MLP on scikit-learn digits, NumPy + numba_bn: with and without BatchNorm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------------- command
def add_arguments(parser):
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument(
        "--high-lr",
        type=float,
        default=0.5,
        help="second, higher learning rate; 0 skips it (default 0.5)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument("--hidden", default="256,128,64", help="hidden sizes (default 256,128,64)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="numba threads (default: numba's); the results do not depend on it",
    )
    parser.add_argument(
        "--plot",
        default="train_digits.png",
        help="PNG to write when matplotlib is installed (default %(default)s, in the current "
        "directory; the docs' figure is --plot docs/train_digits.png from the repository root)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no plot")


def run_from_args(args):
    try:
        if args.threads is not None:
            import numba

            numba.set_num_threads(args.threads)  # ValueError outside 1..NUMBA_NUM_THREADS
        try:
            hidden = tuple(int(s) for s in args.hidden.split(","))
        except ValueError:
            raise ValueError(
                f"--hidden must be integers separated by commas, got {args.hidden!r}"
            ) from None
        result = train_digits(
            epochs=args.epochs,
            lr=args.lr,
            high_lr=args.high_lr,
            batch_size=args.batch_size,
            hidden=hidden,
            seed=args.seed,
            dtype=np.dtype(args.dtype),
        )
    except (ImportError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print("\ntest accuracy (eval mode, running statistics):")
    for run in result.runs:
        h = run.history
        note = f"  (diverged at epoch {h.diverged_at})" if h.diverged_at else ""
        print(
            f"  {h.label:<24} {h.test_accuracy:6.1%}   "
            f"train {np.nansum(h.epoch_seconds):.2f} s{note}"
        )
    print(
        "state_dict round trip:",
        "identical test logits" if result.state_dict_round_trip else "MISMATCH",
    )
    if not args.no_plot:
        if save_plot(result.runs, args.plot):
            print(f"plot: {Path(args.plot).resolve()}")
        else:
            print("plot: skipped, matplotlib is not installed (pip install matplotlib)")
    print(
        f"wall time {result.total_seconds:.1f} s (kernels ready in "
        f"{result.warmup_seconds:.1f} s: compile or cache load)"
    )
    return 0 if result.state_dict_round_trip else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="train_digits", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
