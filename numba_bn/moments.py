"""Per-channel statistics as a public, mergeable value, and exact population statistics.

``Moments`` is the ``(count, mean, M2)`` state every kernel, thread and MPI rank of this library
already merges (:func:`numba_bn.stats.chan_merge`): merging the moments of any split of the data,
in any grouping, gives the statistics of the whole to float64 rounding, where the usual recipes
(a moving average, or the mean of per-batch variances) do not.
"""

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from . import dispatch
from .annotations import Array, Backend, Comm, Device, Float64Array
from .checks import Prepared
from .dispatch import memory_of, placed
from .ops import reduction_out
from .stats import merge_moments

if TYPE_CHECKING:  # for the hints only: layer imports this module
    from .layer import BatchNorm


class Moments:
    """``count`` values per channel, their float64 ``mean`` and ``m2`` (sum of squared
    deviations from the mean), shape (C,)."""

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count: int, mean: ArrayLike, m2: ArrayLike) -> None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
        if mean.ndim != 1 or m2.shape != mean.shape:
            raise ValueError(
                f"mean and m2 must be vectors of one length, got shapes {mean.shape}, {m2.shape}"
            )
        self.count, self.mean, self.m2 = int(count), mean, m2

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        """No values yet: the neutral element of :meth:`merge`."""
        return cls(0, np.zeros(channels), np.zeros(channels))

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def var(self, unbiased: bool = False) -> Float64Array:
        """M2 / count, or M2 / (count - 1) with ``unbiased``; NaN without values to divide."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.m2 / (self.count - 1 if unbiased else self.count)

    def merge(self, other: "Moments") -> "Moments":
        """The moments of both sets of values together (exact: Chan et al.'s merge)."""
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge Moments, got {type(other).__name__}")
        if other.channels != self.channels:
            raise ValueError(
                f"cannot merge moments of {self.channels} and {other.channels} channels"
            )
        mean, m2 = np.empty(self.channels), np.empty(self.channels)
        merge_moments(float(self.count), self.mean, self.m2, float(other.count), other.mean,
                      other.m2, mean, m2)  # fmt: skip
        return Moments(self.count + other.count, mean, m2)

    __add__ = merge

    def to_array(self) -> Float64Array:
        """``[count, mean..., m2...]`` as one float64 array of 2C + 1 values, to save or send."""
        return np.concatenate([[float(self.count)], self.mean, self.m2])

    @classmethod
    def from_array(cls, array: ArrayLike) -> "Moments":
        """The inverse of :meth:`to_array`."""
        array = np.asarray(array, np.float64)
        if array.ndim != 1 or array.size % 2 != 1:
            raise ValueError(
                f"expected [count, mean..., m2...] of 2C + 1 values, got {array.shape}"
            )
        count = array[0]
        if not (count >= 0 and count == int(count)):
            raise ValueError(f"the count (first value) must be a non-negative integer, got {count}")
        channels = array.size // 2
        return cls(int(count), array[1 : 1 + channels].copy(), array[1 + channels :].copy())

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Moments)
            and self.count == other.count
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.m2, other.m2)
        )

    def __repr__(self) -> str:
        return f"Moments(count={self.count}, mean={self.mean!r}, m2={self.m2!r})"


def moments(
    x: Array, axis: int = 1, *, backend: Backend = "cpu", device: Device = "auto"
) -> Moments:
    """The :class:`Moments` of each channel of ``x`` (channels on ``axis``): the training
    forward's own statistics kernels, on any backend; the result is on the host."""
    mean, m2, count = _batch_moments(x, axis, backend=backend, device=device)
    return Moments(count, memory_of(mean).to_host(mean), memory_of(m2).to_host(m2))


@placed(("x",))
def _batch_moments(x, axis, *, backend="cpu"):
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared = Prepared(x, axis, memory=memory)
    local = prepared.count and prepared.channels
    mean, m2 = reduction_out(memory, prepared.channels, local)
    if local:
        kernels.batch_stats(prepared.view, mean=mean, m2=m2)
    return mean, m2, prepared.count


@contextlib.contextmanager
def population_stats(*layers: "BatchNorm", comm: Comm | None = None) -> Iterator[None]:
    """Inside the block, each BatchNorm of ``layers`` normalises with batch statistics (whatever
    its mode) and merges each batch's moments instead of updating its running statistics; on a
    normal exit its ``running_mean`` and ``running_var`` become the mean and variance of every
    value it saw (unbiased for the torch convention, biased for the others), as a float64
    computation over all of them would give. With ``comm`` (mpi4py), over every rank's values
    (a SyncBatchNorm's batches are global already). When the block raises, no running statistic
    changes. Modes and ``num_batches_tracked`` are left as they were; a layer that saw no value
    keeps its running statistics.
    """
    for layer in layers:
        if not getattr(layer, "track_running_stats", False):
            raise ValueError(
                f"population_stats needs BatchNorm layers with running statistics, got {layer!r}"
            )
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("population_stats got the same layer twice")
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.collect_moments(Moments.empty(layer.num_features))
    try:
        yield
        collected = [layer.collect_moments(None) for layer in layers]
        if comm is not None:
            from .distributed import allreduce_moments

            collected = [
                m if layer.is_synchronized() else allreduce_moments(m, comm)
                for layer, m in zip(layers, collected, strict=True)
            ]
        for layer, population in zip(layers, collected, strict=True):
            if population.count:
                layer.set_running_stats(population)
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.collect_moments(None)
            layer.training = mode
