"""Drivers: the work items of :mod:`.items` as ``prange`` loops, parallel and serial twins.

Arguments come validated, C-contiguous and in one dtype (float32 or float64) from
:mod:`numba_bn.ops`; per-channel outputs are float64. Absent weight/bias/running buffers are
zero-length arrays. What an item is, and how many there are, is :mod:`.items`' alone; a driver
chooses which items run and in what order (the merge order inside a channel never depends on
it):

* fused (planes, ``C >= 2 * threads``): one channel per item, x read from memory once
  (``forward_train_fused``, ``backward_fused``);
* split: reduction items into partials, a merge per channel, then elementwise items; planes
  with few channels (C = 1 too) still use every core (``forward_train_split``,
  ``backward_split``). Where each reduction item holds whole channels (rows of one chunk), it
  merges them itself: one parallel region fewer.

Compile time is what a user feels first (README, "First call"): Numba compiles a driver with
everything it inlines, and the kernels it calls, on its first call. One driver per partition
keeps a call from compiling loop nests it never runs: with both in one driver, a rows input's
forward_train compiled the fused kernels too, a quarter of its compile time (40% for the
parallel twin). The backend (:mod:`numba_bn.cpu`) picks the driver.

For the same reason a driver is compiled for one memory shape (:mod:`.items`: rows, planes or
short planes) and one epilogue: :func:`driver` gives the copy of a step's template whose loop
nests call that shape's items (:data:`.items.ITEMS`) and whose global EPILOGUE is that code,
made on first use.
A rows call then never sees the planes items and kernels (a third of its compile time), and a
plain call never compiles the loops of the fused BN+Add+ReLU (issue 13), which is the same
forward drivers with another epilogue (:mod:`.kernels`), a compile-time constant. Its backward
is the plain one on the gradient through the ReLU: ``backward_fused_relu`` takes it channel by
channel in the fused partition, ``relu_grad`` in a pass of its own otherwise.

A loop passes the items and kernels it calls views of its arrays that hold no reference
(:func:`numba_bn.stats.borrowed`, ``flat``), taken in the loop, so that the arrays live until it
ends: Numba counted a reference for every array of an item in every iteration, two atomic
operations each (250 in a serial backward of an (8, 16, 8, 8) batch, ~0.8 us of its 4.4).

The drivers go further: they are compiled without Numba's runtime (``_nrt=False``), so nothing
counts references in them at all. With the runtime, a call made a MemInfo of each array
argument (a malloc, a free and the GIL taken to let go of the array) and counted its
references in the driver, atomically: 0.3-0.9 us of a serial call, half of a small backward's
driver, and 1-2.5 us of a parallel one (benchmarks/README.md, "Stop 61"). Without it, a driver
frees the scratch it allocates (:func:`numba_bn.stats.empty`) itself, with
:func:`numba_bn.stats.release` on every path out and in each item of a ``prange`` loop
(``release`` does nothing in a function compiled with the runtime, which frees the scratch).
"""

import math
import os
import threading

import numba
import numpy as np
from numba import prange

from .. import ahead
from ..codecache import key_on_sources, lock_cache_saves
from ..stats import (
    AFFINE_ROWS,
    DX_ROWS,
    borrowed,
    empty,
    flat,
    kernel,
    release,
    renamed_copy,
    running_update,
)
from .channels import add_channels, dx_channels, merge_channels, train_channels
from .items import (
    ITEM_SCRATCH_SHAPE,
    ITEMS,
    MEMORY_ANY,
    MEMORY_PLANES,
    MEMORY_ROWS,
    MEMORY_SHORT,
    channel_item,
    channel_items,
    elementwise_items,
    flat_item,
    flat_items,
    parts,
    reduce_items,
    release_wide,
    whole_channels,
)
from .kernels import (
    EPILOGUE_NONE,
    affine_coefficients,
    dx_coefficients,
    eval_coefficients,
    plane_channel_backward,
    plane_channel_train,
    relu_grad_planes,
    relu_grad_range,
    short_planes_jit,
)

EPILOGUE = EPILOGUE_NONE  # the templates'; each driver copy (twins, driver) has its own

CACHE = True


def _copy(template, suffix, scope):
    """``template`` under another name (Numba's on-disk cache keys on it) and globals, marked as
    a driver's."""
    copy = renamed_copy(template, suffix, scope)
    copy.twin_of = template.__name__  # what numba_bn.compiling announces
    return copy


_MEMORY_SUFFIX = {MEMORY_ANY: "", MEMORY_ROWS: "_rows", MEMORY_PLANES: "_planes",
                  MEMORY_SHORT: "_short"}  # fmt: skip


def twins(template, epilogue=EPILOGUE_NONE, memory=MEMORY_ANY):
    """Compile ``template`` twice: ``parallel=True``, and serial (``prange`` runs as ``range``).

    The serial twin serves inputs too small to repay waking the thread pool (a parallel launch
    costs ~5 us on an idle machine and milliseconds on a loaded one). Both run the same code in
    the same order, so they give bitwise the same results, and both without Numba's runtime (the
    module's docstring). The copy gets its own qualname so that Numba's on-disk cache keeps the
    two apart.

    ``epilogue`` (:mod:`.kernels`) becomes the global EPILOGUE of both, a compile-time constant,
    and the loop nests they call are those of ``memory`` (:data:`LOOPS`; ``_rows_epilogue1`` in
    the copies' names).
    """
    suffix = _MEMORY_SUFFIX[memory] + (f"_epilogue{epilogue}" if epilogue != EPILOGUE_NONE else "")
    scope = {**template.__globals__, "EPILOGUE": epilogue, **LOOPS[memory]}
    parallel = _copy(template, suffix, scope)
    serial = _copy(template, suffix + "_serial", scope)
    # called from Python only; without Numba's runtime (the module's docstring)
    options = {"cache": CACHE, "no_cfunc_wrapper": True, "_nrt": False}
    pair = kernel(parallel=True, **options)(parallel), kernel(**options)(serial)
    for dispatcher in pair:
        key_on_sources(dispatcher)
        lock_cache_saves(dispatcher)
        ahead.hold_loads(dispatcher)  # a worker may be compiling it (numba_bn.ahead)
    _twins.extend(pair)
    return pair


_twins = []  # every dispatcher twins() has made: batch norm's drivers and the norms' ones


def _for_dtype(signature, dtype):
    """Whether a driver's ``signature`` (Numba's argument types) takes an x (its first
    argument) of ``dtype``."""
    return str(getattr(signature[0], "dtype", "")) == dtype.name


def loaded_for(dispatcher, dtype):
    """Whether ``dispatcher`` has machine code in this process for an x (its first argument) of
    ``dtype``."""
    return any(_for_dtype(signature, dtype) for signature in dispatcher.overloads)


#: Set (to anything but "" or "0") in the environment before numba_bn is imported, every
#: :func:`machine_code` call checks its arguments' types first (the test suite sets it).
CHECK_CALLS = os.environ.get("NUMBA_BN_CHECK_DRIVER_CALLS", "") not in ("", "0")


def machine_code(dispatcher, dtype):
    """How a plan calls the serial twin ``dispatcher`` on an x of ``dtype``: the entry point of
    its machine code for that dtype, which skips Numba's dispatch (typing each argument, ~25 ns
    an array, and finding the overload: 0.2-0.4 us of a small call). None while it has none
    (the first call compiles or loads it); the dispatcher itself when its overloads for the
    dtype take arguments of more than one :func:`_kind` (or one without a kind).

    The entry point unboxes what it is given as the types it was compiled for, unchecked: the
    callers pass validated C-contiguous arrays of x's dtype and float64 vectors (the module's
    first rule), Python floats and bools. Arrays that are read-only or unaligned run the same
    machine code (the dispatcher would compile another copy): the drivers write only their
    outputs, which the callers make or check writable, and x86-64 and AArch64 loads take any
    address. With :data:`CHECK_CALLS` each call checks the arguments' kinds first."""
    compiled = getattr(dispatcher, "overloads", None)
    if compiled is None:  # a Python function (NUMBA_DISABLE_JIT)
        return dispatcher
    overloads = [(signature, code) for signature, code in compiled.items()
                 if _for_dtype(signature, dtype)]  # fmt: skip
    if not overloads:
        return None
    kinds = {_kind(signature) for signature, _ in overloads}
    if len(kinds) != 1 or None in kinds:
        return dispatcher
    entry = overloads[0][1].entry_point
    return _checked(entry, kinds.pop(), dispatcher) if CHECK_CALLS else entry


def native_address(dispatcher, dtype):
    """The address of the twin ``dispatcher``'s machine code (serial or parallel) for an x of
    ``dtype`` as Numba's compiled code calls it (:func:`numba_bn.cpu.fronts.native_call`), for
    arguments of the one kind :func:`machine_code` calls it with; None when there is no such
    code."""
    if machine_code(dispatcher, dtype) is None or not hasattr(dispatcher, "overloads"):
        return None
    for signature, code in dispatcher.overloads.items():
        if _for_dtype(signature, dtype) and _kind(signature) is not None:
            return code.library.get_pointer_to_function(code.fndesc.llvm_func_name) or None
    return None


def _kind(signature):
    """What a call's arguments must be to run the machine code of ``signature`` as Numba's
    dispatch would: (dtype name, ndim) for a C-contiguous array, float for float64, bool for
    boolean; None when another type is in it."""
    kind = []
    for argument in signature:
        if isinstance(argument, numba.types.Array) and argument.layout == "C":
            kind.append((str(argument.dtype), argument.ndim))
        elif argument in _SCALAR_KINDS:
            kind.append(_SCALAR_KINDS[argument])
        else:
            return None
    return tuple(kind)


_SCALAR_KINDS = {numba.types.float64: float, numba.types.boolean: bool}


def _checked(entry, kind, dispatcher):
    """``entry`` behind a check that its arguments are of ``kind`` (:data:`CHECK_CALLS`)."""

    def run(*arguments):
        if len(arguments) != len(kind) or not all(map(_fits, arguments, kind)):
            given = [_kind_of(value) for value in arguments]
            raise TypeError(f"{dispatcher.__name__}: arguments {given} for machine code {kind}")
        return entry(*arguments)

    run.__wrapped__ = dispatcher
    return run


def _fits(value, kind):
    if kind is float:
        return isinstance(value, float)  # np.float64 too; Numba types both float64
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    return isinstance(value, np.ndarray) and _kind_of(value) == kind


def _kind_of(value):
    if isinstance(value, np.ndarray):
        return (value.dtype.name, value.ndim) if value.flags.c_contiguous else "not C-contiguous"
    return type(value).__name__


def cached_for(dispatcher, dtype):
    """Whether Numba's cache holds machine code of ``dispatcher`` for an x (its first argument)
    of ``dtype``, for this machine, Numba and these sources (what a call would load); True when
    it cannot tell (a cache of another layout)."""
    cache = getattr(dispatcher, "_cache", None)
    if not getattr(cache, "cache_path", None):
        return False
    try:
        wanted = cache._index_key((), dispatcher.targetctx.codegen())[1:]
        index = cache._cache_file._load_index()  # {} when missing, stale or of another Numba
    except Exception:  # another Numba's cache layout
        return True
    return any(key[1:] == wanted and _for_dtype(key[0], dtype) for key in index if key and key[0])


# ------------------------------------------------------------------------------- loop nests
# Templates: LOOPS holds their copies per memory shape, each calling that shape's items
# (stats_item and the rest are names of .items.ITEMS, bound in the copies' globals), with
# inline="always", which inlines them into each driver before Numba's parfor pass, so that their
# prange loops run on threads in the parallel twin and as plain loops in the serial one. Their
# items take borrowed views (the module's docstring).
def _stats_loop(x, part, whole, finish, finishing):
    """Partials (=) of every reduction item. Where they hold whole channels (``whole``:
    :func:`.items.whole_channels`), each item then finishes its channels c0:c1 with
    ``finish(c0, c1, part, *finishing)`` (:mod:`.channels`: ``train_channels``,
    ``merge_channels``) in the same parallel region, and the caller's channel items, a region
    of their own (~4 us to start and end on two threads), are not needed. The same kernels on
    the same partials: the same bits."""
    outer, channels, inner = x.shape
    unused = empty((ITEM_SCRATCH_SHAPE[0], 0), np.float64)
    rows = inner == 1 or short_planes_jit(outer, inner)
    for item in prange(reduce_items(outer, channels, inner)):
        # rows and short planes items take ITEM_SCRATCH_SHAPE, one per item (a thread's)
        scratch = empty(ITEM_SCRATCH_SHAPE, np.float64) if rows else borrowed(unused)
        stats_item(flat(x), x.shape, item, borrowed(part), scratch)  # noqa: F821
        if whole:
            c0, c1 = item_channels(x.shape, item)  # noqa: F821
            finish(c0, c1, borrowed(part), *finishing)
        release(scratch)
    release(unused)


def _sums_loop(dy, x, mean, part, whole, finish, finishing):
    """Partials (=) of every reduction item of a backward, finished as in _stats_loop
    (``add_channels``, ``dx_channels``)."""
    outer, channels, inner = x.shape
    unused, short = empty((ITEM_SCRATCH_SHAPE[0], 0), np.float64), short_planes_jit(outer, inner)
    for item in prange(reduce_items(outer, channels, inner)):
        # short planes items' only
        scratch = empty(ITEM_SCRATCH_SHAPE, np.float64) if short else borrowed(unused)
        sums_item(flat(dy), flat(x), x.shape, item, borrowed(mean), borrowed(part),  # noqa: F821
                  scratch)  # fmt: skip
        if whole:
            c0, c1 = item_channels(x.shape, item)  # noqa: F821
            finish(c0, c1, borrowed(part), *finishing)
        release(scratch)
    release(unused)


def _normalize_loop(x, coef, y, z, epilogue):
    """y (=) of every elementwise item, with ``epilogue`` (the calling driver's EPILOGUE: a
    global here would be this module's) and ``z`` (as x); ``coef`` (rows, C), spread here to a
    column per value for short planes (wide_coefficients)."""
    outer, channels, inner = x.shape
    wide = wide_coefficients(coef, outer, inner)  # noqa: F821
    for item in prange(elementwise_items(outer, channels, inner)):
        normalize_item(flat(x), flat(y), x.shape, item, borrowed(wide), flat(z),  # noqa: F821
                       epilogue)  # fmt: skip
    release_wide(wide, outer, inner)


def _dx_loop(dy, x, coef, dx):
    outer, channels, inner = x.shape
    wide = wide_coefficients(coef, outer, inner)  # noqa: F821
    for item in prange(elementwise_items(outer, channels, inner)):
        dx_item(flat(dy), flat(x), flat(dx), x.shape, item, borrowed(wide))  # noqa: F821
    release_wide(wide, outer, inner)


#: LOOPS[memory][name]: the loop nests of one memory shape, as the drivers' copies call them.
LOOPS = {
    memory: {
        loop.__name__: kernel(inline="always")(
            _copy(loop, _MEMORY_SUFFIX[memory], {**globals(), **items})
        )
        for loop in (_stats_loop, _sums_loop, _normalize_loop, _dx_loop)
    }
    for memory, items in ITEMS.items()
}


@kernel(inline="always")
def _channels_loop(part, whole, finish, finishing):
    """The channel items (:func:`.items.channel_item`: ``finish(c0, c1, part, *finishing)``),
    unless the reduction items finished their channels (``whole``, :func:`_stats_loop`). One
    item (up to CHANNEL_GROUP channels) runs on this thread: a parallel region costs ~1.2 us
    (~4 on the AMD EPYC of stop 65) to start and finish, also when one thread has all its work."""
    count = 0 if whole else channel_items(part.shape[2])
    if count == 1:
        channel_item(0, part, finish, finishing)
    elif count > 1:
        for item in prange(count):
            channel_item(item, borrowed(part), finish, finishing)


# ------------------------------------------------------------------------------------ drivers
def _batch_stats(x, mean, m2):
    """mean, M2 (=, float64, (C,)) of each channel of ``x`` (outer, C, inner); returns the count."""
    outer, channels, inner = x.shape
    part = empty((3, parts(outer, inner), channels), np.float64)
    whole = whole_channels(outer, inner)  # see _stats_loop
    _stats_loop(x, part, whole, merge_channels, (mean, m2))
    _channels_loop(part, whole, merge_channels, (mean, m2))
    release(part)
    return float(outer * inner)


def _normalize(x, mean, invstd, weight, bias, y, z):
    """y = (x - mean) * invstd * weight + bias from float64 per-channel ``mean``, ``invstd``,
    then the EPILOGUE with ``z`` (x itself when it has no residual, and not read)."""
    coef = empty((AFFINE_ROWS, x.shape[1]), x.dtype)
    for c in range(x.shape[1]):
        affine_coefficients(c, mean[c], invstd[c], weight, bias, coef)
    _normalize_loop(x, coef, y, z, EPILOGUE)
    release(coef)


def _backward_sums(dy, x, mean, sum_dy, sum_dy_xmu):
    """sum_dy, sum_dy_xmu (=, float64, (C,)): the per-channel reduction of the backward."""
    outer, channels, inner = x.shape
    part = empty((2, parts(outer, inner), channels), np.float64)
    whole = whole_channels(outer, inner)  # see _stats_loop
    _sums_loop(dy, x, mean, part, whole, add_channels, (sum_dy, sum_dy_xmu))
    _channels_loop(part, whole, add_channels, (sum_dy, sum_dy_xmu))
    release(part)


def _backward_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
    """dx from the reductions ``sum_dy``, ``sum_dy_xmu`` over ``count`` values per channel
    (which may be those of a larger batch than x: SyncBatchNorm's global batch)."""
    coef = empty((DX_ROWS, x.shape[1]), x.dtype)
    for c in range(x.shape[1]):
        dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)
    _dx_loop(dy, x, coef, dx)
    release(coef)


@kernel(inline="always")
def _running_update_if_finite(nan_check, running_mean, running_var, count, mean, m2, momentum,
                              unbiased):  # fmt: skip
    """The running update (when there are running buffers); False, with nothing updated, when
    ``nan_check`` is set and a statistic is not finite."""
    if nan_check:
        # a loop, not np.isfinite(mean).all(): no temporary, and no array expression to compile
        for c in range(mean.size):
            if not (math.isfinite(mean[c]) and math.isfinite(m2[c])):
                return False
    if running_mean.size:
        running_update(running_mean, running_var, count, mean, m2, momentum, unbiased)
    return True


@kernel(inline="always")
def _saved_statistics(mean, invstd, saved):
    """saved (=) mean and invstd rounded to saved's dtype (x's) as NumPy's astype rounds them,
    when it has a column per channel; a caller that wants the float64 ones alone passes a
    (2, 0) array. The functional API returns these: here nanoseconds, two astype ~0.7 us."""
    if saved.shape[1] == mean.size:
        for c in range(mean.size):
            saved[0, c] = mean[c]
            saved[1, c] = invstd[c]


def _forward_train_split(
    x, weight, bias, eps, running_mean, running_var, momentum, unbiased, nan_check,
    y, save_mean, save_invstd, save_m2, z, saved,
):  # fmt: skip
    """Batch statistics, normalisation and the running update in one call: reduction items,
    channel merges, then elementwise items (any memory shape); y with the EPILOGUE and ``z``.

    Writes y, save_mean, save_invstd and save_m2 (M2 per channel, float64), and the rounded
    statistics in ``saved`` (:func:`_saved_statistics`). Returns False, with the running buffers
    and y untouched, when ``nan_check`` is set and a statistic is not finite.
    """
    outer, channels, inner = x.shape
    count = float(outer * inner)
    coef = empty((AFFINE_ROWS, channels), x.dtype)
    part = empty((3, parts(outer, inner), channels), np.float64)
    whole = whole_channels(outer, inner)
    finishing = (count, eps, weight, bias, coef, save_mean, save_invstd, save_m2)
    _stats_loop(x, part, whole, train_channels, finishing)
    _channels_loop(part, whole, train_channels, finishing)
    release(part)
    finite = _running_update_if_finite(nan_check, running_mean, running_var, count, save_mean,
                                       save_m2, momentum, unbiased)  # fmt: skip
    if finite:
        _saved_statistics(save_mean, save_invstd, saved)
        _normalize_loop(x, coef, y, z, EPILOGUE)
    release(coef)
    return finite


def _forward_train_fused(
    x, weight, bias, eps, running_mean, running_var, momentum, unbiased, nan_check,
    y, save_mean, save_invstd, save_m2, z, saved,
):  # fmt: skip
    """forward_train_split with one channel per item (planes, :mod:`.items`): x is read from
    memory once. y is written channel by channel, so with ``nan_check`` it may be written when
    False comes back (the caller does not fuse then)."""
    outer, channels, inner = x.shape
    coef = empty((AFFINE_ROWS, channels), x.dtype)
    for c in prange(channels):
        plane_channel_train(borrowed(x), c, eps, borrowed(weight), borrowed(bias), borrowed(coef),
                            borrowed(y), borrowed(save_mean), borrowed(save_invstd),
                            borrowed(save_m2), borrowed(z), EPILOGUE)  # fmt: skip
    release(coef)
    _saved_statistics(save_mean, save_invstd, saved)
    return _running_update_if_finite(nan_check, running_mean, running_var, float(outer * inner),
                                     save_mean, save_m2, momentum, unbiased)  # fmt: skip


def _forward_eval(x, weight, bias, running_mean, running_var, eps, y, z):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, then the EPILOGUE.

    Returns -1; or, with nothing written, the index of the first negative running variance (a
    buffer corrupted in place: the caller's checks explain). The plain calls' check, here
    instead of a compiled call of its own (~0.25 us of a small call)."""
    for c in range(running_var.size):
        if running_var[c] < 0:
            return c
    coef = empty((AFFINE_ROWS, x.shape[1]), x.dtype)
    eval_coefficients(weight, bias, running_mean, running_var, eps, coef)
    _normalize_loop(x, coef, y, z, EPILOGUE)
    release(coef)
    return -1


@kernel(inline="always")
def _parameter_gradients(invstd, sum_dy, sum_dy_xmu, grads):
    """grads (=) dweight = invstd * sum_dy_xmu and dbias = sum_dy, rounded to grads' dtype as
    NumPy's astype rounds (a float64 product, then the cast), when it has a column per channel;
    a caller that wants the sums alone passes a (2, 0) array. The C values cost nanoseconds
    here, three NumPy calls ~1.2 us in the caller."""
    if grads.shape[1] == sum_dy.size:
        for c in range(sum_dy.size):
            grads[0, c] = invstd[c] * sum_dy_xmu[c]
            grads[1, c] = sum_dy[c]


def _backward_split(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, grads):
    """Training-mode backward: the per-channel reduction, then dx (docs/backward.md), as
    reduction items, channel sums, then elementwise items (any memory shape).

    Writes dx, the float64 reductions sum_dy (= dbias) and sum_dy_xmu (dweight is
    invstd * sum_dy_xmu), and the parameter gradients in ``grads`` (:func:`_parameter_gradients`).
    """
    outer, channels, inner = x.shape
    count = float(outer * inner)
    coef = empty((DX_ROWS, channels), x.dtype)
    part = empty((2, parts(outer, inner), channels), np.float64)
    whole = whole_channels(outer, inner)  # see _stats_loop
    finishing = (count, mean, invstd, weight, coef, sum_dy, sum_dy_xmu)
    _sums_loop(dy, x, mean, part, whole, dx_channels, finishing)
    _channels_loop(part, whole, dx_channels, finishing)
    release(part)
    _parameter_gradients(invstd, sum_dy, sum_dy_xmu, grads)
    _dx_loop(dy, x, coef, dx)
    release(coef)


def _backward_fused(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, grads):
    """backward_split with one channel per item (planes): dy and x are read from memory once."""
    coef = empty((DX_ROWS, x.shape[1]), x.dtype)
    for c in prange(x.shape[1]):
        plane_channel_backward(borrowed(dy), borrowed(x), c, borrowed(mean), borrowed(invstd),
                               borrowed(weight), borrowed(coef), borrowed(dx), borrowed(sum_dy),
                               borrowed(sum_dy_xmu))  # fmt: skip
    release(coef)
    _parameter_gradients(invstd, sum_dy, sum_dy_xmu, grads)


def _backward_fused_relu(dy, y, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, grad, grads):
    """backward_fused through a ReLU epilogue: per channel, grad (=) = dy where y > 0, then the
    channel's backward on grad while it is still in L2 (dy and y are read from memory once, grad
    is written once: the residual's gradient)."""
    outer, channels, inner = x.shape
    coef = empty((DX_ROWS, channels), x.dtype)
    for c in prange(channels):
        relu_grad_planes(flat(dy), flat(y), flat(grad), c, outer * channels, channels, inner)
        plane_channel_backward(borrowed(grad), borrowed(x), c, borrowed(mean), borrowed(invstd),
                               borrowed(weight), borrowed(coef), borrowed(dx), borrowed(sum_dy),
                               borrowed(sum_dy_xmu))  # fmt: skip
    release(coef)
    _parameter_gradients(invstd, sum_dy, sum_dy_xmu, grads)


def _relu_grad(dy, y, g):
    """g = dy where y > 0, else 0 (flat arrays of one size): the backward of a ReLU epilogue."""
    size = dy.size
    for item in prange(flat_items(size)):
        start, stop = flat_item(item, size)
        relu_grad_range(borrowed(dy), borrowed(y), borrowed(g), start, stop)


#: The drivers' templates by step.
STEPS = {
    "forward_train_split": _forward_train_split,
    "forward_train_fused": _forward_train_fused,
    "forward_eval": _forward_eval,
    "backward_split": _backward_split,
    "backward_fused": _backward_fused,
    "backward_fused_relu": _backward_fused_relu,
    "batch_stats": _batch_stats,
    "normalize": _normalize,
    "backward_sums": _backward_sums,
    "backward_dx": _backward_dx,
    "relu_grad": _relu_grad,
}
#: The steps whose template calls the loop nests (a copy per memory shape; the others are for
#: planes only, or flat) and those whose elementwise pass takes an epilogue (read EPILOGUE).
BY_MEMORY = frozenset(
    ("forward_train_split", "forward_eval", "backward_split", "batch_stats", "normalize",
     "backward_sums", "backward_dx")
)  # fmt: skip
BY_EPILOGUE = frozenset(("forward_train_split", "forward_train_fused", "forward_eval", "normalize"))
_copies = {}
_copying = threading.Lock()  # two threads' first calls make one copy, compiled once


def driver(step, memory=MEMORY_ANY, epilogue=EPILOGUE_NONE):
    """The (parallel, serial) twins of ``step`` for a memory shape (:mod:`.items`) and an epilogue
    code (:mod:`.kernels`), made on first use and compiled on their first call. A step that does
    not read one of them has one copy for all its values."""
    pair = _copies.get((step, memory, epilogue))
    if pair is None:
        canonical = (
            step,
            memory if step in BY_MEMORY else MEMORY_ANY,
            epilogue if step in BY_EPILOGUE else EPILOGUE_NONE,
        )
        with _copying:
            pair = _copies.get(canonical) or twins(STEPS[step], canonical[2], canonical[1])
            _copies[step, memory, epilogue] = _copies[canonical] = pair
    return pair


def dispatchers():
    """The drivers' dispatchers made so far (by :func:`twins`: batch norm's and the norms'),
    each once (warm-up and the compile line read their caches)."""
    return list(_twins)
