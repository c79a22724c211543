"""BatchNorm's plans (numba_bn/plans.py): a batch like the last one skips the argument checks,
with the general path's bits, and anything reassigned on the layer takes effect at once."""

import pickle
import threading

import numba
import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import layer, ops, plans

import naive
from conftest import random_batch

# rows, planes, channels-last, and a parallel-sized batch (the backend picks its threads per call)
SHAPES = [((64, 32), 1), ((8, 16, 8, 8), 1), ((4, 3, 3, 8), -1), ((256, 512), 1)]


def _unplanned(bn, x, **keywords):
    """bn(x) through the general path: the plans it made are forgotten first."""
    bn._plans.clear()
    return bn(x, **keywords)


def _same(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype and a.shape == b.shape


def _same_state(planned, general):
    for name in ("running_mean", "running_var", "grad_weight", "grad_bias"):
        _same(getattr(planned, name), getattr(general, name))
    assert planned.num_batches_tracked == general.num_batches_tracked


def _steps(rng, shape, axis, dtype, count=3):
    return [(random_batch(rng, shape, dtype, axis=axis), random_batch(rng, shape, dtype, axis=axis))
            for _ in range(count)]  # fmt: skip


@pytest.mark.parametrize("shape, axis", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention, affine", [("torch", True), ("keras", False)])
def test_planned_steps_give_the_general_paths_bits(rng, shape, axis, dtype, convention, affine):
    def make_layer():
        bn = nbn.BatchNorm(shape[axis], axis=axis, dtype=dtype, convention=convention,
                           affine=affine)  # fmt: skip
        if affine:
            bn.weight[:] = rng.uniform(0.5, 2.0, shape[axis])
            bn.bias[:] = rng.uniform(-1.0, 1.0, shape[axis])
        return bn

    planned, general = make_layer(), make_layer()
    general.weight, general.bias = planned.weight, planned.bias
    for x, dy in _steps(rng, shape, axis, dtype):
        y = planned(x)
        _same(y, _unplanned(general, x))
        dx = planned.backward(dy)
        _same(dx, general.backward(dy))
        _same_state(planned, general)
    assert planned._saved is None and planned._plans, "the steps after the first had a plan"
    # the last step against float64 loops (tests/naive.py)
    weight = planned.weight.astype(np.float64) if affine else None
    bias = planned.bias.astype(np.float64) if affine else None
    tolerance = {"rtol": 1e-4, "atol": 1e-4}
    if dtype == np.float64:
        tolerance = {"rtol": 1e-9, "atol": 1e-11}
    expected_y = naive.forward_train(x, weight, bias, planned.eps, axis)[0]
    np.testing.assert_allclose(y, expected_y, **tolerance)
    expected_dx, expected_dw, expected_db = naive.backward(dy, x, weight, planned.eps, axis)
    np.testing.assert_allclose(dx, expected_dx, **tolerance)
    if affine:
        np.testing.assert_allclose(planned.grad_weight, expected_dw, **tolerance)
        np.testing.assert_allclose(planned.grad_bias, expected_db, **tolerance)
    planned.eval(), general.eval()
    for x, _ in _steps(rng, shape, axis, dtype, 2):
        _same(planned(x), _unplanned(general, x))


@pytest.mark.parametrize("shape, axis", SHAPES[:3])
@pytest.mark.parametrize("activation, residual", [(None, True), ("relu", False), ("relu", True)])
def test_planned_fused_steps_give_the_general_paths_bits(rng, shape, axis, activation, residual):
    planned, general = (nbn.BatchNorm(shape[axis], axis=axis, activation=activation)
                        for _ in range(2))  # fmt: skip
    for x, dy in _steps(rng, shape, axis, np.float32, 4):
        z = random_batch(rng, shape, np.float32, axis=axis) if residual else None
        y = planned(x, residual=z)
        _same(y, _unplanned(general, x, residual=z))
        _same(planned.backward(dy), general.backward(dy))
        _same_state(planned, general)
        _same(planned.grad_residual, general.grad_residual)
    if activation == "relu":
        assert (y >= 0).all()
    if residual:  # dy through the ReLU (where y > 0), or dy itself
        np.testing.assert_array_equal(planned.grad_residual, np.where(y > 0, dy, 0) if activation
                                      else dy)  # fmt: skip
    planned.eval(), general.eval()
    for x, _ in _steps(rng, shape, axis, np.float32, 2):
        z = random_batch(rng, shape, np.float32, axis=axis) if residual else None
        _same(planned(x, residual=z), _unplanned(general, x, residual=z))


@pytest.mark.parametrize("activation, residual", [(None, False), ("relu", True)])
def test_a_batch_like_the_last_skips_the_general_path(rng, monkeypatch, activation, residual):
    bn = nbn.BatchNorm(32, activation=activation)
    x, dy = random_batch(rng, (64, 32), np.float32), random_batch(rng, (64, 32), np.float32)
    z = random_batch(rng, (64, 32), np.float32) if residual else None
    bn(x, residual=z), bn.backward(dy)
    bn.eval()
    bn(x, residual=z)
    bn.train()

    def general(*args, **keywords):
        raise AssertionError("the general path ran again")

    monkeypatch.setattr(nbn.BatchNorm, "_forward", general)
    monkeypatch.setattr(ops, "plain_batch_backward", general)
    monkeypatch.setattr(layer, "batch_backward", general)
    for _ in range(3):
        bn(x + 1.0, residual=z), bn.backward(dy)
    bn.eval()
    bn(x, residual=z)


def _general_path_raises(monkeypatch):
    def general(*args, **keywords):
        raise AssertionError("the general path ran again")

    monkeypatch.setattr(nbn.BatchNorm, "_forward", general)
    monkeypatch.setattr(ops, "plain_batch_backward", general)
    monkeypatch.setattr(layer, "batch_backward", general)


@pytest.mark.parametrize("shape, axis", SHAPES[:3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planned_steps_with_out_write_the_general_paths_bits_into_it(
    rng, monkeypatch, shape, axis, dtype
):
    """bn(x, out=y) and bn.backward(dy, out=dx) (dy itself too: in place), and an eval's
    bn(x, out=x), take the plans once a front serves the shape, and write the bits of a layer
    without plans into out. (Before stop 69 every call with out= took the general path, ~5 us
    more a small call; an eval into x itself before stop 70.)"""
    planned, general = (nbn.BatchNorm(shape[axis], axis=axis, dtype=dtype) for _ in range(2))
    planned.weight[:] = general.weight[:] = rng.uniform(0.5, 2.0, shape[axis])

    def step(x, dy, in_place, only_plans):
        y_out = np.full_like(x, np.nan)
        dx_out = dy.copy() if in_place else np.full_like(x, np.nan)
        with monkeypatch.context() as patched:
            if only_plans:
                _general_path_raises(patched)
            assert planned(x, out=y_out) is y_out
            assert planned.backward(dx_out if in_place else dy, out=dx_out) is dx_out
        _same(y_out, _unplanned(general, x))
        _same(dx_out, general.backward(dy))
        _same_state(planned, general)

    for n, (x, dy) in enumerate(_steps(rng, shape, axis, dtype, 6)):
        step(x, dy, n % 2, n >= 4)
    planned.eval(), general.eval()
    for n, (x, _) in enumerate(_steps(rng, shape, axis, dtype, 5)):
        in_place = n >= 3  # inference into x itself (its own memory: no x left for a backward)
        y_out = x.copy() if in_place else np.full_like(x, np.nan)
        with monkeypatch.context() as patched:
            if n:
                _general_path_raises(patched)
            assert planned(y_out if in_place else x, out=y_out) is y_out
        _same(y_out, _unplanned(general, x))
        assert (planned._saved.x is None) is in_place


def _outcome(call):
    """A call's array (copied), or its exception's type and message."""
    try:
        return np.array(call(), copy=True)
    except Exception as error:  # noqa: BLE001 - compared, not swallowed
        return type(error), str(error)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["x itself", "overlapping x", "Fortran-ordered", "read-only",
                                  "float64", "another shape"])  # fmt: skip
def test_an_out_the_plans_do_not_take_has_the_general_paths_outcome(rng, kind, training):
    """An out= the plans leave to the general path (sharing memory with x, or one a front
    declines): the same result, or the same error, and the same state as a layer without
    plans; and an eval forward into x itself leaves no x for a backward."""
    planned, general = nbn.BatchNorm(8), nbn.BatchNorm(8)
    x, dy = (random_batch(rng, (32, 8), np.float32) for _ in range(2))
    for _ in range(3):  # the plan, then its front
        planned(x), planned.backward(dy)
        _unplanned(general, x), general.backward(dy)
    if not training:
        planned.eval(), general.eval()
        planned(x), _unplanned(general, x)

    def out_for(given):
        if kind in ("x itself", "overlapping x"):
            buffer = np.empty(given.size + 8, given.dtype)
            inside = buffer[: given.size].reshape(given.shape)
            inside[...] = given
            return inside, inside if kind == "x itself" else buffer[8:].reshape(given.shape)
        out = {"Fortran-ordered": lambda: np.asfortranarray(np.empty_like(given)),
               "read-only": lambda: np.empty_like(given), "float64": lambda: given.astype(float),
               "another shape": lambda: np.empty((8, 32), given.dtype)}[kind]()  # fmt: skip
        out.flags.writeable = kind != "read-only"
        return given.copy(), out

    results = []
    for bn, call in ((planned, lambda a, o: planned(a, out=o)),
                     (general, lambda a, o: _unplanned(general, a, out=o))):  # fmt: skip
        results.append(_outcome(lambda call=call: call(*out_for(x))))
        if training and not isinstance(results[-1][0], type):
            results.append(_outcome(lambda bn=bn: bn.backward(dy)))
    half = len(results) // 2
    for a, b in zip(results[:half], results[half:], strict=True):
        if isinstance(a[0], type):
            assert a == b
        else:
            _same(a, b)
    _same_state(planned, general)
    if kind == "x itself" and not training:
        with pytest.raises(RuntimeError, match="needs a forward call first|overwrote"):
            planned.backward(dy)


def test_an_eval_with_batch_statistics_into_x_itself_raises_as_without_plans(rng):
    """track_running_stats=False: an eval normalises with the batch's statistics, which its
    backward needs x for; into x itself, the plans leave it to the general path's error, and x
    is as it was."""
    bn = nbn.BatchNorm(8, track_running_stats=False).eval()
    x = random_batch(rng, (32, 8), np.float32)
    for _ in range(3):  # the plan, then its front
        bn(x)
    given = x.copy()
    with pytest.raises(ValueError, match="out shares memory with x"):
        bn(given, out=given)
    np.testing.assert_array_equal(given, x)


def _changed(bn, change, rng):
    channels = bn.num_features
    if change == "weight":
        bn.weight = rng.uniform(0.5, 2.0, channels).astype(bn.dtype)
    elif change == "bias":
        bn.bias = rng.uniform(-1.0, 1.0, channels).astype(bn.dtype)
    elif change == "running buffers":
        bn.running_mean = rng.uniform(-1.0, 1.0, channels).astype(bn.dtype)
        bn.running_var = rng.uniform(0.5, 2.0, channels).astype(bn.dtype)
    elif change == "eps":
        bn.eps = 0.25
    elif change == "momentum":
        bn.momentum = 0.5
    elif change == "momentum None":
        bn.momentum = None
    elif change == "no running statistics":
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = None
    elif change == "activation":
        bn.activation = "relu"
    elif change == "axis":
        bn.axis = -1


@pytest.mark.parametrize("change", [
    "weight", "bias", "running buffers", "eps", "momentum", "momentum None",
    "no running statistics", "activation", "axis",
])  # fmt: skip
@pytest.mark.parametrize("training", [True, False])
def test_what_is_reassigned_on_the_layer_takes_effect_at_once(rng, change, training):
    shape = (16, 8, 8)
    planned, general = nbn.BatchNorm(8), nbn.BatchNorm(8)
    x = random_batch(rng, shape, np.float32)
    dy = random_batch(rng, shape, np.float32)
    for bn in (planned, general):
        bn.train(training)
        bn(x), bn(x)  # the planned one has its plan
    assert planned._plans
    _changed(planned, change, np.random.default_rng(5))
    _changed(general, change, np.random.default_rng(5))
    for _ in range(2):
        _same(planned(x), _unplanned(general, x))
        if training:
            _same(planned.backward(dy), general.backward(dy))
        _same_state(planned, general)
    if change == "momentum None" and training:  # no plan takes it: the old one is forgotten
        assert not planned._plans


def test_a_weight_replaced_between_forward_and_backward_is_the_one_backward_uses(rng):
    planned, general = nbn.BatchNorm(8), nbn.BatchNorm(8)
    x, dy = random_batch(rng, (32, 8), np.float32), random_batch(rng, (32, 8), np.float32)
    planned(x), planned.backward(dy), planned(x)
    _unplanned(general, x), general.backward(dy), _unplanned(general, x)
    weight = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    planned.weight, general.weight = weight, weight.copy()
    _same(planned.backward(dy), general.backward(dy))
    _same_state(planned, general)


def test_a_running_buffer_made_read_only_still_raises_and_changes_nothing(rng):
    bn = nbn.BatchNorm(8)
    x = random_batch(rng, (32, 8), np.float32)
    bn(x), bn(x)
    before = bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked
    bn.running_var.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        bn(x)
    _same(bn.running_mean, before[0])
    _same(bn.running_var, before[1])
    assert bn.num_batches_tracked == before[2]


def test_a_negative_running_variance_written_in_place_still_raises_in_eval(rng):
    bn = nbn.BatchNorm(8).eval()
    x = random_batch(rng, (32, 8), np.float32)
    bn(x), bn(x)
    bn.running_var[3] = -1.0
    with pytest.raises(ValueError, match="running_var"):
        bn(x)


@pytest.mark.parametrize("kind", ["transposed", "float64", "memoryview"])
def test_inputs_a_plan_does_not_take_go_the_general_way(rng, kind):
    planned, general = nbn.BatchNorm(8), nbn.BatchNorm(8)
    x = random_batch(rng, (32, 8), np.float32)
    planned(x), planned(x)
    _unplanned(general, x), _unplanned(general, x)
    other = {"transposed": np.asfortranarray(x), "float64": x.astype(np.float64),
             "memoryview": memoryview(x)}[kind]  # fmt: skip
    if kind == "float64":  # a float32 layer refuses it, plan or not
        with pytest.raises(TypeError, match="dtype"):
            planned(other)
        return
    _same(planned(other), _unplanned(general, other))
    _same_state(planned, general)


@pytest.mark.parametrize("kind", ["Fortran-ordered", "strided"])
def test_a_dy_the_kernels_do_not_take_as_it_is_goes_the_general_way(rng, kind):
    """A planned forward's backward of a dy that is not C-contiguous: the general path copies
    it (the front and the plan's kernel call decline it), with the bits of a layer without
    plans."""
    planned, general = nbn.BatchNorm(8), nbn.BatchNorm(8)
    x, dy = (random_batch(rng, (32, 8), np.float32) for _ in range(2))
    other = np.asfortranarray(dy) if kind == "Fortran-ordered" else np.repeat(dy, 2, 1)[:, ::2]
    for _ in range(3):  # the plan, then its front, each step
        planned(x), planned.backward(dy)
        _unplanned(general, x), general.backward(dy)
    planned(x), _unplanned(general, x)
    _same(planned.backward(other), general.backward(other))
    _same_state(planned, general)


def test_plans_are_few_and_stay_out_of_pickles(rng):
    bn = nbn.BatchNorm(4)
    for n in range(2, 3 + 2 * plans.MOST_PLANS):
        bn(random_batch(rng, (n, 4), np.float32))
    assert 0 < len(bn._plans) <= plans.MOST_PLANS
    copy = pickle.loads(pickle.dumps(bn))
    assert copy._plans == {}
    x = random_batch(rng, (6, 4), np.float32)
    _same(copy(x), bn(x))
    _same(copy(x), bn(x))


def test_what_a_plan_depends_on_is_the_layers_own_and_assigning_it_moves_the_version(rng):
    # plans.Watched leaves reads to the instance's dict: a watched name a layer did not set
    # itself would read as the descriptor
    layers = [nbn.BatchNorm(4), nbn.BatchNorm(4, affine=False, track_running_stats=False,
                                              virtual_batch_size=2, activation="relu")]  # fmt: skip
    layers += [pickle.loads(pickle.dumps(bn)) for bn in layers]

    class Slower(nbn.BatchNorm):  # a class attribute of a watched name: watched all the same
        momentum = 0.01

    layers.append(Slower(4))
    for bn in layers:
        for name in plans.WATCHED:
            assert name in vars(bn), name
            version = bn._version
            setattr(bn, name, getattr(bn, name))  # the same value: a plan is made again
            assert bn._version == version + 1, name


def test_a_thread_count_changed_between_planned_calls_gives_the_same_bits(rng):
    x, dy = random_batch(rng, (256, 512), np.float32), random_batch(rng, (256, 512), np.float32)
    results = []
    for threads in (numba.config.NUMBA_NUM_THREADS, 1, numba.config.NUMBA_NUM_THREADS):
        bn = nbn.BatchNorm(512)
        bn(x), bn.backward(dy)
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            results.append((bn(x), bn.backward(dy), bn.grad_weight, bn.running_var.copy()))
        finally:
            numba.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            _same(a, b)


def test_one_layer_evaluates_batches_from_several_threads_at_once(rng):
    """An eval plan keeps no buffers (numba_bn/plans.py): four threads, serial and parallel
    sizes (a parallel twin releases the GIL while its threads run), the bits of one thread."""
    bn = nbn.BatchNorm(8)
    inputs = [random_batch(rng, shape, np.float32) for shape in ((16, 8), (4, 8, 5, 5),
                                                                 (512, 8, 64))]  # fmt: skip
    for x in inputs:
        bn(x), bn(x)  # running statistics that are not the initial ones
    bn.eval()
    expected = [bn(x) for x in inputs]
    failures = []

    def work(worker):
        for call in range(30):
            k = (worker + call) % len(inputs)
            if not np.array_equal(bn(inputs[k]), expected[k]):
                failures.append((worker, call, k))

    pool = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not failures
    evaluating = [plan for (_, training), plan in bn._plans.items() if not training]
    assert len(evaluating) == 3 and not any(plan.statistics for plan in evaluating)
