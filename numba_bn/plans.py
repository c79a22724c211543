"""A BatchNorm's plain calls, checked once per kind of batch (issue 12: "a layer called again on
the same shape and dtype should reuse what it validated and allocated").

The plain host path (:mod:`numba_bn.hostcall`, ``ops.plain_batch_forward`` and its twins) checks
every argument of every call: most of the ~5 us that a small layer's forward and its backward
each added to their kernels. A layer passes its own arrays, the same objects from one batch to
the next, so a :class:`Plan` keeps what those checks found for one shape, dtype and mode of
input, and makes the plain path's backend call (the same kernels on the same arguments, so the
same bits) on the next batch after checking only what can change: the batch itself (an ndarray
of the plan's shape and dtype, C-contiguous) and that the layer still holds the arrays and
settings the plan was made from: that none of :data:`WATCHED` was assigned since (a
:class:`Watched` attribute moves the layer's version on; an in-place update of an array is the
layer's own business, a reassigned array leaves the plan behind).

A plan also keeps the float64 per-channel buffers the kernels fill (statistics, sums): the layer
exposes none of them and keeps one forward's for one backward. Like the layer's saved input they
belong to one training step at a time: two threads training one layer at once would pair one's
forward with the other's backward anyway (and a parallel twin releases the GIL while its threads
run, Numba's launch, so the buffers are not even kept whole). An eval plan has no buffers: one
layer evaluates batches from several threads at once.

A residual (checked per call, as the plain path checks it) and the layer's activation go to the
same kernels' epilogue. An ``out=`` like x that shares no memory with it (the layer's test) a
plan writes through a front only, which checks its layout and overlap as the plain path does;
any other, or one no front serves, takes the general path. Anything else (a mask,
SyncBatchNorm's exchange, ghost batches, renorm, momentum=None, population statistics, a CUDA
input, a backend that is not a host one) never gets a plan and takes the layer's general path.

Where compiled calls serve a plan's calls (:func:`numba_bn.capi.calls.may_serve`: loaded, the
size and layout they take, no activation), the plan hands its checked arguments to them (the C
library, which compiles nothing) instead of the JIT's drivers; a call they decline (a residual)
takes the general path, which asks them first as well. The layer's general path cost such a
training step ~1 us more than a plan does (benchmarks/README.md, "Stop 68").
"""

from typing import NamedTuple

import numpy as np

from . import dispatch, hostcall
from .capi import calls
from .cpu import CpuBackend, front_address, fronts, num_threads
from .stats import RunningUpdate

#: A training front's arguments for no running update (``absent & 4``) and no rounded
#: statistics, by x's dtype.
_NO_RUNNING = {dtype: (rows[0], rows[0], 0.1, True) for dtype, rows in fronts._NO_ROWS.items()}
_NO_ROWS = fronts._NO_ROWS
#: Compiled calls' running arguments for no running update, and the strings they compare.
_NO_RUNNING_ENTRY = (None, None, 0.1, True)
CPU, PROPAGATE = fronts.CPU, fronts.PROPAGATE

#: What a plan depends on: the layer's settings and arrays (every one an attribute of the
#: layer's own, set by its __init__), besides ``_exchange`` and ``_collected`` (None for a plan,
#: read on each call: class defaults).
WATCHED = (
    "eps", "momentum", "axis", "convention", "nan_policy", "activation", "backend", "dtype",
    "track_running_stats", "virtual_batch_size", "renorm", "_side", "weight", "bias",
    "running_mean", "running_var",
)  # fmt: skip


class Watched:
    """A layer attribute a plan depends on: read as any other (a descriptor with ``__set__``
    alone leaves reads to the instance's dict), assigned through here, which moves the layer's
    ``_version`` on. A plan serves the version it was made at: one comparison a call where
    reading the sixteen cost ~0.45 us of a small layer's forward and as much of its backward."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __set__(self, layer, value):
        state = layer.__dict__
        state[self.name] = value
        state["_version"] = state.get("_version", 0) + 1


def watch(cls):
    """Class decorator: :data:`WATCHED` as :class:`Watched` attributes of ``cls``, and of its
    subclasses that define one of those names themselves (a class attribute there would take
    the assignments past the descriptor; __init__ assigns every one of them anyway)."""
    for name in WATCHED:
        setattr(cls, name, Watched(name))
    cls._version = 0  # a layer's before its first assignment (and a pickle's from before)
    own = vars(cls).get("__init_subclass__")  # the class's own (a classmethod), run first

    def __init_subclass__(subclass, **keywords):
        if own is not None:
            own.__func__(subclass, **keywords)
        else:
            super(cls, subclass).__init_subclass__(**keywords)
        for name in WATCHED:
            if name in vars(subclass):
                setattr(subclass, name, Watched(name))

    cls.__init_subclass__ = classmethod(__init_subclass__)
    return cls


#: Plans a layer keeps at most (shapes x modes: a training loop's batch, its last short batch,
#: and the same in eval).
MOST_PLANS = 8


class Plan(NamedTuple):
    """The checked arguments of a layer's plain call on inputs of one ``shape`` and dtype, in
    one mode: ``batch`` statistics (with the running ``update`` or not) or the running ones."""

    shape: tuple
    dtype: np.dtype
    view_shape: tuple  # the canonical (outer, C, inner)
    kernels: object  # the host backend
    batch: bool
    update: bool
    count: int  # values per channel
    weight: np.ndarray  # as the kernels take them: zero-length when absent
    bias: np.ndarray
    running_mean: np.ndarray | None  # the statistics of an eval plan (None for a batch plan)
    running_var: np.ndarray | None
    running: RunningUpdate | None  # the running update of a plan that updates: its buffers
    eps: float
    activation: str | None  # the layer's, in the kernels' epilogue
    statistics: tuple  # float64 (C,) mean, invstd, M2 of a batch forward: the kernels fill them
    sums: tuple  # float64 (C,) sum_dy, sum_dy_xmu of its backward
    version: int  # the layer's when the plan was made (Watched)
    entry: object  # calls.entry when the plan was made: compiled calls loaded since may serve
    served: bool  # the entry serves this plan's calls (calls.may_serve when it was made)
    axis: int  # the layer's
    absent: int  # the fronts' mask (numba_bn.cpu.fronts): 1 no weight, 2 no bias, 4 no update
    fronts: dict  # {step: (its driver's address for a front, threads)}: found on first use

    def __repr__(self):
        kind = "running statistics" if not self.batch else "batch statistics"
        return f"Plan({self.shape}, {self.dtype}, {kind}{', update' if self.update else ''})"

    @classmethod
    def make(cls, layer, x, training):
        """The plan of ``layer``'s calls on inputs like the ndarray ``x`` in mode ``training``
        (the call that just ran with them took the general path and succeeded), or None when
        such a call is not a plain one."""
        update = training and layer.track_running_stats
        batch = training or not layer.track_running_stats
        served = layer.activation is None and calls.may_serve(batch, x, layer.axis)
        if (layer._exchange is not None or layer._collected is not None
                or layer.virtual_batch_size is not None or layer.renorm
                or not hostcall.activation(layer.activation) or layer.nan_policy != "propagate"
                or layer._side != "cpu" or (update and layer.momentum is None)):  # fmt: skip
            return None  # first the settings no plan takes: their calls try on every call
        kernels, view = dispatch.on_host(layer.backend), hostcall.canonical_view(x, layer.axis)
        if kernels is None or view is None or not view.size:
            return None
        outer, channels, inner = view.shape
        dtype, eps, unbiased = x.dtype, layer.eps, layer.convention.unbiased_running_var
        running_mean = running_var = running = None
        if batch:
            if outer * inner < 2 or not hostcall.training_eps(eps):
                return None  # one value per channel (an error to explain), or an eps to check
            if update:
                buffers = (hostcall.buffer(layer.running_mean, channels, dtype),
                           hostcall.buffer(layer.running_var, channels, dtype))  # fmt: skip
                # every batch's weight (momentum=None, a cumulative average, has none: no plan)
                momentum = layer.convention.new_batch_weight(layer.momentum, 1)
                if buffers[0] is None or buffers[1] is None or not hostcall.momentum(momentum):
                    return None
                if type(unbiased) is not bool:
                    return None
                running = RunningUpdate(*buffers, momentum, unbiased)
        else:
            running_mean = hostcall.vector(layer.running_mean, channels, dtype)
            running_var = hostcall.vector(layer.running_var, channels, dtype)
            if running_mean is None or running_var is None or not hostcall.eval_eps(eps):
                return None
        weight = hostcall.vector(layer.weight, channels, dtype)
        bias = hostcall.vector(layer.bias, channels, dtype)
        if weight is None or bias is None:
            return None
        statistics = sums = ()
        if batch and not served:  # (compiled calls return vectors of their own)
            statistics = tuple(np.empty(channels) for _ in range(3))
            sums = (np.empty(channels), np.empty(channels))
        absent = (not weight.size) | (not bias.size) << 1 | (running is None) << 2
        return cls(x.shape, dtype, view.shape, kernels, batch, update, outer * inner, weight,
                   bias, running_mean, running_var, running, eps, layer.activation, statistics,
                   sums, layer._version, calls.entry, served, layer.axis, absent,
                   {})  # fmt: skip

    def front(self, step, x):
        """The address of the driver of ``step`` for a front on x's shape (a plain call without
        an epilogue on the CPU backend), or 0; looked up until the backend keeps its plan (its
        first call compiles or loads the driver, a race settles), and again when the calling
        thread's count is not the one of the parallel plan found (:func:`.cpu.front_address`)."""
        found = self.fronts.get(step)
        if found is None or (found[1] and found[1] != num_threads()):
            if type(self.kernels) is not CpuBackend or self.activation is not None:
                found = (0, 0)
            else:
                found = front_address(step, x.reshape(self.view_shape), step != "forward_eval")
                if found is None:
                    return 0
            self.fronts[step] = found
        return found[0]

    def takes(self, layer, x):
        """Whether this plan serves ``layer``'s call on the ndarray ``x`` (or its backward's
        ``dy``) of the plan's shape: the layer holds what the plan checked, x has its dtype.
        The memory the kernels need is checked where they are called: a front's types (a
        non-contiguous x, a read-only buffer: another type, which it declines), else
        :meth:`_memory` (~0.3 us less a front's call)."""
        return (
            x.dtype is self.dtype
            and layer._version == self.version
            and layer._exchange is None
            and layer._collected is None
            and calls.entry is self.entry
        )

    def _vectors(self):
        """(weight, bias) as compiled calls take them: None when absent."""
        return (None if self.absent & 1 else self.weight, None if self.absent & 2 else self.bias)

    def _memory(self, x):
        """Whether the kernels can take ``x`` (C-contiguous) and, for a plan that updates them,
        the running buffers (writable)."""
        return x.flags.c_contiguous and (
            not self.update
            or (self.running.mean.flags.writeable and self.running.var.flags.writeable)
        )

    def train(self, x, residual, out=None):
        """y and the float64 mean, invstd (the plan's buffers) of a batch-statistics forward of
        ``x`` (+ ``residual``, then the activation), with the running update when the plan
        updates (float64 vectors of their own from compiled calls); None for a residual the
        plain path would not take, or a call compiled calls decline. y is ``out`` when given
        (an ndarray like x that shares no memory with it: the layer's test), written by a front
        only (None where none serves it: the general path checks and writes it)."""
        if out is not None and (self.served or residual is not None):
            return None
        if self.served:
            running = self.running or _NO_RUNNING_ENTRY
            served = NotImplemented if residual is not None else calls.entry.batch_forward(
                x, *self._vectors(), self.eps, self.axis, *running, PROPAGATE, None, CPU, None,
                None, None, CPU,
            )  # fmt: skip
            return None if served is NotImplemented else served[:3]
        mean, invstd, m2 = self.statistics
        front = self.front("forward_train", x) if residual is None else 0
        if front:
            running = self.running or _NO_RUNNING[self.dtype]
            y = np.empty(self.shape, self.dtype) if out is None else out
            if not fronts._train_front(front, x, self.axis, self.weight,
                                       self.bias, self.absent, self.eps, *running, mean, invstd,
                                       m2, y, _NO_ROWS[self.dtype]):  # fmt: skip
                return y, mean, invstd
        if out is not None or not self._memory(x):
            return None
        view_shape = self.view_shape
        view = x.reshape(view_shape)
        plain, residual = hostcall.residual(residual, x, view)
        if not plain:
            return None
        y = np.empty(self.shape, self.dtype)
        self.kernels.forward_train(view, weight=self.weight, bias=self.bias, eps=self.eps,
                                   y=y.reshape(view_shape), mean=mean, invstd=invstd, m2=m2,
                                   running=self.running, residual=residual,
                                   activation=self.activation)  # fmt: skip
        return y, mean, invstd

    def evaluate(self, x, residual, out=None):
        """y of a running-statistics forward of ``x`` (as :meth:`train`, into ``out`` as
        there); None for a residual the plain path would not take, or when the running variance
        holds a negative value (written in place since), or a call compiled calls decline: the
        general path explains."""
        if out is not None and (self.served or residual is not None):
            return None
        if self.served:
            served = NotImplemented if residual is not None else calls.entry.forward_eval(
                x, self.running_mean, self.running_var, *self._vectors(), self.eps, self.axis,
                None, None, None, CPU, CPU,
            )  # fmt: skip
            return None if served is NotImplemented else served
        front = self.front("forward_eval", x) if residual is None else 0
        if front:
            y = np.empty(self.shape, self.dtype) if out is None else out
            negative = fronts._eval_front(front, x, self.axis,
                                          self.running_mean, self.running_var, self.weight,
                                          self.bias, self.absent, self.eps, y)  # fmt: skip
            return y if negative == -1 else None
        if out is not None or not self._memory(x):
            return None
        view_shape = self.view_shape
        view = x.reshape(view_shape)
        plain, residual = hostcall.residual(residual, x, view)
        if not plain:
            return None
        y = np.empty(self.shape, self.dtype)
        negative = self.kernels.forward_eval(
            view, weight=self.weight, bias=self.bias, running_mean=self.running_mean,
            running_var=self.running_var, eps=self.eps, y=y.reshape(view_shape),
            residual=residual, activation=self.activation,
        )  # fmt: skip
        return None if negative is not None and negative >= 0 else y  # as ops' plain call

    def backward(self, dy, x, mean, invstd, y, residual, out=None):
        """dx, dweight, dbias (in x's dtype, rounded as ``ops.plain_batch_backward`` rounds
        them) and the residual's gradient (None without a ``residual``) of the batch-statistics
        forward of ``x`` whose statistics were ``mean``, ``invstd`` and output ``y``; None for
        a ``dy`` the kernels do not take as it is (not C-contiguous: the general path copies
        it), or that compiled calls decline. dx is ``out`` when given (an ndarray of x's shape
        and dtype), written by a front only, which tests it against dy and x as the plain path
        does (:func:`numba_bn.hostcall.output`); None where none serves it."""
        if out is not None and (self.served or residual):
            return None
        if self.served:
            served = NotImplemented if residual else calls.entry.batch_backward(
                dy, x, mean, invstd, self._vectors()[0], self.axis, None, CPU, None, None, None,
                None, CPU,
            )  # fmt: skip
            if served is NotImplemented:
                return None
            dx, _, _, _, grad_weight, grad_bias = served
            return dx, grad_weight, grad_bias, None
        view_shape, shape, dtype = self.view_shape, self.shape, self.dtype
        dx = np.empty(shape, dtype) if out is None else out
        sum_dy, sum_dy_xmu = self.sums
        front = self.front("backward", x) if not residual else 0
        if front:
            grads = np.empty((2, view_shape[1]), dtype)
            if not fronts._backward_front(front, dy, x, self.axis, mean,
                                          invstd, self.weight, self.absent, sum_dy, sum_dy_xmu,
                                          dx, grads):  # fmt: skip
                return dx, grads[0], grads[1], None
        if out is not None or not dy.flags.c_contiguous:
            return None
        grad = grad_residual = None
        if self.activation is not None:  # the gradient through it, the residual's, in the pass
            grad, y = np.empty(view_shape, dtype), y.reshape(view_shape)
            grad_residual = grad.reshape(shape) if residual else None
        elif residual:
            grad_residual = dy.copy()
        grads = np.empty((2, view_shape[1]), dtype)  # dweight, dbias: the kernels write them
        # every keyword spelt out (an empty ** costs ~0.2 us of a small call)
        self.kernels.backward(dy.reshape(view_shape), x.reshape(view_shape), mean=mean,
                              invstd=invstd, weight=self.weight, dx=dx.reshape(view_shape),
                              sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, activation=self.activation,
                              y=y, grad=grad, grads=grads)  # fmt: skip
        return dx, grads[0], grads[1], grad_residual


def remember(plans, layer, x, training):
    """Keep in ``plans`` (a layer's) the plan of its calls on inputs like ``x`` in mode
    ``training`` when they are plain, else forget the one it had (its layer changed since); drops
    them all when there are MOST_PLANS already."""
    key = x.shape, training
    plan = Plan.make(layer, x, training)
    if plan is None:
        plans.pop(key, None)
        return
    if len(plans) >= MOST_PLANS:
        plans.clear()
    plans[key] = plan
