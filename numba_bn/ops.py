"""The operations behind the public functions and the layers, on one backend.

Each validates (:mod:`numba_bn.checks`), allocates, and runs the backend's kernels on the
canonical ``(outer, C, inner)`` view. Per-channel statistics travel between them in float64.
Names say which statistics normalise: ``batch_*`` those of the batch (training), ``frozen_*``
the running ones (eval). ``device`` (added by :func:`numba_bn.dispatch.placed`) picks the CPU or
the CUDA backend.
"""

from typing import NamedTuple

import numpy as np

from . import dispatch
from .checks import (
    Prepared,
    Vectors,
    check_backward_inputs,
    check_dy,
    check_eps,
    check_running_var,
    check_train_inputs,
    check_training_count,
    stats_vector,
)
from .dispatch import memory_of, placed
from .stats import DX_ROWS


class TrainResult(NamedTuple):
    """What a training forward produces: y and the float64 statistics backward needs."""

    y: object
    mean: object
    invstd: object
    m2: object
    count: int


@placed(
    ("x", "weight", "bias", "running_mean", "running_var", "out"),
    inplace=("running_mean", "running_var", "out"),
)
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
):
    """Training forward with batch statistics; updates the running buffers when given."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared, eps, momentum, vectors = check_train_inputs(
        x, weight, bias, eps, axis, running_mean, running_var, momentum, nan_policy, memory
    )
    check_training_count(prepared)
    y, y_view = prepared.output(out)
    channels = prepared.channels
    if prepared.count == 0 or channels == 0:
        stats = memory.full((3, channels), np.nan, np.float64)
        mean, invstd, m2 = stats[0], stats[1], stats[2]
        return TrainResult(prepared.finish(y, y_view), mean, invstd, m2, 0)
    stats = memory.empty((3, channels), np.float64)
    mean, invstd, m2 = stats[0], stats[1], stats[2]
    store_back = []
    run_mean = run_var = memory.empty(0, prepared.dtype)
    if running_mean is not None:
        (run_mean, store_mean), (run_var, store_var) = (
            vectors.writable("running_mean"),
            vectors.writable("running_var"),
        )
        store_back = [store_mean, store_var]
    ok = kernels.forward_train(
        prepared.view,
        vectors.kernel("weight"),
        vectors.kernel("bias"),
        eps,
        run_mean,
        run_var,
        momentum,
        unbiased,
        nan_policy == "raise",
        y_view,
        mean,
        invstd,
        m2,
    )
    if not ok:
        raise ValueError(
            "x holds NaN or Inf (nan_policy='raise'): batch statistics are not finite; "
            "running statistics were not updated"
        )
    for store in store_back:
        store()
    return TrainResult(prepared.finish(y, y_view), mean, invstd, m2, prepared.count)


@placed(("x", "running_mean", "running_var", "weight", "bias", "out"), inplace=("out",))
def frozen_forward(
    x, running_mean, running_var, weight, bias, eps, axis, *, out=None, backend="cpu"
):
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared = Prepared(x, axis, memory=memory)
    eps = check_eps(eps, training=False)
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if value is None:
            raise ValueError(f"{name} is required for the eval forward (training=False)")
    vectors = Vectors(
        prepared.x,
        prepared.channels,
        memory=memory,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    check_running_var(running_var, memory)
    y, y_view = prepared.output(out)
    if prepared.count and prepared.channels:
        kernels.forward_eval(
            prepared.view,
            vectors.kernel("weight"),
            vectors.kernel("bias"),
            vectors.kernel("running_mean"),
            vectors.kernel("running_var"),
            eps,
            y_view,
        )
    return prepared.finish(y, y_view)


@placed(("dy", "x", "mean", "invstd", "weight", "out"), inplace=("out",))
def batch_backward(dy, x, mean, invstd, weight, axis, *, out=None, backend="cpu"):
    """dx, and the float64 reductions (sum_dy, sum_dy_xmu) of the training-mode backward."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared, dy, mean, invstd, vectors = check_backward_inputs(
        dy, x, mean, invstd, weight, axis, memory
    )
    channels = prepared.channels
    dx, dx_view = prepared.output(out, dy=dy, x=prepared.x)
    sum_dy, sum_dy_xmu = (memory.full(channels, 0.0, np.float64) for _ in range(2))
    if prepared.count and channels:
        dy_view = memory.contiguous(dy, prepared.dtype, "dy").reshape(prepared.shape)
        kernels.backward(
            dy_view,
            prepared.view,
            mean,
            invstd,
            vectors.kernel("weight"),
            dx_view,
            sum_dy,
            sum_dy_xmu,
        )
    return prepared.finish(dx, dx_view), sum_dy, sum_dy_xmu


@placed(("dy", "x", "running_mean", "running_var", "weight", "out"), inplace=("out",))
def frozen_backward(
    dy, x, running_mean, running_var, weight, eps, axis, *, out=None, backend="cpu"
):
    """Eval-mode backward with frozen statistics: dx = dy * weight * invstd; and the sums."""
    kernels = dispatch.get(backend)
    memory = dispatch.memory(kernels)
    prepared = Prepared(x, axis, memory=memory)
    dy = check_dy(dy, prepared, memory)
    eps = check_eps(eps, training=False)
    channels = prepared.channels
    mean = stats_vector(running_mean, "running_mean", channels, memory)
    running_var = stats_vector(running_var, "running_var", channels, memory)
    check_running_var(running_var, memory)
    invstd = memory.invstd(running_var, eps)
    vectors = Vectors(prepared.x, channels, memory=memory, weight=weight)
    dx, dx_view = prepared.output(out, dy=dy, x=prepared.x)
    sum_dy, sum_dy_xmu = (memory.full(channels, 0.0, np.float64) for _ in range(2))
    if prepared.count and channels:
        dy_view = memory.contiguous(dy, prepared.dtype, "dy").reshape(prepared.shape)
        kernels.backward_sums(dy_view, prepared.view, mean, sum_dy, sum_dy_xmu)
        scale = (
            memory.product(invstd, vectors.kernel("weight"), prepared.dtype)
            if weight is not None
            else memory.astype(invstd, prepared.dtype)
        )
        coef = memory.full((DX_ROWS, channels), 0.0, prepared.dtype)
        memory.copy_into(coef[4], scale)  # k; mean, proj and mean_dy stay 0
        memory.copy_into(coef[5], memory.full(channels, 1.0, prepared.dtype))  # pre
        kernels.backward_dx(dy_view, prepared.view, coef, dx_view)
    return prepared.finish(dx, dx_view), sum_dy, sum_dy_xmu, invstd


def weight_gradient(invstd, sum_dy_xmu, count, dtype):
    """dweight = sum(dy * x_hat) = invstd * sum(dy * (x - mean)) in ``dtype``; 0 for a batch of
    no values (a sum over nothing), whose invstd is NaN."""
    memory = memory_of(sum_dy_xmu)
    if count == 0:
        return memory.full(sum_dy_xmu.shape, 0.0, dtype)
    return memory.product(invstd, sum_dy_xmu, dtype)
