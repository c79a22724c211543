"""BatchNorm: parameters, running buffers, train/eval, gradients, state_dict."""

from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from . import conventions as _conventions
from . import folding, ghost, ops, plans
from . import renorm as renorm_
from .annotations import (
    Activation,
    Array,
    Backend,
    ConventionName,
    Device,
    Float64Array,
    HostArray,
    NanPolicy,
)
from .capi import calls
from .checks import check_activation, check_nan_policy, check_scalar, compute_dtype
from .cpu import fronts
from .dispatch import memory_of, move
from .functional import forward_eval
from .layout import check_axis, normalize_axis
from .masking import masked_batch_backward, masked_batch_forward
from .memory import host_view, host_views, is_device_array
from .moments import Moments, moments
from .ops import (
    affine_forward,
    batch_backward,
    batch_forward,
    epilogue_gradient,
    frozen_backward,
    weight_gradient,
)
from .state import LayerState

_ARRAYS = ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias",
           "grad_residual")  # fmt: skip

_DEFAULT: Any = object()
_Layer = TypeVar("_Layer", bound="BatchNorm")


class _Saved(NamedTuple):
    """What backward() needs from the last forward: how it normalised, and its input."""

    batch: bool  # batch statistics (mean, invstd of the batch) or the running ones
    x: object  # the input, or None once forward(x, out=x) overwrote it
    mean: object = None
    invstd: object = None
    count: int = 0  # values per channel of the (global) batch
    plan: object = None  # the plans.Plan that ran the forward, which can run its backward
    y: object = None  # the output, when the activation's backward needs it
    residual: bool = False  # whether the forward added a residual (backward gives its gradient)
    mask: object = None  # the mask= of a masked forward
    ghost: object = None  # the GhostResult of a forward with virtual_batch_size
    renorm: object = None  # (r, d), float64, of a Batch Renormalization forward


_new_saved = tuple.__new__
#: The fields of a plain planned forward's _Saved after ``plan``: their defaults
_NO_TAIL = tuple(_Saved._field_defaults[name] for name in _Saved._fields[6:])


def _call_forward(layer, x, **keywords):
    """``layer(x, ...)`` of a subclass of BatchNorm that overrides forward."""
    return layer.forward(x, **keywords)


@plans.watch
class BatchNorm(LayerState):
    """Batch normalisation over the channel ``axis`` of inputs of any rank >= 2.

    Parameters
    ----------
    num_features : int
        C, the size of the channel axis.
    eps, momentum, axis : optional
        Defaults from ``convention``; momentum is in that convention's own meaning
        (``"torch"``: weight of the new batch, ``None`` = cumulative average; ``"keras"``,
        ``"flax"``, ``"onnx"``: weight of the old value).
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); ``scale``/``center`` toggle them
        separately, as in Keras.
    track_running_stats : bool
        Keep ``running_mean``/``running_var``; when False, eval mode uses batch statistics.
    dtype : float16, float32, float64 or ``ml_dtypes.bfloat16``
        dtype of the parameters and buffers (float16 and bfloat16 are computed in float32).
    convention : {"torch", "keras", "flax", "onnx"}
    nan_policy : {"propagate", "raise"}
        "raise": a training batch with non-finite statistics raises and updates nothing.
    virtual_batch_size : int, optional
        Ghost batch normalisation (:mod:`numba_bn.ghost`): in batch mode each run of this many
        consecutive samples along axis 0 is normalised with its own statistics; the running
        statistics take one update per call from the mean of the ghost batches' statistics.
    activation : {None, "relu"}
        Fused into the forward's pass: ``y = activation(BN(x) + residual)`` with
        ``layer(x, residual=z)`` (:func:`numba_bn.forward_train`); the forward then keeps y for
        the backward (do not change it in place before ``backward``).
    device : {"auto", "cpu", "cuda"}
        Where parameters, buffers and gradients live. "auto": in host memory until the layer is
        called on CUDA arrays, then on the GPU (they follow the input). "cpu" / "cuda" keep them
        there; an input from the other side raises. :meth:`to` moves them.

    A forward saves what :meth:`backward` needs: x itself, so in training mode ``out=`` may
    not share memory with x (after an eval-mode ``forward(x, out=x)``, backward raises). A
    layer trains in one thread at a time, as a forward is paired with the next backward; in
    eval mode it serves several threads at once.
    ``backward(dy)`` returns dx, sets ``grad_weight``/``grad_bias`` (and ``grad_residual`` after
    a forward with a residual) and releases the saved input (as PyTorch frees its graph): one
    backward per forward. Pickles hold parameters, buffers and gradients, never a saved input.

    A host batch like an earlier one (an ndarray of its shape and dtype, C-contiguous, in the
    same mode) skips the checks that call made (:mod:`numba_bn.plans`), with the same results;
    reassigning ``weight``, the buffers or a setting such as ``eps`` takes effect on the next
    call.
    """

    # Where batch statistics and backward sums meet across processes (numba_bn.ops.Exchange):
    # none for one process; SyncBatchNorm (numba_bn.distributed) sets an MPI one.
    _exchange = None
    _admitted = None  # (shape, dtype, axis, side) of the last NumPy input _admit() checked
    _collected = None  # the Moments merged under numba_bn.population_stats, else None
    grad_residual = None  # (a class default: pickles from before it load too)
    _device_arrays = _ARRAYS  # what .to() and device="auto" move

    def __init__(
        self,
        num_features: int,
        eps: float | None = None,
        momentum: float | None = _DEFAULT,
        affine: bool = True,
        track_running_stats: bool = True,
        axis: int | None = None,
        dtype: DTypeLike = np.float32,
        convention: ConventionName = "torch",
        *,
        center: bool | None = None,
        scale: bool | None = None,
        nan_policy: NanPolicy = "propagate",
        backend: Backend = "cpu",
        device: Device = "auto",
        virtual_batch_size: int | None = None,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        activation: Activation = None,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an integer, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.convention = _conventions.get(convention)
        self.num_features = int(num_features)
        self.eps = check_scalar(self.convention.eps if eps is None else eps, "eps", 0.0)
        momentum = self.convention.momentum if momentum is _DEFAULT else momentum
        if momentum is not None:
            momentum = check_scalar(momentum, "momentum", 0.0, 1.0)
        self.convention.new_batch_weight(momentum, 1)  # rejects None outside PyTorch's
        self.momentum = momentum
        self.axis = check_axis(self.convention.axis if axis is None else axis)
        self.dtype = np.dtype(dtype)
        compute_dtype(self.dtype, "dtype")
        self.nan_policy = check_nan_policy(nan_policy)
        self.activation = check_activation(activation)
        self.virtual_batch_size = ghost.check_virtual_batch_size(virtual_batch_size)
        self.backend = backend
        self.track_running_stats = bool(track_running_stats)
        self.affine = bool(affine)
        scale = self.affine if scale is None else bool(scale)
        center = self.affine if center is None else bool(center)
        self.weight = np.ones(num_features, self.dtype) if scale else None
        self.bias = np.zeros(num_features, self.dtype) if center else None
        self.grad_weight = self.grad_bias = self.grad_residual = None
        if self.track_running_stats:
            self.running_mean = np.zeros(num_features, self.dtype)
            self.running_var = np.ones(num_features, self.dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0
        self.renorm = bool(renorm)
        if self.renorm:
            if self.convention.momentum_weights_new:
                raise ValueError(
                    "renorm is Keras' Batch Renormalization: use convention='keras', 'flax' or "
                    f"'onnx', got convention={self.convention.name!r}"
                )
            if not self.track_running_stats:
                raise ValueError("renorm needs track_running_stats=True (its moving statistics)")
            self.renorm_clipping = renorm_.check_clipping(renorm_clipping)
            self.renorm_momentum = check_scalar(renorm_momentum, "renorm_momentum", 0.0, 1.0)
            self.renorm_mean = np.zeros(num_features, self.dtype)
            self.renorm_stddev = np.ones(num_features, self.dtype)
            self.moving_stddev = np.ones(num_features, self.dtype)
        self.training = True
        self._saved = None
        self._plans = {}  # (shape, training) -> plans.Plan: the plain calls checked once
        self.device = "auto"
        self._side = "cpu"  # where the arrays are now
        self.to(device)

    # ---------------------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (as PyTorch)."""
        if self.track_running_stats:
            self.running_mean = move(np.zeros(self.num_features, self.dtype), self._side)
            self.running_var = move(np.ones(self.num_features, self.dtype), self._side)
        self.num_batches_tracked = 0
        self._saved = None  # a pending backward would mix the old forward with new statistics

    def reset_parameters(self) -> None:
        """reset_running_stats(), and weight = 1, bias = 0 where they exist (as PyTorch)."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight = move(np.ones(self.num_features, self.dtype), self._side)
        if self.bias is not None:
            self.bias = move(np.zeros(self.num_features, self.dtype), self._side)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_saved"] = None  # a layer's state is its parameters, buffers and gradients
        del state["_plans"]  # what this process checked (kernels, backends)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._plans = {}

    # ---------------------------------------------------------------------------- modes
    def train(self: _Layer, mode: bool = True) -> _Layer:
        self.training = bool(mode)
        return self

    def eval(self: _Layer) -> _Layer:
        return self.train(False)

    # -------------------------------------------------------------------------- forward
    def _check_input(self, x):
        """The layer's own words for an input that does not fit it (before the functional
        checks, which would speak of weight and running_mean the caller never passed)."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2:
            return  # the functional checks explain
        axis = normalize_axis(self.axis, len(shape))
        name = type(self).__name__
        if shape[axis] != self.num_features:
            raise ValueError(
                f"{name}(num_features={self.num_features}) got {shape[axis]} channels on axis "
                f"{self.axis} of x with shape {tuple(shape)}"
            )
        try:
            dtype = np.dtype(x.dtype)
        except TypeError:
            return  # not a NumPy dtype (a torch one, say): the functional checks explain
        compute = _compute_dtype_or_none(dtype)
        if compute is None:
            return  # not a float dtype: the functional checks explain
        holds_arrays = any(getattr(self, n) is not None for n in _ARRAYS[:4])
        if holds_arrays and self.dtype not in (dtype, compute):
            raise TypeError(
                f"{name}(dtype={self.dtype.name}) got x of dtype {dtype}: create the layer "
                f"with dtype=np.{dtype} or cast x (x.astype(np.{self.dtype}))"
            )

    def _admit(self, x):
        """Bring the arrays to the side of ``x`` and check x against the layer, once per kind of
        input: a NumPy array with the shape and dtype of the last one (a training loop's next
        batch) was checked already, and the functional checks still run on every call. Returns
        x as the layer keeps it: NumPy's view (no copy) of another host array (a torch CPU
        tensor, say), so that backward, ghost batches and renorm see a NumPy array."""
        if type(x) is np.ndarray and self._admitted == (x.shape, x.dtype, self.axis, self._side):
            return x
        x = host_view(x)
        self._follow(x)
        self._check_input(x)
        if type(x) is np.ndarray:
            self._admitted = (x.shape, x.dtype, self.axis, self._side)
        return x

    def forward(
        self,
        x: Array,
        *,
        training: bool | None = None,
        mask: Array | None = None,
        out: Array | None = None,
        residual: Array | None = None,
    ) -> Array:
        """Normalise ``x``; in training mode also update the running statistics. ``training``
        overrides the layer's mode for this call (as Keras' ``layer(x, training=False)``).
        ``mask``: with batch statistics, those of the True positions (:mod:`numba_bn.masking`;
        ignored when the running statistics normalise, as in Keras). ``residual`` (an array
        like x): added before the layer's ``activation``, in the same pass."""
        training = self.training if training is None else bool(training)
        if type(x) is not np.ndarray:  # a torch CPU tensor: NumPy's views take the plans
            x, residual = host_views(x, residual)
        plain, y = type(x) is np.ndarray and mask is None, None
        if plain and out is not None:  # an out= the plans take: like x, apart from it, or x
            plain = _apart(out, x) or out is x  # itself (a running-statistics plan's only)
        if plain:  # a batch like one before: its plan, when the layer still holds what it checked
            plan = self._plans.get((x.shape, training))
            if plan is not None and plan.takes(self, x):
                y = self._planned_forward(plan, x, residual, out)
        if y is None:
            x, out = self._admit(x), host_view(out)
            y = self._forward(x, training, mask, out, residual)
            if plain:
                plans.remember(self._plans, self, x, training)
            if self._saved is not None and (self.activation is not None or residual is not None):
                self._saved = self._saved._replace(
                    y=y if self.activation is not None else None, residual=residual is not None
                )
        return y

    # layer(x) is forward itself: a __call__ that called it (its four keywords passed on) cost
    # 0.1-0.6 us of a small batch's call. A subclass that overrides forward gets a __call__
    # that calls its forward (__init_subclass__).
    __call__ = forward

    def __init_subclass__(cls, **keywords):
        super().__init_subclass__(**keywords)
        if "forward" in vars(cls) and "__call__" not in vars(cls):
            cls.__call__ = _call_forward

    def _planned_forward(self, plan, x, residual, out):
        """forward() of a plain call through its plan: _forward's kernels and bookkeeping
        without its checks; None when the plan declines (the general path explains). The saved
        state is made whole at once, positionally (a NamedTuple's _replace costs ~0.85 us)."""
        if not plan.batch:
            y = plan.evaluate(x, residual, out)
            if y is not None:  # (into x itself: no x left for a backward, as _forward says)
                kept = y if plan.activation is not None else None
                self._saved = _Saved(False, None if out is x else x, None, None, 0, None, kept,
                                     residual is not None)  # fmt: skip
            return y
        if out is x:  # batch statistics (training, or an eval without running statistics):
            return None  # the general path's error, the x its backward needs kept
        trained = plan.train(x, residual, out)
        if trained is None:
            return None
        y, mean, invstd = trained
        if plan.update:
            self.num_batches_tracked += 1
        if plan.activation is None and residual is None:  # (a NamedTuple's __new__: ~0.15 us more)
            self._saved = _new_saved(_Saved, (True, x, mean, invstd, plan.count, plan, *_NO_TAIL))
        else:  # the epilogue's backward needs the activation's y, and whether a residual came
            kept, added = y if plan.activation is not None else None, residual is not None
            self._saved = _Saved(True, x, mean, invstd, plan.count, plan, kept, added)
        return y

    def _forward(self, x, training, mask, out, residual):
        overwrites_x = out is not None and _shares_memory(out, x)
        if training or not self.track_running_stats or self._collected is not None:
            if overwrites_x:
                raise ValueError(
                    "out shares memory with x: in training mode backward() needs x as it was; "
                    "pass another array as out= (or none)"
                )
            update = training and self.track_running_stats and self._collected is None
            batches = self.num_batches_tracked + 1
            if mask is not None and (self._exchange or self.virtual_batch_size or self.renorm):
                raise ValueError(
                    "mask= is not supported with SyncBatchNorm, ghost batches or renorm"
                )
            if self.virtual_batch_size is not None:
                return self._ghost_forward(x, update, batches, out, self._epilogue(residual))
            if self.renorm and training and self._collected is None:
                return self._renorm_forward(x, update, batches, out, self._epilogue(residual))
            convention = self.convention
            running_mean, running_var = (
                (self.running_mean, self.running_var) if update else (None, None)
            )
            momentum = convention.new_batch_weight(self.momentum, batches)
            result = None
            if mask is None and self._exchange is None and calls.entry is None:
                # batch_forward's plain path without its keywords and its TrainResult (~1 us of
                # a small step): its fields as a tuple, or None for a call it does not take
                result = ops.plain_batch_forward(
                    x, self.weight, self.bias, self.eps, self.axis, running_mean, running_var,
                    momentum, convention.unbiased_running_var, self.nan_policy, out, self.backend,
                    residual, self.activation, self._side,
                )  # fmt: skip
            if mask is not None:
                result = masked_batch_forward(
                    x, self.weight, self.bias, self.eps, self.axis, mask,
                    running_mean=running_mean, running_var=running_var, momentum=momentum,
                    unbiased=convention.unbiased_running_var, nan_policy=self.nan_policy, out=out,
                    backend=self.backend, residual=residual, activation=self.activation,
                )  # fmt: skip
            elif result is None:  # keywords spelt out, no dict to build
                result = batch_forward(
                    x, self.weight, self.bias, self.eps, self.axis, running_mean=running_mean,
                    running_var=running_var, momentum=momentum,
                    unbiased=convention.unbiased_running_var, nan_policy=self.nan_policy, out=out,
                    backend=self.backend, exchange=self._exchange, residual=residual,
                    activation=self.activation, device=self._side,
                )  # fmt: skip
            y, mean, invstd, m2, count = result  # a TrainResult, or its fields as a tuple
            if update:  # an empty batch counts, as in PyTorch (its statistics change nothing)
                self.num_batches_tracked = batches
            if self._collected is not None and count:
                host = (memory_of(v).to_host(v) for v in (mean, m2))
                self._collected = self._collected.merge(Moments(count, *host))
            self._saved = _Saved(True, x, mean, invstd, count, mask=mask)
            return y
        y = None
        if calls.entry is None:  # forward_eval's plain path, as batch statistics' above
            y = ops.plain_frozen_forward(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                self.axis, out, self.backend, residual, self.activation, self._side,
            )  # fmt: skip
        if y is None:  # the public call: compiled calls (capi.calls) serve it when they can
            y = forward_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.eps, self.axis, out=out, backend=self.backend,
                             device=self._side, residual=residual,
                             activation=self.activation)  # fmt: skip
        self._saved = _Saved(False, None if overwrites_x else x)
        return y

    def _epilogue(self, residual):
        """The epilogue keywords of a forward (the common paths spell them out instead)."""
        return {"residual": residual, "activation": self.activation}

    def _ghost_forward(self, x, update, batches, out, epilogue):
        """forward() in batch mode with ghost batches (:mod:`numba_bn.ghost`); the epilogue in
        a pass of its own over y (the identity affine, then the epilogue)."""
        if self._exchange is not None:
            raise ValueError("virtual_batch_size is not supported by SyncBatchNorm")
        result = ghost.ghost_forward(x, self.virtual_batch_size, self.weight, self.bias,
                                     self.eps, self.axis, nan_policy=self.nan_policy,
                                     backend=self.backend)  # fmt: skip
        statistics = ghost.batch_statistics(result, self.convention.unbiased_running_var)
        if update and statistics is not None:
            weight = self.convention.new_batch_weight(self.momentum, batches)
            for buffer, value in zip(
                (self.running_mean, self.running_var), statistics, strict=True
            ):
                np.copyto(buffer, (1.0 - weight) * buffer + weight * value, casting="same_kind")
        if update:
            self.num_batches_tracked = batches
        if self._collected is not None and result.count:
            for mean, m2 in zip(result.mean, result.m2, strict=True):
                self._collected = self._collected.merge(Moments(result.count, mean, m2))
        self._saved = _Saved(True, x, ghost=result)
        y = result.y
        if epilogue["residual"] is not None or epilogue["activation"] is not None:
            channels = self.num_features
            y = affine_forward(y, np.zeros(channels), np.ones(channels), None, None, self.axis,
                               out=y, backend=self.backend, **epilogue)  # fmt: skip
        if out is None:
            return y
        np.copyto(out, y)
        return out

    def _renorm_forward(self, x, update, batches, out, epilogue):
        """forward() in training mode with Batch Renormalization (:mod:`numba_bn.renorm`)."""
        if is_device_array(x) or self._exchange is not None:
            raise TypeError("renorm runs on host (NumPy) arrays in one process")
        batch = moments(x, self.axis, backend=self.backend)
        if batch.count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.shape}"
            )
        mean, var = batch.mean, batch.var()
        if self.nan_policy == "raise" and not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise ValueError(
                "x holds NaN or Inf (nan_policy='raise'): batch statistics are not finite; "
                "running statistics were not updated"
            )
        r, d, stddev = renorm_.corrections(mean, var, self.eps, self.renorm_mean,
                                           self.renorm_stddev, self.renorm_clipping)  # fmt: skip
        scale, shift = renorm_.composed_affine(r, d, self.weight, self.bias)
        invstd = 1.0 / stddev
        dtype = compute_dtype(self.dtype)
        y = affine_forward(x, mean, invstd, scale.astype(dtype), shift.astype(dtype), self.axis,
                           out=out, backend=self.backend, **epilogue)  # fmt: skip
        if update and batch.count:
            old = 1.0 - self.convention.new_batch_weight(self.momentum, batches)
            for name, value, weight in (
                ("renorm_mean", mean, self.renorm_momentum),
                ("renorm_stddev", stddev, self.renorm_momentum),
                ("running_mean", mean, old),
                ("moving_stddev", stddev, old),
            ):
                buffer = getattr(self, name)
                np.copyto(
                    buffer, renorm_.moving_average(buffer, value, weight), casting="same_kind"
                )
            moving_stddev = self.moving_stddev.astype(np.float64)
            np.copyto(self.running_var, np.maximum(moving_stddev**2 - self.eps, 0.0),
                      casting="same_kind")  # fmt: skip
        if update:
            self.num_batches_tracked = batches
        self._saved = _Saved(True, x, mean, invstd, batch.count, renorm=(r, d))
        return y

    # ------------------------------------------------------------------------- backward
    def backward(self, dy: Array, *, out: Array | None = None) -> Array:
        """dx for the last forward; sets ``grad_weight`` (sum dy*x_hat) and ``grad_bias``, and
        after a forward with a residual ``grad_residual`` (dy through the activation)."""
        saved = self._saved
        if type(dy) is not np.ndarray:  # a torch CPU tensor: NumPy's view takes the plan
            (dy,) = host_views(dy)
        if saved is not None and saved.plan is not None:  # a planned forward's
            plan = saved.plan
            planned = None
            if (type(dy) is np.ndarray and dy.shape == plan.shape and plan.takes(self, dy)
                    and (out is None or fronts.like(out, dy))):  # fmt: skip
                planned = plan.backward(dy, saved.x, saved.mean, saved.invstd, saved.y,
                                        saved.residual, out)  # fmt: skip
            if planned is not None:  # (None: a dy the kernels do not take as it is)
                dx, grad_weight, grad_bias, self.grad_residual = planned
                self.grad_weight = None if self.weight is None else grad_weight
                self.grad_bias = None if self.bias is None else grad_bias
                self._saved = None
                return dx
        if saved is None:
            raise RuntimeError(
                "BatchNorm.backward() needs a forward call first: nothing is saved (a backward "
                "releases what its forward saved; the state may also have been reloaded)"
            )
        x, dy, out = saved.x, host_view(dy), host_view(out)
        if x is None:
            raise RuntimeError(
                "BatchNorm.backward() needs x of the last forward, which forward(x, out=x) "
                "overwrote: pass another array as out= to call backward() afterwards"
            )
        # the epilogue's keywords (spelt out below: no dict to build on every call)
        activation, y = self.activation, saved.y
        grad_residual = memory_of(x).empty(x.shape, x.dtype) if saved.residual else None
        if saved.ghost is not None:
            if activation is not None or saved.residual:  # the epilogue had its own pass
                dy = epilogue_gradient(dy, x, self.axis, activation=activation, y=y,
                                       residual_out=grad_residual,
                                       backend=self.backend)  # fmt: skip
            dx, sum_dy, dweight = ghost.ghost_backward(dy, x, saved.ghost, self.virtual_batch_size,
                                                       self.weight, self.axis,
                                                       backend=self.backend)  # fmt: skip
            self.grad_weight = None if self.weight is None else dweight.astype(self.dtype)
            self.grad_bias = None if self.bias is None else sum_dy.astype(self.dtype)
            self.grad_residual = grad_residual
            self._saved = None
            if out is None:
                return dx
            np.copyto(out, dx)
            return out
        weight = self.weight
        if saved.renorm is not None:  # r and d are constants: the scale is weight * r
            r = saved.renorm[0]
            weight = (r if weight is None else r * weight).astype(compute_dtype(self.dtype))
        # the parameter gradients as a plain or compiled call rounded them, to x's dtype: the
        # layer's, as _check_input made sure (x is float32 or float64, and the layer has the
        # parameter)
        grad_weight = grad_bias = None
        if saved.mask is not None:
            dx, sum_dy, sum_dy_xmu, *_ = masked_batch_backward(
                dy, x, saved.mean, saved.invstd, weight, self.axis, saved.mask, out=out,
                backend=self.backend, activation=activation, y=y, residual_out=grad_residual,
            )  # fmt: skip
        elif saved.batch:
            result = None
            if self._exchange is None and calls.entry is None:  # as in _forward
                result = ops.plain_batch_backward(
                    dy, x, saved.mean, saved.invstd, weight, self.axis, out, self.backend,
                    activation, y, grad_residual, self._side,
                )  # fmt: skip
            if result is None:
                result = batch_backward(
                    dy, x, saved.mean, saved.invstd, weight, self.axis, out=out,
                    backend=self.backend, exchange=self._exchange, device=self._side,
                    activation=activation, y=y, residual_out=grad_residual,
                )  # fmt: skip
            dx, sum_dy, sum_dy_xmu, _, grad_weight, grad_bias = result
        else:
            dx, sum_dy, sum_dy_xmu, invstd = frozen_backward(
                dy, x, self.running_mean, self.running_var, self.weight, self.eps, self.axis,
                out=out, backend=self.backend, exchange=self._exchange, device=self._side,
                activation=activation, y=y, residual_out=grad_residual,
            )  # fmt: skip
        if self.weight is None:
            self.grad_weight = None
        elif saved.renorm is not None:  # d(y)/d(gamma) = x_hat * r + d
            r, d = saved.renorm
            dx_hat = saved.invstd * sum_dy_xmu if saved.count else 0.0 * sum_dy_xmu
            self.grad_weight = (r * dx_hat + d * sum_dy).astype(self.dtype)
        elif grad_weight is not None:
            self.grad_weight = grad_weight
        elif saved.batch:
            self.grad_weight = weight_gradient(saved.invstd, sum_dy_xmu, saved.count, self.dtype)
        else:
            self.grad_weight = memory_of(sum_dy).product(invstd, sum_dy_xmu, self.dtype)
        if self.bias is None:
            self.grad_bias = None
        elif grad_bias is not None:
            self.grad_bias = grad_bias
        else:
            self.grad_bias = memory_of(sum_dy).astype(sum_dy, self.dtype)
        self.grad_residual = grad_residual
        self._saved = None  # one backward per forward, as PyTorch frees its graph
        return dx

    # ---------------------------------------------------------------- population statistics
    def collect_moments(self, moments):
        """Start merging each forward's batch moments into ``moments`` (a Moments) instead of
        updating the running statistics, or stop (None); returns what was collected. Used by
        :func:`numba_bn.population_stats`."""
        collected, self._collected = self._collected, moments
        return collected

    def is_synchronized(self):
        """True when this layer's batch statistics are those of every process (SyncBatchNorm)."""
        return self._exchange is not None

    def set_running_stats(self, moments):
        """running_mean and running_var from ``moments`` (the variance unbiased or biased as the
        convention's running variance is), in the layer's dtype and place."""
        var = moments.var(unbiased=self.convention.unbiased_running_var)
        for name, value in (("running_mean", moments.mean), ("running_var", var)):
            if self._side == "cpu":  # in place, as the functional API updates them
                np.copyto(getattr(self, name), value, casting="same_kind")
            else:
                setattr(self, name, move(value.astype(self.dtype), self._side))

    # -------------------------------------------------------------------------- folding
    def scale_shift(self) -> tuple[Float64Array, Float64Array]:
        """``(scale, shift)``, float64 (C,): eval mode as ``y = x * scale + shift`` per channel,
        from the running statistics, eps and the affine parameters."""
        if not self.track_running_stats:
            raise ValueError(
                "scale_shift and folding need running statistics: this BatchNorm has "
                "track_running_stats=False, so its eval mode normalises with batch statistics"
            )
        arrays = (self.running_mean, self.running_var, self.weight, self.bias)
        return folding.scale_shift(*(None if a is None else move(a, "cpu") for a in arrays),
                                   eps=self.eps)  # fmt: skip

    def fold_into(
        self, weight: ArrayLike, bias: ArrayLike | None = None, axis: int = 0
    ) -> tuple[HostArray, HostArray]:
        """``(weight, bias)`` of the linear layer or convolution before this batch norm with the
        batch norm folded in (:func:`numba_bn.fold_into`; ``axis``: weight's output axis)."""
        return folding.affine_into(weight, bias, *self.scale_shift(), axis=axis)

    def fold_into_next(
        self, weight: ArrayLike, bias: ArrayLike | None = None, axis: int = 1, out_axis: int = 0
    ) -> tuple[HostArray, HostArray]:
        """``(weight, bias)`` of the linear layer after this batch norm with the batch norm
        folded in (:func:`numba_bn.fold_into_next`, exact without padding)."""
        return folding.affine_into_next(weight, bias, *self.scale_shift(), axis=axis,
                                        out_axis=out_axis)  # fmt: skip

    # ----------------------------------------------------------------------- state dict
    def _state_keys(self):
        keys = [n for n in ("weight", "bias") if getattr(self, n) is not None]
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        if self.renorm:
            keys += list(renorm_.BUFFERS)
        return keys

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"axis={self.axis}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name}, "
            f"convention={self.convention.name!r}, training={self.training}, "
            f"device={self.device!r})"
        )


def _apart(out, x):
    """Whether the plans may take ``out`` for a forward of the ndarray ``x``: as a front takes
    it (fronts.like), and sharing no memory with x (its bounds; a training forward may not
    overwrite the x its backward needs; an eval forward into x itself is the caller's other
    case, one that partly overlaps x takes the general path)."""
    return fronts.like(out, x) and not np.may_share_memory(out, x)


def _shares_memory(out, x):
    memory = memory_of(x)
    return memory.is_array(x) and memory.is_array(out) and memory.shares_memory(out, x)


def _compute_dtype_or_none(dtype):
    try:
        return compute_dtype(dtype)
    except TypeError:
        return None
