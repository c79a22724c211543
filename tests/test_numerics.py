"""Numerical properties: large means, finite differences, thread-count independence, partitions."""

import sys

import numba
import numpy as np
import pytest

import numba_bn as nbn
from numba_bn.cpu import drivers, items, kernels

import naive
from conftest import random_batch, run_child


@pytest.mark.parametrize("shape, axis", [((64, 8, 32, 32), 1), ((4096, 16), 1), ((8, 9, 9, 8), -1)])
def test_large_mean_small_spread_keeps_variance_and_output(rng, shape, axis):
    """float32, mean 1e4, std 1e-2: variance within 1e-6 of the float64 computation."""
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    eps = 1e-12  # training needs eps > 0; this one is far below the variance (1e-4)
    y, mean, invstd = nbn.forward_train(x, eps=eps, axis=axis)
    _, var_ref, _ = naive.batch_stats(x, axis)  # float64 on the same float32 values
    var = 1.0 / invstd.astype(np.float64) ** 2 - eps
    np.testing.assert_allclose(var, var_ref, rtol=1e-6)
    y_ref = naive.forward(x, naive.batch_stats(x, axis)[0], var_ref, eps=eps, axis=axis)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)  # compensated mean: no loss in y


@pytest.mark.parametrize("shape, axis", [((64, 8, 32, 32), 1), ((4096, 16), 1), ((8, 9, 9, 8), -1)])
def test_large_mean_with_an_affine_keeps_output_to_float32_rounding(rng, shape, axis):
    """float32, mean 1e4, std 1e-2, a weight and a bias: the low part of the mean, folded into
    the shift (stats.folded_shift), costs no more than the float32 roundings of y itself (both
    forms measured within 1.04 ulp of the largest |y|). The low part times the scale reaches
    ~0.1 here: leaving it out, or folding it with the wrong sign, is ~1e4 times the bound."""
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    bias = (3.0 * rng.standard_normal(channels)).astype(np.float32)
    y = nbn.forward_train(x, weight, bias, eps=1e-12, axis=axis)[0]
    mean_ref, var_ref, _ = naive.batch_stats(x, axis)
    y_ref = naive.forward(x, mean_ref, var_ref, weight, bias, eps=1e-12, axis=axis)
    bound = 4 * np.spacing(np.float32(np.abs(y_ref).max()))  # a few roundings of the largest y
    assert np.abs(y - y_ref).max() <= bound


def test_large_mean_backward_stays_accurate(rng):
    x = (1e4 + 1e-2 * rng.standard_normal((32, 4, 16, 16))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = nbn.BatchNorm(4, eps=1e-12)
    bn(x)
    dx = bn.backward(dy)
    dx_ref, dweight_ref, _ = naive.backward(dy, x, eps=1e-12)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4 * np.abs(dx_ref).max())
    np.testing.assert_allclose(bn.grad_weight, dweight_ref, rtol=1e-4, atol=1e-2)


def _loss(x, weight, bias, probe, axis):
    y, _, _ = nbn.forward_train(x, weight, bias, eps=1e-3, axis=axis)
    return float(np.sum(y * probe))


@pytest.mark.parametrize("shape, axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 3, 2), -1)])
def test_backward_matches_finite_differences(rng, shape, axis):
    x = random_batch(rng, shape, np.float64, axis=axis)
    channels = shape[axis]
    weight, bias = rng.uniform(0.5, 2.0, channels), rng.standard_normal(channels)
    probe = rng.standard_normal(shape)  # L = sum(y * probe), so dL/dy = probe
    _, mean, invstd = nbn.forward_train(x, weight, bias, eps=1e-3, axis=axis)
    dx, dweight, dbias = nbn.backward(probe, x, mean, invstd, weight, axis=axis)
    h = 1e-6

    def central(f, array, index):
        saved = array[index]
        array[index] = saved + h
        up = f()
        array[index] = saved - h
        down = f()
        array[index] = saved
        return (up - down) / (2 * h)

    def loss():
        return _loss(x, weight, bias, probe, axis)

    for index in np.ndindex(shape):
        assert central(loss, x, index) == pytest.approx(dx[index], rel=1e-5, abs=1e-7)
    for c in range(channels):
        assert central(loss, weight, c) == pytest.approx(dweight[c], rel=1e-6, abs=1e-8)
        assert central(loss, bias, c) == pytest.approx(dbias[c], rel=1e-6, abs=1e-8)


# Shapes that take every path of the drivers: fused channels, split planes (few channels),
# multi-segment planes, rows with several chunks and channel tiles.
PARTITION_SHAPES = [
    ((3, 16, items.FUSED_FORWARD_MIN_INNER), 1),  # two threads: the forward fused
    ((items.FUSED_BACKWARD_MIN_ELEMENTS // (4 * 2048), 4, 2048), 1),  # and the backward
    ((2, 1, 3 * kernels.PLANE_BLOCK + 17), 1),
    ((3, 3, kernels.PLANE_BLOCK + 5), 1),
    ((2 * kernels.ROW_CHUNK + 3, kernels.CHANNEL_TILE + 9), 1),
    ((kernels.ROW_CHUNK + 1, 3), 1),
    ((45, 3, 196), 1),  # short planes in groups of 20, 20 and 5
    ((45, 8, 196), 1),
]


# a child process: float64 forward_train and backward of a plane batch, a digest of each result
_BITS = """
import hashlib
import sys
import numpy as np
import numba_bn as nbn

rng = np.random.default_rng(int(sys.argv[1]))
x = rng.standard_normal((8, 16, 8, 8)) * rng.uniform(0.1, 10, (1, 16, 1, 1)) + 3
dy = rng.standard_normal(x.shape)
y, mean, invstd = nbn.forward_train(x)
for array in (y, mean, invstd, *nbn.backward(dy, x, mean, invstd, np.ones(16))):
    print(hashlib.sha256(array.tobytes()).hexdigest())
"""


# a child process: every step on rows, planes, short planes, one and more channel items, serial
# and parallel sizes, both dtypes; a digest of every result
_EVERY_STEP = """
import hashlib
import sys
import numpy as np
import numba_bn as nbn

rng, digest = np.random.default_rng(int(sys.argv[1])), hashlib.sha256()
for shape in [(64, 32), (8, 16, 8, 8), (45, 3, 14, 14), (16, 80, 9, 9), (512, 256),
              (16, 64, 28, 28)]:
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        running = [np.zeros(shape[1], dtype), np.ones(shape[1], dtype)]
        y, mean, invstd = nbn.forward_train(x)
        fused, _, _ = nbn.forward_train(x, residual=dy, activation="relu")
        results = [y, mean, invstd, nbn.batch_norm(x, *running, training=True), *running,
                   *nbn.backward(dy, x, mean, invstd),
                   *nbn.backward(dy, x, mean, invstd, activation="relu", y=fused),
                   nbn.forward_eval(x, *running)]
        stats = nbn.moments(x)
        results += [stats.mean, stats.m2]
        if x.ndim == 4 and shape[1] % 4 == 0:  # group and layer norm's drivers
            y, mean, invstd = nbn.group_norm_forward(x, 4)
            results += [y, mean, invstd, *nbn.group_norm_backward(dy, x, mean, invstd, 4)]
            y, mean, invstd = nbn.layer_norm_forward(x, shape[1:])
            results += [y, mean, invstd, *nbn.layer_norm_backward(dy, x, mean, invstd, shape[1:])]
        for array in results:
            digest.update(np.ascontiguousarray(array).tobytes())
print(digest.hexdigest())
"""


def test_no_kernel_reads_an_array_numba_has_freed(rng):
    """glibc fills freed memory with a pattern under MALLOC_PERTURB_: a kernel that reads an
    array after Numba freed it (a borrowed view that outlived its array, stats.borrowed) gives
    other bits there. Without the pattern the freed memory still held the values: the channel
    items' borrowed partials gave the right bits in every other test."""
    seed = int(rng.integers(2**31))
    quiet = {"NUMBA_BN_QUIET": "1"}
    runs = [run_child([sys.executable, "-c", _EVERY_STEP, seed], env, timeout=600)
            for env in (quiet, {**quiet, "MALLOC_PERTURB_": "165"})]  # fmt: skip
    assert all(status == 0 for status, _ in runs), runs
    assert runs[0][1] == runs[1][1]


def test_a_process_that_loads_a_driver_gives_the_bits_of_the_one_that_compiled_it(rng, tmp_path):
    """A driver compiled in the process runs the code Numba caches for later ones. Before
    stats.strict_copy, float64 sums over planes came out a few ulp apart: the compiling
    process's call bound to the kernel's own function, a loading one ran the driver's copy of it
    (benchmarks/README.md, "Compiled calls")."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_BN_QUIET": ""}
    seed = int(rng.integers(2**31))
    (compiled_status, compiled), (loaded_status, loaded) = (
        run_child([sys.executable, "-c", _BITS, seed], env, timeout=600) for _ in range(2)
    )
    assert compiled_status == 0 and loaded_status == 0, compiled + loaded
    assert "numba_bn: compiling" in compiled and "numba_bn: compiling" not in loaded, loaded
    bits = [[line for line in out.splitlines() if not line.startswith("numba_bn")]
            for out in (compiled, loaded)]  # fmt: skip
    assert len(bits[0]) == 6 and bits[0] == bits[1]


_FORWARD = """
import sys
import numpy as np
from numba_bn import codecache
import numba_bn as nbn

if sys.argv[1] == "edited":  # as if stats.py or a module of cpu/ had changed since the compile
    codecache.sources_digest = lambda: "another source"
nbn.forward_train(np.arange(24.0).reshape(4, 6))
"""


def test_a_cached_driver_of_other_kernel_sources_compiles_again(tmp_path):
    """A driver's cache entry is keyed on the sources of its kernels, not only on its own file
    (codecache.sources_digest): an edit of stats.py once left a tree's cache serving the old
    kernels."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_BN_QUIET": ""}
    outputs = [run_child([sys.executable, "-c", _FORWARD, sources], env, timeout=600)
               for sources in ("same", "same", "edited", "same")]  # fmt: skip
    assert all(status == 0 for status, _ in outputs), outputs
    compiled = ["numba_bn: compiling forward_train" in output for _, output in outputs]
    assert compiled == [True, False, True, False]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", PARTITION_SHAPES)
def test_results_are_bitwise_identical_with_one_and_two_threads(rng, shape, axis, dtype):
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = random_batch(rng, shape, dtype, axis=axis)
    weight = rng.uniform(0.5, 2.0, shape[axis]).astype(dtype)
    results = []
    saved = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            y, mean, invstd = nbn.forward_train(x, weight, axis=axis)
            results.append((y, mean, invstd, *nbn.backward(dy, x, mean, invstd, weight, axis=axis)))
    finally:
        numba.set_num_threads(saved)
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, narrow", [(1024, 256), (600, 160)])
def test_a_channels_results_do_not_depend_on_the_tile_that_reduces_it(rng, dtype, rows, narrow):
    # the narrow batch's reduction items are tiles of fewer than CHANNEL_TILE columns (more
    # items for the threads); with more channels beside them the same columns sit in wide tiles
    # (items.row_tile), and elementwise items of other rows
    wide = 2 * kernels.CHANNEL_TILE  # one chunk of rows: two tiles of CHANNEL_TILE columns
    x = random_batch(rng, (rows, wide), dtype)
    dy = random_batch(rng, (rows, wide), dtype, mean_scale=1.0)
    weight = rng.uniform(0.5, 2.0, wide).astype(dtype)
    bias = rng.standard_normal(wide).astype(dtype)
    assert items.row_tile(rows, narrow) < items.row_tile(rows, wide) == kernels.CHANNEL_TILE
    some = np.ascontiguousarray(x[:, :narrow])
    y, mean, invstd = nbn.forward_train(some, weight[:narrow], bias[:narrow])
    y_all, mean_all, invstd_all = nbn.forward_train(x, weight, bias)
    grads = nbn.backward(np.ascontiguousarray(dy[:, :narrow]), some, mean, invstd, weight[:narrow])
    grads_all = nbn.backward(dy, x, mean_all, invstd_all, weight)
    for part, whole in zip((y, mean, invstd, *grads), (y_all, mean_all, invstd_all, *grads_all),
                           strict=True):  # fmt: skip
        np.testing.assert_array_equal(part, whole[..., :narrow])


@pytest.mark.parametrize("fused", [False, True])
# one channel item (C <= 64: merged on the calling thread) and several (a prange of them)
@pytest.mark.parametrize("shape", [(6, 16, 40), (5, 2, 300), (700, 9, 1), (4, 70, 9),
                                   (40, 130, 1)])  # fmt: skip
def test_serial_and_parallel_twins_are_bitwise_identical(rng, shape, fused):
    fused = fused and shape[2] > 1
    x = random_batch(rng, shape, np.float32)
    dy = random_batch(rng, shape, np.float32)
    weight = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    partition = "fused" if fused else "split"
    results = []
    memory = items.memory_of(shape[0], shape[2])
    trains = drivers.driver(f"forward_train_{partition}", memory)  # (parallel, serial)
    backs = drivers.driver(f"backward_{partition}", memory)
    add_relu = drivers.driver(f"forward_train_{partition}", memory, kernels.EPILOGUE_ADD_RELU)
    relu_backs = drivers.driver("backward_fused_relu")
    no_rows = np.empty((2, 0), np.float32)  # saved: not wanted
    for twin, train, back in zip(("", "_serial"), trains, backs, strict=True):
        running = [np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)]
        y = np.full_like(x, np.nan)
        stats = [np.full(shape[1], np.nan) for _ in range(3)]
        saved = np.full((2, shape[1]), np.nan, np.float32)  # mean, invstd in x's dtype
        assert train(x, weight, bias, 1e-5, *running, 0.1, True, True, y, *stats, x, saved)
        # rounded from float64 as NumPy's astype rounds them (what forward_train returned)
        np.testing.assert_array_equal(saved, np.array(stats[:2]).astype(np.float32))
        dx = np.full_like(x, np.nan)
        sums = [np.full(shape[1], np.nan) for _ in range(2)]
        grads = np.full((2, shape[1]), np.nan, np.float32)  # dweight, dbias
        back(dy, x, stats[0], stats[1], weight, dx, *sums, grads)
        # rounded from float64 as NumPy rounds them (parameter_gradients' way)
        np.testing.assert_array_equal(grads[0], (stats[1] * sums[1]).astype(np.float32))
        np.testing.assert_array_equal(grads[1], sums[0].astype(np.float32))
        fused_y = np.full_like(x, np.nan)  # the epilogue's twins: y = relu(BN(x) + dy)
        add_relu[0 if twin == "" else 1](x, weight, bias, 1e-5, *running, 0.1, True, True,
                                         fused_y, *stats, dy, no_rows)  # fmt: skip
        results.append([y, *stats, *running, saved, dx, *sums, grads, fused_y])
        if fused:  # its backward, through the ReLU channel by channel
            grad, relu_dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
            relu_sums = [np.full(shape[1], np.nan) for _ in range(2)]
            relu_grads = np.full((2, shape[1]), np.nan, np.float32)
            relu_backs[0 if twin == "" else 1](
                dy, fused_y, x, stats[0], stats[1], weight, relu_dx, *relu_sums, grad, relu_grads
            )
            np.testing.assert_array_equal(grad, np.where(fused_y > 0, dy, np.float32(0)))
            np.testing.assert_array_equal(relu_grads[1], relu_sums[0].astype(np.float32))
            results[-1] += [relu_dx, *relu_sums, relu_grads]
    for parallel, serial in zip(*results, strict=True):
        assert np.all(np.isfinite(parallel))
        np.testing.assert_array_equal(parallel, serial)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(6, 16, 40), (5, 2, 300), (700, 9, 1), (40, 130, 1),
                                   (45, 3, 196)])  # fmt: skip
def test_a_drivers_output_in_place_of_an_input_gets_the_bits_it_gets_apart(rng, shape, fused):
    """y into x itself, or into the residual z; dx into dy or into x: the bits a new array gets
    (every value is read before its own index is written). y into x and dx into dy read and
    write one array (kernels.one_memory; through two, the vector loop ran the scalar one, 5-7x
    slower); the others keep the two-array loop."""
    fused = fused and shape[2] > 1
    x, dy = random_batch(rng, shape, np.float32), random_batch(rng, shape, np.float32)
    weight = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    bias = rng.standard_normal(shape[1]).astype(np.float32)
    partition, memory = "fused" if fused else "split", items.memory_of(shape[0], shape[2])
    trains = drivers.driver(f"forward_train_{partition}", memory)  # (parallel, serial)
    add_relus = drivers.driver(f"forward_train_{partition}", memory, kernels.EPILOGUE_ADD_RELU)
    backs = drivers.driver(f"backward_{partition}", memory)
    no_rows = np.empty((2, 0), np.float32)

    def train(twin, x, y, z=None):
        stats = [np.full(shape[1], np.nan) for _ in range(3)]
        running = [np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)]
        run = (trains if z is None else add_relus)[twin]
        run(x, weight, bias, 1e-5, *running, 0.1, True, True, y, *stats,
            x if z is None else z, no_rows)  # fmt: skip
        return y, stats

    def back(twin, dy, x, dx, mean, invstd):
        sums = [np.full(shape[1], np.nan) for _ in range(2)]
        backs[twin](dy, x, mean, invstd, weight, dx, *sums, np.empty((2, shape[1]), np.float32))
        return dx

    for twin in (0, 1):
        y, (mean, invstd, _) = train(twin, x, np.full_like(x, np.nan))
        fused_y = train(twin, x, np.full_like(x, np.nan), dy)[0]
        dx = back(twin, dy, x, np.full_like(x, np.nan), mean, invstd)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(fused_y)) and np.all(np.isfinite(dx))
        into_x, into_z, into_dy, into_x_again = x.copy(), dy.copy(), dy.copy(), x.copy()
        np.testing.assert_array_equal(train(twin, into_x, into_x)[0], y)
        np.testing.assert_array_equal(train(twin, x, into_z, into_z)[0], fused_y)
        np.testing.assert_array_equal(back(twin, into_dy, x, into_dy, mean, invstd), dx)
        np.testing.assert_array_equal(back(twin, dy, into_x_again, into_x_again, mean, invstd), dx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(16, 32, 256), (6, 16, 40), (5, 2, 300), (3, 9, 2100)])
def test_the_fused_and_split_partitions_give_the_same_bits(rng, shape, dtype):
    """Which items compute a channel never changes its merge order (numba_bn/cpu/items.py): the
    partition the rules pick (items.is_fused, measured on one machine and the other way round
    on another: benchmarks/README.md, "Stop 55") decides the speed alone."""
    x = random_batch(rng, shape, dtype)
    dy = random_batch(rng, shape, dtype, mean_scale=0.5)
    weight = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    memory = items.memory_of(shape[0], shape[2])
    results = {}
    for partition in ("fused", "split"):
        trains = drivers.driver(f"forward_train_{partition}", memory)  # (parallel, serial)
        backs = drivers.driver(f"backward_{partition}", memory)
        for twin, train, back in zip(("parallel", "serial"), trains, backs, strict=True):
            running = [np.zeros(shape[1], dtype), np.ones(shape[1], dtype)]
            y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
            stats = [np.full(shape[1], np.nan) for _ in range(3)]
            saved = np.full((2, shape[1]), np.nan, dtype)
            assert train(x, weight, bias, 1e-5, *running, 0.1, True, True, y, *stats, x, saved)
            sums = [np.full(shape[1], np.nan) for _ in range(2)]
            grads = np.full((2, shape[1]), np.nan, dtype)
            back(dy, x, stats[0], stats[1], weight, dx, *sums, grads)
            results[partition, twin] = [y, *stats, *running, saved, dx, *sums, grads]
    expected = results["split", "serial"]
    assert all(np.all(np.isfinite(value)) for value in expected)
    for got in results.values():
        for value, want in zip(got, expected, strict=True):
            np.testing.assert_array_equal(value, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", PARTITION_SHAPES)
def test_every_partition_path_matches_reference(rng, shape, axis, dtype):
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = random_batch(rng, shape, dtype, mean_scale=0.5, axis=axis)
    y, mean, invstd = nbn.forward_train(x, axis=axis)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, axis=axis)
    y_ref, mean_ref, _ = naive.forward_train(x, axis=axis)
    dx_ref, dweight_ref, dbias_ref = naive.backward(dy, x, axis=axis)
    tol = 3e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(mean, mean_ref, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol * 10 * np.abs(dx_ref).max())
    size = np.sum(np.abs(dy), axis=0 if len(shape) == 2 else (0, 2)).max() * 4
    np.testing.assert_allclose(dweight, dweight_ref, atol=tol * size)
    np.testing.assert_allclose(dbias, dbias_ref, atol=tol * size)


def test_nan_input_propagates_by_default_and_raises_on_request(rng):
    x = random_batch(rng, (8, 3, 4), np.float32)
    x[2, 1, 3] = np.nan
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = nbn.batch_norm(x, rm, rv, training=True)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert np.isnan(rm[1]) and np.isfinite(rm[[0, 2]]).all()
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="nan_policy"):
        nbn.batch_norm(x, rm, rv, training=True, nan_policy="raise")
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
