import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A fresh generator per test; its seed is printed so that a failure can be replayed."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed for {request.node.nodeid}: {seed}")
    return np.random.default_rng(seed)


def random_batch(rng, shape, dtype=np.float64, mean_scale=5.0, std_range=(0.1, 10.0), axis=1):
    """Per-channel non-zero means and varied spreads: what real activations look like."""
    axis = axis % len(shape)
    channels = shape[axis]
    means = rng.uniform(-mean_scale, mean_scale, channels)
    stds = np.exp(rng.uniform(np.log(std_range[0]), np.log(std_range[1]), channels))
    bshape = [1] * len(shape)
    bshape[axis] = channels
    x = rng.standard_normal(shape) * stds.reshape(bshape) + means.reshape(bshape)
    return x.astype(dtype)


def poison(shape, dtype):
    """An output buffer full of NaN, so that any element a kernel forgets to write shows."""
    return np.full(shape, np.nan, dtype)


# (shape, axis) layouts every behaviour is checked on: rows, planes, channels-last, rank 5,
# odd channel counts, and a plane longer than one PLANE_BLOCK segment.
LAYOUTS = [
    ((16, 5), 1),
    ((7, 3, 11), 1),
    ((4, 6, 5, 7), 1),
    ((3, 5, 4, 6), -1),
    ((2, 3, 4, 3, 5), 1),
    ((2, 4, 3, 5), 2),
    ((3, 1, 4500), 1),
    ((200, 1), 1),
]
