"""The public functions, shaped like ``torch.nn.functional.batch_norm`` and its explicit steps.

Per-channel statistics come back in the input's dtype (float32 for float16 and bfloat16).
``device`` picks the CPU or the CUDA backend (:mod:`numba_bn.dispatch`); validation lives in
:mod:`numba_bn.checks` and the operations in :mod:`numba_bn.ops`.
"""

import numpy as np

from . import ops
from .annotations import Activation, Array, Backend, Device, NanPolicy
from .capi import calls
from .checks import trained
from .cpu import fronts
from .masking import masked_batch_backward, masked_batch_forward
from .memory import host_views
from .ops import batch_forward, parameter_gradients


def forward_train(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    out: Array | None = None,
    nan_policy: NanPolicy = "propagate",
    mask: Array | None = None,
    residual: Array | None = None,
    activation: Activation = None,
    backend: Backend = "cpu",
    device: Device = "auto",
) -> tuple[Array, Array, Array]:
    """Training-mode forward with batch statistics.

    Every array argument is a NumPy array, a CUDA array, or a host array NumPy views without a
    copy: the buffer protocol, ``__array_interface__``, or ``__dlpack__`` (``np.from_dlpack``:
    torch CPU tensors, JAX CPU arrays). Such a view shares the caller's memory, so ``out=`` (and
    :func:`batch_norm`'s running buffers) are written in place; a non-contiguous ``x`` is copied
    once, as a non-contiguous ndarray is.

    Parameters
    ----------
    x : array, float16/32/64 or bfloat16 (ml_dtypes, torch), rank >= 2
        Channels on ``axis``; the statistics reduce over every other axis. Also a nested
        sequence of numbers (converted, a copy).
    weight, bias : array (C,), optional
        Affine parameters (1 and 0 when None).
    eps : float
        Added to the biased variance.
    out : array, optional
        C-contiguous and writable, with the shape and dtype of ``x``, to write ``y`` into (a
        torch CPU tensor receives y; the returned y is a NumPy view of its memory).
    nan_policy : {"propagate", "raise"}
        "raise": ValueError when the batch statistics are not finite.
    mask : bool array, optional
        Statistics over the True positions only (:mod:`numba_bn.masking`): the shape of x
        without the channel axis, or broadcastable to it; every position is normalised.
    residual : array like x, optional
        Added to the normalised values: ``y = activation(BN(x) + residual)``, in the same pass
        over memory (a ResNet block's skip connection). ``out`` may be x or the residual itself.
    activation : {None, "relu"}
        Applied last, in the same pass (ReLU keeps NaN, as torch.relu). Its backward needs this
        y: :func:`backward` with ``activation`` and ``y``.
    device : {"auto", "cpu", "cuda"}
        "auto": the GPU for arrays that expose ``__cuda_array_interface__`` (results are Numba
        device arrays), the CPU for NumPy arrays. "cuda" with NumPy arrays copies them over and
        returns NumPy arrays. Host and device arrays in one call raise ValueError.

    Returns
    -------
    y, mean, invstd
        NumPy arrays for host inputs (whatever kind of host array came in); for CUDA inputs the
        kind of ``x`` (CuPy in, CuPy out; a torch CUDA tensor in, torch tensors out; Numba
        device arrays otherwise), zero-copy views of the results. ``mean`` and
        ``invstd = 1/sqrt(var + eps)`` (biased variance) have shape (C,) and the dtype of ``x``
        (float32 for float16 and bfloat16).

    .. math:: y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\\,w + b
    """
    if calls.entry is not None:  # compiled calls (capi.calls) serve a plain call, or decline
        served = calls.entry.forward_train(x, weight, bias, eps, axis, out, nan_policy, mask,
                                           residual, activation, backend, device)  # fmt: skip
        if served is not NotImplemented:
            return served
    if type(x) is not np.ndarray:  # torch CPU tensors, say: NumPy's views take the plain path
        x, weight, bias, out, residual = host_views(x, weight, bias, out, residual)
    if mask is None:  # the common call first: keywords spelt out, no dict to build (~0.5 us)
        if (
            residual is None
            and activation is None
            and nan_policy is fronts.PROPAGATE
            and fronts.may_serve(backend, device)
        ):
            served = fronts.forward_train(x, weight, bias, eps, axis, out=out)
            if served is not None:  # a call like one before, in compiled code
                return served
        # ops.batch_forward's two paths, its TrainResult skipped on the plain one (~1 us of 8),
        # and the statistics rounded to x's dtype by the kernels (two astype: ~0.7 us)
        plain = ops.plain_batch_forward(x, weight, bias, eps, axis, None, None, 0.1, True,
                                        nan_policy, out, backend, residual, activation, device,
                                        "rounded")  # fmt: skip
        if plain is not None:  # y, mean, invstd
            return plain
        result = ops.checked_batch_forward(
            x, weight, bias, eps, axis, running_mean=None, running_var=None, momentum=0.1,
            unbiased=True, nan_policy=nan_policy, out=out, backend=backend, exchange=None,
            residual=residual, activation=activation, device=device,
        )  # fmt: skip
    else:
        result = masked_batch_forward(x, weight, bias, eps, axis, mask, nan_policy=nan_policy,
                                      out=out, backend=backend, residual=residual,
                                      activation=activation)  # fmt: skip
    return trained(result)


def forward_eval(
    x: Array,
    running_mean: Array,
    running_var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    out: Array | None = None,
    residual: Array | None = None,
    activation: Activation = None,
    backend: Backend = "cpu",
    device: Device = "auto",
) -> Array:
    """Inference forward with frozen statistics: ``(x - running_mean) / sqrt(running_var + eps)``
    scaled by ``weight`` and shifted by ``bias`` (then ``residual`` and ``activation``);
    arguments (any host array NumPy views without a copy, as well as NumPy and CUDA arrays) as
    :func:`forward_train`. Returns y: a NumPy array for host inputs (a view of ``out`` when
    given); for CUDA inputs the kind of ``x`` (CuPy, torch, else a Numba device array)."""
    if calls.entry is not None:  # as in forward_train
        served = calls.entry.forward_eval(x, running_mean, running_var, weight, bias, eps, axis,
                                          out, residual, activation, backend, device)  # fmt: skip
        if served is not NotImplemented:
            return served
    if type(x) is not np.ndarray:  # as in forward_train
        x, running_mean, running_var, weight, bias, out, residual = host_views(
            x, running_mean, running_var, weight, bias, out, residual
        )
    if residual is None and activation is None and fronts.may_serve(backend, device):
        y = fronts.forward_eval(x, running_mean, running_var, weight, bias, eps, axis, out)
        if y is not None:  # a call like one before, in compiled code (cpu/fronts.py)
            return y
    # ops.frozen_forward's two paths, its keywords skipped on the plain one (as forward_train)
    y = ops.plain_frozen_forward(x, running_mean, running_var, weight, bias, eps, axis, out,
                                 backend, residual, activation, device)  # fmt: skip
    if y is not None:
        return y
    return ops.checked_frozen_forward(x, running_mean, running_var, weight, bias, eps, axis,
                                      out=out, backend=backend, residual=residual,
                                      activation=activation, device=device)  # fmt: skip


def backward(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    weight: Array | None = None,
    axis: int = 1,
    *,
    out: Array | None = None,
    mask: Array | None = None,
    activation: Activation = None,
    y: Array | None = None,
    residual_out: Array | None = None,
    backend: Backend = "cpu",
    device: Device = "auto",
) -> tuple[Array, Array, Array]:
    """Exact training-mode backward (docs/backward.md).

    ``mean`` and ``invstd`` are those returned by :func:`forward_train` for the same ``x`` (and
    ``mask``, when the statistics were masked).
    Returns ``dx, dweight, dbias`` with ``dweight = sum(dy * x_hat)``, ``dbias = sum(dy)``
    per channel (in the dtype of ``x``, float32 for float16 and bfloat16): NumPy arrays for host
    inputs; for CUDA inputs the kind of ``dy`` (CuPy, torch, else Numba device arrays). Arrays
    are taken as by :func:`forward_train`
    (torch CPU tensors, DLPack and buffer-protocol objects too; ``out=`` and ``residual_out``
    are written in place).

    After a fused forward (``residual``, ``activation``): pass its ``activation`` and its output
    ``y`` ("relu": the gradient flows where y > 0); ``residual_out`` (an array like dy, sharing
    no memory with x, dy, y or out) receives the residual's gradient, dy through the activation
    (dy itself without one), in the same pass.

    .. math::
        dx = w\\,\\sigma^{-1}\\left(dy - \\tfrac{1}{m}\\textstyle\\sum dy
             - \\hat x\\,\\tfrac{1}{m}\\sum dy\\,\\hat x\\right)
    """
    if calls.entry is not None:  # as in forward_train
        served = calls.entry.backward(dy, x, mean, invstd, weight, axis, out, mask, activation, y,
                                      residual_out, backend, device)  # fmt: skip
        if served is not NotImplemented:
            return served
    if type(x) is not np.ndarray:  # as in forward_train
        x, dy, mean, invstd, weight, out, y, residual_out = host_views(
            x, dy, mean, invstd, weight, out, y, residual_out
        )
    if (mask is None and activation is None and y is None and residual_out is None
            and fronts.may_serve(backend, device)):  # fmt: skip
        served = fronts.backward(dy, x, mean, invstd, weight, axis, out)
        if served is not None:  # a call like one before, in compiled code
            return served
    if mask is None:  # as in forward_train: ops.batch_backward's two paths
        plain = ops.plain_batch_backward(dy, x, mean, invstd, weight, axis, out, backend,
                                         activation, y, residual_out, device, False)  # fmt: skip
        if plain is not None:  # (dx, None, None (the sums: not wanted), count, dweight, dbias)
            return plain[0], plain[4], plain[5]
        result = ops.checked_batch_backward(
            dy, x, mean, invstd, weight, axis, out=out, backend=backend, exchange=None,
            activation=activation, y=y, residual_out=residual_out, device=device,
        )  # fmt: skip
    else:
        result = masked_batch_backward(
            dy, x, mean, invstd, weight, axis, mask, out=out, backend=backend,
            activation=activation, y=y, residual_out=residual_out,
        )  # fmt: skip
    return (result.dx, *parameter_gradients(result, invstd))


def batch_norm(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    out: Array | None = None,
    unbiased_running_var: bool = True,
    nan_policy: NanPolicy = "propagate",
    mask: Array | None = None,
    residual: Array | None = None,
    activation: Activation = None,
    backend: Backend = "cpu",
    device: Device = "auto",
) -> Array:
    """Batch normalisation shaped like ``torch.nn.functional.batch_norm``.

    ``training=True`` normalises with batch statistics and, when ``running_mean`` and
    ``running_var`` are given, updates them in place: ``r = (1 - momentum) * r + momentum * s``
    with the unbiased batch variance (``unbiased_running_var=False``: the biased one, as Keras,
    Flax and ONNX). ``training=False`` normalises with the running statistics. ``mask`` (in
    training): statistics over its True positions, as :func:`forward_train`. ``residual`` and
    ``activation``: ``y = activation(BN(x) + residual)`` in the same pass, as
    :func:`forward_train`. Nothing is modified when the call raises. ``device`` as in
    :func:`forward_train`.

    Arrays are taken as by :func:`forward_train`: ``running_mean`` and ``running_var`` may be
    any writable host array NumPy views without a copy (a torch CPU tensor is updated in place;
    a read-only one raises ValueError "must be writable"). Returns y: a NumPy array for host
    inputs (a view of ``out`` when given); for CUDA inputs the kind of ``x`` (CuPy, torch, else
    a Numba device array).
    """
    if type(x) is not np.ndarray and calls.entry is None:  # as in forward_train
        x, running_mean, running_var, weight, bias, out, residual = host_views(
            x, running_mean, running_var, weight, bias, out, residual
        )
    if (training and mask is None and calls.entry is None and residual is None
            and activation is None and nan_policy is fronts.PROPAGATE
            and fronts.may_serve(backend, device)):  # fmt: skip
        served = fronts.forward_train(x, weight, bias, eps, axis, running_mean, running_var,
                                      momentum, unbiased_running_var, out)  # fmt: skip
        if served is not None:  # a call like one before, in compiled code (cpu/fronts.py)
            return served[0]
    if training and mask is None and calls.entry is None:
        # batch_forward's plain path without its keywords and its TrainResult (~1 us of a small
        # call), as forward_train
        plain = ops.plain_batch_forward(x, weight, bias, eps, axis, running_mean, running_var,
                                        momentum, unbiased_running_var, nan_policy, out, backend,
                                        residual, activation, device, None)  # fmt: skip
        if plain is not None:
            return plain[0]
    # keywords spelt out, no dict to build: a training loop's every call (as forward_train)
    if training and mask is not None:
        return masked_batch_forward(
            x, weight, bias, eps, axis, mask, running_mean=running_mean, running_var=running_var,
            momentum=momentum, unbiased=unbiased_running_var, nan_policy=nan_policy, out=out,
            backend=backend, residual=residual, activation=activation,
        ).y  # fmt: skip
    if training:
        return batch_forward(
            x, weight, bias, eps, axis, running_mean=running_mean, running_var=running_var,
            momentum=momentum, unbiased=unbiased_running_var, nan_policy=nan_policy, out=out,
            backend=backend, device=device, residual=residual, activation=activation,
        ).y  # fmt: skip
    return forward_eval(x, running_mean, running_var, weight, bias, eps, axis, out=out,
                        residual=residual, activation=activation, backend=backend,
                        device=device)  # fmt: skip
