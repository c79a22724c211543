"""BatchNorm: parameters, running buffers, train/eval, gradients, state_dict."""

import numpy as np

from . import conventions as _conventions
from .functional import (
    check_nan_policy,
    check_scalar,
    compute_dtype,
    eval_forward,
    frozen_backward,
    train_backward,
    train_forward,
)
from .placement import DEVICES, is_device_array, memory_of, move

_ARRAYS = ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias")

_DEFAULT = object()


class BatchNorm:
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
    dtype : float16, float32 or float64
        dtype of the parameters and buffers.
    convention : {"torch", "keras", "flax", "onnx"}
    nan_policy : {"propagate", "raise"}
        "raise": a training batch with non-finite statistics raises and updates nothing.
    device : {"auto", "cpu", "cuda"}
        Where parameters, buffers and gradients live. "auto": in host memory until the layer is
        called on CUDA arrays, then on the GPU (they follow the input). "cpu" / "cuda" keep them
        there; an input from the other side raises. :meth:`to` moves them.

    Training forward saves what :meth:`backward` needs; ``backward(dy)`` returns dx and sets
    ``grad_weight``/``grad_bias``.
    """

    # The operations on batch statistics; SyncBatchNorm (numba_bn.distributed) swaps in versions
    # that reduce over the ranks of an MPI communicator.
    _train_forward = staticmethod(train_forward)
    _train_backward = staticmethod(train_backward)
    _frozen_backward = staticmethod(frozen_backward)

    def __init__(
        self,
        num_features,
        eps=None,
        momentum=_DEFAULT,
        affine=True,
        track_running_stats=True,
        axis=None,
        dtype=np.float32,
        convention="torch",
        *,
        center=None,
        scale=None,
        nan_policy="propagate",
        backend="cpu",
        device="auto",
    ):
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
        self.axis = self.convention.axis if axis is None else axis
        self.dtype = np.dtype(dtype)
        compute_dtype(self.dtype, "dtype")
        self.nan_policy = check_nan_policy(nan_policy)
        self.backend = backend
        self.track_running_stats = bool(track_running_stats)
        self.affine = bool(affine)
        scale = self.affine if scale is None else bool(scale)
        center = self.affine if center is None else bool(center)
        self.weight = np.ones(num_features, self.dtype) if scale else None
        self.bias = np.zeros(num_features, self.dtype) if center else None
        self.grad_weight = self.grad_bias = None
        if self.track_running_stats:
            self.running_mean = np.zeros(num_features, self.dtype)
            self.running_var = np.ones(num_features, self.dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0
        self.training = True
        self._saved = None
        self.device = "auto"
        self._side = "cpu"  # where the arrays are now
        self.to(device)

    # ---------------------------------------------------------------------------- modes
    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # -------------------------------------------------------------------------- device
    def to(self, device):
        """Move parameters, buffers and gradients to ``device`` ("cpu", "cuda" or "auto", which
        leaves them where they are and lets them follow the input); returns self."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if device != "auto":
            self._move(device)
        self.device = device
        return self

    def _move(self, side):
        if side == self._side:
            return
        for name in _ARRAYS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, move(value, side))
        self._side = side
        self._saved = None  # a saved input on the other side cannot feed backward()

    def _follow(self, x):
        """Bring the arrays to the side of ``x`` (device="auto"), or raise."""
        side = "cuda" if is_device_array(x) else "cpu"
        if side == self._side:
            return
        if self.device != "auto":
            where = "a CUDA device array" if side == "cuda" else "a host (NumPy) array"
            raise ValueError(
                f"this BatchNorm keeps its arrays on {self.device!r} but x is {where}: move x, "
                f"or the layer with .to({side!r})"
            )
        self._move(side)

    # -------------------------------------------------------------------------- forward
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x, *, out=None):
        """Normalise ``x``; in training mode also update the running statistics."""
        self._follow(x)
        if self.training or not self.track_running_stats:
            update = self.training and self.track_running_stats
            batches = self.num_batches_tracked + 1
            result = self._train_forward(
                x,
                self.weight,
                self.bias,
                self.eps,
                self.axis,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None,
                momentum=self.convention.new_batch_weight(self.momentum, batches),
                unbiased=self.convention.unbiased_running_var,
                nan_policy=self.nan_policy,
                out=out,
                backend=self.backend,
                device=self._side,
            )
            if update and result.count:
                self.num_batches_tracked = batches
            self._saved = ("batch", x, result.mean, result.invstd)
            return result.y
        y = eval_forward(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.eps,
            self.axis,
            out=out,
            backend=self.backend,
            device=self._side,
        )
        self._saved = ("running", x)
        return y

    # ------------------------------------------------------------------------- backward
    def backward(self, dy, *, out=None):
        """dx for the last forward; sets ``grad_weight`` (sum dy*x_hat) and ``grad_bias``."""
        if self._saved is None:
            raise RuntimeError("BatchNorm.backward() needs a forward call first: nothing saved")
        if self._saved[0] == "batch":
            _, x, mean, invstd = self._saved
            dx, sum_dy, sum_dy_xmu = self._train_backward(
                dy,
                x,
                mean,
                invstd,
                self.weight,
                self.axis,
                out=out,
                backend=self.backend,
                device=self._side,
            )
        else:
            dx, sum_dy, sum_dy_xmu, invstd = self._frozen_backward(
                dy,
                self._saved[1],
                self.running_mean,
                self.running_var,
                self.weight,
                self.eps,
                self.axis,
                out=out,
                backend=self.backend,
                device=self._side,
            )
        memory = memory_of(sum_dy)
        self.grad_weight = (
            memory.product(invstd, sum_dy_xmu, self.dtype) if self.weight is not None else None
        )
        self.grad_bias = memory.astype(sum_dy, self.dtype) if self.bias is not None else None
        return dx

    # ----------------------------------------------------------------------- state dict
    def state_dict(self):
        """Host NumPy copies (wherever the layer is), under the keys of
        ``torch.nn.BatchNorm2d.state_dict()``."""
        state = {}
        for name in self._state_keys():
            value = getattr(self, name)
            if name == "num_batches_tracked":
                state[name] = np.array(value, dtype=np.int64)
            else:
                state[name] = move(value, "cpu") if self._side == "cuda" else value.copy()
        return state

    def load_state_dict(self, state, strict=True):
        """Load values (numpy arrays, or anything np.asarray takes, torch CPU tensors too, and
        CUDA arrays); they land where the layer's arrays are.

        Every value is checked before any is assigned.
        """
        expected = self._state_keys()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state_dict mismatch: missing keys {missing}, unexpected keys {unexpected}"
            )
        loaded = {}
        for name in expected:
            if name not in state:
                continue
            value = np.asarray(move(state[name], "cpu"))
            if name == "num_batches_tracked":
                if value.shape != () or not np.issubdtype(value.dtype, np.integer):
                    raise ValueError(
                        f"num_batches_tracked must be an integer scalar, got {value!r}"
                    )
                loaded[name] = int(value)
                continue
            if value.shape != (self.num_features,):
                raise ValueError(
                    f"{name} must have shape ({self.num_features},), got {value.shape}"
                )
            if not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"{name} must hold floats, got dtype {value.dtype}")
            loaded[name] = move(value.astype(self.dtype), self._side)
        for name, value in loaded.items():
            setattr(self, name, value)
        return self

    def _state_keys(self):
        keys = [n for n in ("weight", "bias") if getattr(self, n) is not None]
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"axis={self.axis}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, dtype={self.dtype.name}, "
            f"convention={self.convention.name!r}, training={self.training}, "
            f"device={self.device!r})"
        )
