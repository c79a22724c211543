"""Range drivers over raw pointers: the compute code of the C library.

``numba-bn build-plugin`` (:mod:`.build`) compiles every function in :data:`EXPORTED` with
``@cfunc`` for float32 and float64 and links them into ``libnumba_bn.so``. The C shim
(csrc/nbn_shim.c) checks arguments, allocates scratch and runs them on its threads, each call
over a range ``first:last`` of the work items of :mod:`numba_bn.cpu.items`, the items the JIT
drivers run in ``prange``; :func:`plan` tells the shim how many there are and how many partials a
channel has. So the plugin computes what the JIT backend computes, bit for bit; only the loop over
items moved from ``prange`` to the shim.

Arguments: ``T`` is the tensor dtype, ``(outer, channels, inner)`` the canonical view; weight and
bias come with their length (``channels``, or 0 when absent). The annotations give each
argument's C type; the build generates the C declarations from them (nbn_kernels.h:
``numba-bn build-plugin --out DIR --header-only`` writes it). Outputs are overwritten (``=``);
nothing allocates (``part`` and ``scratch`` come from the shim). Partials ``part`` are
``(3, parts, C)`` (count, mean, M2) or ``(2, parts, C)`` (sum_dy, sum_dy_xmu).

The forward's elementwise pass takes a residual ``z`` (like x; x itself when there is none, never
read then) and an ``epilogue`` code (:mod:`numba_bn.cpu.kernels`: bit 0 adds z, bit 1 applies
ReLU). The kernels need the code as a compile-time constant, so the drivers branch on it once and
call a specialisation per code: a code read at run time inside the loop would cost the plain pass
its speed. An unknown code computes nothing (the shim checks codes first).

=========================  ==========================================  ========================
function                   items                                       writes
=========================  ==========================================  ========================
plan                       -                                           the partition (PLAN_FIELDS)
train_plane_channels       channels (fused)                            y, coef, statistics
stats_items                reduction items                             part
train_from_parts           channel items: merge in part order, coefs   coef, statistics
spread_coefficients        -                                           the wide rows
normalize_items            elementwise items                           y
relu_grad_items            flat items                                  g
update_running             -                                           running_mean, _var
eval_coefficients          -                                           coef
backward_plane_channels    channels (fused)                            dx, coef, sums
sums_items                 reduction items                             part
dx_from_parts              channel items: add in part order, coefs     coef, sums
dx_items                   elementwise items                           dx
=========================  ==========================================  ========================

The elementwise items read coefficient rows of ``coef_columns`` columns (:func:`plan`): the
channels', or for short planes (:func:`numba_bn.cpu.kernels.short_planes`) a column per value of
a plane, which the shim makes from the channels' rows with ``spread_coefficients``.

Group and layer norm (ABI 1.3) have their drivers in :mod:`.norm_ranges`; :data:`EXPORTED` and
:data:`CONSTANTS` hold theirs too.
"""

from numba import carray

from ..cpu import NS_PER_ELEMENT, WAKE_NS, items
from ..cpu.channels import dx_channels, train_channels
from ..cpu.kernels import (
    EPILOGUE_ADD,
    EPILOGUE_ADD_RELU,
    EPILOGUE_NONE,
    EPILOGUE_RELU,
    plane_channel_backward,
    plane_channel_train,
    relu_grad_range,
    spread_columns,
)
from ..cpu.kernels import eval_coefficients as _eval_coefficients
from ..stats import AFFINE_ROWS, DX_ROWS, kernel, running_update
from .c_types import F64, I64, IN, IN64, OUT, OUT64, OUTI64
from .norm_ranges import NORM_CONSTANTS, NORM_EXPORTED

#: The fields plan() writes: the partition of :func:`numba_bn.cpu.items.plan`, then the flat
#: items of a pass that needs no channel (relu_grad_items) over the whole tensor.
PLAN_FIELDS = (*items.PLAN_FIELDS, "flat_items", "flat_item_elements")
_FLAT_FIELD = len(items.PLAN_FIELDS)

#: Constants the shim needs: coefficient rows, the per-thread scratch of a reduction item, the
#: epilogue bits, the order of the fields plan() writes (NBN_PLAN_<FIELD>), the CPU backend's
#: cost model (serial or parallel: NBN_WAKE_NS, and NBN_NS_<STEP> for the steps the shim runs),
#: and group and layer norm's (norm_ranges.NORM_CONSTANTS).
CONSTANTS = {
    "AFFINE_ROWS": AFFINE_ROWS,
    "DX_ROWS": DX_ROWS,
    "ITEM_SCRATCH": items.ITEM_SCRATCH_SHAPE[0] * items.ITEM_SCRATCH_SHAPE[1],
    "EPILOGUE_NONE": EPILOGUE_NONE,
    "EPILOGUE_ADD": EPILOGUE_ADD,
    "EPILOGUE_RELU": EPILOGUE_RELU,
    "PLAN_SIZE": len(PLAN_FIELDS),
    **{f"PLAN_{field.upper()}": index for index, field in enumerate(PLAN_FIELDS)},
    "WAKE_NS": WAKE_NS,
    **{
        f"NS_{step.upper()}": NS_PER_ELEMENT[step]
        for step in ("forward_train", "forward_eval", "backward")
    },
    **NORM_CONSTANTS,
}


def plan(outer: I64, channels: I64, inner: I64, threads: I64, plan_ptr: OUTI64):
    """The partition of a call (:func:`numba_bn.cpu.items.plan`) for ``threads`` threads, and
    the flat items of the whole tensor (:func:`numba_bn.cpu.items.flat_items`)."""
    out = carray(plan_ptr, len(PLAN_FIELDS))
    items.plan(outer, channels, inner, threads, out)
    size = outer * channels * inner
    start, stop = items.flat_item(0, size)
    out[_FLAT_FIELD] = items.flat_items(size)
    out[_FLAT_FIELD + 1] = stop - start


# ---------------------------------------------------------------------------------- forward
@kernel(inline="always")
def _train_channels(x, first, last, eps, weight, bias, coef, y, mean, invstd, m2, z, epilogue):
    for c in range(first, last):
        plane_channel_train(x, c, eps, weight, bias, coef, y, mean, invstd, m2, z, epilogue)


def train_plane_channels(
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    eps: F64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    y_ptr: OUT,
    coef_ptr: OUT,
    mean_ptr: OUT64,
    invstd_ptr: OUT64,
    m2_ptr: OUT64,
    z_ptr: IN,
    epilogue: I64,
):
    """Channels first:last of the planes layout, each start to finish (statistics, y with the
    epilogue)."""
    shape = (outer, channels, inner)
    x, y, z = carray(x_ptr, shape), carray(y_ptr, shape), carray(z_ptr, shape)
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    coef = carray(coef_ptr, (AFFINE_ROWS, channels))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    m2 = carray(m2_ptr, channels)
    # spelt out per code: a call through *args would type the code as a plain int64
    if epilogue == EPILOGUE_NONE:
        _train_channels(x, first, last, eps, weight, bias, coef, y, mean, invstd, m2, z,
                        EPILOGUE_NONE)  # fmt: skip
    elif epilogue == EPILOGUE_ADD:
        _train_channels(x, first, last, eps, weight, bias, coef, y, mean, invstd, m2, z,
                        EPILOGUE_ADD)  # fmt: skip
    elif epilogue == EPILOGUE_RELU:
        _train_channels(x, first, last, eps, weight, bias, coef, y, mean, invstd, m2, z,
                        EPILOGUE_RELU)  # fmt: skip
    elif epilogue == EPILOGUE_ADD_RELU:
        _train_channels(x, first, last, eps, weight, bias, coef, y, mean, invstd, m2, z,
                        EPILOGUE_ADD_RELU)  # fmt: skip


def stats_items(
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    part_ptr: OUT64,
    scratch_ptr: OUT64,
):
    """Partials (count, mean, M2) of items first:last; ``scratch``: NBN_ITEM_SCRATCH doubles."""
    shape = (outer, channels, inner)
    x = carray(x_ptr, outer * channels * inner)
    part = carray(part_ptr, (3, items.parts(outer, inner), channels))
    scratch = carray(scratch_ptr, items.ITEM_SCRATCH_SHAPE)
    for item in range(first, last):
        items.stats_item(x, shape, item, part, scratch)


def train_from_parts(
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    part_ptr: IN64,
    eps: F64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    coef_ptr: OUT,
    mean_ptr: OUT64,
    invstd_ptr: OUT64,
    m2_ptr: OUT64,
):
    """Channel items first:last (:func:`numba_bn.cpu.items.channel_items`, groups of
    channels): merge the partials in order, then the coefficients."""
    part = carray(part_ptr, (3, items.parts(outer, inner), channels))
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    coef = carray(coef_ptr, (AFFINE_ROWS, channels))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    m2 = carray(m2_ptr, channels)
    count = float(outer * inner)
    for item in range(first, last):
        items.channel_item(
            item, part, train_channels, (count, eps, weight, bias, coef, mean, invstd, m2)
        )


@kernel(inline="always")
def _normalize_items(x, y, shape, first, last, coef, z, epilogue):
    for item in range(first, last):
        items.normalize_item(x, y, shape, item, coef, z, epilogue)


def normalize_items(
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    coef_ptr: IN,
    y_ptr: OUT,
    z_ptr: IN,
    epilogue: I64,
):
    """y of elementwise items first:last, with the epilogue."""
    size = outer * channels * inner
    x, y, z = carray(x_ptr, size), carray(y_ptr, size), carray(z_ptr, size)
    coef = carray(coef_ptr, (AFFINE_ROWS, items.coef_columns(outer, channels, inner)))
    shape = (outer, channels, inner)
    if epilogue == EPILOGUE_NONE:  # spelt out as in train_plane_channels
        _normalize_items(x, y, shape, first, last, coef, z, EPILOGUE_NONE)
    elif epilogue == EPILOGUE_ADD:
        _normalize_items(x, y, shape, first, last, coef, z, EPILOGUE_ADD)
    elif epilogue == EPILOGUE_RELU:
        _normalize_items(x, y, shape, first, last, coef, z, EPILOGUE_RELU)
    elif epilogue == EPILOGUE_ADD_RELU:
        _normalize_items(x, y, shape, first, last, coef, z, EPILOGUE_ADD_RELU)


def spread_coefficients(rows: I64, channels: I64, inner: I64, coef_ptr: IN, wide_ptr: OUT):
    """The coefficient rows of short planes: (rows, channels) spread to a column per value."""
    coef = carray(coef_ptr, (rows, channels))
    spread_columns(coef, inner, carray(wide_ptr, (rows, channels * inner)))


def update_running(
    channels: I64,
    running_mean_ptr: OUT,
    running_var_ptr: OUT,
    count: F64,
    mean_ptr: IN64,
    m2_ptr: IN64,
    momentum: F64,
    unbiased: I64,
):
    """The running update: momentum weights the batch; the unbiased batch variance (PyTorch's)
    or, with ``unbiased`` 0, the biased one."""
    running_mean, running_var = (
        carray(running_mean_ptr, channels),
        carray(running_var_ptr, channels),
    )
    mean, m2 = carray(mean_ptr, channels), carray(m2_ptr, channels)
    running_update(running_mean, running_var, count, mean, m2, momentum, unbiased != 0)


def eval_coefficients(
    channels: I64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    running_mean_ptr: IN,
    running_var_ptr: IN,
    eps: F64,
    coef_ptr: OUT,
):
    """Coefficients of the eval forward from frozen statistics, every channel."""
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    running_mean, running_var = (
        carray(running_mean_ptr, channels),
        carray(running_var_ptr, channels),
    )
    coef = carray(coef_ptr, (AFFINE_ROWS, channels))
    _eval_coefficients(weight, bias, running_mean, running_var, eps, coef)


# --------------------------------------------------------------------------------- backward
def backward_plane_channels(
    dy_ptr: IN,
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    mean_ptr: IN64,
    invstd_ptr: IN64,
    weight_ptr: IN,
    n_weight: I64,
    coef_ptr: OUT,
    sum_dy_ptr: OUT64,
    sum_dy_xmu_ptr: OUT64,
    dx_ptr: OUT,
):
    """Channels first:last of the planes layout, each start to finish (reduction, dx)."""
    dy, x = carray(dy_ptr, (outer, channels, inner)), carray(x_ptr, (outer, channels, inner))
    dx = carray(dx_ptr, (outer, channels, inner))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    weight, coef = carray(weight_ptr, n_weight), carray(coef_ptr, (DX_ROWS, channels))
    sum_dy, sum_dy_xmu = carray(sum_dy_ptr, channels), carray(sum_dy_xmu_ptr, channels)
    for c in range(first, last):
        plane_channel_backward(dy, x, c, mean, invstd, weight, coef, dx, sum_dy, sum_dy_xmu)


def sums_items(
    dy_ptr: IN,
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    mean_ptr: IN64,
    part_ptr: OUT64,
    scratch_ptr: OUT64,
):
    """Partials (sum_dy, sum_dy_xmu) of reduction items first:last; ``scratch``:
    NBN_ITEM_SCRATCH doubles."""
    shape, size = (outer, channels, inner), outer * channels * inner
    dy, x = carray(dy_ptr, size), carray(x_ptr, size)
    mean = carray(mean_ptr, channels)
    part = carray(part_ptr, (2, items.parts(outer, inner), channels))
    scratch = carray(scratch_ptr, items.ITEM_SCRATCH_SHAPE)
    for item in range(first, last):
        items.sums_item(dy, x, shape, item, mean, part, scratch)


def dx_from_parts(
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    part_ptr: IN64,
    mean_ptr: IN64,
    invstd_ptr: IN64,
    weight_ptr: IN,
    n_weight: I64,
    coef_ptr: OUT,
    sum_dy_ptr: OUT64,
    sum_dy_xmu_ptr: OUT64,
):
    """Channel items first:last (as train_from_parts): add the partials in order, then the dx
    coefficients."""
    part = carray(part_ptr, (2, items.parts(outer, inner), channels))
    mean, invstd = carray(mean_ptr, channels), carray(invstd_ptr, channels)
    weight, coef = carray(weight_ptr, n_weight), carray(coef_ptr, (DX_ROWS, channels))
    sum_dy, sum_dy_xmu = carray(sum_dy_ptr, channels), carray(sum_dy_xmu_ptr, channels)
    count = float(outer * inner)
    for item in range(first, last):
        items.channel_item(
            item, part, dx_channels, (count, mean, invstd, weight, coef, sum_dy, sum_dy_xmu)
        )


def dx_items(
    dy_ptr: IN,
    x_ptr: IN,
    outer: I64,
    channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    coef_ptr: IN,
    dx_ptr: OUT,
):
    """dx of elementwise items first:last."""
    size = outer * channels * inner
    dy, x, dx = carray(dy_ptr, size), carray(x_ptr, size), carray(dx_ptr, size)
    coef = carray(coef_ptr, (DX_ROWS, items.coef_columns(outer, channels, inner)))
    for item in range(first, last):
        items.dx_item(dy, x, dx, (outer, channels, inner), item, coef)


def relu_grad_items(
    dy_ptr: IN,
    y_ptr: IN,
    size: I64,
    first: I64,
    last: I64,
    g_ptr: OUT,
):
    """g = dy where y > 0, else 0, over flat items first:last (the gradient through a fused
    forward's ReLU, from its output y)."""
    dy, y, g = carray(dy_ptr, size), carray(y_ptr, size), carray(g_ptr, size)
    for item in range(first, last):
        start, stop = items.flat_item(item, size)
        relu_grad_range(dy, y, g, start, stop)


#: In the order of the generated C table (struct nbn_dtype_kernels of nbn_kernels.h).
EXPORTED = (
    plan,
    train_plane_channels,
    stats_items,
    train_from_parts,
    normalize_items,
    update_running,
    eval_coefficients,
    backward_plane_channels,
    sums_items,
    dx_from_parts,
    dx_items,
    relu_grad_items,
    spread_coefficients,
    *NORM_EXPORTED,
)
