"""Group, layer and instance normalisation: batch norm's reduction on another view.

Each normalises groups of values with their own float64 ``(count, mean, M2)`` statistics, by
the kernels batch norm uses (:mod:`numba_bn.cpu.norm_kernels`), and applies the affine per
original channel (group and instance norm) or per element of ``normalized_shape`` (layer norm):

==============  ======================================  ===================  ================
operation       statistics over                         mean, invstd shape   weight, bias
==============  ======================================  ===================  ================
group norm      (n, g): C/G channels x spatial          (N, G)               (C,)
instance norm   (n, c): spatial (group norm, G = C)     (N, C)               (C,)
layer norm      each row of the trailing dimensions     leading shape        normalized_shape
==============  ======================================  ===================  ================

The batch is axis 0 and the channels are on ``axis`` (1, or -1 for channels-last); any other
axis is moved to 1 by one copy of x (and of dy), and y (dx) moved back. float16 is computed in
float32. The statistics and gradients the functions return are in the compute dtype of x
(float32 for float16); the layers (:mod:`numba_bn.norm_layers`) keep them in float64. The
backward is derived in docs/backward.md ("Group, instance and layer norm").

Every argument is checked before anything is written: a call that raises leaves ``out=`` and the
running buffers as they were. As batch norm's functions (:mod:`numba_bn.hostcall`), each
operation first tries the plain call; anything else takes the checked path, which accepts all a
plain call does (with the same bits) and explains what it rejects.

Group and instance norm also take CUDA arrays (all of a call's arrays on the device, channels on
axis 1), computed by batch norm's CUDA steps (:mod:`numba_bn.norm_cuda`); their results come back
as the kind of the call's first CUDA array, as batch norm's (docs/norms.md, "CUDA"). Layer norm
runs on the CPU only: a CUDA array raises TypeError.

This module is the public functions; :mod:`numba_bn.norm_ops` the operations behind them (plain
and checked paths), :mod:`numba_bn.norm_checks` the argument checks and the plain call's
recognisers, :mod:`numba_bn.norm_layers` the layers.
"""

from collections.abc import Sequence

from numpy.typing import ArrayLike

from .annotations import Array, HostArray
from .checks import in_compute_dtype
from .norm_ops import (
    group_stats_backward,
    group_stats_forward,
    instance_stats_backward,
    instance_stats_forward,
    layer_stats_backward,
    layer_stats_forward,
)


def _public(result, *arrays):
    """float64 statistics or gradients in the compute dtype of ``result`` (y or dx), on its side
    and of its kind (CUDA arrays: as batch norm's, :func:`numba_bn.checks.in_compute_dtype`)."""
    return in_compute_dtype(result, *arrays)


# --------------------------------------------------------------------------- public API
def group_norm_forward(
    x: Array,
    num_groups: int,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    out: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Group normalisation with its statistics: ``(y, mean, invstd)``.

    Parameters
    ----------
    x : ndarray or CUDA array, float16/32/64, shape (N, C, ...) (channels on ``axis``; axis 0
        is the batch). CUDA arrays: every array argument on the device, channels on axis 1;
        results of the kind of x.
    num_groups : int
        G, dividing C; each sample's channels are split into G consecutive groups.
    weight, bias : ndarray (C,), optional
        Per-channel affine (1 and 0 when None), in x's dtype (or float32 for float16 x).
    eps : float > 0
    axis : int
        The channel axis: 1 (NCHW) or -1 (channels-last).
    out : ndarray, optional
        C-contiguous array of x's shape and dtype for y (may be x itself).

    Returns
    -------
    y, mean, invstd
        ``mean``, ``invstd = 1/sqrt(var + eps)`` (biased variance) of shape (N, G), in x's
        compute dtype (float32 for float16).

    .. math:: y_{n,c} = \\frac{x_{n,c} - \\mu_{n,g(c)}}{\\sqrt{\\sigma^2_{n,g(c)} + \\epsilon}}
              \\,w_c + b_c
    """
    y, mean, invstd, _ = group_stats_forward(x, num_groups, weight, bias, eps, axis, out=out)
    return (y, *_public(y, mean, invstd))


def group_norm(
    x: Array,
    num_groups: int,
    weight: Array | None = None,
    bias: Array | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    out: Array | None = None,
) -> Array:
    """``torch.nn.functional.group_norm``: y of :func:`group_norm_forward`."""
    return group_stats_forward(x, num_groups, weight, bias, eps, axis, out=out)[0]


def group_norm_backward(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    num_groups: int,
    weight: Array | None = None,
    axis: int = 1,
    *,
    out: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Exact group norm backward: ``(dx, dweight, dbias)``.

    ``mean``, ``invstd`` (N, G) are those :func:`group_norm_forward` returned for ``x``;
    ``dweight = sum over n and spatial of dy * x_hat``, ``dbias = sum of dy`` per channel, in x's
    compute dtype. ``out`` (for dx) may be dy or x.

    .. math:: dx = \\sigma^{-1}\\left(g - \\tfrac{1}{m}\\textstyle\\sum_{group} g
              - \\hat x\\,\\tfrac{1}{m}\\sum_{group} g\\,\\hat x\\right),\\quad g = w_c\\,dy
    """
    dx, dweight, dbias = group_stats_backward(dy, x, mean, invstd, num_groups, weight, axis,
                                              out=out)  # fmt: skip
    return (dx, *_public(dx, dweight, dbias))


def layer_norm_forward(
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: HostArray | None = None,
    bias: HostArray | None = None,
    eps: float = 1e-5,
    *,
    out: HostArray | None = None,
) -> tuple[HostArray, HostArray, HostArray]:
    """Layer normalisation over the trailing dimensions ``normalized_shape``:
    ``(y, mean, invstd)``.

    ``weight``, ``bias`` have shape ``normalized_shape`` (elementwise affine); ``mean`` and
    ``invstd`` have x's leading shape (``x.shape[:-len(normalized_shape)]``), in x's compute
    dtype. ``out`` as :func:`group_norm_forward`.
    """
    y, mean, invstd = layer_stats_forward(x, normalized_shape, weight, bias, eps, out=out)
    return (y, *_public(y, mean, invstd))


def layer_norm(
    x: ArrayLike,
    normalized_shape: int | Sequence[int],
    weight: HostArray | None = None,
    bias: HostArray | None = None,
    eps: float = 1e-5,
    *,
    out: HostArray | None = None,
) -> HostArray:
    """``torch.nn.functional.layer_norm``: y of :func:`layer_norm_forward`."""
    return layer_stats_forward(x, normalized_shape, weight, bias, eps, out=out)[0]


def layer_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: HostArray,
    invstd: HostArray,
    normalized_shape: int | Sequence[int],
    weight: HostArray | None = None,
    *,
    out: HostArray | None = None,
) -> tuple[HostArray, HostArray, HostArray]:
    """Exact layer norm backward: ``(dx, dweight, dbias)``, the gradients of shape
    ``normalized_shape`` summed over the leading dimensions; arguments as
    :func:`group_norm_backward`."""
    dx, dweight, dbias = layer_stats_backward(dy, x, mean, invstd, normalized_shape, weight,
                                              out=out)  # fmt: skip
    return (dx, *_public(dx, dweight, dbias))


def instance_norm_forward(
    x: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    spatial_dims: int | None = None,
    out: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Instance normalisation (group norm with one channel per group): ``(y, mean, invstd)``,
    the statistics (N, C).

    x is a batch (N, C, *spatial), as in ``torch.nn.functional.instance_norm``. With
    ``spatial_dims`` (the number of spatial dimensions, PyTorch's InstanceNorm1d/2d/3d: 1, 2, 3),
    x may also be one sample (C, *spatial) as those modules take it: ``x.ndim == spatial_dims +
    1``; it is normalised as a batch of one (a view, no copy), y has its shape and the
    statistics are (C,). ``axis`` counts the batch axis either way (1, or -1 for channels-last).

    With ``use_input_stats`` (training) and running buffers (C,), the buffers are updated in
    place as PyTorch does: ``r = (1 - momentum) * r + momentum * b`` with ``b`` the mean over
    the batch of the per-instance means (unbiased variances). With ``use_input_stats=False`` the
    running statistics normalise (batch norm's eval forward), and ``mean``, ``invstd`` are
    theirs, repeated for each sample.
    """
    y, mean, invstd = instance_stats_forward(x, running_mean, running_var, weight, bias,
                                             use_input_stats, momentum, eps, axis,
                                             spatial_dims=spatial_dims, out=out)  # fmt: skip
    return (y, *_public(y, mean, invstd))


def instance_norm(
    x: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    *,
    spatial_dims: int | None = None,
    out: Array | None = None,
) -> Array:
    """``torch.nn.functional.instance_norm``: y of :func:`instance_norm_forward` (one sample
    with ``spatial_dims``, as there)."""
    return instance_stats_forward(x, running_mean, running_var, weight, bias, use_input_stats,
                                  momentum, eps, axis, spatial_dims=spatial_dims,
                                  out=out)[0]  # fmt: skip


def instance_norm_backward(
    dy: Array,
    x: Array,
    mean: Array,
    invstd: Array,
    weight: Array | None = None,
    axis: int = 1,
    *,
    spatial_dims: int | None = None,
    out: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Exact instance norm backward (input statistics): ``(dx, dweight, dbias)``; ``mean``,
    ``invstd`` (N, C) from :func:`instance_norm_forward`, (C,) for one sample (x and dy of
    ``spatial_dims + 1`` dimensions, as there)."""
    dx, dweight, dbias = instance_stats_backward(dy, x, mean, invstd, weight, axis,
                                                 spatial_dims=spatial_dims, out=out)  # fmt: skip
    return (dx, *_public(dx, dweight, dbias))
