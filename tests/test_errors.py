"""The bad-input catalogue: each error names the argument, and nothing is modified."""

import numpy as np
import pytest

import numba_bn as nbn

C = 3


def _args(**changes):
    rng = np.random.default_rng(7)
    args = dict(
        x=rng.standard_normal((4, C, 5)).astype(np.float32) + 2.0,
        running_mean=np.full(C, 0.5, np.float32),
        running_var=np.full(C, 2.0, np.float32),
        weight=np.full(C, 1.5, np.float32),
        bias=np.full(C, -1.0, np.float32),
        training=True,
    )
    args.update(changes)
    return args


BAD_TRAINING_CALLS = [
    (dict(x=np.ones(5, np.float32)), ValueError, "x must have at least 2 dimensions"),
    (dict(axis=3), ValueError, "axis=3 is out of range"),
    (dict(axis=-4), ValueError, "axis=-4 is out of range"),
    (dict(axis=1.0), TypeError, "axis must be an integer"),
    (dict(weight=np.ones(C + 1, np.float32)), ValueError, r"weight must have shape \(3,\)"),
    (dict(bias=np.ones((C, 1), np.float32)), ValueError, r"bias must have shape \(3,\)"),
    (dict(running_mean=np.zeros(2, np.float32)), ValueError, "running_mean must have shape"),
    (dict(running_var=np.ones(4, np.float32)), ValueError, "running_var must have shape"),
    (dict(weight=np.ones(C)), TypeError, "weight has dtype float64"),
    (dict(running_var=np.ones(C, np.float16)), TypeError, "running_var has dtype float16"),
    (dict(weight=[1.0, 1.0, 1.0]), TypeError, "weight must be a numpy array"),
    (
        dict(x=np.ones((4, C), np.int64)),
        TypeError,
        "x must be float16, float32 or float64, got dtype int64",
    ),  # noqa: E501
    (dict(x=np.ones((4, C), np.complex64)), TypeError, "got dtype complex64"),
    (
        dict(x=np.ones((1, C, 1), np.float32)),
        ValueError,
        "Expected more than 1 value per channel when training",
    ),  # noqa: E501
    (dict(x=np.ones((1, C), np.float32)), ValueError, "Expected more than 1 value per channel"),
    (dict(eps=-1e-5), ValueError, "eps must be >= 0"),
    (dict(eps=float("nan")), ValueError, "eps must be >= 0"),
    (dict(momentum=1.5), ValueError, r"momentum must be in \[0.0, 1.0\]"),
    (dict(momentum=-0.1), ValueError, "momentum must be in"),
    (dict(running_var=None), ValueError, "running_mean and running_var must be given together"),
    (dict(nan_policy="omit"), ValueError, "nan_policy must be one of"),
    (dict(out=np.empty((4, C, 5), np.float64)), ValueError, "out must have the shape and dtype"),
    (dict(out=np.empty((4, C, 6), np.float32)), ValueError, "out must have the shape and dtype"),
    (dict(out=np.empty((4, C, 10), np.float32)[:, :, ::2]), ValueError, "out must be C-contiguous"),
    (dict(backend="gpu9000"), ValueError, "backend='gpu9000' is not registered"),
    # issue 10: eps, momentum, masks, overlapping out
    (dict(eps=0.0), ValueError, "eps must be > 0 when training"),
    (dict(eps=None), TypeError, "eps must be a real number, got NoneType"),
    (dict(eps="1e-5"), TypeError, "eps must be a real number, got str"),
    (dict(eps=True), TypeError, "eps must be a real number, got bool"),
    (dict(momentum=None), TypeError, r"momentum must be a number in \[0, 1\], got None.*BatchNorm"),
    (dict(momentum="0.1"), TypeError, "momentum must be a real number"),
    (
        dict(x=np.ma.masked_array(np.ones((4, C), np.float32), mask=np.eye(4, C))),
        TypeError,
        "x is a numpy.ma.MaskedArray: masks are not supported",
    ),
    (
        dict(running_mean=np.ma.masked_array(np.zeros(C, np.float32), mask=[1, 0, 0])),
        TypeError,
        "running_mean is a numpy.ma.MaskedArray",
    ),
    (
        dict(out=np.ma.masked_array(np.zeros((4, C, 5), np.float32))),
        TypeError,
        "out is a numpy.ma.MaskedArray",
    ),
]


@pytest.mark.parametrize("changes, error, message", BAD_TRAINING_CALLS)
def test_bad_training_call_raises_and_modifies_nothing(changes, error, message):
    args = _args(**changes)
    buffers = {k: args[k] for k in ("running_mean", "running_var", "weight", "bias")
               if isinstance(args[k], np.ndarray)}  # fmt: skip
    before = {k: v.copy() for k, v in buffers.items()}
    x_before = np.array(args["x"], copy=True)
    with pytest.raises(error, match=message):
        nbn.batch_norm(**args)
    for name, value in buffers.items():
        np.testing.assert_array_equal(value, before[name], err_msg=f"{name} was modified")
    np.testing.assert_array_equal(args["x"], x_before)


def test_read_only_running_buffer_is_refused_before_anything_runs():
    args = _args()
    args["running_var"].setflags(write=False)
    mean_before = args["running_mean"].copy()
    with pytest.raises(ValueError, match="running_var must be writable"):
        nbn.batch_norm(**args)
    np.testing.assert_array_equal(args["running_mean"], mean_before)


def test_eval_requires_running_stats():
    with pytest.raises(ValueError, match="running_mean is required for the eval forward"):
        nbn.batch_norm(_args()["x"], None, None, training=False)


def test_mixed_per_channel_dtypes_are_refused():
    x = np.ones((4, C), np.float16) + np.arange(C, dtype=np.float16)
    with pytest.raises(TypeError, match="must share one dtype"):
        nbn.forward_train(x, np.ones(C, np.float16), np.zeros(C, np.float32))


def test_backward_argument_errors():
    x = _args()["x"]
    _, mean, invstd = nbn.forward_train(x)
    with pytest.raises(ValueError, match=r"dy must have the shape of x, \(4, 3, 5\)"):
        nbn.backward(np.ones((4, C, 4), np.float32), x, mean, invstd)
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        nbn.backward(np.ones(x.shape), x, mean, invstd)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        nbn.backward(x, x, mean[:2], invstd)
    with pytest.raises(TypeError, match="invstd must be a numpy array"):
        nbn.backward(x, x, mean, None)


def test_layer_errors_leave_the_layer_unchanged():
    bn = nbn.BatchNorm(C)
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        bn.backward(np.ones((4, C), np.float32))
    bn(np.random.default_rng(1).standard_normal((5, C)).astype(np.float32))
    state = bn.state_dict()
    for bad in (np.ones((1, C), np.float32), np.ones((5, C + 1), np.float32),
                np.ones((5, C), np.int32)):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            bn(bad)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_features=0), ValueError, "num_features must be >= 1"),
    (dict(num_features=2.5), TypeError, "num_features must be an integer"),
    (dict(num_features=3, convention="caffe"), ValueError, "convention must be one of"),
    (dict(num_features=3, convention="keras", momentum=None), ValueError, "momentum=None"),
    (dict(num_features=3, momentum=2.0), ValueError, "momentum must be in"),
    (dict(num_features=3, eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(num_features=3, dtype=np.int32), TypeError, "dtype must be float16, float32 or float64"),
    (dict(num_features=3, nan_policy="ignore"), ValueError, "nan_policy must be one of"),
])  # fmt: skip
def test_layer_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        nbn.BatchNorm(**kwargs)


def test_eval_mode_backward_checks_dy_like_the_training_backward():
    bn = nbn.BatchNorm(C).eval()
    x = np.ones((4, C, 5), np.float32)
    bn(x)
    with pytest.raises(ValueError, match=r"dy must have the shape of x, \(4, 3, 5\)"):
        bn.backward(np.ones((4, C, 4), np.float32))
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        bn.backward(np.ones(x.shape))
