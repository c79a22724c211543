"""GroupNorm, LayerNorm, InstanceNorm: the layers of :mod:`numba_bn.norms`, with PyTorch's
argument names, defaults and state_dict keys, and ``backward(dy)`` as :class:`numba_bn.BatchNorm`:
it returns dx, sets ``grad_weight`` / ``grad_bias`` and releases what the forward saved (one
backward per forward).

GroupNorm and InstanceNorm run where their input is, as ``BatchNorm``: ``device="auto"`` (the
default) keeps the parameters, running buffers and gradients in host memory and moves them to the
GPU (Numba device arrays) when called with a CUDA array, and back for a NumPy one; ``"cpu"`` or
``"cuda"`` (or ``.to(...)``) pins them there. LayerNorm runs on the CPU only.
"""

import warnings
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from .annotations import Device, HostArray
from .checks import check_scalar, compute_dtype
from .dispatch import memory_of, move
from .layout import check_axis, normalize_axis
from .memory import is_device_array
from .norm_checks import (
    check_count,
    check_dy,
    check_groups,
    check_normalized_shape,
    check_spatial_dims,
    instance_batch,
    sample_out,
)
from .norm_cuda import any_on_device, instance_frozen_backward
from .norm_ops import (
    group_stats_backward,
    group_stats_forward,
    instance_stats_backward,
    instance_stats_forward,
    layer_stats_backward,
    layer_stats_forward,
)
from .ops import frozen_backward
from .state import LayerState

_Layer = TypeVar("_Layer", bound="_Normalization")
#: The arrays a layer may hold, moved together between host and device.
_ARRAYS = ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias")


class _Saved(NamedTuple):
    """What backward() needs from the last forward."""

    x: object  # the input, or None when forward(x, out=x) overwrote it
    mean: object = None  # float64 statistics of the input; None: the running ones normalised
    invstd: object = None


class _Normalization(LayerState):
    """What the three layers share: parameters in ``dtype``, train/eval, backward's bookkeeping,
    state_dict. A subclass calls ``_init_common`` and implements ``_forward(x, out)`` ->
    (y, float64 mean, invstd or None) and ``_backward(dy, saved, out)`` -> (dx, dweight, dbias)."""

    _device_arrays = _ARRAYS

    def _init_common(self, eps, dtype, affine_shape, weight, bias):
        self.eps = check_scalar(eps, "eps", 0.0)
        if self.eps == 0.0:
            raise ValueError("eps must be > 0: a group whose values are all equal has variance 0")
        self.dtype = np.dtype(dtype)
        compute_dtype(self.dtype, "dtype")
        self._affine_shape = affine_shape
        self.weight = np.ones(affine_shape, self.dtype) if weight else None
        self.bias = np.zeros(affine_shape, self.dtype) if bias else None
        self.grad_weight = self.grad_bias = None
        self.training = True
        self._saved = None
        self.device = "auto"
        self._side = "cpu"  # where the arrays are now

    # ------------------------------------------------------------------------- modes
    def train(self: _Layer, mode: bool = True) -> _Layer:
        self.training = bool(mode)
        return self

    def eval(self: _Layer) -> _Layer:
        return self.train(False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_saved"] = None  # a layer's state is its parameters, buffers and gradients
        return state

    # ------------------------------------------------------------------- forward, backward
    def __call__(self, x: ArrayLike, *, out: HostArray | None = None) -> HostArray:
        return self.forward(x, out=out)

    def _check_dtype(self, x):
        """The layer's own words for x of another dtype than its parameters."""
        dtype = getattr(x, "dtype", None)
        if dtype is None:
            return  # not an array: the functional checks convert or explain
        try:
            compute = compute_dtype(np.dtype(dtype))
        except TypeError:
            return  # not a float dtype: the functional checks explain
        has_arrays = any(getattr(self, n, None) is not None for n in self._state_arrays())
        if has_arrays and self.dtype not in (np.dtype(dtype), compute):
            raise TypeError(
                f"{type(self).__name__}(dtype={self.dtype.name}) got x of dtype {dtype}: create "
                f"the layer with dtype=np.{np.dtype(dtype).name} or cast x"
            )

    def forward(self, x: ArrayLike, *, out: HostArray | None = None) -> HostArray:
        """Normalise ``x``; saves x and the statistics for :meth:`backward`."""
        self._follow(x)
        self._check_dtype(x)
        y, mean, invstd = self._forward(x, out)
        keeps_x = out is None or not _shares_memory(out, x)
        self._saved = _Saved(x if keeps_x else None, mean, invstd)
        return y

    def backward(self, dy: ArrayLike, *, out: HostArray | None = None) -> HostArray:
        """dx for the last forward; sets ``grad_weight`` (sum dy * x_hat) and ``grad_bias``
        (sum dy), None for a parameter the layer does not have."""
        name = type(self).__name__
        saved = self._saved
        if saved is None:
            raise RuntimeError(
                f"{name}.backward() needs a forward call first: nothing is saved (a backward "
                "releases what its forward saved; the state may also have been reloaded)"
            )
        if saved.x is None:
            raise RuntimeError(
                f"{name}.backward() needs x of the last forward, which forward(x, out=x) "
                "overwrote: pass another array as out= to call backward() afterwards"
            )
        dx, dweight, dbias = self._backward(dy, saved, out)
        memory = memory_of(dweight)
        self.grad_weight = None if self.weight is None else memory.astype(dweight, self.dtype)
        self.grad_bias = None if self.bias is None else memory.astype(dbias, self.dtype)
        self._saved = None  # one backward per forward, as PyTorch frees its graph
        return dx

    def _kernel_vector(self, name):
        """A parameter in the compute dtype of the layer (float32 for float16)."""
        value, dtype = getattr(self, name), compute_dtype(self.dtype)
        if value is None or value.dtype == dtype:
            return value
        return memory_of(value).astype(value, dtype)

    # ------------------------------------------------------------------------ state dict
    def _state_arrays(self):
        return [n for n in ("weight", "bias") if getattr(self, n) is not None]

    def _state_keys(self):
        return self._state_arrays()


class GroupNorm(_Normalization):
    """Group normalisation (``torch.nn.GroupNorm``): each sample's C channels are split into
    ``num_groups`` groups, normalised with their own statistics, then scaled and shifted per
    channel. Training and eval mode compute the same thing (no running statistics).

    Parameters
    ----------
    num_groups, num_channels : int
        num_groups must divide num_channels.
    eps : float
    affine : bool
        Learnable per-channel ``weight`` (ones) and ``bias`` (zeros).
    dtype : float16, float32 or float64
        dtype of the parameters.
    axis : int
        The channel axis of the inputs: 1 (NCHW, PyTorch) or -1 (channels-last).
    device : {"auto", "cpu", "cuda"}
        Where the parameters and gradients live, as ``BatchNorm``'s: "auto" follows the input
        (CUDA arrays: channels-first only).
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        dtype: DTypeLike = np.float32,
        *,
        axis: int = 1,
        device: Device = "auto",
    ) -> None:
        self.num_channels = check_count(num_channels, "num_channels")
        self.num_groups = check_groups(check_count(num_groups, "num_groups"), num_channels)
        self.affine = bool(affine)
        self.axis = check_axis(axis)
        self._init_common(eps, dtype, (self.num_channels,), self.affine, self.affine)
        self.to(device)

    def _forward(self, x, out):
        _check_channels(self, getattr(x, "shape", None), self.num_channels)
        y, mean, invstd, _ = group_stats_forward(
            x, self.num_groups, self._kernel_vector("weight"), self._kernel_vector("bias"),
            self.eps, self.axis, out=out,
        )  # fmt: skip
        return y, mean, invstd

    def _backward(self, dy, saved, out):
        return group_stats_backward(dy, saved.x, saved.mean, saved.invstd, self.num_groups,
                                    self._kernel_vector("weight"), self.axis,
                                    out=out)  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, "
            f"affine={self.affine}, dtype={self.dtype.name}, axis={self.axis})"
        )


class LayerNorm(_Normalization):
    """Layer normalisation (``torch.nn.LayerNorm``) over the trailing dimensions
    ``normalized_shape``, with an elementwise affine of that shape. CPU only: a CUDA x raises
    TypeError (its per-element affine has no CUDA kernel yet).

    Parameters
    ----------
    normalized_shape : int or tuple of ints
    eps : float
    elementwise_affine : bool
        Learnable ``weight`` (ones) and, with ``bias=True``, ``bias`` (zeros).
    bias : bool
    dtype : float16, float32 or float64
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        dtype: DTypeLike = np.float32,
    ) -> None:
        self.normalized_shape = check_normalized_shape(normalized_shape)
        self.elementwise_affine = bool(elementwise_affine)
        self._init_common(eps, dtype, self.normalized_shape, self.elementwise_affine,
                          self.elementwise_affine and bool(bias))  # fmt: skip

    runs_on_cuda = False

    def _forward(self, x, out):
        return layer_stats_forward(x, self.normalized_shape, self._kernel_vector("weight"),
                                   self._kernel_vector("bias"), self.eps, out=out)  # fmt: skip

    def _backward(self, dy, saved, out):
        return layer_stats_backward(dy, saved.x, saved.mean, saved.invstd, self.normalized_shape,
                                    self._kernel_vector("weight"), out=out)  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}, "
            f"dtype={self.dtype.name})"
        )


class InstanceNorm(_Normalization):
    """Instance normalisation (``torch.nn.InstanceNorm1d/2d/3d``): each channel of each sample
    normalised with its own statistics.

    One class for every rank: by default x is a batch (N, C, *spatial) of any rank >= 3.
    PyTorch's modules also take one sample (C, *spatial), told from a batch by its rank; here
    ``spatial_dims`` gives that rank (``InstanceNorm(C, spatial_dims=2)`` is InstanceNorm2d): x
    of ``spatial_dims + 2`` dimensions is a batch, of ``spatial_dims + 1`` one sample, normalised
    as a batch of one (a view, no copy) and returned in its shape; any other rank raises
    ValueError.

    With ``track_running_stats``, training mode updates ``running_mean`` / ``running_var`` as
    PyTorch does (the mean over the batch of the per-instance statistics, the unbiased variance,
    ``momentum`` weighting the new batch; ``momentum=None`` updates nothing, as PyTorch passes
    0), and eval mode normalises with them. ``num_batches_tracked`` is kept for the state_dict
    and, as in PyTorch, never counts.

    Parameters
    ----------
    num_features : int
        C.
    eps, momentum : float
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); False by default, as PyTorch.
    track_running_stats : bool
        False by default, as PyTorch.
    dtype : float16, float32 or float64
    axis : int
        The channel axis of a batch: 1 or -1 (channels-last).
    spatial_dims : int, optional
        Spatial dimensions of the inputs (1, 2, 3 for PyTorch's 1d, 2d, 3d modules), which
        lets the layer take one sample as well as a batch; None: batches only.
    device : {"auto", "cpu", "cuda"}
        Where the parameters, running buffers and gradients live, as ``BatchNorm``'s: "auto"
        follows the input (CUDA arrays: channels-first only).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        dtype: DTypeLike = np.float32,
        *,
        axis: int = 1,
        spatial_dims: int | None = None,
        device: Device = "auto",
    ) -> None:
        self.num_features = check_count(num_features, "num_features")
        self.momentum = None if momentum is None else check_scalar(momentum, "momentum", 0.0, 1.0)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = check_axis(axis)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self._init_common(eps, dtype, (self.num_features,), self.affine, self.affine)
        if self.track_running_stats:
            self.running_mean = np.zeros(self.num_features, self.dtype)
            self.running_var = np.ones(self.num_features, self.dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0
        self.to(device)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean = move(np.zeros(self.num_features, self.dtype), self._side)
            self.running_var = move(np.ones(self.num_features, self.dtype), self._side)
        self.num_batches_tracked = 0

    def _uses_input_stats(self):
        return self.training or not self.track_running_stats

    def _forward(self, x, out):
        arrays = self.affine or self.track_running_stats
        if is_device_array(x):  # its rank is checked with the device arrays (norm_cuda)
            one = self.spatial_dims is not None and len(x.shape) == self.spatial_dims + 1
            shape = (1, *x.shape) if one else x.shape
        else:
            shape = instance_batch(x, self.spatial_dims)[0].shape
        _check_channels(self, shape, self.num_features, warn_only=not arrays)
        weight, bias = self._kernel_vector("weight"), self._kernel_vector("bias")
        if self._uses_input_stats():
            update = self.track_running_stats
            return instance_stats_forward(
                x, self.running_mean if update else None, self.running_var if update else None,
                weight, bias, True, 0.0 if self.momentum is None else self.momentum, self.eps,
                self.axis, spatial_dims=self.spatial_dims, out=out,
            )  # fmt: skip
        y, _, _ = instance_stats_forward(x, self.running_mean, self.running_var, weight, bias,
                                         False, 0.0, self.eps, self.axis,
                                         spatial_dims=self.spatial_dims, out=out)  # fmt: skip
        return y, None, None

    def _backward(self, dy, saved, out):
        weight = self._kernel_vector("weight")
        if saved.mean is not None:
            return instance_stats_backward(dy, saved.x, saved.mean, saved.invstd, weight,
                                           self.axis, spatial_dims=self.spatial_dims,
                                           out=out)  # fmt: skip
        # the running statistics normalised: constants, so dx = dy * weight * invstd
        if any_on_device(dy, saved.x, out):
            return instance_frozen_backward(dy, saved.x, self.running_mean, self.running_var,
                                            weight, self.eps, self.axis, self.spatial_dims,
                                            out)  # fmt: skip
        x, one = instance_batch(saved.x, self.spatial_dims)
        given = None
        if one:  # dy and out as x: one sample, seen as a batch of one
            dy = check_dy(dy, x[0])[None]
            given, out = sample_out(out, x[0])
        dx, sum_dy, sum_dy_xmu, invstd = frozen_backward(
            dy, x, self.running_mean, self.running_var, weight, self.eps, self.axis, out=out
        )
        if one:
            dx = dx[0] if given is None else given
        return dx, np.asarray(invstd) * sum_dy_xmu, sum_dy

    def _state_arrays(self):
        names = super()._state_arrays()
        return names + (["running_mean", "running_var"] if self.track_running_stats else [])

    def _state_keys(self):
        keys = self._state_arrays()
        return keys + (["num_batches_tracked"] if self.track_running_stats else [])

    def __repr__(self) -> str:
        return (
            f"InstanceNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"dtype={self.dtype.name}, axis={self.axis}, spatial_dims={self.spatial_dims})"
        )


def _check_channels(layer, shape, expected, warn_only=False):
    """ValueError (or, for a layer without per-channel arrays, a warning as PyTorch) when the
    channel axis of x (of ``shape``, as a batch) does not hold ``expected`` channels."""
    if shape is None or len(shape) < 2:
        return  # the functional checks explain
    axis = normalize_axis(layer.axis, len(shape))
    if shape[axis] == expected:
        return
    message = (
        f"{type(layer).__name__} expects {expected} channels on axis {layer.axis}, got x of shape "
        f"{tuple(shape)}"
    )
    if not warn_only:
        raise ValueError(message)
    warnings.warn(message, stacklevel=3)


def _shares_memory(out, x):
    """True when ``out`` and ``x`` (both on one side: the functional checked it) share memory."""
    if is_device_array(x):
        memory = memory_of(x)
        return memory.is_array(out) and memory.shares_memory(out, x)
    return np.shares_memory(out, x)
