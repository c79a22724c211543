"""Validation and allocation shared by every operation: each check runs before any buffer is
written, so a call that raises leaves running statistics, ``out=`` and every other argument as
they were. Arrays are checked and allocated through a :class:`numba_bn.memory.Memory`, so the same
code serves NumPy and CUDA arrays. Host arrays of other libraries (torch CPU tensors, DLPack and
buffer-protocol objects) are checked as NumPy's views of their memory (:func:`check_array`), so
what is written into them lands in the caller's memory.
"""

import math
import numbers

import numpy as np

from .dispatch import memory_of
from .layout import canonical_shape, normalize_axis
from .memory import HOST, dtype_of

NAN_POLICIES = ("propagate", "raise")
#: What may follow batch norm in the same pass (issue 13): y = activation(BN(x) + residual).
ACTIVATIONS = (None, "relu")
#: The dtype the kernels compute in, for each dtype accepted. Where they differ (float16,
#: bfloat16) the input is converted once and the result converted back (:class:`Prepared`).
_COMPUTE_DTYPE = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}
_FLOAT64 = _COMPUTE_DTYPE[np.dtype(np.float64)]
#: Dtypes NumPy learns from an optional package, entered in _COMPUTE_DTYPE when first met:
#: ml_dtypes' bfloat16 exists only once the caller has imported ml_dtypes, so none is imported
#: here (numba_bn.memory imports it for torch bfloat16 tensors only).
_COMPUTED_IN_FLOAT32_BY_NAME = ("bfloat16",)


def compute_dtype(dtype, name="x"):
    """float32 for float16, bfloat16 and float32, float64 for float64; TypeError for anything
    else."""
    result = _COMPUTE_DTYPE.get(dtype)
    if result is None:
        dtype = np.dtype(dtype)
        result = _COMPUTE_DTYPE.get(dtype)
        if result is None and dtype.name in _COMPUTED_IN_FLOAT32_BY_NAME:
            result = _COMPUTE_DTYPE[dtype] = np.dtype(np.float32)
        if result is None:
            raise TypeError(
                f"{name} must be float16, float32 or float64, got dtype {dtype} (bfloat16 too: "
                "ml_dtypes.bfloat16 arrays, torch bfloat16 tensors)"
            )
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


def check_array(value, name, memory=HOST):
    """``value`` as an array of ``memory`` without a copy, for a per-channel vector, a running
    buffer or ``out=``: on the host NumPy's view of any host array (:meth:`HostMemory.view
    <numba_bn.memory.HostMemory.view>`); TypeError naming ``name`` for anything else."""
    memory.check_unmasked(value, name)
    if memory.is_array(value):
        return value
    if memory is HOST:  # a device memory's arrays are adopted (no copy) before the checks
        return HOST.view(value, name)
    raise TypeError(f"{name} must be {memory.array_kind}, got {type(value).__name__}")


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


def check_activation(activation):
    """``activation`` as one of ACTIVATIONS; ValueError naming it otherwise."""
    if activation is None or (type(activation) is str and activation in ACTIVATIONS):
        return activation
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


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
            vector = check_array(vector, name, memory)
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


def check_out(out, like, memory=HOST, name="out", **inputs):
    """``out`` as the array a kernel writes (on the host NumPy's view of it): ``like``'s (x's)
    shape and dtype, C-contiguous, writable, and overlapping none of ``inputs`` (x by default)
    unless it is that input."""
    out = check_array(out, name, memory)
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(
            f"{name} must have the shape and dtype of x, {like.shape} {like.dtype}, got "
            f"{out.shape} {out.dtype}"
        )
    if not (memory.is_c_contiguous(out) and memory.is_writable(out)):
        raise ValueError(f"{name} must be C-contiguous and writable")
    check_no_overlap(out, name, memory, **(inputs or {"x": like}))
    return out


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
        """(the user's array (NumPy's view of it) or None, the canonical view the kernel writes).

        ``out`` may be one of ``inputs`` (x by default, others by name) but not overlap one.
        """
        memory = self.memory
        if out is not None:
            out = check_out(out, self.x, memory, name, **inputs)
        if self.dtype != self.x.dtype:  # float16, bfloat16: compute in float32, convert in finish()
            return out, memory.empty(self.shape, self.dtype)
        if out is None:
            out = memory.empty(self.x.shape, self.dtype)
        return out, out.reshape(self.shape)

    def finish(self, out, view):
        """The result in the user's dtype and shape (float16 and bfloat16 are converted here)."""
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
    return prepared, eps, momentum, _vectors(prepared, memory, weight, bias, running_mean,
                                             running_var)  # fmt: skip


def check_eval_inputs(x, running_mean, running_var, weight, bias, eps, axis, memory=HOST):
    """The checks of an eval forward: (Prepared x, eps, Vectors of the rest)."""
    prepared = Prepared(x, axis, memory=memory)
    eps = check_eps(eps, training=False)
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if value is None:
            raise ValueError(f"{name} is required for the eval forward (training=False)")
    vectors = _vectors(prepared, memory, weight, bias, running_mean, running_var)
    check_running_var(vectors.given["running_var"], memory)
    return prepared, eps, vectors


def _vectors(prepared, memory, weight, bias, running_mean, running_var):
    return Vectors(prepared.x, prepared.channels, memory=memory, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var)  # fmt: skip


def check_like(value, name, prepared, memory=HOST):
    """``value`` (dy, a residual, y) checked against the prepared ``x``: its shape (ValueError)
    and dtype (TypeError)."""
    value = check_input(value, name, memory)
    if value.shape != prepared.x.shape:
        raise ValueError(f"{name} must have the shape of x, {prepared.x.shape}, got {value.shape}")
    if value.dtype != prepared.x.dtype:
        raise TypeError(f"{name} must have the dtype of x, {prepared.x.dtype}, got {value.dtype}")
    return value


def check_residual_out(residual_out, prepared, memory=HOST, **inputs):
    """``residual_out`` (the residual's gradient) as an output like x that shares no memory at
    all with ``inputs`` (x, dy, y, out=): it is written while they are read."""
    residual_out = check_array(residual_out, "residual_out", memory)
    residual_out = check_like(residual_out, "residual_out", prepared, memory)
    if not (memory.is_c_contiguous(residual_out) and memory.is_writable(residual_out)):
        raise ValueError("residual_out must be C-contiguous and writable")
    for name, value in inputs.items():
        if value is not None and memory.shares_memory(residual_out, value):
            raise ValueError(
                f"residual_out shares memory with {name}: it is written while {name} is read; "
                "pass an array of its own"
            )
    return residual_out


def check_backward_inputs(dy, x, mean, invstd, weight, axis, memory=HOST):
    """The checks of a training backward: (Prepared x, dy, float64 mean and invstd, Vectors)."""
    prepared = Prepared(x, axis, memory=memory)
    dy = check_like(dy, "dy", prepared, memory)
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


def stats_vector(value, name, channels, memory=HOST):
    """A saved statistic as a float64 (C,) vector."""
    value = check_array(value, name, memory)
    if value.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {value.shape}")
    compute_dtype(value.dtype, name)
    return memory.contiguous(value, np.float64, name)


def trained(result):
    """(y, mean, invstd) of a training forward's ``result`` (an ops.TrainResult), the float64
    statistics in the compute dtype of y and on its side: what forward_train returns. A host
    call's in two ``astype`` and nothing else (~0.4 us less than through in_compute_dtype)."""
    y = result.y
    if type(y) is np.ndarray:
        dtype = _COMPUTE_DTYPE.get(y.dtype) or compute_dtype(y.dtype)
        if dtype is _FLOAT64:  # the float64 statistics as they are
            return y, result.mean, result.invstd
        return y, result.mean.astype(dtype), result.invstd.astype(dtype)
    return (y, *in_compute_dtype(y, result.mean, result.invstd))


def in_compute_dtype(array, *vectors):
    """float64 per-channel vectors in the compute dtype of ``array`` (of any kind: y returned
    as a torch tensor, say), on its side."""
    if type(array) is np.ndarray:  # the common case, without a look at the device (~0.7 us)
        dtype = _COMPUTE_DTYPE.get(array.dtype) or compute_dtype(array.dtype)
        return tuple([vector.astype(dtype, copy=False) for vector in vectors])
    dtype = compute_dtype(dtype_of(array))
    memory = memory_of(array)
    return returned_like(array, *(memory.astype(vector, dtype) for vector in vectors))


def returned_like(array, *results):
    """``results``, this library's arrays on the side of ``array``, as the kind of ``array``: a
    result that is the caller's kind already (CuPy in, CuPy out: :func:`.dispatch.placed`)."""
    if type(array) is np.ndarray:
        return results
    returned = memory_of(array).returner(array)
    return results if returned is None else tuple(map(returned, results))
