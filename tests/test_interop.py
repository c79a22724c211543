"""Host arrays of other libraries as arguments: anything NumPy views without a copy.

torch CPU tensors (through ``__dlpack__``), DLPack-only objects, buffer-protocol objects and
``__array_interface__`` objects are taken as NumPy's views of their memory: the results are the
bits of the same call on NumPy arrays, running buffers and ``out=`` are written in the caller's
memory, and what a NumPy array of the same layout would be refused for is refused alike.
"""

import array
import sys

import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import layer as layer_module
from numba_bn import ops

from conftest import random_batch

try:
    import torch
except ImportError:  # the DLPack, buffer and array-interface tests run without it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

LAYOUTS = [((16, 5), 1), ((4, 3, 6), 1), ((3, 4, 5, 6), -1)]
DTYPES = [np.float32, np.float64]


def _tensor(a):
    """A torch CPU tensor with memory of its own holding the values of ``a``."""
    return torch.tensor(np.ascontiguousarray(a))


def _numpy(t):
    return t.numpy()


class DLPackOnly:
    """An array that exposes nothing but ``__dlpack__`` / ``__dlpack_device__`` (a NumPy
    array's own)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class InterfaceOnly:
    """An array that exposes nothing but ``__array_interface__`` (a NumPy array's own)."""

    def __init__(self, a):
        self._a = a

    @property
    def __array_interface__(self):
        return self._a.__array_interface__


def _case(rng, shape, axis, dtype):
    channels = shape[axis]
    return {
        "x": random_batch(rng, shape, dtype, axis=axis),
        "dy": random_batch(rng, shape, dtype, mean_scale=1.0, axis=axis),
        "weight": rng.uniform(0.5, 2.0, channels).astype(dtype),
        "bias": rng.standard_normal(channels).astype(dtype),
        "running_mean": rng.standard_normal(channels).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, channels).astype(dtype),
    }


def _assert_same_bits(actual, expected):
    assert type(actual) is np.ndarray
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_torch_tensors_as_arguments_give_the_numpy_bits(rng, shape, axis, dtype):
    case = _case(rng, shape, axis, dtype)
    t = {name: _tensor(value) for name, value in case.items()}
    x, dy, weight, bias = (case[n] for n in ("x", "dy", "weight", "bias"))
    tx, tdy, tweight, tbias = (t[n] for n in ("x", "dy", "weight", "bias"))

    expected = nbn.forward_train(x, weight, bias, axis=axis)
    actual = nbn.forward_train(tx, tweight, tbias, axis=axis)
    for a, e in zip(actual, expected, strict=True):
        _assert_same_bits(a, e)
    _, mean, invstd = expected
    tmean, tinvstd = _tensor(mean), _tensor(invstd)
    for a, e in zip(nbn.backward(tdy, tx, tmean, tinvstd, tweight, axis=axis),
                    nbn.backward(dy, x, mean, invstd, weight, axis=axis), strict=True):  # fmt: skip
        _assert_same_bits(a, e)
    running = (case["running_mean"], case["running_var"])
    trunning = (t["running_mean"], t["running_var"])
    _assert_same_bits(
        nbn.forward_eval(tx, *trunning, tweight, tbias, axis=axis),
        nbn.forward_eval(x, *running, weight, bias, axis=axis),
    )


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_torch_running_buffers_are_updated_in_place_with_the_numpy_bits(rng, shape, axis, dtype):
    case = _case(rng, shape, axis, dtype)
    t = {name: _tensor(value) for name, value in case.items()}
    buffers = [case["running_mean"].copy(), case["running_var"].copy()]
    tbuffers = [t["running_mean"], t["running_var"]]
    addresses = [b.data_ptr() for b in tbuffers]

    y = nbn.batch_norm(case["x"], *buffers, case["weight"], case["bias"], training=True,
                       momentum=0.3, axis=axis)  # fmt: skip
    ty = nbn.batch_norm(t["x"], *tbuffers, t["weight"], t["bias"], training=True, momentum=0.3,
                        axis=axis)  # fmt: skip

    _assert_same_bits(ty, y)
    assert [b.data_ptr() for b in tbuffers] == addresses  # the caller's tensors, not copies
    befores = (case["running_mean"], case["running_var"])
    for tbuffer, buffer, before in zip(tbuffers, buffers, befores, strict=True):
        assert not np.array_equal(_numpy(tbuffer), before)
        _assert_same_bits(_numpy(tbuffer), buffer)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_torch_out_receives_y_and_the_result_shares_its_memory(rng, dtype):
    case = _case(rng, (6, 4, 5), 1, dtype)
    x, w, b = (_tensor(case[n]) for n in ("x", "weight", "bias"))
    running = (_tensor(case["running_mean"]), _tensor(case["running_var"]))
    expected_train = nbn.forward_train(case["x"], case["weight"], case["bias"])
    expected_eval = nbn.forward_eval(case["x"], case["running_mean"], case["running_var"],
                                     case["weight"], case["bias"])  # fmt: skip

    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    y, _, _ = nbn.forward_train(x, w, b, out=out)
    assert np.shares_memory(y, _numpy(out))
    _assert_same_bits(_numpy(out), expected_train[0])

    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    y = nbn.batch_norm(x, *running, w, b, training=False, out=out)
    assert np.shares_memory(y, _numpy(out))
    _assert_same_bits(_numpy(out), expected_eval)

    dy = _tensor(case["dy"])
    mean, invstd = expected_train[1], expected_train[2]
    expected_dx = nbn.backward(case["dy"], case["x"], mean, invstd, case["weight"])[0]
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    dx = nbn.backward(dy, x, mean, invstd, w, out=out)[0]
    assert np.shares_memory(dx, _numpy(out))
    _assert_same_bits(_numpy(out), expected_dx)


@needs_torch
def test_a_torch_residual_and_residual_out(rng):
    case = _case(rng, (6, 4, 5), 1, np.float32)
    residual = random_batch(rng, (6, 4, 5), np.float32, mean_scale=1.0)
    y, mean, invstd = nbn.forward_train(case["x"], residual=residual, activation="relu")
    ty, _, _ = nbn.forward_train(_tensor(case["x"]), residual=_tensor(residual),
                                 activation="relu")  # fmt: skip
    _assert_same_bits(ty, y)
    grad = np.full_like(y, np.nan)
    expected = nbn.backward(case["dy"], case["x"], mean, invstd, activation="relu", y=y,
                            residual_out=grad)  # fmt: skip
    tgrad = torch.full(y.shape, float("nan"))
    actual = nbn.backward(_tensor(case["dy"]), _tensor(case["x"]), mean, invstd,
                          activation="relu", y=_tensor(y), residual_out=tgrad)  # fmt: skip
    for a, e in zip(actual, expected, strict=True):
        _assert_same_bits(a, e)
    _assert_same_bits(_numpy(tgrad), grad)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_layer_on_torch_tensors_gives_the_numpy_bits(rng, dtype):
    case = _case(rng, (8, 3, 5), 1, dtype)
    layers = [nbn.BatchNorm(3, dtype=dtype), nbn.BatchNorm(3, dtype=dtype)]
    for _ in range(2):  # the second call: a layer that has seen the input's kind already
        x = random_batch(rng, (8, 3, 5), dtype)
        y = layers[0](x)
        ty = layers[1](_tensor(x))
        _assert_same_bits(ty, y)
        dx = layers[0].backward(case["dy"])
        tdx = layers[1].backward(_tensor(case["dy"]))
        _assert_same_bits(tdx, dx)
        for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            _assert_same_bits(getattr(layers[1], name), getattr(layers[0], name))
    for layer in layers:
        layer.eval()
    out = torch.empty(x.shape, dtype=_tensor(x).dtype)
    y = layers[0](x)
    ty = layers[1](_tensor(x), out=out)
    assert np.shares_memory(ty, _numpy(out))
    _assert_same_bits(_numpy(out), y)
    _assert_same_bits(layers[1].backward(_tensor(case["dy"])), layers[0].backward(case["dy"]))


def _refuse(*args, **keywords):
    raise AssertionError("the checked (general) path ran")


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_calls_of_torch_tensors_take_the_plain_path(rng, monkeypatch, dtype):
    """A plain call of torch CPU tensors is the plain call of NumPy's views of them: the
    functions' checked paths are not run (patched to raise), the bits are the ndarrays', and
    the running tensors are updated in place (they took the checked path, ~25 us more a call
    on a small batch)."""
    case = _case(rng, (16, 5), 1, dtype)
    t = {name: _tensor(value) for name, value in case.items()}
    x, dy, weight, bias = (case[n] for n in ("x", "dy", "weight", "bias"))
    tx, tdy, tweight, tbias = (t[n] for n in ("x", "dy", "weight", "bias"))
    running = [case["running_mean"].copy(), case["running_var"].copy()]
    trunning = [t["running_mean"], t["running_var"]]
    expected_train = nbn.forward_train(x, weight, bias)
    _, mean, invstd = expected_train
    expected_dx = nbn.backward(dy, x, mean, invstd, weight)
    expected_eval = nbn.forward_eval(x, *running, weight, bias)
    expected_y = nbn.batch_norm(x, *running, weight, bias, training=True)

    for name in ("checked_batch_forward", "checked_frozen_forward", "checked_batch_backward"):
        monkeypatch.setattr(ops, name, _refuse)
    for actual, expected in zip(nbn.forward_train(tx, tweight, tbias), expected_train,
                                strict=True):  # fmt: skip
        _assert_same_bits(actual, expected)
    actual_dx = nbn.backward(tdy, tx, _tensor(mean), _tensor(invstd), tweight)
    for actual, expected in zip(actual_dx, expected_dx, strict=True):
        _assert_same_bits(actual, expected)
    _assert_same_bits(nbn.forward_eval(tx, *trunning, tweight, tbias), expected_eval)
    _assert_same_bits(nbn.batch_norm(tx, *trunning, tweight, tbias, training=True), expected_y)
    for tbuffer, buffer in zip(trunning, running, strict=True):
        _assert_same_bits(_numpy(tbuffer), buffer)


@needs_torch
def test_a_layer_on_torch_tensors_keeps_plans(rng, monkeypatch):
    """BatchNorm on torch CPU tensors (x, residual, dy) plans as on ndarrays: after the first
    step its general path does not run again (patched to raise), with the ndarrays' bits."""
    shape = (16, 5)
    x, z, dy = (random_batch(rng, shape, np.float32) for _ in range(3))
    layers = [nbn.BatchNorm(5, activation="relu") for _ in range(2)]
    for bn, inputs in zip(layers, [(x, z, dy), tuple(map(_tensor, (x, z, dy)))], strict=True):
        bn(inputs[0], residual=inputs[1]), bn.backward(inputs[2])
    monkeypatch.setattr(nbn.BatchNorm, "_forward", _refuse)
    monkeypatch.setattr(ops, "plain_batch_backward", _refuse)
    monkeypatch.setattr(layer_module, "batch_backward", _refuse)
    tx, tz, tdy = map(_tensor, (x, z, dy))
    for _ in range(2):
        _assert_same_bits(layers[1](tx, residual=tz), layers[0](x, residual=z))
        _assert_same_bits(layers[1].backward(tdy), layers[0].backward(dy))
        _assert_same_bits(layers[1].grad_residual, layers[0].grad_residual)
        _assert_same_bits(layers[1].running_var, layers[0].running_var)


@needs_torch
def test_batchnorm_layer_refuses_a_torch_out_that_is_its_torch_input_in_training():
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="out shares memory with x"):
        nbn.BatchNorm(3)(x, out=x)


def test_an_object_exposing_only_dlpack_is_accepted_everywhere(rng):
    case = _case(rng, (6, 4, 5), 1, np.float32)
    buffers = [case["running_mean"].copy(), case["running_var"].copy()]
    y = nbn.batch_norm(case["x"], *buffers, case["weight"], case["bias"], training=True)
    their_buffers = [case["running_mean"].copy(), case["running_var"].copy()]
    out = np.full_like(y, np.nan)
    wrapped = [DLPackOnly(a) for a in (case["x"], *their_buffers, case["weight"], case["bias"])]
    result = nbn.batch_norm(*wrapped, training=True, out=DLPackOnly(out))
    _assert_same_bits(result, y)
    assert np.shares_memory(result, out)
    _assert_same_bits(out, y)
    for theirs, ours in zip(their_buffers, buffers, strict=True):
        _assert_same_bits(theirs, ours)


def test_a_read_only_dlpack_export_as_a_running_buffer_is_refused_and_nothing_changes(rng):
    case = _case(rng, (6, 4, 5), 1, np.float32)
    running_mean, running_var = case["running_mean"].copy(), case["running_var"].copy()
    running_var.setflags(write=False)
    assert not np.from_dlpack(DLPackOnly(running_var)).flags.writeable
    with pytest.raises(ValueError, match="running_var must be writable"):
        nbn.batch_norm(case["x"], DLPackOnly(running_mean), DLPackOnly(running_var),
                       training=True)  # fmt: skip
    _assert_same_bits(running_mean, case["running_mean"])
    out = np.empty_like(case["x"])
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out must be C-contiguous and writable"):
        nbn.forward_train(case["x"], out=DLPackOnly(out))


def test_buffer_protocol_objects_are_viewed_without_a_copy(rng):
    case = _case(rng, (6, 3, 5), 1, np.float32)
    buffers = [case["running_mean"].copy(), case["running_var"].copy()]
    y = nbn.batch_norm(case["x"], *buffers, case["weight"], training=True)
    # running buffers in array.array('f'), the weight in a bytearray, out in a shaped memoryview
    their_buffers = [array.array("f", case[n].tolist()) for n in ("running_mean", "running_var")]
    weight = bytearray(case["weight"].tobytes())
    out_bytes = bytearray(case["x"].nbytes)
    out = memoryview(out_bytes).cast("f", case["x"].shape)
    result = nbn.batch_norm(case["x"], *their_buffers, memoryview(weight).cast("f"),
                            training=True, out=out)  # fmt: skip
    _assert_same_bits(result, y)
    _assert_same_bits(np.frombuffer(out_bytes, np.float32).reshape(y.shape), y)
    for theirs, ours in zip(their_buffers, buffers, strict=True):
        _assert_same_bits(np.frombuffer(theirs, np.float32), ours)


def test_a_read_only_buffer_as_a_running_buffer_is_refused(rng):
    case = _case(rng, (6, 3, 5), 1, np.float32)
    with pytest.raises(ValueError, match="running_mean must be writable"):
        nbn.batch_norm(case["x"], memoryview(case["running_mean"].tobytes()).cast("f"),
                       case["running_var"], training=True)  # fmt: skip


def test_an_object_exposing_only_the_array_interface_is_accepted(rng):
    case = _case(rng, (6, 3, 5), 1, np.float64)
    buffers = [case["running_mean"].copy(), case["running_var"].copy()]
    y = nbn.batch_norm(case["x"], *buffers, case["weight"], case["bias"], training=True)
    their_buffers = [case["running_mean"].copy(), case["running_var"].copy()]
    result = nbn.batch_norm(InterfaceOnly(case["x"]), *map(InterfaceOnly, their_buffers),
                            InterfaceOnly(case["weight"]), InterfaceOnly(case["bias"]),
                            training=True)  # fmt: skip
    _assert_same_bits(result, y)
    for theirs, ours in zip(their_buffers, buffers, strict=True):
        _assert_same_bits(theirs, ours)


@needs_torch
def test_a_non_contiguous_torch_input_is_taken_as_a_non_contiguous_ndarray(rng):
    x = random_batch(rng, (5, 8), np.float32)  # x.T: (8, 5), 5 channels, strided
    weight = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    expected = nbn.forward_train(x.T, weight)
    tx = _tensor(x).T
    assert not tx.is_contiguous()
    for a, e in zip(nbn.forward_train(tx, _tensor(weight)), expected, strict=True):
        _assert_same_bits(a, e)
    _assert_same_bits(expected[0], nbn.forward_train(np.ascontiguousarray(x.T), weight)[0])


@needs_torch
def test_a_non_contiguous_torch_out_is_refused_as_a_non_contiguous_ndarray(rng):
    x = random_batch(rng, (8, 5), np.float32)
    for out in (np.empty((5, 8), np.float32).T, torch.empty(5, 8).T):
        with pytest.raises(ValueError, match="out must be C-contiguous and writable"):
            nbn.forward_train(x, out=out)


@needs_torch
def test_a_non_contiguous_torch_running_buffer_is_updated_as_a_non_contiguous_ndarray(rng):
    case = _case(rng, (6, 3, 5), 1, np.float32)
    strided = [np.zeros(6, np.float32)[::2], np.zeros(6, np.float32)[::2]]
    tstrided = [torch.zeros(6)[::2], torch.zeros(6)[::2]]
    for a, t, name in zip(strided, tstrided, ("running_mean", "running_var"), strict=True):
        a[...] = case[name]
        t[...] = torch.from_numpy(case[name])
    assert not tstrided[0].is_contiguous()
    y = nbn.batch_norm(case["x"], *strided, training=True)
    ty = nbn.batch_norm(_tensor(case["x"]), *tstrided, training=True)
    _assert_same_bits(ty, y)
    for t, a, name in zip(tstrided, strided, ("running_mean", "running_var"), strict=True):
        assert not np.array_equal(a, case[name])
        np.testing.assert_array_equal(t.numpy(), a)


@needs_torch
@pytest.mark.parametrize("name", ["x", "weight", "running_mean", "out"])
def test_a_torch_tensor_numpy_cannot_view_is_refused_by_name(rng, name, monkeypatch):
    case = _case(rng, (6, 3), 1, np.float32)
    args = {"x": case["x"], "running_mean": case["running_mean"],
            "running_var": case["running_var"], "weight": case["weight"]}  # fmt: skip
    shape = (6, 3) if name in ("x", "out") else (3,)
    args[name] = torch.ones(shape, requires_grad=True)
    with pytest.raises(TypeError, match=f"{name} is a torch tensor that requires grad: pass "
                                        f"{name}.detach"):  # fmt: skip
        nbn.batch_norm(**args, training=True)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # without the bfloat16 extra
    args[name] = torch.ones(shape, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=f"{name} is a torch bfloat16 tensor"):
        nbn.batch_norm(**args, training=True)


def test_a_list_is_still_refused_where_the_call_writes_or_takes_a_vector(rng):
    case = _case(rng, (6, 3), 1, np.float32)
    with pytest.raises(TypeError, match="running_mean must be a numpy array .*got list"):
        nbn.batch_norm(case["x"], [0.0] * 3, case["running_var"], training=True)
    with pytest.raises(TypeError, match="out must be a numpy array .*got list"):
        nbn.forward_train(case["x"], out=case["x"].tolist())


def test_a_mask_and_masked_arrays_of_other_libraries_give_the_numpy_bits(rng):
    x = random_batch(rng, (6, 3, 4), np.float32)
    dy = random_batch(rng, (6, 3, 4), np.float32)
    mask = rng.random((6, 4)) < 0.7
    y, mean, invstd = nbn.forward_train(x, mask=mask)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd, mask=mask)
    y2, mean2, invstd2 = nbn.forward_train(DLPackOnly(x), mask=DLPackOnly(mask))
    dx2, dweight2, dbias2 = nbn.backward(DLPackOnly(dy), DLPackOnly(x), mean2, invstd2,
                                         mask=DLPackOnly(mask))  # fmt: skip
    for a, b in zip((y, mean, invstd, dx, dweight, dbias), (y2, mean2, invstd2, dx2, dweight2,
                                                            dbias2), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_the_norms_take_torch_tensors_for_every_array_and_update_running_buffers_in_place(rng):
    """Group, layer and instance norm: torch CPU tensors as x, weights, running buffers and out=
    give the NumPy call's bits; instance norm's running buffers are the tensors' own memory."""
    x = rng.standard_normal((4, 6, 5)).astype(np.float32) * 3 + 2
    w, b = rng.uniform(0.5, 2, 6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    lw, lb = rng.uniform(0.5, 2, 5).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    buffers = [rng.standard_normal(6).astype(np.float32), rng.uniform(1, 2, 6).astype(np.float32)]
    their_buffers = [_tensor(a.copy()) for a in buffers]
    pointers = [t.data_ptr() for t in their_buffers]
    calls = {
        "group": (lambda *a, **k: nbn.group_norm(a[0], 3, *a[1:3], **k), (x, w, b)),
        "layer": (lambda *a, **k: nbn.layer_norm(a[0], 5, *a[1:3], **k), (x, lw, lb)),
        "instance": (
            lambda *a, **k: nbn.instance_norm(a[0], *a[3:5], *a[1:3], **k),
            (x, w, b, *buffers),
        ),  # fmt: skip
    }
    for name, (call, arrays) in calls.items():
        expected = call(*arrays)
        out = torch.full(x.shape, float("nan"))
        tensors = [_tensor(a) for a in arrays[:3]]
        if name == "instance":
            tensors += their_buffers
        result = call(*tensors, out=out)
        _assert_same_bits(result, expected)
        assert np.shares_memory(result, _numpy(out)), name
    for theirs, ours, pointer in zip(their_buffers, buffers, pointers, strict=True):
        assert theirs.data_ptr() == pointer
        _assert_same_bits(_numpy(theirs), ours)


def test_jax_cpu_arrays_give_the_numpy_bits_and_refuse_to_be_updated(rng):
    """JAX CPU arrays (``__dlpack__``, immutable): every input, the NumPy call's bits; as a
    running buffer of a training call, the "must be writable" error, nothing modified."""
    jnp = pytest.importorskip("jax.numpy")
    case = _case(rng, (6, 4, 5), 1, np.float32)
    x, dy = case["x"], rng.standard_normal(case["x"].shape).astype(np.float32)
    w, b = case["weight"], case["bias"]
    y, mean, invstd = nbn.forward_train(x, w, b)
    grads = nbn.backward(dy, x, mean, invstd, w)
    j = {name: jnp.asarray(value) for name, value in
         {"x": x, "dy": dy, "w": w, "b": b, "mean": mean, "invstd": invstd}.items()}  # fmt: skip
    jy, jmean, jinvstd = nbn.forward_train(j["x"], j["w"], j["b"])
    for ours, theirs in zip((jy, jmean, jinvstd), (y, mean, invstd), strict=True):
        assert type(ours) is np.ndarray
        _assert_same_bits(ours, theirs)
    for ours, theirs in zip(nbn.backward(j["dy"], j["x"], j["mean"], j["invstd"], j["w"]), grads,
                            strict=True):  # fmt: skip
        _assert_same_bits(ours, theirs)
    running = [case["running_mean"], case["running_var"]]
    eval_y = nbn.forward_eval(x, *running, w, b)
    _assert_same_bits(nbn.forward_eval(j["x"], *map(jnp.asarray, running), j["w"], j["b"]), eval_y)
    frozen = [jnp.asarray(a) for a in running]
    with pytest.raises(ValueError, match="running_mean must be writable"):
        nbn.batch_norm(j["x"], *frozen, j["w"], j["b"], training=True)
    for value, original in zip(frozen, running, strict=True):
        _assert_same_bits(np.asarray(value), original)
