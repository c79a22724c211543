"""Fronts: a plain call's checks and canonical view in compiled code, in front of the machine
code of the driver its plan runs (issue 12: the per-call overhead).

A plain host call (:mod:`numba_bn.hostcall`) spends 3.5-9 us in Python: ~20 attribute checks,
the canonical view, the plan's lookup and the driver's entry point (benchmarks/README.md,
"Stop 63" and "Stop 64"), around a kernel of 0.5-3 us on a small batch, 20-30 us on a medium
one. A front is a small Numba function that takes the call's arrays as they come, checks
what Numba's dispatch does not (the vectors' lengths, eps, the arrays' layout and dtype,
folded at compile time), makes the canonical view and calls the driver's machine code by its
address (:func:`native_call`, Numba's calling convention, as a compiled call of the driver
would, without linking the driver into the front: a front compiles in ~0.3 s and holds no
copy of a driver). The same driver on the same views: the same bits.

The address comes from the plan the plain path made for the same shape (:func:`learn`, called
by ``numba_bn.ops`` after a plain call, :func:`numba_bn.cpu.front_address`), kept by (step,
x's shape, axis, dtype): a front serves only the shapes a plain call ran before, and the first
call of a shape takes the plain path. Below the cost model's serial bound the plan is the
serial twin's for any thread count; above it, the plan of one thread count (the parallel twin,
or the serial one a race chose), and a call on another count takes the plain path, after
which a front learns that count's plan. What Python still checks (:func:`forward_eval`): the
arrays are ndarrays of x's dtype (a torch tensor or a list would make Numba's dispatch
compile, or fail); a vector that is not contiguous makes the front compile once more for that
layout and decline. Declined calls (None) take the plain path, whose checks explain.
"""

import math

import numpy as np
from numba import float64, typeof, types
from numba.extending import intrinsic

from ..codecache import key_on_sources, lock_cache_saves
from ..stats import empty, kernel, release, shaped_when_plain
from .kernels import one_memory
from .threads import num_threads

ndarray, F64 = np.ndarray, np.dtype(np.float64)
NOT_PLAIN = -2  # a front's answer for a call it does not serve (the plain path's checks then)

_NO_STATISTICS = np.empty(0)  # the float64 statistics or sums of a call: in the front's scratch
_NO_ROWS = {np.dtype(t): np.empty((2, 0), t) for t in (np.float32, np.float64)}  # not wanted
#: (step, x.shape, axis, x.dtype) -> (the driver's address, a zero-length vector of the dtype:
#: an absent weight or bias, the thread count it serves: 0 for any): what :func:`learn` found;
#: bounded as the plans are
_ADDRESSES = {}
_ADDRESSES_MAX = 256
_largest = -1  # the size of the largest x in _ADDRESSES: larger calls skip the lookup


def native_call(restype):
    """An intrinsic ``call(address, arguments)``: the function at ``address`` (an int), compiled
    by Numba for the types of the tuple ``arguments``, called with Numba's calling convention,
    its ``restype`` result returned; an exception it raises (MemoryError) propagates."""

    @intrinsic
    def call(typingctx, address, arguments):
        if not isinstance(address, types.Integer) or not isinstance(arguments, types.BaseTuple):
            return None
        given = tuple(arguments)
        argtypes = tuple(types.unliteral(t) for t in given)  # a constant True: a boolean

        def codegen(context, builder, signature, args):
            pointer = context.call_conv.get_function_type(restype, argtypes).as_pointer()
            function = builder.inttoptr(args[0], pointer)
            values = [context.cast(builder, builder.extract_value(args[1], i), t, argtypes[i])
                      for i, t in enumerate(given)]  # fmt: skip
            status, result = context.call_conv.call_function(builder, function, restype,
                                                             argtypes, values)  # fmt: skip
            with builder.if_then(status.is_error, likely=False):
                context.call_conv.return_status_propagate(builder, status)
            return result

        return restype(address, arguments), codegen

    return call


call_int64 = native_call(types.int64)
call_boolean = native_call(types.boolean)
call_none = native_call(types.none)


@intrinsic
def plain_arrays(typingctx, arrays, vectors):
    """Whether every array of the tuples ``arrays`` (x's first, an output last) and ``vectors``
    is C-contiguous, of x's dtype (float32 or float64), each vector of rank 1 and the output
    writable: a constant of the types, folded where the front compiles (a front of other
    types compiles once, and declines)."""
    if not isinstance(arrays, types.BaseTuple) or not isinstance(vectors, types.BaseTuple):
        return None
    dtype = getattr(arrays[0], "dtype", None)
    plain = (all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == dtype
                 for a in (*arrays, *vectors))
             and all(v.ndim == 1 for v in vectors) and arrays[-1].mutable
             and str(dtype) in ("float32", "float64"))  # fmt: skip
    return _constant(plain, arrays, vectors)


def _constant(value, *argtypes):
    """An intrinsic's signature and code generator that give the boolean constant ``value``."""

    def codegen(context, builder, signature, args):
        return context.get_constant(types.boolean, value)

    return types.boolean(*argtypes), codegen


@intrinsic
def writable(typingctx, arrays):
    """Whether every array of the tuple ``arrays`` is writable (a read-only one is another type
    to Numba): a constant, as :func:`plain_arrays`."""
    if not isinstance(arrays, types.BaseTuple):
        return None
    return _constant(all(isinstance(a, types.Array) and a.mutable for a in arrays), arrays)


@intrinsic
def float64_buffers(typingctx, arrays):
    """Whether every array of the tuple ``arrays`` is a writable C-contiguous float64 vector
    (the statistics and sums the drivers write): a constant, as :func:`plain_arrays`."""
    if not isinstance(arrays, types.BaseTuple):
        return None
    plain = all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 and a.mutable
                and a.dtype == types.float64 for a in arrays)  # fmt: skip
    return _constant(plain, arrays)


@kernel(inline="always")
def _canonical(x, axis):
    """(outer, C, inner) of ``x`` with channels on ``axis`` (negative counts from the end); C is
    -1 for an axis out of range."""
    ndim = x.ndim
    if axis < 0:
        axis += ndim
    if axis < 0 or axis >= ndim:
        return 0, -1, 0
    outer = inner = 1
    for i in range(axis):
        outer *= x.shape[i]
    for i in range(axis + 1, ndim):
        inner *= x.shape[i]
    return outer, x.shape[axis], inner


@kernel(inline="always")
def _apart_or_same(out, value):
    """Whether the C-contiguous arrays ``out`` and ``value`` of one dtype are one view (the same
    first byte and size) or lie apart (their bytes' bounds do not meet, np.may_share_memory's
    test): what a plain call asks of an ``out=`` and each of its inputs
    (:func:`numba_bn.hostcall.output`; the checked path takes the same view in place too)."""
    if one_memory(out, value):  # (the kernels then read and write one array: in place)
        return out.size == value.size
    a, b = out.ctypes.data, value.ctypes.data
    return a + out.nbytes <= b or b + value.nbytes <= a


@kernel(inline="always")
def _fits(vector, channels, absent):
    """A per-channel vector of ``channels`` values, or the zero-length one for an absent one."""
    return vector.size == 0 if absent else vector.size == channels


def _front(step):
    """The front of ``step``, compiled as the drivers are (cached, without Numba's runtime) and
    announced as they are (numba_bn.compiling: ``front_of``)."""

    def make(function):
        function.front_of = step
        dispatcher = kernel(cache=True, no_cfunc_wrapper=True, _nrt=False)(function)
        key_on_sources(dispatcher)
        lock_cache_saves(dispatcher)
        return dispatcher

    return make


@_front("forward_eval")
def _eval_front(address, x, axis, running_mean, running_var, weight, bias, absent, eps, y):
    """forward_eval's driver on x's canonical view: its answer (-1, or the first negative
    running variance's index, nothing written), or NOT_PLAIN."""
    if not plain_arrays((x, y), (running_mean, running_var, weight, bias)):
        return NOT_PLAIN
    outer, channels, inner = _canonical(x, axis)
    if (channels < 1 or running_mean.size != channels or running_var.size != channels
            or not _fits(weight, channels, absent & 1) or not _fits(bias, channels, absent & 2)
            or not (eps >= 0.0 and eps <= math.inf) or y.size != x.size
            or not _apart_or_same(y, x)):  # fmt: skip
        return NOT_PLAIN
    view = shaped_when_plain(x, (outer, channels, inner))
    y_view = shaped_when_plain(y, (outer, channels, inner))
    return call_int64(address, (view, weight, bias, running_mean, running_var, float64(eps),
                                y_view, view))  # fmt: skip


@_front("forward_train")
def _train_front(address, x, axis, weight, bias, absent, eps, running_mean, running_var,
                 momentum, unbiased, mean, invstd, m2, y, saved):  # fmt: skip
    """forward_train's driver on x's canonical view, with the running update of the buffers
    unless absent (``absent & 4``); its float64 statistics in ``mean``, ``invstd`` and ``m2``
    (zero-length: in scratch), and rounded to x's dtype in ``saved`` (2, C; (2, 0): not
    wanted): 0, or NOT_PLAIN."""
    if not (
        plain_arrays((x, y), (weight, bias, running_mean, running_var))
        and writable((running_mean, running_var))
        and plain_arrays((x, saved), ())
        and float64_buffers((mean, invstd, m2))
    ):
        return NOT_PLAIN
    outer, channels, inner = _canonical(x, axis)
    if (
        channels < 1
        or outer * inner < 2
        or not _fits(weight, channels, absent & 1)
        or not _fits(bias, channels, absent & 2)
        or not (eps > 0.0 and eps <= math.inf)
        or not _fits(running_mean, channels, absent & 4)
        or not _fits(running_var, channels, absent & 4)
        or not (momentum >= 0.0 and momentum <= 1.0)
        or y.size != x.size
        or not _apart_or_same(y, x)
        or saved.shape[0] != 2
        or (saved.shape[1] != channels and saved.shape[1] != 0)
        or not _fits(mean, channels, absent & 8)
        or invstd.size != mean.size
        or m2.size != mean.size
    ):
        return NOT_PLAIN
    view = shaped_when_plain(x, (outer, channels, inner))
    y_view = shaped_when_plain(y, (outer, channels, inner))
    if absent & 8:  # (an argument's release does nothing: it has no MemInfo here)
        mean, invstd, m2 = _scratch(channels), _scratch(channels), _scratch(channels)
    call_boolean(address, (view, weight, bias, float64(eps), running_mean, running_var,
                           float64(momentum), unbiased, False, y_view, mean, invstd, m2, view,
                           saved))  # fmt: skip
    release(mean)
    release(invstd)
    release(m2)
    return 0


@kernel(inline="always")
def _scratch(channels):
    return empty(channels, np.float64)


@_front("backward")
def _backward_front(address, dy, x, axis, mean, invstd, weight, absent, sum_dy, sum_dy_xmu, dx,
                    grads):  # fmt: skip
    """backward's driver on the canonical views of dy and x, the statistics (vectors of float64
    or x's dtype, any layout) as float64, its sums in ``sum_dy`` and ``sum_dy_xmu``
    (zero-length: in scratch), dweight and dbias rounded to x's dtype in ``grads`` (2, C): 0,
    or NOT_PLAIN."""
    if not (
        plain_arrays((x, dy, dx), (weight,))
        and plain_arrays((x, grads), ())
        and float64_buffers((sum_dy, sum_dy_xmu))
    ):
        return NOT_PLAIN
    outer, channels, inner = _canonical(x, axis)
    if (
        channels < 1
        or dy.shape != x.shape  # (False for shapes of two ranks)
        or mean.size != channels
        or invstd.size != channels
        or not _fits(weight, channels, absent & 1)
        or not _fits(sum_dy, channels, absent & 8)
        or sum_dy_xmu.size != sum_dy.size
        or dx.size != x.size
        or not _apart_or_same(dx, dy)
        or not _apart_or_same(dx, x)
        or grads.shape[0] != 2
        or grads.shape[1] != channels
    ):
        return NOT_PLAIN
    shape = (outer, channels, inner)
    mean64, invstd64 = _scratch(channels), _scratch(channels)
    for c in range(channels):  # exact: float32 and float64 alike
        mean64[c] = mean[c]
        invstd64[c] = invstd[c]
    if absent & 8:
        sum_dy, sum_dy_xmu = _scratch(channels), _scratch(channels)
    dy_view, x_view = shaped_when_plain(dy, shape), shaped_when_plain(x, shape)
    dx_view = shaped_when_plain(dx, shape)
    call_none(address, (dy_view, x_view, mean64, invstd64, weight, dx_view, sum_dy, sum_dy_xmu,
                        grads))  # fmt: skip
    release(mean64)
    release(invstd64)
    release(sum_dy)
    release(sum_dy_xmu)
    return 0


def forward_train(x, weight, bias, eps, axis, running_mean=None, running_var=None,
                  momentum=0.1, unbiased=True, out=None):  # fmt: skip
    """A plain training forward of the ndarray ``x`` without mask, residual or activation
    (nan_policy "propagate"), into ``out`` when given, when a front serves it; else None.
    Without running buffers, (y, mean, invstd), the statistics in x's dtype
    (functional.forward_train); with them (updated in place), (y,) (functional.batch_norm)."""
    served = _served("forward_train", x, axis, weight, bias)
    if served is None or type(eps) is not float:
        return None
    address, nothing, weight, bias, absent = served
    dtype = nothing.dtype
    if out is not None and not like(out, x):
        return None
    y = np.empty(x.shape, dtype) if out is None else out
    if running_mean is None and running_var is None:
        saved = np.empty((2, x.shape[axis]), dtype)
        status = _train_front(address, x, axis, weight, bias, absent | 12, eps, nothing, nothing,
                              0.1, True, _NO_STATISTICS, _NO_STATISTICS, _NO_STATISTICS, y,
                              saved)  # fmt: skip
        return None if status else (y, saved[0], saved[1])
    if (type(running_mean) is not ndarray or running_mean.dtype is not dtype
            or type(running_var) is not ndarray or running_var.dtype is not dtype
            or type(momentum) is not float or type(unbiased) is not bool):  # fmt: skip
        return None
    status = _train_front(address, x, axis, weight, bias, absent | 8, eps, running_mean,
                          running_var, momentum, unbiased, _NO_STATISTICS, _NO_STATISTICS,
                          _NO_STATISTICS, y, _NO_ROWS[dtype])  # fmt: skip
    return None if status else (y,)


def backward(dy, x, mean, invstd, weight, axis, out=None):
    """(dx, dweight, dbias) of a plain backward of the ndarrays ``dy`` and ``x`` without mask
    or activation, dx in ``out`` when given, when a front serves it; else None."""
    served = _served("backward", x, axis, weight, None)  # (no bias: its slot and bit unread)
    if served is None:
        return None
    address, nothing, weight, _, absent = served
    dtype = nothing.dtype
    if (type(dy) is not ndarray or dy.dtype is not dtype or type(mean) is not ndarray
            or (mean.dtype is not dtype and mean.dtype is not F64) or mean.ndim != 1
            or type(invstd) is not ndarray or invstd.ndim != 1
            or (invstd.dtype is not dtype and invstd.dtype is not F64)):  # fmt: skip
        return None
    if out is not None and not like(out, x):
        return None
    dx = np.empty(x.shape, dtype) if out is None else out
    grads = np.empty((2, x.shape[axis]), dtype)
    if _backward_front(address, dy, x, axis, mean, invstd, weight, absent | 8, _NO_STATISTICS,
                       _NO_STATISTICS, dx, grads):  # fmt: skip
        return None
    return dx, grads[0], grads[1]


def forward_eval(x, running_mean, running_var, weight, bias, eps, axis, out=None):
    """y of a plain forward_eval of the ndarray ``x`` without residual or activation, into
    ``out`` when given, when a front serves it; else None."""
    served = _served("forward_eval", x, axis, weight, bias)
    if served is None or type(eps) is not float:
        return None
    address, nothing, weight, bias, absent = served
    dtype = nothing.dtype
    if (type(running_mean) is not ndarray or running_mean.dtype is not dtype
            or type(running_var) is not ndarray or running_var.dtype is not dtype):  # fmt: skip
        return None
    if out is not None and not like(out, x):
        return None
    y = np.empty(x.shape, dtype) if out is None else out
    status = _eval_front(address, x, axis, running_mean, running_var, weight, bias, absent, eps, y)
    return y if status == -1 else None


def like(out, x):
    """Whether an ``out=`` is one a front takes for the ndarray ``x``: an ndarray of x's dtype
    and shape. Its layout and writability are the front's types to check, its overlap with the
    inputs the front's to test (:func:`_apart_or_same`)."""
    return type(out) is ndarray and out.dtype is x.dtype and out.shape == x.shape


def _served(step, x, axis, weight=None, bias=None):
    """(address, the zero-length vector of x's dtype, weight, bias, the absent mask) of the
    front that serves ``step`` on ``x`` with channels on ``axis`` on the calling thread's
    count, with the vectors as it takes them (the zero-length one for None); None where it
    does not serve, or a vector is not an ndarray of x's dtype. (One call: checking the vectors
    in a call of their own cost ~0.1-0.2 us of a small call.)"""
    if type(x) is not ndarray or x.size > _largest or type(axis) is not int:
        return None  # a CUDA array, say; a size no front serves; axis=True (hashes as 1)
    plan = _ADDRESSES.get((step, x.shape, axis, x.dtype))
    if plan is None or (plan[2] and plan[2] != num_threads()):
        return None  # a parallel plan's: that count's plan may run another twin
    address, nothing, _ = plan
    absent = 0
    if weight is None:
        weight, absent = nothing, 1
    elif type(weight) is not ndarray or weight.dtype is not nothing.dtype:
        return None
    if bias is None:
        bias, absent = nothing, absent | 2
    elif type(bias) is not ndarray or bias.dtype is not nothing.dtype:
        return None
    return address, nothing, weight, bias, absent


#: The defaults of ``backend`` and ``device``, as the strings they are (interned): a call that
#: keeps them may take a front after one identity test each; any other string takes the plain
#: path (the same result).
CPU, AUTO, PROPAGATE = "cpu", "auto", "propagate"  # (and nan_policy's)


def may_serve(backend, device):
    """Whether a front may serve a call with these ``backend`` and ``device`` arguments."""
    return backend is CPU and device is AUTO


def knows(step, x, axis):
    """Whether a front serves ``step`` on inputs like ``x`` with channels on ``axis`` (on the
    calling thread's count)."""
    return _served(step, x, axis) is not None


def learn(step, x, axis, found):
    """Keep ``found`` ((address, threads): the machine code of the driver the plan runs,
    :func:`numba_bn.cpu.front_address`) for ``step``'s plain calls on inputs like the ndarray
    ``x`` with channels on ``axis``."""
    global _largest
    if len(_ADDRESSES) >= _ADDRESSES_MAX:
        forget()
    address, threads = found
    _ADDRESSES[step, x.shape, axis, x.dtype] = address, np.empty(0, x.dtype), threads
    _largest = max(_largest, x.size)


def forget():
    """Forget every address (the plans were dropped: another thread count, compile_only)."""
    global _largest
    _ADDRESSES.clear()
    _largest = -1


def dispatchers():
    """The fronts' dispatchers (warm-up counts their cache loads)."""
    return [_eval_front, _train_front, _backward_front]


def compile_ahead(dtype, rank):
    """Compile (or load from Numba's cache) the fronts the plain calls on an x of ``dtype`` and
    ``rank`` take (``numba-bn warmup``): the functional API's and the layer's, whose backward
    passes float64 statistics, for C-contiguous writable arrays as those calls make them. A
    front compiles on the third call of a shape otherwise (~0.35 s each)."""
    x = np.empty((1,) * rank, dtype)
    vector, rows, f64 = np.empty(0, dtype), np.empty((2, 0), dtype), np.empty(0)
    train = (0, x, 1, vector, vector, 0, 1e-5, vector, vector, 0.1, True, f64, f64, f64, x, rows)
    calls = [(_eval_front, (0, x, 1, vector, vector, vector, vector, 0, 1e-5, x)),
             (_train_front, train)]  # fmt: skip
    for statistics in dict.fromkeys((vector.dtype, f64.dtype)):  # functional's, the layer's
        stat = np.empty(0, statistics)
        calls.append((_backward_front, (0, x, x, 1, stat, stat, vector, 0, f64, f64, x, rows)))
    for front, arguments in calls:
        front.compile(tuple(map(typeof, arguments)))
