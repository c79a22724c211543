"""Public functions: validate, allocate, dispatch to a backend on the canonical view.

Every check runs before any buffer is written, so a call that raises leaves running statistics
(and every other argument) as they were. Per-channel statistics travel between calls in float64;
the public functions return them in the input's dtype (float32 for float16 input). ``device``
picks the CPU or the CUDA backend (:mod:`numba_bn.dispatch`); arrays are checked and allocated
through the backend's ``memory``, so the same code serves NumPy and device arrays.
"""

import math
import numbers
from typing import NamedTuple

import numpy as np

from . import dispatch
from .dispatch import memory_of, placed
from .layout import canonical_shape, normalize_axis
from .memory import HOST
from .stats import DX_ROWS

NAN_POLICIES = ("propagate", "raise")
_COMPUTE_DTYPE = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}


# ------------------------------------------------------------------------------------ checks
def compute_dtype(dtype, name="x"):
    """float32 for float16 and float32, float64 for float64; TypeError for anything else."""
    result = _COMPUTE_DTYPE.get(dtype)
    if result is None:
        result = _COMPUTE_DTYPE.get(np.dtype(dtype))
        if result is None:
            raise TypeError(f"{name} must be float16, float32 or float64, got dtype {dtype}")
    return result


def check_input(x, name="x", memory=HOST):
    """``x`` as an array of ``memory`` with a float dtype and a batch and a channel dimension."""
    x = memory.asarray(x, name)
    compute_dtype(x.dtype, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and channels), got shape {x.shape}"
        )
    return x


def check_scalar(value, name, low, high=math.inf):
    """``value`` as a float in [low, high]: TypeError for a non-number, ValueError outside."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not low <= value <= high:  # also rejects NaN
        bounds = f"in [{low}, {high}]" if high != math.inf else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_eps(eps, training):
    """``eps`` >= 0, and > 0 when training: a channel of equal values (all zero after a ReLU,
    say) has batch variance 0, and 1 / sqrt(0 + eps) must stay finite (PyTorch rejects it too).
    With frozen statistics eps = 0 is allowed and IEEE rules apply (inf or NaN, as PyTorch)."""
    eps = check_scalar(eps, "eps", 0.0)
    if training and eps == 0.0:
        raise ValueError(
            "eps must be > 0 when training (a channel whose values are all equal has batch "
            "variance 0), got 0.0"
        )
    return eps


def check_momentum(momentum):
    """The weight of the new batch in [0, 1]; None is explained, not guessed at."""
    if momentum is None:
        raise TypeError(
            "momentum must be a number in [0, 1], got None: the cumulative average (PyTorch's "
            "momentum=None) needs a count of batches, which BatchNorm(momentum=None) keeps; "
            "here pass momentum=1/k for the k-th batch"
        )
    return check_scalar(momentum, "momentum", 0.0, 1.0)


def check_running_var(running_var, memory):
    """ValueError naming the first channel whose running variance is negative (a corrupted
    checkpoint, say): its square root would silently be NaN. O(C), once per call."""
    values = memory.to_host(running_var)
    if values.size and values.min() < 0:
        channel = int(np.flatnonzero(values < 0)[0])
        raise ValueError(f"running_var must be >= 0, got {values[channel]} in channel {channel}")


def check_no_overlap(out, name, memory, **inputs):
    """ValueError when ``out`` shares memory with an input without being that very array:
    a kernel writing one element would change another it has yet to read."""
    for input_name, value in inputs.items():
        if value is not None and memory.overlaps(out, value):
            raise ValueError(
                f"{name} overlaps {input_name} without being {input_name} itself; pass "
                f"{name}={input_name} (in place) or an array that shares no memory with it"
            )


def check_nan_policy(nan_policy):
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    return nan_policy


class Vectors:
    """Per-channel arguments checked together: length C, one dtype, converted for the kernels."""

    def __init__(self, x, channels, *, memory=HOST, **vectors):
        self.kernel_dtype = kernel_dtype = compute_dtype(x.dtype)
        self.memory = memory
        self.given = given = {}
        shape = (channels,)
        for name, vector in vectors.items():
            if vector is None:
                continue
            memory.check_unmasked(vector, name)
            if not memory.is_array(vector):
                raise TypeError(f"{name} must be {memory.array_kind}, got {type(vector).__name__}")
            if vector.shape != shape:
                raise ValueError(
                    f"{name} must have shape ({channels},) to match the {channels} channels of "
                    f"x, got {vector.shape}"
                )
            if vector.dtype != x.dtype and vector.dtype != kernel_dtype:
                expected = " or ".join(sorted({str(x.dtype), str(kernel_dtype)}))
                raise TypeError(
                    f"{name} has dtype {vector.dtype}; expected {expected} (as x: {x.dtype})"
                )
            given[name] = vector
        if len({vector.dtype for vector in given.values()}) > 1:
            listing = ", ".join(f"{name}: {vector.dtype}" for name, vector in given.items())
            raise TypeError(f"per-channel arguments must share one dtype, got {listing}")

    def kernel(self, name):
        """The vector as the kernels take it: contiguous, compute dtype, empty when absent."""
        vector = self.given.get(name)
        if vector is None:
            return self.memory.empty(0, self.kernel_dtype)
        return self.memory.contiguous(vector, self.kernel_dtype, name)

    def writable(self, name):
        """A buffer the kernels update in place, and a function that stores it back."""
        vector = self.given[name]
        if not self.memory.is_writable(vector):
            raise ValueError(f"{name} must be writable: it is updated in place")
        work = self.kernel(name)
        if work is vector:
            return work, lambda: None
        work = self.memory.copy(work)
        return work, lambda: self.memory.copy_into(vector, work)


class Prepared:
    """An input checked and seen as its canonical (outer, C, inner) view in the compute dtype."""

    def __init__(self, x, axis, name="x", memory=HOST):
        x = check_input(x, name, memory)
        self.x = x
        self.memory = memory
        self.axis = normalize_axis(axis, x.ndim)
        self.shape = canonical_shape(x.shape, self.axis)
        self.count = self.shape[0] * self.shape[2]
        self.channels = self.shape[1]
        self.dtype = compute_dtype(x.dtype, name)
        self.view = memory.contiguous(x, self.dtype, name).reshape(self.shape)

    def output(self, out, name="out", **inputs):
        """(the user's array or None, the canonical view the kernel writes).

        ``out`` may be one of ``inputs`` (x by default, others by name) but not overlap one.
        """
        memory = self.memory
        if out is not None:
            memory.check_unmasked(out, name)
            if not memory.is_array(out):
                raise TypeError(f"{name} must be {memory.array_kind}, got {type(out).__name__}")
            if out.shape != self.x.shape or out.dtype != self.x.dtype:
                raise ValueError(
                    f"{name} must have the shape and dtype of x, {self.x.shape} {self.x.dtype}, "
                    f"got {out.shape} {out.dtype}"
                )
            if not (memory.is_c_contiguous(out) and memory.is_writable(out)):
                raise ValueError(f"{name} must be C-contiguous and writable")
            check_no_overlap(out, name, memory, **(inputs or {"x": self.x}))
        if self.dtype != self.x.dtype:  # float16: compute in float32, convert in finish()
            return out, memory.empty(self.shape, self.dtype)
        if out is None:
            out = memory.empty(self.x.shape, self.dtype)
        return out, out.reshape(self.shape)

    def finish(self, out, view):
        """The result in the user's dtype and shape (float16 is converted here)."""
        if view.dtype == self.x.dtype:
            return out
        if out is None:
            return self.memory.astype(view.reshape(self.x.shape), self.x.dtype)
        self.memory.copy_into(out, view.reshape(self.x.shape))
        return out


def check_train_inputs(
    x, weight, bias, eps, axis, running_mean, running_var, momentum, nan_policy, memory=HOST
):
    """The checks of a training forward: (Prepared x, eps, momentum, Vectors of the rest)."""
    prepared = Prepared(x, axis, memory=memory)
    eps = check_eps(eps, training=True)
    momentum = check_momentum(momentum)
    check_nan_policy(nan_policy)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    vectors = Vectors(
        prepared.x,
        prepared.channels,
        memory=memory,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    return prepared, eps, momentum, vectors


def check_dy(dy, prepared, memory=HOST):
    """``dy`` checked against the prepared ``x``: its shape (ValueError) and dtype (TypeError)."""
    dy = check_input(dy, "dy", memory)
    if dy.shape != prepared.x.shape:
        raise ValueError(f"dy must have the shape of x, {prepared.x.shape}, got {dy.shape}")
    if dy.dtype != prepared.x.dtype:
        raise TypeError(f"dy must have the dtype of x, {prepared.x.dtype}, got {dy.dtype}")
    return dy


def check_backward_inputs(dy, x, mean, invstd, weight, axis, memory=HOST):
    """The checks of a training backward: (Prepared x, dy, float64 mean and invstd, Vectors)."""
    prepared = Prepared(x, axis, memory=memory)
    dy = check_dy(dy, prepared, memory)
    mean = stats_vector(mean, "mean", prepared.channels, memory)
    invstd = stats_vector(invstd, "invstd", prepared.channels, memory)
    vectors = Vectors(prepared.x, prepared.channels, memory=memory, weight=weight)
    return prepared, dy, mean, invstd, vectors


def check_training_count(prepared):
    if prepared.count == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{prepared.x.shape} (axis={prepared.axis})"
        )


# ------------------------------------------------------------------------- internal operations
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
def train_forward(
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
def eval_forward(x, running_mean, running_var, weight, bias, eps, axis, *, out=None, backend="cpu"):
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


def stats_vector(value, name, channels, memory=HOST):
    """A saved statistic as a float64 (C,) vector."""
    if not memory.is_array(value):
        raise TypeError(f"{name} must be {memory.array_kind}, got {type(value).__name__}")
    if value.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {value.shape}")
    compute_dtype(value.dtype, name)
    return memory.contiguous(value, np.float64, name)


@placed(("dy", "x", "mean", "invstd", "weight", "out"), inplace=("out",))
def train_backward(dy, x, mean, invstd, weight, axis, *, out=None, backend="cpu"):
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


def _in_dtype_of(array, *vectors):
    """float64 per-channel vectors in the compute dtype of ``array``, on its side."""
    dtype = compute_dtype(array.dtype)
    return tuple(memory_of(array).astype(vector, dtype) for vector in vectors)


# ------------------------------------------------------------------------------ public functions
def forward_train(
    x,
    weight=None,
    bias=None,
    eps=1e-5,
    axis=1,
    *,
    out=None,
    nan_policy="propagate",
    backend="cpu",
    device="auto",
):
    """Training-mode forward with batch statistics.

    Parameters
    ----------
    x : ndarray or CUDA array, float16/32/64, rank >= 2
        Channels on ``axis``; the statistics reduce over every other axis.
    weight, bias : ndarray (C,), optional
        Affine parameters (1 and 0 when None).
    eps : float
        Added to the biased variance.
    out : ndarray, optional
        C-contiguous array with the shape and dtype of ``x`` to write ``y`` into.
    nan_policy : {"propagate", "raise"}
        "raise": ValueError when the batch statistics are not finite.
    device : {"auto", "cpu", "cuda"}
        "auto": the GPU for arrays that expose ``__cuda_array_interface__`` (results are Numba
        device arrays), the CPU for NumPy arrays. "cuda" with NumPy arrays copies them over and
        returns NumPy arrays. Host and device arrays in one call raise ValueError.

    Returns
    -------
    y, mean, invstd
        ``mean`` and ``invstd = 1/sqrt(var + eps)`` (biased variance) have shape (C,) and the
        dtype of ``x`` (float32 for float16).

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\,w + b
    """
    result = train_forward(
        x, weight, bias, eps, axis, nan_policy=nan_policy, out=out, backend=backend, device=device
    )
    return (result.y, *_in_dtype_of(result.y, result.mean, result.invstd))


def forward_eval(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    eps=1e-5,
    axis=1,
    *,
    out=None,
    backend="cpu",
    device="auto",
):
    """Inference forward with frozen statistics: ``(x - running_mean) / sqrt(running_var + eps)``
    scaled by ``weight`` and shifted by ``bias``; arguments as :func:`forward_train`."""
    return eval_forward(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        eps,
        axis,
        out=out,
        backend=backend,
        device=device,
    )


def backward(dy, x, mean, invstd, weight=None, axis=1, *, out=None, backend="cpu", device="auto"):
    """Exact training-mode backward (docs/backward.md).

    ``mean`` and ``invstd`` are those returned by :func:`forward_train` for the same ``x``.
    Returns ``dx, dweight, dbias`` with ``dweight = sum(dy * x_hat)``, ``dbias = sum(dy)``
    per channel (in the dtype of ``x``, float32 for float16).

    .. math::
        dx = w\\,\\sigma^{-1}\\left(dy - \\tfrac{1}{m}\\textstyle\\sum dy
             - \\hat x\\,\\tfrac{1}{m}\\sum dy\\,\\hat x\\right)
    """
    dx, sum_dy, sum_dy_xmu = train_backward(
        dy, x, mean, invstd, weight, axis, out=out, backend=backend, device=device
    )
    memory, dtype = memory_of(dx), compute_dtype(dx.dtype)
    count = dx.size // max(sum_dy.size, 1)  # values per channel
    dweight = weight_gradient(invstd, sum_dy_xmu, count, dtype)
    return dx, dweight, memory.astype(sum_dy, dtype)


def batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    axis=1,
    *,
    out=None,
    unbiased_running_var=True,
    nan_policy="propagate",
    backend="cpu",
    device="auto",
):
    """Batch normalisation shaped like ``torch.nn.functional.batch_norm``.

    ``training=True`` normalises with batch statistics and, when ``running_mean`` and
    ``running_var`` are given, updates them in place: ``r = (1 - momentum) * r + momentum * s``
    with the unbiased batch variance (``unbiased_running_var=False``: the biased one, as Keras,
    Flax and ONNX). ``training=False`` normalises with the running statistics. Nothing is
    modified when the call raises. ``device`` as in :func:`forward_train`.
    """
    if training:
        return train_forward(
            x,
            weight,
            bias,
            eps,
            axis,
            running_mean=running_mean,
            running_var=running_var,
            momentum=momentum,
            unbiased=unbiased_running_var,
            nan_policy=nan_policy,
            out=out,
            backend=backend,
            device=device,
        ).y
    return eval_forward(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        eps,
        axis,
        out=out,
        backend=backend,
        device=device,
    )
