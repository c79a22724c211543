"""Any array and channel axis as the canonical (outer, C, inner) view (numba_bn/layout.py)."""

import numpy as np
import pytest

from numba_bn.layout import canonical_shape, check_axis, normalize_axis


@pytest.mark.parametrize("shape, axis, expected", [
    ((32, 64), 1, (32, 64, 1)),
    ((8, 16, 100), 1, (8, 16, 100)),
    ((4, 3, 5, 7), 1, (4, 3, 35)),
    ((2, 3, 4, 5, 6), 1, (2, 3, 120)),
    ((4, 5, 7, 3), 3, (140, 3, 1)),
    ((4, 5, 7, 3), 2, (20, 7, 3)),
    ((6, 2), 0, (1, 6, 2)),
    ((0, 3, 4), 1, (0, 3, 4)),
])  # fmt: skip
def test_canonical_shape_of_the_design_table(shape, axis, expected):
    assert canonical_shape(shape, axis) == expected


@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 7), 1), ((4, 5, 7, 3), 3), ((2, 3, 4, 5), 2)])
def test_reshape_to_the_canonical_view_groups_each_channel(rng, shape, axis):
    """Element [o, c, i] of the view is channel c: the same multiset as moving the axis."""
    x = rng.standard_normal(shape)
    view = x.reshape(canonical_shape(shape, axis))
    moved = np.moveaxis(x, axis, 0).reshape(shape[axis], -1)
    for c in range(shape[axis]):
        np.testing.assert_array_equal(np.sort(view[:, c, :].ravel()), np.sort(moved[c]))


@pytest.mark.parametrize(
    "axis, ndim, expected", [(1, 4, 1), (-1, 4, 3), (-4, 4, 0), (np.int64(2), 3, 2)]
)
def test_normalize_axis_counts_negative_axes_from_the_end(axis, ndim, expected):
    assert normalize_axis(axis, ndim) == expected
    assert type(normalize_axis(axis, ndim)) is int


@pytest.mark.parametrize("axis", [4, -5])
def test_normalize_axis_out_of_range_names_the_axis(axis):
    with pytest.raises(ValueError, match=f"axis={axis} is out of range for an input with 4 dim"):
        normalize_axis(axis, 4)


@pytest.mark.parametrize("axis", [1.0, True, "1", [1], None])
def test_check_axis_refuses_anything_but_an_integer(axis):
    with pytest.raises(TypeError, match="axis must be an integer"):
        check_axis(axis)
