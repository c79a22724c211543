"""The operations behind the public functions and the layers, on one backend.

Each validates (:mod:`numba_bn.checks`), allocates, and runs the backend's kernels on the
canonical ``(outer, C, inner)`` view. Per-channel statistics travel between them in float64.
Names say which statistics normalise: ``batch_*`` those of the batch (training), ``frozen_*``
the running ones (eval). ``device`` (added by :func:`numba_bn.dispatch.placed`) picks the CPU or
the CUDA backend.
"""

from typing import NamedTuple, Protocol

import numpy as np

from . import dispatch, hostcall
from .capi import calls
from .checks import (
    Prepared,
    Vectors,
    check_activation,
    check_backward_inputs,
    check_eps,
    check_eval_inputs,
    check_like,
    check_residual_out,
    check_running_var,
    check_train_inputs,
    check_training_count,
    compute_dtype,
    returned_like,
    stats_vector,
)
from .cpu import CpuBackend, front_address, fronts
from .dispatch import memory_of, placed
from .memory import dtype_of
from .stats import RunningUpdate, invstd_of, running_update


def reduction_out(memory, channels, written):
    """Two float64 per-channel vectors for what a reduction fills, (mean, M2) or (sum_dy,
    sum_dy_xmu): left unset when it runs (``written``: there are values, and it writes every
    channel; on a GPU a zero-fill costs a launch each), zeros when there is nothing to reduce
    (the moments of no values, a sum over nothing, which an exchange may still add to)."""
    if written:
        return memory.empty(channels, np.float64), memory.empty(channels, np.float64)
    return memory.full(channels, 0.0, np.float64), memory.full(channels, 0.0, np.float64)


def _host_device(device):
    """True for the devices a plain host call may run on; anything else takes the checks
    (which also explain a device that is not one)."""
    return type(device) is str and (device == "auto" or device == "cpu")


class TrainResult(NamedTuple):
    """What a training forward produces: y and the float64 statistics backward needs."""

    y: object
    mean: object
    invstd: object
    m2: object
    count: int


class Exchange(Protocol):
    """Where the statistics of a batch split over processes meet (SyncBatchNorm's MPI ranks).

    ``batch_stats`` takes this process's count and float64 (mean, M2) per channel and returns
    the global ones; ``sums`` the backward's (sum_dy, sum_dy_xmu) with the count, ``frozen``
    telling an eval-mode backward from a training one. Every process must call them in the same
    order; an implementation raises the same error on every process or none.
    """

    def batch_stats(self, dtype, count, mean, m2): ...
    def sums(self, dtype, count, sum_dy, sum_dy_xmu, *, frozen): ...


def batch_forward(
    x,
    weight,
    bias,
    eps,
    axis,
    *,
    running_mean=None,
    running_var=None,
    momentum=0.1,
    unbiased=True,
    nan_policy="propagate",
    out=None,
    backend="cpu",
    exchange=None,
    residual=None,
    activation=None,
    device="auto",
):
    """Training forward with batch statistics; updates the running buffers when given.

    statistics -> (``exchange``: merged over the processes) -> finalise -> normalise (with the
    epilogue: y = activation(BN(x) + residual)). Without an exchange the backend runs it as one
    fused call.
    """
    if calls.entry is not None:  # compiled calls (capi.calls) serve a plain call, or decline
        served = calls.entry.batch_forward(
            x, weight, bias, eps, axis, running_mean, running_var, momentum, unbiased, nan_policy,
            out, backend, exchange, residual, activation, device,
        )  # fmt: skip
        if served is not NotImplemented:  # a TrainResult
            return served
    if exchange is None:
        result = plain_batch_forward(
            x, weight, bias, eps, axis, running_mean, running_var, momentum, unbiased, nan_policy,
            out, backend, residual, activation, device,
        )  # fmt: skip
        if result is not None:
            return TrainResult._make(result)
    return checked_batch_forward(
        x, weight, bias, eps, axis, running_mean=running_mean, running_var=running_var,
        momentum=momentum, unbiased=unbiased, nan_policy=nan_policy, out=out, backend=backend,
        exchange=exchange, residual=residual, activation=activation, device=device,
    )  # fmt: skip


def plain_batch_forward(x, weight, bias, eps, axis, running_mean, running_var, momentum,
                        unbiased, nan_policy, out, backend, residual, activation, device,
                        statistics="float64"):  # fmt: skip
    """batch_forward of a plain host call (:mod:`numba_bn.hostcall`) without an exchange: the
    fields of its TrainResult as a tuple; with ``statistics="rounded"``, y and the statistics in
    x's dtype as the functional API returns them (the kernels round them), with None, (y,)
    (no float64 statistics made: the kernels' own); None for any other call, which
    :func:`checked_batch_forward` takes."""
    if nan_policy != "propagate" or not _host_device(device):
        return None
    kernels, view = dispatch.on_host(backend), hostcall.canonical_view(x, axis)
    if kernels is None or view is None or not hostcall.training_eps(eps):
        return None
    plain, residual_view = hostcall.residual(residual, x, view)
    if not plain or not hostcall.activation(activation):
        return None
    outer, channels, inner = view.shape
    dtype = x.dtype
    weight, bias = hostcall.vector(weight, channels, dtype), hostcall.vector(bias, channels, dtype)
    if outer * inner < 2 or not channels or weight is None or bias is None:
        return None  # an empty batch, one value per channel, or a vector to check or convert
    running = None
    if running_mean is not None or running_var is not None:
        running_mean = hostcall.buffer(running_mean, channels, dtype)
        running_var = hostcall.buffer(running_var, channels, dtype)
        if running_mean is None or running_var is None or not hostcall.momentum(momentum):
            return None
        if type(unbiased) is not bool:
            return None
        running = RunningUpdate(running_mean, running_var, momentum, unbiased)
    # y[i] depends on x[i] and residual[i] alone: out may be either
    y = np.empty(x.shape, dtype) if out is None else hostcall.output(out, x, x, residual)
    if y is None:
        return None
    saved = mean = invstd = m2 = None  # the float64 statistics not wanted: the kernels' own
    if statistics == "float64":
        mean, invstd, m2 = np.empty(channels), np.empty(channels), np.empty(channels)
    elif statistics == "rounded":
        saved = np.empty((2, channels), dtype)
    kernels.forward_train(view, weight=weight, bias=bias, eps=eps, y=y.reshape(view.shape),
                          mean=mean, invstd=invstd, m2=m2, running=running,
                          residual=residual_view, activation=activation,
                          saved=saved)  # fmt: skip
    if residual is None and activation is None and fronts.may_serve(backend, device):
        learn_front("forward_train", kernels, x, axis, view, may_fuse=True)
    if mean is not None:
        return y, mean, invstd, m2, outer * inner
    return (y,) if saved is None else (y, saved[0], saved[1])


def _epilogue_inputs(residual, activation, prepared, memory):
    """The checked epilogue of a forward: (residual as the kernels take it, or None;
    activation)."""
    activation = check_activation(activation)
    if residual is None:
        return None, activation
    residual = check_like(residual, "residual", prepared, memory)
    residual = memory.contiguous(residual, prepared.dtype, "residual")
    return residual.reshape(prepared.shape), activation


@placed(
    ("x", "weight", "bias", "running_mean", "running_var", "out", "residual"),
    inplace=("running_mean", "running_var", "out"),
)
def checked_batch_forward(
    x,
    weight,
    bias,
    eps,
    axis,
    *,
    running_mean,
    running_var,
    momentum,
    unbiased,
    nan_policy,
    out,
    backend,
    exchange,
    residual,
    activation,
):
    """batch_forward with every check (and the device): what a plain call skips."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared, eps, momentum, vectors = check_train_inputs(
        x, weight, bias, eps, axis, running_mean, running_var, momentum, nan_policy, memory
    )
    if exchange is None:  # with one, only the global batch must hold more than one value
        check_training_count(prepared)
    epilogue = _epilogue_inputs(residual, activation, prepared, memory)
    # y[i] depends on x[i] and residual[i] alone: out may be either of them, not overlap one
    y, y_view = prepared.output(out, x=prepared.x, residual=residual)
    channels = prepared.channels
    running, store_back = None, ()
    if running_mean is not None:
        (run_mean, store_mean), (run_var, store_var) = (
            vectors.writable("running_mean"),
            vectors.writable("running_var"),
        )
        running = RunningUpdate(run_mean, run_var, momentum, unbiased)
        store_back = (store_mean, store_var)
    weight, bias = vectors.kernel("weight"), vectors.kernel("bias")
    local = prepared.count and channels
    if exchange is None:
        if not local:
            return _no_values(prepared, y, y_view, memory)
        stats = memory.empty((3, channels), np.float64)
        mean, invstd, m2 = stats[0], stats[1], stats[2]
        finite = kernels.forward_train(
            prepared.view, weight=weight, bias=bias, eps=eps, y=y_view, mean=mean,
            invstd=invstd, m2=m2, running=running, nan_check=nan_policy == "raise",
            residual=epilogue[0], activation=epilogue[1],
        )  # fmt: skip
        count = prepared.count
    else:
        mean, m2 = reduction_out(memory, channels, local)
        if local:
            kernels.batch_stats(prepared.view, mean=mean, m2=m2)
        # the global statistics come back in host memory (NumPy), where the C-length
        # finalisation runs for either memory; its results then go to the backend's memory
        count, mean, m2 = exchange.batch_stats(prepared.x.dtype, prepared.count, mean, m2)
        if count == 0:
            return _no_values(prepared, y, y_view, memory)
        finite = nan_policy != "raise" or (np.isfinite(mean).all() and np.isfinite(m2).all())
        if finite:
            invstd = np.empty(channels)
            invstd_of(count, m2, eps, invstd)
            if running is not None:  # on host copies (the buffers themselves on the host)
                buffers = [memory.to_host(buffer) for buffer in running[:2]]
                running_update(*buffers, count, mean, m2, momentum, unbiased)
                for buffer, updated in zip(running[:2], buffers, strict=True):
                    memory.from_host(updated, out=buffer)
            mean, invstd, m2 = (memory.from_host(v) for v in (mean, invstd, m2))
            if local:
                kernels.normalize(prepared.view, mean=mean, invstd=invstd, weight=weight,
                                  bias=bias, y=y_view, residual=epilogue[0],
                                  activation=epilogue[1])  # fmt: skip
    if not finite:
        where = "" if exchange is None else " on some process (statistics of the whole batch)"
        raise ValueError(
            f"x holds NaN or Inf{where} (nan_policy='raise'): batch statistics are not finite; "
            "running statistics were not updated"
        )
    for store in store_back:
        store()
    return TrainResult(prepared.finish(y, y_view), mean, invstd, m2, int(count))


def _no_values(prepared, y, y_view, memory):
    """The result of a batch with no values: y as it is, NaN statistics, a count of 0."""
    stats = memory.full((3, prepared.channels), np.nan, np.float64)
    return TrainResult(prepared.finish(y, y_view), stats[0], stats[1], stats[2], 0)


def frozen_forward(x, running_mean, running_var, weight, bias, eps, axis, *, out=None,
                   backend="cpu", residual=None, activation=None, device="auto"):  # fmt: skip
    """Eval forward: normalise with the running statistics (then the epilogue, as
    batch_forward)."""
    y = plain_frozen_forward(x, running_mean, running_var, weight, bias, eps, axis, out, backend,
                             residual, activation, device)  # fmt: skip
    if y is not None:
        return y
    return checked_frozen_forward(x, running_mean, running_var, weight, bias, eps, axis,
                                   out=out, backend=backend, residual=residual,
                                   activation=activation, device=device)  # fmt: skip


def plain_frozen_forward(x, running_mean, running_var, weight, bias, eps, axis, out, backend,
                         residual, activation, device):  # fmt: skip
    """frozen_forward of a plain host call (:mod:`numba_bn.hostcall`), or None for any other,
    which :func:`checked_frozen_forward` takes."""
    if not _host_device(device):
        return None
    kernels, view = dispatch.on_host(backend), hostcall.canonical_view(x, axis)
    if kernels is None or view is None or not view.size or not hostcall.eval_eps(eps):
        return None
    plain, residual_view = hostcall.residual(residual, x, view)
    if not plain or not hostcall.activation(activation):
        return None
    if running_mean is None or running_var is None:
        return None  # an error to explain
    channels, dtype = view.shape[1], x.dtype
    running_mean = hostcall.vector(running_mean, channels, dtype)
    running_var = hostcall.vector(running_var, channels, dtype)
    weight, bias = hostcall.vector(weight, channels, dtype), hostcall.vector(bias, channels, dtype)
    if running_mean is None or running_var is None or weight is None or bias is None:
        return None
    y = np.empty(x.shape, dtype) if out is None else hostcall.output(out, x, x, residual)
    if y is None:
        return None
    negative = kernels.forward_eval(view, weight=weight, bias=bias, running_mean=running_mean,
                                    running_var=running_var, eps=eps, y=y.reshape(view.shape),
                                    residual=residual_view, activation=activation)  # fmt: skip
    if negative is not None and negative >= 0:
        return None  # a negative running variance, nothing written: an error to explain
    if residual is None and activation is None and fronts.may_serve(backend, device):
        learn_front("forward_eval", kernels, x, axis, view)
    return y


def learn_front(step, kernels, x, axis, view, may_fuse=False):
    """After a plain call of ``step`` that a front may serve (:func:`.cpu.fronts.may_serve`),
    on the CPU backend: the next such calls on inputs like ``x`` through a front, once the
    backend keeps the plan it ran (:func:`.cpu.front_address`)."""
    if type(kernels) is CpuBackend and not fronts.knows(step, x, axis):
        found = front_address(step, view, may_fuse)
        if found is not None:
            fronts.learn(step, x, axis, found)


@placed(("x", "running_mean", "running_var", "weight", "bias", "out", "residual"),
        inplace=("out",))  # fmt: skip
def checked_frozen_forward(x, running_mean, running_var, weight, bias, eps, axis, *, out,
                            backend, residual, activation):  # fmt: skip
    """frozen_forward with every check (and the device): what a plain call skips."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared, eps, vectors = check_eval_inputs(
        x, running_mean, running_var, weight, bias, eps, axis, memory
    )
    epilogue = _epilogue_inputs(residual, activation, prepared, memory)
    y, y_view = prepared.output(out, x=prepared.x, residual=residual)
    if prepared.count and prepared.channels:
        kernels.forward_eval(
            prepared.view,
            weight=vectors.kernel("weight"),
            bias=vectors.kernel("bias"),
            running_mean=vectors.kernel("running_mean"),
            running_var=vectors.kernel("running_var"),
            eps=eps,
            y=y_view,
            residual=epilogue[0],
            activation=epilogue[1],
        )
    return prepared.finish(y, y_view)


class BackwardResult(NamedTuple):
    """dx and the float64 reductions of a backward, with the count of values per channel they
    cover (the global batch's under an exchange). A plain host call (and a compiled one,
    capi.calls) also gives the parameter gradients ``invstd * sum_dy_xmu`` and ``sum_dy``
    rounded to x's dtype, as :func:`weight_gradient` and ``astype`` round them; the other paths
    leave them None."""

    dx: object
    sum_dy: object
    sum_dy_xmu: object
    count: int
    grad_weight: object = None
    grad_bias: object = None


def batch_backward(dy, x, mean, invstd, weight, axis, *, out=None, backend="cpu", exchange=None,
                   activation=None, y=None, residual_out=None, device="auto"):  # fmt: skip
    """dx, and the float64 reductions (sum_dy, sum_dy_xmu) of the training-mode backward:
    (through the epilogue's ``activation``, :func:`_through_epilogue`) -> reduce ->
    (``exchange``: summed over the processes) -> dx."""
    if calls.entry is not None:  # as in batch_forward
        served = calls.entry.batch_backward(
            dy, x, mean, invstd, weight, axis, out, backend, exchange, activation, y,
            residual_out, device,
        )  # fmt: skip
        if served is not NotImplemented:  # a BackwardResult
            return served
    if exchange is None:
        result = plain_batch_backward(dy, x, mean, invstd, weight, axis, out, backend, activation,
                                      y, residual_out, device)  # fmt: skip
        if result is not None:
            return BackwardResult._make(result)
    return checked_batch_backward(dy, x, mean, invstd, weight, axis, out=out, backend=backend,
                                   exchange=exchange, activation=activation, y=y,
                                   residual_out=residual_out, device=device)  # fmt: skip


def plain_batch_backward(dy, x, mean, invstd, weight, axis, out, backend, activation, y,
                         residual_out, device, sums=True):  # fmt: skip
    """batch_backward of a plain host call (:mod:`numba_bn.hostcall`) without an exchange: the
    fields of its BackwardResult, the parameter gradients with them, as a tuple (without
    ``sums``, the float64 sums None: the kernels' own); None for any other call, which
    :func:`checked_batch_backward` takes."""
    if activation is not None or y is not None or residual_out is not None:
        return None
    if not _host_device(device):
        return None
    kernels, view = dispatch.on_host(backend), hostcall.canonical_view(x, axis)
    if kernels is None or view is None or not view.size:
        return None
    outer, channels, inner = view.shape
    dy_view = hostcall.like(dy, x, view)
    mean, invstd = hostcall.statistic(mean, channels), hostcall.statistic(invstd, channels)
    weight = hostcall.vector(weight, channels, x.dtype)
    if dy_view is None or mean is None or invstd is None or weight is None:
        return None
    dtype = x.dtype
    dx = np.empty(x.shape, dtype) if out is None else hostcall.output(out, x, dy, x)
    if dx is None:
        return None
    sum_dy, sum_dy_xmu = (np.empty(channels), np.empty(channels)) if sums else (None, None)
    # the parameter gradients written by the kernels, rounded as parameter_gradients rounds
    # them (three NumPy calls here cost ~1.2 us of a small backward)
    grads = np.empty((2, channels), dtype)
    kernels.backward(dy_view, view, mean=mean, invstd=invstd, weight=weight,
                     dx=dx.reshape(view.shape), sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu,
                     grads=grads)  # fmt: skip
    if not sums and fronts.may_serve(backend, device):
        learn_front("backward", kernels, x, axis, view, may_fuse=True)
    return dx, sum_dy, sum_dy_xmu, outer * inner, grads[0], grads[1]


class _Through(NamedTuple):
    """The gradient through a fused forward's activation, ready for the kernels: ``grad`` (=)
    will hold dy where y > 0 ("relu"), and is the residual's gradient."""

    activation: str
    y: object  # the forward's output: canonical view, compute dtype
    grad: object  # canonical view, compute dtype: residual_out itself when it can be
    residual_out: object  # the caller's, or None

    def kernel_args(self):
        return {"activation": self.activation, "y": self.y, "grad": self.grad}

    def finish(self, memory, shape):
        """residual_out (=) grad, where grad could not be residual_out itself (float16)."""
        if self.residual_out is not None and self.grad.dtype != self.residual_out.dtype:
            memory.copy_into(self.residual_out, self.grad.reshape(shape))


def _through_epilogue(dy, prepared, memory, activation, y, residual_out, out):
    """The backward's way through the epilogue of a fused forward whose output was ``y``: a
    :class:`_Through` for an ``activation``; else None, with dy (the residual's gradient
    without an activation) copied into ``residual_out`` when given. Everything is checked
    before anything is written."""
    activation = check_activation(activation)
    if activation is not None:
        if y is None:
            raise ValueError(
                f"y is required with activation={activation!r}: the gradient flows where the "
                "fused forward's output y > 0"
            )
        y = check_like(y, "y", prepared, memory)
    if residual_out is not None:
        residual_out = check_residual_out(residual_out, prepared, memory, x=prepared.x, dy=dy,
                                          y=y, out=out)  # fmt: skip
    if activation is None:
        if residual_out is not None:
            memory.copy_into(residual_out, dy)
        return None
    y_view = memory.contiguous(y, prepared.dtype, "y").reshape(prepared.shape)
    if residual_out is not None and residual_out.dtype == prepared.dtype:
        grad = residual_out.reshape(prepared.shape)
    else:
        grad = memory.empty(prepared.shape, prepared.dtype)
    return _Through(activation, y_view, grad, residual_out)


def _gradient_through(through, kernels, dy_view):
    """The gradient that reaches batch norm: dy_view, or through the activation."""
    if through is None:
        return dy_view
    kernels.activation_grad(dy_view, through.y, activation=through.activation, grad=through.grad)
    return through.grad


@placed(("dy", "x", "mean", "invstd", "weight", "out", "y", "residual_out"),
        inplace=("out", "residual_out"))  # fmt: skip
def checked_batch_backward(dy, x, mean, invstd, weight, axis, *, out, backend, exchange,
                            activation, y, residual_out):  # fmt: skip
    """batch_backward with every check (and the device): what a plain call skips."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared, dy, mean, invstd, vectors = check_backward_inputs(
        dy, x, mean, invstd, weight, axis, memory
    )
    channels = prepared.channels
    dx, dx_view = prepared.output(out, dy=dy, x=prepared.x)
    local, count = prepared.count and channels, prepared.count
    sum_dy, sum_dy_xmu = reduction_out(memory, channels, local)
    dy_view = memory.contiguous(dy, prepared.dtype, "dy").reshape(prepared.shape)
    through = _through_epilogue(dy, prepared, memory, activation, y, residual_out, out)
    weight = vectors.kernel("weight")
    if exchange is None:
        if local:  # the backend may fuse the activation's gradient into its passes
            kernels.backward(dy_view, prepared.view, mean=mean, invstd=invstd, weight=weight,
                             dx=dx_view, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu,
                             **(through.kernel_args() if through else {}))  # fmt: skip
    else:
        dy_view = _gradient_through(through, kernels, dy_view)
        if local:
            kernels.backward_sums(dy_view, prepared.view, mean=mean, sum_dy=sum_dy,
                                  sum_dy_xmu=sum_dy_xmu)  # fmt: skip
        count, sum_dy, sum_dy_xmu = exchange.sums(
            prepared.x.dtype, count, sum_dy, sum_dy_xmu, frozen=False
        )
        if local:
            kernels.backward_dx(dy_view, prepared.view, mean=mean, invstd=invstd, weight=weight,
                                sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, count=count,
                                dx=dx_view)  # fmt: skip
    if through is not None:
        through.finish(memory, prepared.x.shape)
    return BackwardResult(prepared.finish(dx, dx_view), sum_dy, sum_dy_xmu, int(count))


def epilogue_gradient(dy, x, axis, *, activation, y, residual_out, backend="cpu"):
    """dy through the epilogue alone, like x (host arrays): for a backward that cannot take the
    epilogue in its own pass (ghost batches). ``residual_out`` as in batch_backward."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared = Prepared(x, axis, memory=memory)
    dy = check_like(dy, "dy", prepared, memory)
    dy_view = memory.contiguous(dy, prepared.dtype, "dy").reshape(prepared.shape)
    through = _through_epilogue(dy, prepared, memory, activation, y, residual_out, None)
    grad = _gradient_through(through, kernels, dy_view)
    if through is not None:
        through.finish(memory, prepared.x.shape)
    return memory.astype(grad.reshape(prepared.x.shape), prepared.x.dtype)


@placed(("dy", "x", "running_mean", "running_var", "weight", "out", "y", "residual_out"),
        inplace=("out", "residual_out"))  # fmt: skip
def frozen_backward(dy, x, running_mean, running_var, weight, eps, axis, *, out=None,
                    backend="cpu", exchange=None, activation=None, y=None,
                    residual_out=None):  # fmt: skip
    """Eval-mode backward with frozen statistics: dx = dy * weight * invstd, and the sums
    (``exchange``: summed over the processes, for the gradients of weight and bias); through
    the epilogue's activation first, as batch_backward."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared = Prepared(x, axis, memory=memory)
    dy = check_like(dy, "dy", prepared, memory)
    eps = check_eps(eps, training=False)
    channels = prepared.channels
    mean = stats_vector(running_mean, "running_mean", channels, memory)
    running_var = stats_vector(running_var, "running_var", channels, memory)
    check_running_var(running_var, memory)
    invstd = memory.invstd(running_var, eps)
    vectors = Vectors(prepared.x, channels, memory=memory, weight=weight)
    dx, dx_view = prepared.output(out, dy=dy, x=prepared.x)
    local = prepared.count and channels
    sum_dy, sum_dy_xmu = reduction_out(memory, channels, local)
    dy_view = memory.contiguous(dy, prepared.dtype, "dy").reshape(prepared.shape)
    through = _through_epilogue(dy, prepared, memory, activation, y, residual_out, out)
    dy_view = _gradient_through(through, kernels, dy_view)
    if through is not None:
        through.finish(memory, prepared.x.shape)
    if local:
        kernels.backward_sums(dy_view, prepared.view, mean=mean, sum_dy=sum_dy,
                              sum_dy_xmu=sum_dy_xmu)  # fmt: skip
    if exchange is not None:
        _, sum_dy, sum_dy_xmu = exchange.sums(
            prepared.x.dtype, prepared.count, sum_dy, sum_dy_xmu, frozen=True
        )
    if local:
        # the statistics are constants, so dx = dy * invstd * weight: the affine pass on dy
        kernels.normalize(dy_view, mean=memory.full(channels, 0.0, np.float64), invstd=invstd,
                          weight=vectors.kernel("weight"), bias=vectors.kernel("bias"),
                          y=dx_view)  # fmt: skip
    return prepared.finish(dx, dx_view), sum_dy, sum_dy_xmu, invstd


@placed(("x", "weight", "bias", "out", "residual"), inplace=("out",))
def affine_forward(x, mean, invstd, weight, bias, axis, *, out=None, backend="cpu",
                   residual=None, activation=None):  # fmt: skip
    """y = (x - mean) * invstd * weight + bias with given float64 host statistics (C,), then the
    epilogue: the elementwise pass of a training forward, for statistics computed elsewhere
    (Batch Renormalization's composed scale and shift)."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared = Prepared(x, axis, memory=memory)
    vectors = Vectors(prepared.x, prepared.channels, memory=memory, weight=weight, bias=bias)
    mean, invstd = (stats_vector(v, name, prepared.channels, memory)
                    for v, name in ((mean, "mean"), (invstd, "invstd")))  # fmt: skip
    epilogue = _epilogue_inputs(residual, activation, prepared, memory)
    y, y_view = prepared.output(out, x=prepared.x, residual=residual)
    if prepared.count and prepared.channels:
        kernels.normalize(prepared.view, mean=mean, invstd=invstd, weight=vectors.kernel("weight"),
                          bias=vectors.kernel("bias"), y=y_view, residual=epilogue[0],
                          activation=epilogue[1])  # fmt: skip
    return prepared.finish(y, y_view)


def parameter_gradients(result, invstd):
    """(dweight, dbias) of a backward's ``result`` (a :class:`BackwardResult`) in the compute
    dtype of its dx and, for CUDA arrays, of dx's kind (:func:`.checks.returned_like`)."""
    if result.grad_weight is not None:  # a plain or compiled call rounded them, to x's dtype
        return result.grad_weight, result.grad_bias
    dx, sum_dy = result.dx, result.sum_dy
    dtype = compute_dtype(dtype_of(dx))  # dx is in the caller's kind: a torch tensor, say
    dweight = weight_gradient(invstd, result.sum_dy_xmu, result.count, dtype)
    if type(dx) is np.ndarray:  # a host call: NumPy's own astype
        return dweight, sum_dy.astype(dtype, copy=False)
    return returned_like(dx, dweight, memory_of(sum_dy).astype(sum_dy, dtype))


def weight_gradient(invstd, sum_dy_xmu, count, dtype):
    """dweight = sum(dy * x_hat) = invstd * sum(dy * (x - mean)) in ``dtype``; 0 for a batch of
    no values (a sum over nothing), whose invstd is NaN."""
    if count and type(invstd) is np.ndarray and type(sum_dy_xmu) is np.ndarray:
        # NumPy's own product, in float64 as sum_dy_xmu is whatever invstd's float dtype: the
        # memory interface's (HostMemory.product, the same operations) costs ~1 us more, and
        # np.multiply's dtype= keyword 0.2 us more, of a small backward
        return (invstd * sum_dy_xmu).astype(dtype)
    memory = memory_of(sum_dy_xmu)
    if count == 0:
        return memory.full(sum_dy_xmu.shape, 0.0, dtype)
    return memory.product(invstd, sum_dy_xmu, dtype)
