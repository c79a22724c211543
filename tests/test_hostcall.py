"""The plain host call (numba_bn.hostcall) against the checked path it short-cuts.

A plain call must give the bits of the checked one, and anything that is not plain (an error to
explain, a conversion to make) must leave the plain path to the checks.
"""

import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import functional, layer, ops, plans
from numba_bn.cpu import fronts

from conftest import LAYOUTS, poison, random_batch


@pytest.fixture
def checked_calls(monkeypatch):
    """The names of the checked operations called, in order."""
    calls = []
    for name in ("checked_batch_forward", "checked_frozen_forward", "checked_batch_backward"):
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return calls


def _no_plain_path(monkeypatch):
    """Every call from now on takes the checked path: ops' plain functions decline it, and
    neither a front nor a new layer's plans serve it (they serve out= too)."""
    for name in ("plain_batch_forward", "plain_frozen_forward", "plain_batch_backward"):
        monkeypatch.setattr(ops, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(fronts, "may_serve", lambda backend, device: False)
    monkeypatch.setattr(plans, "remember", lambda *args: None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_plain_calls_skip_the_checks_and_give_their_bits(
    rng, monkeypatch, shape, axis, dtype, checked_calls
):
    """The plain calls, with new arrays and with out= (the caller's array, written and
    returned), give the checked path's bits."""
    x = random_batch(rng, shape, dtype, axis=axis)
    dy = random_batch(rng, shape, dtype, mean_scale=1.0, axis=axis)
    channels = shape[axis]
    weight = rng.uniform(0.5, 2.0, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    running = [rng.standard_normal(channels).astype(dtype), rng.uniform(0.5, 2, channels)]
    running[1] = running[1].astype(dtype)
    plain_running, checked_running = [r.copy() for r in running], [r.copy() for r in running]

    plain = [
        nbn.batch_norm(x, *plain_running, weight, bias, training=True, momentum=0.3, axis=axis),
        *nbn.forward_train(x, weight, bias, axis=axis),
        nbn.forward_eval(x, *running, weight, bias, axis=axis),
        nbn.forward_train(x, weight, bias, axis=axis, residual=dy, activation="relu")[0],
        nbn.forward_eval(x, *running, weight, bias, axis=axis, residual=dy, activation="relu"),
    ]
    plain += nbn.backward(dy, x, plain[2], plain[3], weight, axis=axis)
    outs = [poison(shape, dtype) for _ in range(6)]
    buffers = [r.copy() for r in running]
    into = [nbn.batch_norm(x, *buffers, weight, bias, training=True, momentum=0.3, axis=axis,
                           out=outs[0]),
            nbn.forward_train(x, weight, bias, axis=axis, out=outs[1])[0],
            nbn.forward_eval(x, *running, weight, bias, axis=axis, out=outs[2]),
            nbn.forward_train(x, weight, bias, axis=axis, residual=dy, activation="relu",
                              out=outs[3])[0],
            nbn.forward_eval(x, *running, weight, bias, axis=axis, residual=dy,
                             activation="relu", out=outs[4]),
            nbn.backward(dy, x, plain[2], plain[3], weight, axis=axis, out=outs[5])[0]]  # fmt: skip
    assert checked_calls == []
    for got, written, want in zip(into, outs, [plain[i] for i in (0, 1, 4, 5, 6, 7)], strict=True):
        assert got is written
        np.testing.assert_array_equal(got, want)
    _no_plain_path(monkeypatch)

    def out():
        return poison(shape, dtype)

    checked = [
        nbn.batch_norm(
            x, *checked_running, weight, bias, training=True, momentum=0.3, axis=axis, out=out()
        ),  # fmt: skip
        *nbn.forward_train(x, weight, bias, axis=axis, out=out()),
        nbn.forward_eval(x, *running, weight, bias, axis=axis, out=out()),
        nbn.forward_train(x, weight, bias, axis=axis, residual=dy, activation="relu", out=out())[
            0
        ],  # fmt: skip
        nbn.forward_eval(
            x, *running, weight, bias, axis=axis, residual=dy, activation="relu", out=out()
        ),  # fmt: skip
    ]
    checked += nbn.backward(dy, x, checked[2], checked[3], weight, axis=axis, out=out())
    assert len(checked_calls) == 6
    for a, b in zip(plain + plain_running, checked + checked_running, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("convention", ["torch", "keras"])
def test_a_plain_training_step_of_the_layer_and_of_batch_norm_skips_the_wrappers(
    rng, monkeypatch, checked_calls, convention
):
    """BatchNorm's training step and eval, batch_norm(training=True) and forward_eval on plain
    arrays call the plain path itself (not ops.batch_forward / batch_backward / frozen_forward,
    nor the layer forward_eval: their keywords and NamedTuples are ~1 us of a small step), with
    out= too, and with the bits of the checked path."""
    wrapped = []
    for module, name in [(layer, "batch_forward"), (layer, "batch_backward"),
                         (layer, "forward_eval"), (functional, "batch_forward"),
                         (ops, "frozen_forward")]:  # fmt: skip
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            wrapped.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    x = random_batch(rng, (16, 5, 3), np.float32)
    dy = random_batch(rng, (16, 5, 3), np.float32, mean_scale=1.0)
    weight, bias = rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    running = [rng.standard_normal(5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)]
    results = {}
    for path in ("plain", "plain out=", "checked"):
        if path == "checked":
            _no_plain_path(monkeypatch)

        def out(path=path):
            return None if path == "plain" else poison(x.shape, x.dtype)

        bn = nbn.BatchNorm(5, convention=convention, axis=1)
        bn.weight[:], bn.bias[:] = weight, bias
        arrays = []
        for step in range(2):
            arrays += [bn(x + step, out=out()), bn.backward(dy, out=out()), bn.grad_weight,
                       bn.grad_bias, bn.running_mean.copy(), bn.running_var.copy()]  # fmt: skip
        arrays.append(bn.eval()(x, out=out()))
        buffers = [r.copy() for r in running]
        arrays.append(nbn.batch_norm(x, *buffers, training=True, momentum=0.3, out=out()))
        arrays.append(nbn.forward_eval(x, *running, weight.astype(np.float32), None, out=out()))
        results[path] = arrays + buffers
        if path != "checked":
            assert wrapped == [] and checked_calls == []
    assert wrapped == ["batch_forward", "batch_backward"] * 2 + ["forward_eval", "batch_forward"]
    for path in ("plain out=", "checked"):
        for a, b in zip(results["plain"], results[path], strict=True):
            np.testing.assert_array_equal(a, b)


def _not_plain_outs(x):
    """(name, out=) that a plain call leaves to the checks (x: float32, at least 2 values on
    its last axis)."""
    read_only = np.empty_like(x)
    read_only.flags.writeable = False
    wide = np.empty((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
    return [("float64 out", np.empty(x.shape)), ("out of another shape", np.empty_like(x[1:])),
            ("non-contiguous out", wide[..., ::2]), ("read-only out", read_only),
            ("out as a list", np.empty_like(x).tolist())]  # fmt: skip


def _overlapping(x, first, second):
    """{first: an array, second: another}: C-contiguous, the values of x, one value apart in
    the same memory."""
    memory = np.empty(x.size + 1, x.dtype)
    arrays = {first: memory[:-1].reshape(x.shape), second: memory[1:].reshape(x.shape)}
    for array in arrays.values():
        array[...] = x
    return arrays


def _variants(rng):
    """(name, forward_train arguments) that are not plain: each needs a check or a conversion."""
    x = random_batch(rng, (6, 3, 4), np.float32)
    w = np.ones(3, np.float32)
    masked = np.ma.masked_array(x, mask=np.zeros_like(x, bool))
    read_only = np.zeros(3, np.float32)
    read_only.flags.writeable = False
    return [
        ("float16 x", dict(x=x.astype(np.float16))),
        ("int x", dict(x=x.astype(np.int32))),
        ("non-contiguous x", dict(x=x[:, :, ::2])),
        ("fortran x", dict(x=np.asfortranarray(x))),
        ("nested list x", dict(x=x.tolist())),
        ("masked x", dict(x=masked)),
        ("1-d x", dict(x=x.ravel())),
        ("numpy integer axis", dict(x=x, axis=np.int64(1))),
        ("axis out of range", dict(x=x, axis=3)),
        ("int eps", dict(x=x, eps=1)),
        ("eps 0", dict(x=x, eps=0.0)),
        ("NaN eps", dict(x=x, eps=float("nan"))),
        ("float64 weight", dict(x=x, weight=w.astype(np.float64))),
        ("weight too short", dict(x=x, weight=w[:2])),
        ("strided weight", dict(x=x, weight=np.ones(6, np.float32)[::2])),
        ("weight as list", dict(x=x, weight=[1.0, 1.0, 1.0])),
        ("running_mean alone", dict(x=x, running_mean=np.zeros(3, np.float32))),
        ("read-only running_var", dict(x=x, running_mean=w.copy(), running_var=read_only)),
        ("int momentum", dict(x=x, running_mean=w.copy(), running_var=w.copy(), momentum=1)),
        ("momentum above 1", dict(x=x, running_mean=w.copy(), running_var=w.copy(), momentum=2.0)),
        ("empty batch", dict(x=np.empty((0, 3, 4), np.float32))),
        ("one value per channel", dict(x=np.ones((1, 3), np.float32))),
        ("unknown backend", dict(x=x, backend="no-such-backend")),
        ("float64 residual", dict(x=x, residual=x.astype(np.float64))),
        ("residual of another shape", dict(x=x, residual=x[:3])),
        ("non-contiguous residual", dict(x=x, residual=np.repeat(x, 2, axis=2)[:, :, ::2])),
        ("unknown activation", dict(x=x, activation="gelu")),
        ("activation not a str", dict(x=x, activation=np.str_("relu"))),
        *[(name, dict(x=x, out=out)) for name, out in _not_plain_outs(x)],
        ("out overlapping x", _overlapping(x, "x", "out")),
        ("out overlapping the residual", {**_overlapping(x, "residual", "out"), "x": x}),
        ("nan_policy raise", dict(x=x, nan_policy="raise")),
        ("device cuda", dict(x=x, device="cuda")),
        ("device not a str", dict(x=x, device=["cpu"])),
    ]


def test_anything_but_a_plain_call_goes_to_the_checks(rng):
    defaults = dict(weight=None, bias=None, eps=1e-5, axis=1, running_mean=None,
                    running_var=None, momentum=0.1, unbiased=True, nan_policy="propagate",
                    out=None, backend="cpu", residual=None, activation=None,
                    device="auto")  # fmt: skip
    for name, arguments in _variants(rng):
        call = {**defaults, **arguments}
        assert ops.plain_batch_forward(**call) is None, name


def test_not_plain_eval_and_backward_go_to_the_checks(rng):
    x = random_batch(rng, (6, 3, 4), np.float32)
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    negative = var.copy()
    negative[1] = -1.0
    plain = dict(x=x, running_mean=mean, running_var=var, weight=None, bias=None, eps=1e-5,
                 axis=1, out=None, backend="cpu", residual=None, activation=None,
                 device="auto")  # fmt: skip
    assert ops.plain_frozen_forward(**plain) is not None
    for name, arguments in [
        ("no running_mean", dict(running_mean=None)),
        ("negative running_var", dict(running_var=negative)),
        ("negative eps", dict(eps=-1e-5)),
        ("float16 x", dict(x=x.astype(np.float16))),
        ("float64 residual", dict(residual=x.astype(float))),
        ("unknown activation", dict(activation="tanh")),
        *[(name, dict(out=out)) for name, out in _not_plain_outs(x)],
        ("out overlapping x", _overlapping(x, "x", "out")),
        ("out overlapping the residual", _overlapping(x, "residual", "out")),
        ("device cuda", dict(device="cuda")),
    ]:
        assert ops.plain_frozen_forward(**{**plain, **arguments}) is None, name
    plain = dict(dy=x, x=x, mean=mean, invstd=var, weight=None, axis=1, out=None, backend="cpu",
                 activation=None, y=None, residual_out=None, device="auto")  # fmt: skip
    assert ops.plain_batch_backward(**plain) is not None
    for name, arguments in [
        ("dy of another shape", dict(dy=x[:3])),
        ("dy of another dtype", dict(dy=x.astype(np.float64))),
        ("mean too long", dict(mean=np.zeros(4))),
        ("invstd too long", dict(invstd=np.ones(4, np.float32))),
        ("invstd as list", dict(invstd=[1.0, 1.0, 1.0])),
        ("float16 mean", dict(mean=mean.astype(np.float16))),
        ("float64 invstd not contiguous", dict(invstd=np.ones(6)[::2])),
        *[(name, dict(out=out)) for name, out in _not_plain_outs(x)],
        ("out overlapping x", _overlapping(x, "x", "out")),
        ("out overlapping dy", _overlapping(x, "dy", "out")),
        ("an activation", dict(activation="relu", y=x)),
        ("residual_out", dict(residual_out=np.empty_like(x))),
        ("device cuda", dict(device="cuda")),
    ]:
        assert ops.plain_batch_backward(**{**plain, **arguments}) is None, name


def test_a_plain_backward_takes_float32_and_float64_statistics_alike(rng):
    """The saved statistics reach the kernels as float64 (hostcall.statistics), as they are or
    converted from float32, whichever dtype each has."""
    x = random_batch(rng, (6, 3, 4), np.float32)
    dy = random_batch(rng, (6, 3, 4), np.float32, mean_scale=1.0)
    mean, invstd = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3)
    invstd = invstd.astype(np.float32)
    backward = dict(weight=None, axis=1, out=None, backend="cpu", activation=None, y=None,
                    residual_out=None, device="auto")  # fmt: skip
    want = ops.checked_batch_backward(dy, x, mean.astype(float), invstd.astype(float), None, 1,
                                      out=None, backend="cpu", exchange=None, activation=None,
                                      y=None, residual_out=None, device="auto").dx  # fmt: skip
    for pair in [(mean, invstd), (mean.astype(float), invstd), (mean, invstd.astype(float)),
                 (mean.astype(float), invstd.astype(float))]:  # fmt: skip
        got = ops.plain_batch_backward(dy, x, *pair, **backward)
        assert got is not None, [a.dtype for a in pair]
        np.testing.assert_array_equal(got[0], want)


def test_an_out_that_is_an_input_or_shares_no_memory_with_one_is_plain(rng):
    """out= a new array, or an input itself (in place: x, the residual, dy), is a plain call's:
    written with the bits of a call without out=, and returned."""
    x = random_batch(rng, (6, 3, 4), np.float32)
    dy = random_batch(rng, (6, 3, 4), np.float32, mean_scale=1.0)
    mean, var = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    forward = dict(weight=None, bias=None, eps=1e-5, axis=1, running_mean=None, running_var=None,
                   momentum=0.1, unbiased=True, nan_policy="propagate", backend="cpu",
                   activation="relu", device="auto")  # fmt: skip
    frozen = dict(running_mean=mean, running_var=var, weight=None, bias=None, eps=1e-5, axis=1,
                  backend="cpu", activation="relu", device="auto")  # fmt: skip
    backward = dict(mean=mean, invstd=var, weight=None, axis=1, backend="cpu", activation=None,
                    y=None, residual_out=None, device="auto")  # fmt: skip
    want = (ops.plain_batch_forward(x, out=None, residual=dy, **forward)[0],
            ops.plain_frozen_forward(x, out=None, residual=dy, **frozen),
            ops.plain_batch_backward(dy, x, out=None, **backward)[0])  # fmt: skip
    for into in ("new", "x", "residual", "dy"):
        for step in range(3):
            if (step, into) in ((0, "dy"), (1, "dy"), (2, "residual")):
                continue  # not an input of that call
            inputs = {"x": x.copy(), "residual": dy.copy(), "dy": dy.copy()}
            out = inputs[into] if into in inputs else poison(x.shape, x.dtype)
            if step == 0:
                got = ops.plain_batch_forward(inputs["x"], out=out, residual=inputs["residual"],
                                              **forward)[0]  # fmt: skip
            elif step == 1:
                got = ops.plain_frozen_forward(inputs["x"], out=out, residual=inputs["residual"],
                                               **frozen)  # fmt: skip
            else:
                got = ops.plain_batch_backward(inputs["dy"], inputs["x"], out=out, **backward)[0]
            assert got is out, (step, into)
            np.testing.assert_array_equal(got, want[step], err_msg=f"{step} {into}")


def test_a_layer_checks_an_input_of_a_new_kind_again(rng):
    bn = nbn.BatchNorm(3, affine=False, track_running_stats=False)
    bn(random_batch(rng, (8, 3), np.float32))
    bn(random_batch(rng, (8, 3), np.float32))  # the same kind: admitted before
    with pytest.raises(ValueError, match=r"BatchNorm\(num_features=3\) got 4 channels"):
        bn(random_batch(rng, (8, 4), np.float32))
    with pytest.raises(TypeError, match=r"BatchNorm\(dtype=float32\) got x of dtype float64"):
        nbn.BatchNorm(3)(random_batch(rng, (8, 3), np.float64))
    bn.axis = 0  # an attribute a user may change between calls
    with pytest.raises(ValueError, match=r"got 8 channels on axis 0"):
        bn(random_batch(rng, (8, 3), np.float32))


@pytest.mark.parametrize(
    "call",
    [
        lambda x: nbn.forward_train(x, device="gpu"),
        lambda x: nbn.forward_eval(x, np.zeros(3), np.ones(3), device="gpu"),
        lambda x: nbn.backward(x, x, np.zeros(3), np.ones(3), device="gpu"),
        lambda x: nbn.batch_norm(x, None, None, training=True, device=["cpu"]),
    ],
)
def test_an_unknown_device_is_explained_even_for_a_plain_call(call):
    with pytest.raises(ValueError, match=r"device must be one of \('auto', 'cpu', 'cuda'\)"):
        call(np.ones((4, 3)))
