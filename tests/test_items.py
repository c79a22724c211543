"""The CPU work partition (numba_bn/cpu/items.py): the items cover every element once, and the
plan the C shim reads is the partition the JIT drivers run."""

import numpy as np
import pytest

from numba_bn.cpu import drivers, items
from numba_bn.cpu.channels import add_channels, dx_channels, merge_channels, train_channels
from numba_bn.cpu.race import THREADS_RACE_BOUNDS
from numba_bn.stats import AFFINE_ROWS, DX_ROWS

from conftest import assert_mean_close, random_batch

# rows with several chunks and channel tiles, long planes (several blocks), short planes (as
# rows of (outer, C * inner): one chunk, several, several chunks and tiles of columns), one
# channel, a plane just over one block, runs of planes, planes of fewer values than SHORT_PLANE
# but too few per channel to be short
SHAPES = [(2100, 1100, 1), (3, 2, 9000), (700, 3, 5), (5000, 4, 15), (1100, 300, 4), (8, 7, 4),
          (5, 1, 4100), (9, 7, 1), (4, 6, 35), (7, 5, 4)]  # fmt: skip


def _plan(shape, threads=2):
    out = np.full(len(items.PLAN_FIELDS), -1, np.int64)
    items.plan(*shape, threads, out)
    return dict(zip(items.PLAN_FIELDS, out.tolist(), strict=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_elementwise_items_write_every_element(rng, shape):
    x = random_batch(rng, shape, np.float32)
    z = random_batch(rng, shape, np.float32)
    coef = np.zeros((AFFINE_ROWS, shape[1]), np.float32)
    scale = np.arange(1, shape[1] + 1, dtype=np.float32)[:, None]
    coef[2], coef[4] = scale[:, 0], 1.0  # y = (c + 1) x in channel c
    # as a driver's loop nest passes them: a column per value for short planes
    wide = items.wide_coefficients(coef, shape[0], shape[2])
    assert wide.shape[1] == _plan(shape)["coef_columns"]
    for epilogue, expected in [(0, scale * x), (3, np.maximum(scale * x + z, 0))]:  # add, ReLU
        y = np.full(shape, np.nan, np.float32)
        for item in range(_plan(shape)["elementwise_items"]):
            items.normalize_item(x.reshape(-1), y.reshape(-1), shape, item, wide, z.reshape(-1),
                                 epilogue)  # fmt: skip
        np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_reduction_items_and_channel_merges_give_the_drivers_statistics(rng, shape):
    x = random_batch(rng, shape, np.float64)
    plan = _plan(shape)
    part = np.full((3, plan["parts"], shape[1]), np.nan)
    scratch = np.empty(items.ITEM_SCRATCH_SHAPE)
    memory = items.memory_of(shape[0], shape[2])
    for item in range(plan["reduce_items"]):
        items.ITEMS[memory]["stats_item"](x.reshape(-1), shape, item, part, scratch)
    assert not np.isnan(part).any(), "a partial no item wrote"
    mean, m2 = np.empty(shape[1]), np.empty(shape[1])
    for item in range(plan["channel_items"]):
        items.channel_item(item, part, merge_channels, (mean, m2))
    expected_mean, expected_m2 = np.empty(shape[1]), np.empty(shape[1])
    drivers.driver("batch_stats", memory)[1](x, expected_mean, expected_m2)
    np.testing.assert_array_equal(mean, expected_mean)
    np.testing.assert_array_equal(m2, expected_m2)
    values = np.moveaxis(x, 1, 0).reshape(shape[1], -1)
    assert_mean_close(mean, values.mean(axis=1), values)


@pytest.mark.parametrize("shape", SHAPES)
def test_reduction_items_and_channel_sums_give_the_drivers_sums(rng, shape):
    x, dy = random_batch(rng, shape, np.float64), random_batch(rng, shape, np.float64)
    mean = np.moveaxis(x, 1, 0).reshape(shape[1], -1).mean(axis=1)
    plan = _plan(shape)
    part = np.full((2, plan["parts"], shape[1]), np.nan)
    scratch = np.empty(items.ITEM_SCRATCH_SHAPE)
    memory = items.memory_of(shape[0], shape[2])
    for item in range(plan["reduce_items"]):
        items.ITEMS[memory]["sums_item"](dy.reshape(-1), x.reshape(-1), shape, item, mean, part,
                                         scratch)  # fmt: skip
    assert not np.isnan(part).any(), "a partial no item wrote"
    sum_dy, sum_dy_xmu = np.empty(shape[1]), np.empty(shape[1])
    for item in range(plan["channel_items"]):
        items.channel_item(item, part, add_channels, (sum_dy, sum_dy_xmu))
    expected = np.empty(shape[1]), np.empty(shape[1])
    drivers.driver("backward_sums", memory)[1](dy, x, mean, *expected)
    np.testing.assert_array_equal(sum_dy, expected[0])
    np.testing.assert_array_equal(sum_dy_xmu, expected[1])
    g, xmu = (np.moveaxis(v, 1, 0).reshape(shape[1], -1) for v in (dy, x - mean[:, None]))
    np.testing.assert_allclose(sum_dy, g.sum(axis=1), rtol=1e-10, atol=1e-10 * g.size)
    np.testing.assert_allclose(sum_dy_xmu, (g * xmu).sum(axis=1), rtol=1e-10,
                               atol=1e-10 * g.size)  # fmt: skip


@pytest.mark.parametrize("channels", [1, 63, 64, 65, 256, 1100])
def test_the_plan_counts_channel_items_as_the_drivers_run_them(channels):
    """The C shim runs the merges of a split call as the plan's channel items (each up to
    CHANNEL_GROUP channels), as the drivers' channel loop does: every channel in exactly one
    item, and no item without channels. (It ran one item per channel, most of them empty: ~7 ns
    each, 1.8 us of a (64, 256) backward's 7.6.)"""
    plan = _plan((300, channels, 1))
    assert plan["channel_items"] == items.channel_items(channels)
    assert plan["channel_item_elements"] == plan["parts"] * min(items.CHANNEL_GROUP, channels)
    merged = []

    def finish(c0, c1, part, out):
        out.append((c0, c1))

    for item in range(plan["channel_items"]):
        found = []
        items.channel_item.py_func(item, np.empty((2, 1, channels)), finish, (found,))
        assert len(found) == 1 and found[0][1] > found[0][0]
        merged += range(*found[0])
    assert merged == list(range(channels))


# reduction items that hold whole channels: rows of one chunk (one tile, several: 1000 x 300
# and 1024 x 1024 have two); planes of one segment a channel, which are not finished in their
# items (an item a channel); and SHAPES, where most do not
WHOLE = [(256, 40, 1), (1000, 300, 1), (1024, 1024, 1), (3, 5, 300), (1, 2, 4096)]


@pytest.mark.parametrize("shape", WHOLE + SHAPES)
def test_items_that_hold_whole_channels_finish_them_as_channel_items_do(rng, shape):
    """Where every reduction item reads all of its channels' values (items.whole_channels), the
    training forward and the backward finish each channel in the item that reduced it (no
    channel items of their own): each channel in exactly one item, the one that wrote its
    partial, and the same statistics and sums as the drivers that merge in channel items."""
    plan, memory = _plan(shape), items.memory_of(shape[0], shape[2])
    whole = items.whole_channels(shape[0], shape[2])
    assert whole == (plan["parts"] == 1 and memory == items.MEMORY_ROWS)
    if whole:
        x = random_batch(rng, shape, np.float64)
        finished = []
        for item in range(plan["reduce_items"]):
            part = np.full((3, 1, shape[1]), np.nan)
            items.ITEMS[memory]["stats_item"](x.reshape(-1), shape, item, part,
                                              np.empty(items.ITEM_SCRATCH_SHAPE))  # fmt: skip
            c0, c1 = items.ITEMS[memory]["item_channels"](shape, item)
            assert c1 > c0
            assert np.flatnonzero(~np.isnan(part[0, 0])).tolist() == list(range(c0, c1))
            finished += range(c0, c1)
        assert sorted(finished) == list(range(shape[1]))
    # the training forward's statistics and the backward's sums, bit for bit those of the
    # reduction items merged in channel items (the other drivers' way), on both twins
    x, dy = random_batch(rng, shape, np.float64), random_batch(rng, shape, np.float64)
    channels, none, count = shape[1], np.empty(0), float(shape[0] * shape[2])
    stats, sums = np.empty((3, plan["parts"], channels)), np.empty((2, plan["parts"], channels))
    expected = [np.empty(channels) for _ in range(5)]  # mean, invstd, m2, sum_dy, sum_dy_xmu
    coef = np.empty((AFFINE_ROWS, channels))
    for item in range(plan["reduce_items"]):
        items.ITEMS[memory]["stats_item"](x.reshape(-1), shape, item, stats,
                                          np.empty(items.ITEM_SCRATCH_SHAPE))  # fmt: skip
    for item in range(items.channel_items(channels)):
        items.channel_item(
            item, stats, train_channels, (count, 1e-5, none, none, coef, *expected[:3])
        )
    for item in range(plan["reduce_items"]):
        items.ITEMS[memory]["sums_item"](dy.reshape(-1), x.reshape(-1), shape, item, expected[0],
                                         sums, np.empty(items.ITEM_SCRATCH_SHAPE))  # fmt: skip
    coef = np.empty((DX_ROWS, channels))
    for item in range(items.channel_items(channels)):
        items.channel_item(
            item, sums, dx_channels, (count, expected[0], expected[1], none, coef, *expected[3:])
        )
    for twin in (0, 1):
        got = [np.full(channels, np.nan) for _ in range(5)]
        y, dx = np.full(shape, np.nan), np.full(shape, np.nan)
        drivers.driver("forward_train_split", memory)[twin](
            x, none, none, 1e-5, none, none, 0.1, True, False, y, *got[:3], x, np.empty((2, 0))
        )  # fmt: skip
        drivers.driver("backward_split", memory)[twin](dy, x, got[0], got[1], none, dx, *got[3:],
                                                        np.empty((2, 0)))  # fmt: skip
        for value, reference in zip(got, expected, strict=True):
            np.testing.assert_array_equal(value, reference)
        assert not np.isnan(y).any() and not np.isnan(dx).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_item_sizes_bound_the_work(shape):
    plan = _plan(shape)
    size = int(np.prod(shape))
    assert plan["reduce_items"] * plan["reduce_item_elements"] >= size
    assert plan["elementwise_items"] * plan["elementwise_item_elements"] >= size


BIG = items.FUSED_SERIAL_MIN_ELEMENTS
LONG = items.FUSED_FORWARD_MIN_INNER
BACKWARD = items.FUSED_BACKWARD_MIN_ELEMENTS


@pytest.mark.parametrize("outer, channels, inner, threads, forward, backward", [
    (3, 4, LONG, 2, True, False), (3, 4, LONG - 1, 2, False, False),
    (BACKWARD // (4 * LONG), 4, LONG, 2, True, True),
    (BACKWARD // (4 * LONG), 4, LONG - 1, 2, False, False),  # one value short of BACKWARD
    (BACKWARD // 400 + 1, 4, 100, 2, False, True), (BACKWARD // 300, 3, 100, 2, False, False),
    (3, 8, 1, 2, False, False), (3, 1, LONG, 1, False, False), (3, 2, LONG, 1, False, False),
    (-(-BIG // (2 * LONG)), 2, LONG, 1, True, True),
    (BIG // (2 * LONG) - 1, 2, LONG, 1, False, False), (-(-BIG // 10), 2, 5, 1, False, False),
    (BIG // 10, 2, 5, 1, False, False), (-(-BIG // 32), 2, 16, 1, False, True),
    (-(-BACKWARD // 16), 4, 4, 2, False, False), (-(-BIG // 8), 2, 4, 1, False, False),  # short
])  # fmt: skip
def test_plan_and_the_jit_backend_share_the_fused_rules(outer, channels, inner, threads,
                                                          forward, backward):  # fmt: skip
    """Fused with a channel or more per thread, twice over: the forward on long planes, the
    backward on big inputs of planes that are not short; one thread only for bigger ones (the
    JIT backend asks is_fused, the C shim plan())."""
    size = outer * channels * inner
    assert items.is_fused(channels, inner, threads, size, True) is forward
    assert items.is_fused(channels, inner, threads, size, False) is backward
    plan = _plan((outer, channels, inner), threads)
    assert (plan["fused_forward"], plan["fused_backward"]) == (int(forward), int(backward))


def _two_threads(monkeypatch):
    """The thread count the backend asks (cpu.num_threads) says 2, and the serial bounds are
    those of NUMBA_NUM_THREADS=2 also where it is 1 (where only 1 thread is ever allowed and
    everything runs serial)."""
    import numba

    from numba_bn import cpu

    monkeypatch.setattr(cpu, "num_threads", lambda: 2)
    monkeypatch.setattr(cpu, "expected_layer", lambda: "omp")  # WAKE_NS, whatever runs here
    monkeypatch.setattr(cpu, "_omp_threads_sleep_here", lambda: False)
    if numba.config.NUMBA_NUM_THREADS < 2:
        bounds = {step: cpu.WAKE_NS / (ns * 0.5) for step, ns in cpu.NS_PER_ELEMENT.items()}
        monkeypatch.setattr(cpu, "_SERIAL_BELOW", bounds)


def test_the_cost_model_runs_small_inputs_serial_and_large_ones_on_every_thread(monkeypatch):
    from numba_bn import cpu

    _two_threads(monkeypatch)
    for step, ns in cpu.NS_PER_ELEMENT.items():
        assert cpu.threads_for(step, 64 * 32) == 1, step  # an MLP batch: never worth a wake-up
        assert cpu.threads_for(step, cpu.parallel_min_elements()) == 2, step
        pays = cpu.WAKE_NS / (ns * 0.5)  # with 2 threads, half the work is saved
        assert (
            cpu.threads_for(step, int(pays) - 1) == 1 and cpu.threads_for(step, int(pays) + 1) == 2
        )
    monkeypatch.setattr(cpu, "num_threads", lambda: 1)
    assert cpu.threads_for("forward_train", 10**8) == 1


def test_a_launch_is_priced_by_how_the_layers_threads_wait(monkeypatch):
    """OpenMP's threads spin after a launch (WAKE_NS), TBB's wake later, the workqueue's sleep,
    as OpenMP's do with OMP_WAIT_POLICY=passive or GOMP_SPINCOUNT=0: a batch of 200K elements
    that repays a wake-up of OpenMP's spinning pool runs serial on a sleeping one (measured
    2-4x faster there, benchmarks/README.md), and a layer not chosen yet is priced as the
    least."""
    from numba_bn import cpu

    spinning, passive, no_spin = {}, {"OMP_WAIT_POLICY": " Passive"}, {"GOMP_SPINCOUNT": "0"}
    assert cpu.wake_ns("omp", spinning) == cpu.WAKE_NS
    assert cpu.wake_ns("omp", {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "300000"}) == (
        cpu.WAKE_NS
    )
    assert cpu.wake_ns("omp", passive) == cpu.wake_ns("omp", no_spin) == cpu.WAKE_NS_OMP_SLEEPING
    for layer in ("tbb", "workqueue", None):  # OpenMP's variables are OpenMP's alone
        assert cpu.wake_ns(layer, passive) == cpu.wake_ns(layer, spinning)
    assert cpu.wake_ns(None, spinning) == cpu.WAKE_NS
    assert cpu.WAKE_NS < cpu.wake_ns("tbb") < cpu.WAKE_NS_OMP_SLEEPING < cpu.wake_ns("workqueue")
    # every price at least WAKE_NS: the sizes below _SERIAL_BELOW are serial on any layer
    assert min(cpu.WAKE_NS_BY_LAYER.values()) == cpu.WAKE_NS

    _two_threads(monkeypatch)
    size = 200_000
    cases = [("omp", {}, 2), ("tbb", {}, 2), ("workqueue", {}, 1), ("omp", passive, 1),
             ("omp", no_spin, 1), (None, passive, 2)]  # fmt: skip
    for layer, env, threads in cases:
        monkeypatch.setattr(cpu, "expected_layer", lambda layer=layer: layer)
        monkeypatch.setattr(
            cpu, "_omp_threads_sleep_here", lambda env=env: cpu.omp_threads_sleep(env)
        )
        assert cpu.threads_for("forward_train", size) == threads, (layer, env)
        least = cpu.parallel_min_elements()
        assert all(cpu.threads_for(step, least) == 2 for step in cpu.NS_PER_ELEMENT), layer
        assert least > size or threads == 2


def test_the_layer_launches_will_run_on_is_numbas_choice_or_the_one_configured(monkeypatch):
    import numba

    from numba_bn.cpu import threads

    monkeypatch.setattr(threads, "threading_layer", lambda: None)  # not chosen yet
    cases = [("workqueue", "workqueue"), ("OMP", "omp"), ("tbb", "tbb"), ("default", None),
             ("forksafe", None), ("safe", None)]  # fmt: skip
    for configured, expected in cases:
        monkeypatch.setattr(numba.config, "THREADING_LAYER", configured)
        assert threads.expected_layer() == expected, configured
    monkeypatch.setattr(threads, "threading_layer", lambda: "omp")  # Numba's choice wins
    assert threads.expected_layer() == "omp"


def test_sizes_serial_at_every_thread_count_skip_asking_for_the_threads(monkeypatch):
    """Below WAKE_NS / (ns * (1 - 1 / NUMBA_NUM_THREADS)) no thread count numba.set_num_threads
    allows repays a wake-up: the answer is 1 without asking the thread count, and _plan keeps
    it (a (64, 256) backward asked at every call before)."""
    import numba

    from numba_bn import cpu

    most = numba.config.NUMBA_NUM_THREADS

    def asked():
        raise AssertionError("the thread count was asked")

    monkeypatch.setattr(cpu, "num_threads", asked)
    monkeypatch.setattr(cpu, "_PLANS", {})
    for step, ns in cpu.NS_PER_ELEMENT.items():
        below = 10**12 if most == 1 else int(cpu.WAKE_NS / (ns * (1 - 1 / most)))
        assert cpu.threads_for(step, below - 1) == 1, step
    if most == 2:  # this project's machines: (64, 256) is below the backward's bound
        x = np.empty((64, 256, 1), np.float32)
        _serial_twins_run(x)
        plan = cpu._plan("backward", x, may_fuse=True)
        assert cpu._PLANS["backward", x.shape, x.dtype, True, 0] is plan


def _serial_twins_run(x):
    """forward_eval and backward run once on a batch like the canonical view ``x``: their serial
    twins then have machine code for x's dtype, which a plan calls (drivers.machine_code; a plan
    made before there is some is not kept)."""
    import numba_bn as nbn

    channels = np.ones(x.shape[1], x.dtype)
    batch = np.ones(x.shape, x.dtype)
    nbn.forward_eval(batch, channels, channels)
    nbn.backward(batch, batch, channels, channels)


def _runs(plan):
    """What a plan's run calls: the parallel twin in its launch guard, or the serial twin's
    machine code behind the suite's check (drivers.CHECK_CALLS), is its ``__wrapped__``."""
    return getattr(plan[0], "__wrapped__", plan[0])


def test_the_backend_remembers_plans_and_the_thread_counts_they_were_made_for(monkeypatch):
    """A small input's plan is kept under its shape (its twin is serial at any thread count); a
    large one's under its shape by the thread count, asked at each call, so that
    numba.set_num_threads takes effect. A parallel plan calls the parallel twin as it is on a
    threading layer safe from several threads, in its launch guard on workqueue; one made before
    numba chose the layer is guarded and not kept."""
    from numba_bn import cpu
    from numba_bn.cpu import drivers, threads

    monkeypatch.setattr(cpu, "_PLANS", {})
    _two_threads(monkeypatch)
    small = np.empty((64, 32, 1), np.float32)
    # (past the sizes whose plans race the twins: numba_bn/cpu/race.py)
    large = np.empty((THREADS_RACE_BOUNDS * cpu.parallel_min_elements(), 1, 1), np.float32)
    serial_twin = drivers.driver("forward_eval", items.MEMORY_ROWS)[1]
    parallel_twin = drivers.driver("forward_eval", items.MEMORY_ROWS)[0]
    _serial_twins_run(small)
    monkeypatch.setattr(cpu, "_PLANS", {})
    monkeypatch.setattr(threads, "_safe_layer", None)
    monkeypatch.setattr(threads, "threading_layer", lambda: None)  # not chosen yet
    assert _runs(cpu._plan("forward_eval", small)) is serial_twin
    assert cpu._plan("forward_eval", large)[0].__wrapped__ is parallel_twin  # in its guard
    assert list(cpu._PLANS) == [("forward_eval", small.shape, small.dtype, False, 0)]
    monkeypatch.setattr(threads, "threading_layer", lambda: "workqueue")
    assert cpu._plan("forward_eval", large)[0].__wrapped__ is parallel_twin
    monkeypatch.setattr(cpu, "_PLANS", {})
    monkeypatch.setattr(threads, "_safe_layer", None)
    monkeypatch.setattr(threads, "threading_layer", lambda: "omp")
    small_plan, parallel_plan = cpu._plan("forward_eval", small), cpu._plan("forward_eval", large)
    assert _runs(small_plan) is serial_twin
    assert parallel_plan[0] is parallel_twin  # as it is
    assert cpu._PLANS == {
        ("forward_eval", small.shape, small.dtype, False, 0): small_plan,
        ("forward_eval", large.shape, large.dtype, False, 0): {2: parallel_plan},
    }
    assert cpu._plan("forward_eval", small) is small_plan  # from the dict
    assert cpu._plan("forward_eval", large) is parallel_plan  # from the dict
    monkeypatch.setattr(cpu, "num_threads", lambda: 1)
    assert _runs(cpu._plan("forward_eval", large)) is serial_twin
    monkeypatch.setattr(cpu, "num_threads", lambda: 2)
    assert cpu._plan("forward_eval", large) is parallel_plan
    for shape in [(2, 8, 5), (2, 1, 5)]:  # the partition is kept too: split, as one thread
        x = np.empty(shape, np.float32)  # runs inputs this small (items.is_fused)
        _serial_twins_run(x)
        assert cpu._plan("backward", x, may_fuse=True)[1] is False
        plan = cpu._PLANS["backward", shape, x.dtype, True, 0]
        assert cpu._plan("backward", x, may_fuse=True) is plan
        assert cpu._plan("backward", x, may_fuse=False)[1] is False
