"""The fronts (numba_bn/cpu/fronts.py): a plain call like one before, checked and viewed in
compiled code in front of the machine code of the driver its plan runs (the serial twin, or the
parallel one at sizes for threads).

A front must give the plain path's bits (the same driver on the same views), serve only what
the plain path would serve, and send anything else back to it, so that the errors and
conversions are the same as without fronts. References: the float64 loops of tests/naive.py
and the plain path's own results.
"""

import re
import sys
import threading

import numba
import numpy as np
import pytest
from numba.core.runtime import _nrt_python as nrt_stats
from numba.core.runtime import nrt

import numba_bn as nbn
from numba_bn import cpu, hostcall, ops
from numba_bn.cpu import CpuBackend, drivers, fronts, partitions

import naive
from conftest import LAYOUTS, random_batch, run_child

#: The plain calls a front takes the place of, by step.
PLAIN = {"forward_train": "plain_batch_forward", "forward_eval": "plain_frozen_forward",
         "backward": "plain_batch_backward"}  # fmt: skip


@pytest.fixture(autouse=True)
def no_addresses():
    """Each test learns its own."""
    fronts.forget()
    yield
    fronts.forget()


def _only_fronts(monkeypatch):
    """From now on a plain call that no front serves fails the test."""

    def refused(*args, **kwargs):
        raise AssertionError("the plain path ran where a front should serve")

    for name in PLAIN.values():
        monkeypatch.setattr(ops, name, refused)


def _inputs(rng, shape, axis, dtype):
    channels = shape[axis]
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = random_batch(rng, shape, dtype, mean_scale=1.0, axis=axis)
    weight = rng.uniform(0.5, 2, channels).astype(dtype)
    bias = rng.uniform(-1, 1, channels).astype(dtype)
    running_mean = rng.standard_normal(channels).astype(dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(dtype)
    return x, dy, weight, bias, running_mean, running_var


def _calls(x, dy, weight, bias, running_mean, running_var, axis):
    """The three calls a front serves, each returning a tuple of arrays."""
    saved = nbn.forward_train(x, weight, bias, axis=axis)

    def batch_norm(unbiased):  # buffers updated in place: each call from the same ones
        buffers = running_mean.copy(), running_var.copy()
        y = nbn.batch_norm(x, *buffers, weight, bias, training=True, momentum=0.25, axis=axis,
                           unbiased_running_var=unbiased)  # fmt: skip
        return y, *buffers

    return {
        "forward_train": lambda: nbn.forward_train(x, weight, bias, axis=axis),
        "batch_norm": lambda: batch_norm(True),
        "batch_norm, biased": lambda: batch_norm(False),
        "forward_eval": lambda: (
            nbn.forward_eval(x, running_mean, running_var, weight, bias, axis=axis),
        ),  # fmt: skip
        "backward": lambda: nbn.backward(dy, x, saved[1], saved[2], weight, axis=axis),
    }


def _same(got, want):
    for a, b in zip(got, want, strict=True):
        assert type(a) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


#: Batches the cost model runs on threads in every step (above 4x the serial bounds of 2
#: threads: no threads race) in rows, planes and channels-last; the tests that take them turn
#: the races off (:func:`_no_races`), whose plans a front waits for.
PARALLEL = [((4096, 128), 1, np.float32), ((16, 32, 16, 16), 1, np.float64),
            ((32, 8, 8, 64), -1, np.float32)]  # fmt: skip


def _no_races(monkeypatch):
    """Plans run the rule's twin from their first call on (no race: numba_bn/cpu/race.py)."""
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: no parallel twin runs")
    monkeypatch.setattr(cpu, "_no_races", [True])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_a_front_serves_the_next_call_of_a_shape_with_the_plain_paths_bits(
    rng, monkeypatch, shape, axis, dtype
):
    _serves_with_the_plain_paths_bits(rng, monkeypatch, shape, axis, dtype)


@pytest.mark.parametrize("shape, axis, dtype", PARALLEL)
def test_a_front_at_a_size_for_threads_runs_the_parallel_twin_with_the_plain_paths_bits(
    rng, monkeypatch, shape, axis, dtype
):
    _no_races(monkeypatch)
    found = _serves_with_the_plain_paths_bits(rng, monkeypatch, shape, axis, dtype)
    threads = numba.get_num_threads()
    view = hostcall.canonical_view(np.empty(shape, dtype), axis)
    for step, (address, _, served) in found.items():
        parallel = cpu._driver(step, view, threads, step != "forward_eval")[0]
        assert served == threads and address == drivers.native_address(parallel, view.dtype)


def _serves_with_the_plain_paths_bits(rng, monkeypatch, shape, axis, dtype):
    """The three steps' calls on a batch of ``shape``, through fronts once the plain path ran
    twice: the plain path's bits and the float64 loops' values. Returns what the fronts
    learnt, by step."""
    inputs = _inputs(rng, shape, axis, dtype)
    calls = _calls(*inputs, axis)
    first = {step: call() for step, call in calls.items()}  # compiles, or loads: not kept
    plain = {step: call() for step, call in calls.items()}  # the plain path: a front learns
    assert all(fronts.knows(step, inputs[0], axis) for step in PLAIN)
    _only_fronts(monkeypatch)
    for step, call in calls.items():
        _same(call(), plain[step])
        _same(call(), first[step])
    # against the float64 loops, that the bits are the right ones
    x, dy, weight, bias, running_mean, running_var = inputs
    tol = 2e-5 if dtype == np.float32 else 1e-11
    y, mean, invstd = calls["forward_train"]()
    want_y, want_mean, want_invstd = naive.forward_train(x, weight, bias, axis=axis)
    np.testing.assert_allclose(y, want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(invstd, want_invstd, rtol=tol)
    for unbiased in (True, False):
        y, running_mean_now, running_var_now = calls[
            "batch_norm" if unbiased else "batch_norm, biased"
        ]()
        np.testing.assert_allclose(y, want_y, rtol=tol, atol=tol)
        want_mean, want_var = naive.running_update(running_mean, running_var, x, 0.25, axis=axis,
                                                   unbiased=unbiased)  # fmt: skip
        np.testing.assert_allclose(running_mean_now, want_mean, rtol=tol, atol=tol * 10)
        np.testing.assert_allclose(running_var_now, want_var, rtol=tol)
    (y,) = calls["forward_eval"]()
    want = naive.forward(x, running_mean, running_var, weight, bias, axis=axis)
    np.testing.assert_allclose(y, want, rtol=tol, atol=tol)
    dx, dweight, dbias = calls["backward"]()
    want_dx, want_dw, want_db = naive.backward(dy, x, weight, axis=axis)
    terms = np.abs(dy).sum() * 10  # |x_hat| up to ~10 here
    np.testing.assert_allclose(dx, want_dx, rtol=1e-3 if dtype == np.float32 else 1e-9,
                               atol=tol * np.abs(want_dx).max())  # fmt: skip
    np.testing.assert_allclose(dbias, want_db, rtol=tol, atol=tol * terms)
    np.testing.assert_allclose(dweight, want_dw, rtol=1e-3 if dtype == np.float32 else 1e-9,
                               atol=tol * terms)  # fmt: skip
    return {step: fronts._ADDRESSES[step, shape, axis, np.dtype(dtype)] for step in PLAIN}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_a_front_serves_calls_with_out_writing_the_plain_paths_bits_into_it(
    rng, monkeypatch, shape, axis, dtype
):
    """out= (a caller's array like x, or x or dy itself: in place) takes a front as a call
    without it does, once the plain path ran: it writes the plain path's bits into out and
    returns out. (Before stop 69 such calls took the plain path, 2-4.5 us slower than a call
    without out=.)"""
    x, dy, weight, bias, running_mean, running_var = _inputs(rng, shape, axis, dtype)
    _, mean, invstd = nbn.forward_train(x, weight, bias, axis=axis)

    def calls(into):
        """(name, call) of the calls with out=; ``into(value)``: the out for an x-like input."""

        def batch_norm(a):
            buffers = running_mean.copy(), running_var.copy()
            y = nbn.batch_norm(a, *buffers, weight, bias, training=True, axis=axis, out=into(a))
            return y, *buffers

        return [
            ("forward_train", lambda a: nbn.forward_train(a, weight, bias, axis=axis, out=into(a))),
            ("forward_train", batch_norm),
            (
                "forward_eval",
                lambda a: (
                    nbn.forward_eval(
                        a, running_mean, running_var, weight, bias, axis=axis, out=into(a)
                    ),
                ),
            ),
            (
                "backward",
                lambda a: nbn.backward(a, x, mean, invstd, weight, axis=axis, out=into(a)),
            ),
        ]

    def run(call, step):  # on a copy of x (of dy for the backward), which it may write
        result = call((dy if step == "backward" else x).copy())
        return [np.array(v, copy=True) for v in result], result[0], None

    made = []  # each call's out

    def fresh(a):  # poisoned
        made.append(np.full_like(a, np.nan))
        return made[-1]

    def in_place(a):
        made.append(a)
        return a

    for into in (fresh, in_place):
        with monkeypatch.context() as patched:
            patched.setattr(fronts, "learn", lambda *args: None)
            fronts.forget()
            want = [run(call, step)[0] for step, call in calls(into)]  # the plain path's
        for step, call in calls(into) * 2:
            run(call, step)  # the plain path: a front learns
            assert fronts.knows(step, x, axis)
        with monkeypatch.context() as patched:
            _only_fronts(patched)
            for (step, call), wanted in zip(calls(into), want, strict=True):
                got, y, _ = run(call, step)
                _same(got, wanted)
                assert y is made[-1]  # out itself


def test_a_parallel_front_serves_the_thread_count_it_was_learnt_on(rng, monkeypatch):
    """numba.set_num_threads picks another plan (here the serial twin's): the front of the
    other count declines, the plain path runs that plan and a front learns it, with the same
    bits (a twin's result does not depend on the threads)."""
    _no_races(monkeypatch)
    threads = numba.get_num_threads()
    x, dy, *_ = _inputs(rng, PARALLEL[0][0], 1, np.float32)
    key = ("backward", x.shape, 1, x.dtype)
    _, mean, invstd = nbn.forward_train(x)
    want = [nbn.backward(dy, x, mean, invstd) for _ in range(2)][-1]
    parallel, _, learnt_on = fronts._ADDRESSES[key]
    assert learnt_on == threads
    try:
        numba.set_num_threads(1)
        assert not fronts.knows("backward", x, 1)
        for _ in range(2):  # the plain path: its plan for one thread, which a front learns
            _same(nbn.backward(dy, x, mean, invstd), want)
        serial, _, learnt_on = fronts._ADDRESSES[key]
        assert learnt_on == 1 and serial != parallel
        with monkeypatch.context() as patched:
            _only_fronts(patched)
            _same(nbn.backward(dy, x, mean, invstd), want)
    finally:
        numba.set_num_threads(threads)
    assert not fronts.knows("backward", x, 1)
    _same(nbn.backward(dy, x, mean, invstd), want)


def _outcome(call):
    """A call's arrays, or its exception's type and message."""
    try:
        result = call()
    except Exception as error:  # noqa: BLE001 - compared, not swallowed
        return type(error), str(error)
    return tuple(np.array(a, copy=True) for a in (result if isinstance(result, tuple) else
                                                  (result,)))  # fmt: skip


def _same_outcome(got, want):
    if isinstance(want[0], type):
        assert got == want
    else:
        _same(got, want)


def _variants(rng, dtype):
    """Calls on a learned shape that a front must not serve as it serves the plain ones: each
    (name, step, call)."""
    shape, axis = (16, 5, 3), 1
    x, dy, weight, bias, running_mean, running_var = _inputs(rng, shape, axis, dtype)
    _, mean, invstd = nbn.forward_train(x, weight, bias)
    other = np.float64 if dtype == np.float32 else np.float32
    strided = np.repeat(weight, 2)[::2]
    negative = running_var.copy()
    negative[-1] = -0.5
    readonly = x.copy()
    readonly.flags.writeable = False
    fortran = np.asfortranarray(x)  # x's shape and values, not C-contiguous: a front declines it
    strided_x = np.repeat(x, 2, axis=-1)[..., ::2]
    frozen = dict(running_mean=running_mean, running_var=running_var)

    def batch_norm(**options):  # from the same buffers each call
        buffers = {"running_mean": running_mean.copy(), "running_var": running_var.copy()}
        if options.pop("readonly", False):
            buffers["running_var"].flags.writeable = False
        buffers.update(options)
        y = nbn.batch_norm(x, weight=weight, bias=bias, training=True, **buffers)
        return y, *(b for b in buffers.values() if isinstance(b, np.ndarray))

    def shifted(values, by=1):
        """An array of values' shape in one buffer with ``values``, ``by`` elements on: they
        overlap without being one view."""
        buffer = np.empty(values.size + by, values.dtype)
        inside = buffer[: values.size].reshape(values.shape)
        inside[...] = values
        return inside, buffer[by:].reshape(values.shape)

    def into(call, *inputs):  # a call given fresh copies of inputs (it may write them)
        return lambda: call(*(value.copy() for value in inputs))

    readonly_out = np.empty_like(x)
    readonly_out.flags.writeable = False
    return [
        (
            "out overlapping x",
            "forward_train",
            lambda: (lambda a, o: nbn.forward_train(a, weight, bias, out=o))(*shifted(x)),
        ),
        (
            "out overlapping x",
            "forward_eval",
            lambda: (lambda a, o: nbn.forward_eval(a, **frozen, out=o))(*shifted(x)),
        ),
        (
            "out overlapping dy",
            "backward",
            lambda: (lambda a, o: nbn.backward(a, x, mean, invstd, out=o))(*shifted(dy, 2)),
        ),
        (
            "out overlapping x",
            "backward",
            lambda: (lambda a, o: nbn.backward(dy, a, mean, invstd, out=o))(*shifted(x, 3)),
        ),
        (
            "out x, in place",
            "forward_train",
            into(lambda a: nbn.forward_train(a, weight, bias, out=a), x),
        ),
        (
            "out x, in place",
            "forward_eval",
            into(lambda a: nbn.forward_eval(a, **frozen, out=a), x),
        ),
        (
            "out dy, in place",
            "backward",
            into(lambda a: nbn.backward(a, x, mean, invstd, out=a), dy),
        ),
        (
            "read-only out",
            "forward_train",
            lambda: nbn.forward_train(x, weight, bias, out=readonly_out),
        ),
        ("read-only out", "backward", lambda: nbn.backward(dy, x, mean, invstd, out=readonly_out)),
        (
            "Fortran-ordered out",
            "forward_eval",
            lambda: nbn.forward_eval(x, **frozen, out=np.asfortranarray(np.empty_like(x))),
        ),
        (
            "out of another dtype",
            "forward_train",
            lambda: nbn.forward_train(x, out=np.empty(x.shape, other)),
        ),
        (
            "out of another shape",
            "backward",
            lambda: nbn.backward(dy, x, mean, invstd, out=np.empty((16, 15), dtype)),
        ),
        ("running buffers", "forward_train", lambda: batch_norm()),
        ("a read-only running_var", "forward_train", lambda: batch_norm(readonly=True)),
        ("one running buffer", "forward_train", lambda: batch_norm(running_var=None)),
        ("momentum 2", "forward_train", lambda: batch_norm(momentum=2.0)),
        ("int momentum", "forward_train", lambda: batch_norm(momentum=1)),
        ("unbiased 1", "forward_train", lambda: batch_norm(unbiased_running_var=1)),
        (
            "short running_mean",
            "forward_train",
            lambda: batch_norm(running_mean=running_mean[:4].copy()),
        ),
        ("long weight", "forward_train", lambda: nbn.forward_train(x, np.ones(6, dtype))),
        (
            "weight of another dtype",
            "forward_train",
            lambda: nbn.forward_train(x, weight.astype(other), bias),
        ),
        ("strided weight", "forward_train", lambda: nbn.forward_train(x, strided, bias)),
        ("2-D weight", "forward_train", lambda: nbn.forward_train(x, weight[None], bias)),
        ("list bias", "forward_train", lambda: nbn.forward_train(x, weight, list(bias))),
        ("eps 0", "forward_train", lambda: nbn.forward_train(x, eps=0.0)),
        ("int eps", "forward_train", lambda: nbn.forward_train(x, eps=1)),
        ("NaN eps", "forward_train", lambda: nbn.forward_train(x, eps=float("nan"))),
        ("axis True", "forward_train", lambda: nbn.forward_train(x, axis=True)),
        ("readonly x", "forward_train", lambda: nbn.forward_train(readonly, weight, bias)),
        ("Fortran-ordered x", "forward_train", lambda: nbn.forward_train(fortran, weight, bias)),
        ("strided x", "forward_train", lambda: nbn.forward_train(strided_x, weight, bias)),
        (
            "Fortran-ordered x",
            "forward_train",
            lambda: nbn.batch_norm(fortran, running_mean.copy(), running_var.copy(), training=True),
        ),
        ("Fortran-ordered x", "forward_eval", lambda: nbn.forward_eval(fortran, **frozen)),
        ("Fortran-ordered x", "backward", lambda: nbn.backward(dy, fortran, mean, invstd)),
        (
            "Fortran-ordered dy",
            "backward",
            lambda: nbn.backward(np.asfortranarray(dy), x, mean, invstd),
        ),
        (
            "negative running_var",
            "forward_eval",
            lambda: nbn.forward_eval(x, running_mean, negative, weight, bias),
        ),
        (
            "short running_mean",
            "forward_eval",
            lambda: nbn.forward_eval(x, running_mean[:4], running_var),
        ),
        (
            "running_var of another dtype",
            "forward_eval",
            lambda: nbn.forward_eval(x, running_mean, running_var.astype(other)),
        ),
        ("negative eps", "forward_eval", lambda: nbn.forward_eval(x, **frozen, eps=-1e-5)),
        ("eps 0", "forward_eval", lambda: nbn.forward_eval(x, **frozen, eps=0.0)),
        (
            "strided running_mean",
            "forward_eval",
            lambda: nbn.forward_eval(x, np.repeat(running_mean, 2)[::2], running_var),
        ),
        (
            "dy of another shape",
            "backward",
            lambda: nbn.backward(dy.reshape(16, 15), x, mean, invstd),
        ),
        (
            "dy of another dtype",
            "backward",
            lambda: nbn.backward(dy.astype(other), x, mean, invstd),
        ),
        (
            "statistics of another dtype",
            "backward",
            lambda: nbn.backward(dy, x, mean.astype(other), invstd.astype(other), weight),
        ),
        ("2-D mean", "backward", lambda: nbn.backward(dy, x, mean[None], invstd)),
        ("short invstd", "backward", lambda: nbn.backward(dy, x, mean, invstd[:4])),
        (
            "strided statistics",
            "backward",
            lambda: nbn.backward(dy, x, np.repeat(mean, 2)[::2], np.repeat(invstd, 2)[::2]),
        ),
        ("readonly dy", "backward", lambda: nbn.backward(readonly, x, mean, invstd)),
    ], x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_what_a_front_does_not_serve_as_plain_has_the_outcome_it_had_without_fronts(
    rng, monkeypatch, dtype
):
    """Errors, conversions and other layouts on a shape a front serves: the same arrays or the
    same error as when no front had learned the shape."""
    variants, x = _variants(rng, dtype)
    fronts.forget()
    with monkeypatch.context() as patched:
        patched.setattr(fronts, "learn", lambda *args: None)
        want = [_outcome(call) for _, _, call in variants]
    assert not fronts._ADDRESSES
    for (name, step, call), outcome in zip(variants, want, strict=True):
        # each step learnt on plain calls of x's shape first
        _, _, weight, bias, running_mean, running_var = _inputs(rng, x.shape, 1, x.dtype)
        for _ in range(2):
            _, mean, invstd = nbn.forward_train(x, weight, bias)
            nbn.forward_eval(x, running_mean, running_var)
            nbn.backward(x, x, mean, invstd)
        assert fronts.knows(step, x, 1), name
        _same_outcome(_outcome(call), outcome)
    for (name, step, _), outcome in zip(variants, want, strict=True):  # the errors are errors
        if name in ("long weight", "short running_mean", "negative running_var", "negative eps",
                    "a read-only running_var", "one running buffer", "momentum 2",
                    "dy of another shape", "2-D weight", "short invstd", "NaN eps",
                    "2-D mean", "out overlapping x", "out overlapping dy", "read-only out",
                    "out of another dtype", "out of another shape",
                    ) or (name, step) == ("eps 0", "forward_train"):  # fmt: skip
            assert isinstance(outcome[0], type), name


def test_partitions_forget_the_addresses(rng):
    x = random_batch(rng, (16, 5, 3), np.float32)
    nbn.forward_train(x), nbn.forward_train(x)
    assert fronts.knows("forward_train", x, 1)
    with partitions(forward_train=True):
        assert not fronts.knows("forward_train", x, 1)
        nbn.forward_train(x), nbn.forward_train(x)
    assert not fronts.knows("forward_train", x, 1)


@pytest.mark.parametrize("shape", [(8, 6, 5, 3), (16, 32, 16, 16)])
def test_threads_calling_one_front_at_once_get_the_plain_paths_bits(rng, monkeypatch, shape):
    if np.prod(shape) > 10000:  # a parallel twin's front, from four threads at once
        _no_races(monkeypatch)
    inputs = _inputs(rng, shape, 1, np.float32)
    calls = _calls(*inputs, 1)
    for _ in range(2):  # compiles or loads, then the plain path keeps the plans: fronts learn
        want = {step: call() for step, call in calls.items()}
    assert all(fronts.knows(step, inputs[0], 1) for step in PLAIN)
    failures = []

    def work():
        for _ in range(200):
            for step, call in calls.items():
                got = call()
                if not all(np.array_equal(a, b) for a, b in zip(got, want[step], strict=True)):
                    failures.append(step)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_a_front_frees_its_scratch(rng):
    """The fronts run without Numba's runtime and free the float64 scratch they allocate."""
    calls = _calls(*_inputs(rng, (8, 6, 5, 3), 1, np.float32), 1)
    for call in (*calls.values(), *calls.values()):
        call()
    enabled = nrt_stats.memsys_stats_enabled()
    nrt_stats.memsys_enable_stats()
    try:
        before = nrt.rtsys.get_allocation_stats()
        for _ in range(50):
            for call in calls.values():
                call()
        after = nrt.rtsys.get_allocation_stats()
    finally:
        if not enabled:
            nrt_stats.memsys_disable_stats()
    allocated, freed = after.alloc - before.alloc, after.free - before.free
    assert allocated == freed and allocated >= 50 * 7  # train: 3, backward: 4 (and the drivers')
    assert after.mi_alloc - before.mi_alloc == after.mi_free - before.mi_free


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6, 4, 5, 3), (16, 32, 16, 16)])
def test_a_layers_plans_take_the_fronts_with_the_general_paths_bits(rng, monkeypatch, dtype,
                                                                    affine, shape):  # fmt: skip
    """BatchNorm's plans (numba_bn/plans.py) call the fronts with their checked arrays: the
    training step and eval give the bits of a layer whose plans are off, state included; at a
    size for threads too."""
    axis, channels = 1, shape[1]
    if np.prod(shape) > 10000:
        _no_races(monkeypatch)
    x, dy = (random_batch(rng, shape, dtype, axis=axis) for _ in range(2))
    fronted, general = (nbn.BatchNorm(channels, dtype=dtype, affine=affine) for _ in range(2))

    def steps(layer):
        results = []
        for _ in range(3):
            layer.train()
            results += [layer(x), layer.backward(dy)]
            layer.eval()
            results.append(layer(x))
        state = layer.state_dict()
        return results + [state[k] for k in sorted(state)] + [layer.grad_weight, layer.grad_bias]

    def warm(layer):  # compiles or loads the drivers, makes the plans, finds the fronts
        for _ in range(3):
            layer.train()
            layer(x), layer.backward(dy), layer.eval(), layer(x)

    warm(fronted)
    plans = list(fronted._plans.values())
    assert {step for plan in plans for step, found in plan.fronts.items() if found[0]} == {
        "forward_train", "backward", "forward_eval"}  # fmt: skip
    with monkeypatch.context() as patched:
        patched.setattr(nbn.layer.plans, "remember", lambda *args: None)  # no plans
        warm(general)
        want = steps(general)
    for name in ("forward_train", "forward_eval", "backward"):  # the plans' kernel calls
        monkeypatch.setattr(CpuBackend, name, _refused)
    for got, expected in zip(steps(fronted), want, strict=True):
        if expected is None:
            assert got is None
        else:
            np.testing.assert_array_equal(got, expected)


def _refused(*args, **kwargs):
    raise AssertionError("a plan's kernel call ran where its front should")


_THREE_EVALS = """
import numpy as np, numba_bn as nbn
x = np.ones((64, 32), np.float32)
for _ in range(3):
    nbn.forward_eval(x, np.zeros(32, np.float32), np.ones(32, np.float32))
print("done")
"""


def test_a_fronts_compile_says_so_in_one_line_and_a_warm_cache_says_nothing(tmp_path):
    """The third call of a shape compiles its front (the first compiles the driver): one line
    each, as numba_bn.compiling announces the drivers; a later process loads both silently."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_BN_QUIET": ""}
    outputs = [run_child([sys.executable, "-c", _THREE_EVALS], env, timeout=600)
               for _ in range(2)]  # fmt: skip
    assert all(status == 0 and "done" in output for status, output in outputs), outputs
    lines = [re.findall(r"^numba_bn: compiling .*$", output, re.M) for _, output in outputs]
    assert len(lines[0]) == 2, outputs[0]
    assert "forward_eval (rows, float32, serial twin)" in lines[0][0]
    assert "the front of forward_eval (float32, rank 2) on its first call" in lines[0][1]
    assert f"cached in {tmp_path}" in lines[0][1] and "NUMBA_BN_QUIET=1" in lines[0][1]
    assert lines[1] == [], outputs[1]
