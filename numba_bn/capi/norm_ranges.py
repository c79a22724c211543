"""Range drivers of group and layer norm over raw pointers (ABI 1.3), exported as
:mod:`.ranges`' are (its :data:`~.ranges.EXPORTED` table ends with :data:`NORM_EXPORTED`).

They run the range kernels of :mod:`numba_bn.cpu.norm_kernels` over the items its ``prange``
drivers use: runs of ``units_per_item`` whole groups or rows, and for layer norm's backward the
fixed chunks of ``part_rows`` rows whose column partials ``part`` ``(chunks, 2, width)`` are added
in chunk order (:func:`layer_add_parts`). :func:`norm_plan` tells the shim how many items there
are, so the shim counts nothing. Group norm's views are those of the drivers:
``(1, N*G, C/G*S)`` for the forward, ``(1, N*C, S)`` for the backward, weight and bias (C,) as
the caller gave them, the affine rows per (sample, channel), the dx terms per group. The
statistics and the sums are float64; outputs are overwritten (``=``); nothing allocates.

=========================  ==========================================  ========================
function                   items                                       writes
=========================  ==========================================  ========================
norm_plan                  -                                           item count, units per item
group_train_items          runs of whole groups                        y, coef, statistics
group_backward_items       runs of whole groups                        dx, coef, sums
layer_train_items          runs of whole rows                          y, statistics
layer_backward_chunks      fixed row chunks                            dx, part
layer_add_parts            -: the chunks' partials in chunk order      dweight, dbias
=========================  ==========================================  ========================
"""

from numba import carray

from ..cpu.norm_kernels import (
    GROUP_DX_ROWS,
    add_parts,
    group_backward_range,
    group_train_range,
    layer_backward_rows,
    layer_train_rows,
    part_rows_jit,
    unit_items,
    unit_range,
    units_per_item,
)
from ..stats import AFFINE_ROWS
from .c_types import F64, I64, IN, IN64, OUT, OUT64, OUTI64

#: The fields norm_plan() writes: the work items of a group or layer norm driver.
NORM_PLAN_FIELDS = ("items", "units_per_item")

#: Constants the shim needs (in nbn_kernels.h with ranges.CONSTANTS).
NORM_CONSTANTS = {
    "GROUP_DX_ROWS": GROUP_DX_ROWS,
    "NORM_PLAN_SIZE": len(NORM_PLAN_FIELDS),
    **{f"NORM_PLAN_{field.upper()}": index for index, field in enumerate(NORM_PLAN_FIELDS)},
}


def norm_plan(units: I64, unit_size: I64, chunked: I64, plan_ptr: OUTI64):
    """The work items of a group or layer norm driver over ``units`` groups or rows of
    ``unit_size`` elements: runs of ``units_per_item`` of them, or (``chunked``: layer norm's
    backward, ``units`` rows of width ``unit_size``) the fixed chunks of ``part_rows``."""
    out = carray(plan_ptr, len(NORM_PLAN_FIELDS))
    per = part_rows_jit(units, unit_size) if chunked else units_per_item(unit_size)
    out[0] = unit_items(units, per)
    out[1] = per


def group_train_items(
    x_ptr: IN,
    groups: I64,
    group_channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    eps: F64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    coef_ptr: OUT,
    y_ptr: OUT,
    mean_ptr: OUT64,
    invstd_ptr: OUT64,
    m2_ptr: OUT64,
):
    """Items first:last of the group norm forward: ``groups`` = N*G groups of ``group_channels``
    channels of ``inner`` values; weight and bias (C,) (or 0)."""
    shape = (1, groups, group_channels * inner)
    x, y = carray(x_ptr, shape), carray(y_ptr, shape)
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    coef = carray(coef_ptr, (AFFINE_ROWS, groups * group_channels))
    mean, invstd = carray(mean_ptr, groups), carray(invstd_ptr, groups)
    m2 = carray(m2_ptr, groups)
    per = units_per_item(group_channels * inner)
    for item in range(first, last):
        g0, g1 = unit_range(item, per, groups)
        group_train_range(x, g0, g1, group_channels, eps, weight, bias, coef, y, mean, invstd, m2)


def group_backward_items(
    dy_ptr: IN,
    x_ptr: IN,
    groups: I64,
    group_channels: I64,
    inner: I64,
    first: I64,
    last: I64,
    mean_ptr: IN64,
    invstd_ptr: IN64,
    weight_ptr: IN,
    n_weight: I64,
    coef_ptr: OUT,
    dx_ptr: OUT,
    sum_dy_ptr: OUT64,
    sum_dy_xmu_ptr: OUT64,
):
    """Items first:last of the group norm backward: dx, and sum_dy, sum_dy_xmu per (sample,
    channel) (N*C); weight (C,) (or 0)."""
    planes = groups * group_channels
    shape = (1, planes, inner)
    dy, x, dx = carray(dy_ptr, shape), carray(x_ptr, shape), carray(dx_ptr, shape)
    mean, invstd = carray(mean_ptr, groups), carray(invstd_ptr, groups)
    weight, coef = carray(weight_ptr, n_weight), carray(coef_ptr, (GROUP_DX_ROWS, groups))
    sum_dy, sum_dy_xmu = carray(sum_dy_ptr, planes), carray(sum_dy_xmu_ptr, planes)
    per = units_per_item(group_channels * inner)
    for item in range(first, last):
        g0, g1 = unit_range(item, per, groups)
        group_backward_range(dy, x, g0, g1, group_channels, mean, invstd, weight, coef, dx,
                             sum_dy, sum_dy_xmu)  # fmt: skip


def layer_train_items(
    x_ptr: IN,
    rows: I64,
    width: I64,
    first: I64,
    last: I64,
    eps: F64,
    weight_ptr: IN,
    n_weight: I64,
    bias_ptr: IN,
    n_bias: I64,
    y_ptr: OUT,
    mean_ptr: OUT64,
    invstd_ptr: OUT64,
):
    """Items first:last of the layer norm forward over (rows, width); weight and bias (width,)
    or 0."""
    x, y = carray(x_ptr, (1, rows, width)), carray(y_ptr, (1, rows, width))
    weight, bias = carray(weight_ptr, n_weight), carray(bias_ptr, n_bias)
    mean, invstd = carray(mean_ptr, rows), carray(invstd_ptr, rows)
    per = units_per_item(width)
    for item in range(first, last):
        r0, r1 = unit_range(item, per, rows)
        layer_train_rows(x, r0, r1, eps, weight, bias, y, mean, invstd)


def layer_backward_chunks(
    dy_ptr: IN,
    x_ptr: IN,
    rows: I64,
    width: I64,
    first: I64,
    last: I64,
    mean_ptr: IN64,
    invstd_ptr: IN64,
    weight_ptr: IN,
    n_weight: I64,
    dx_ptr: OUT,
    part_ptr: OUT64,
):
    """Row chunks first:last of the layer norm backward: dx, and each chunk's column partials
    (chunks, 2, width)."""
    shape = (1, rows, width)
    dy, x, dx = carray(dy_ptr, shape), carray(x_ptr, shape), carray(dx_ptr, shape)
    mean, invstd = carray(mean_ptr, rows), carray(invstd_ptr, rows)
    weight = carray(weight_ptr, n_weight)
    per = part_rows_jit(rows, width)
    part = carray(part_ptr, (unit_items(rows, per), 2, width))
    for item in range(first, last):
        r0, r1 = unit_range(item, per, rows)
        layer_backward_rows(dy, x, r0, r1, mean, invstd, weight, dx, part[item])


def layer_add_parts(rows: I64, width: I64, part_ptr: IN64, dweight_ptr: OUT64, dbias_ptr: OUT64):
    """dweight, dbias (width,) from the chunks' partials, added in chunk order."""
    part = carray(part_ptr, (unit_items(rows, part_rows_jit(rows, width)), 2, width))
    add_parts(part, carray(dweight_ptr, width), carray(dbias_ptr, width))


#: At the end of the generated C table, in this order.
NORM_EXPORTED = (
    norm_plan,
    group_train_items,
    group_backward_items,
    layer_train_items,
    layer_backward_chunks,
    layer_add_parts,
)
