"""Host side of the CUDA backend: launch shapes from :mod:`.config`, scratch buffers, launches.

Arguments come validated from :mod:`numba_bn.functional` as C-contiguous Numba device arrays in
one compute dtype; per-channel statistics are float64; absent weight/bias/running buffers are
zero-length device arrays. Every call launches at most two kernels (see :mod:`.kernels`).

Under the simulator, importing this module first makes its shared arrays thread-safe (see
:mod:`.simulator`).
"""

import math
import threading

import numpy as np
from numba import cuda

from ..cpu.kernels import EPILOGUE_NONE
from . import config, kernels
from .simulator import make_shared_arrays_thread_safe

make_shared_arrays_thread_safe()


def _pow2_at_least(n):
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _threads():
    """THREADS_PER_BLOCK and ROW_TILE, read now (tests shrink them) and checked."""
    threads, tile = config.THREADS_PER_BLOCK, config.ROW_TILE
    if threads != _pow2_at_least(threads) or not 1 <= threads <= config.MAX_THREADS:
        raise ValueError(
            f"config.THREADS_PER_BLOCK must be a power of two <= {config.MAX_THREADS}, "
            f"got {threads}"
        )
    if tile != _pow2_at_least(tile) or not 1 <= tile <= threads:
        raise ValueError(f"config.ROW_TILE must be a power of two <= THREADS_PER_BLOCK, got {tile}")
    return threads, tile


def _block(channels, inner):
    """(bx, by): threads.x along a plane (planes) or over neighbouring channels (rows)."""
    threads, tile = _threads()
    bx = min(threads, _pow2_at_least(inner)) if inner > 1 else min(tile, _pow2_at_least(channels))
    return bx, threads // bx


def reduction_shape(shape):
    """(blocks, (bx, by), parts_n, parts_s, tiles) of a reduction over ``shape``."""
    outer, channels, inner = shape
    bx, by = _block(channels, inner)
    if inner > 1:
        tiles, ranks, s_groups = channels, bx * by, math.ceil(inner / bx)
    else:
        tiles, ranks, s_groups = math.ceil(channels / bx), by, 1
    wanted = min(
        config.BLOCKS_PER_CHANNEL,
        math.ceil(config.TARGET_BLOCKS / tiles),
        math.ceil(outer * inner / (ranks * config.VALUES_PER_THREAD)),
    )
    parts_n = max(1, min(wanted, math.ceil(outer / by)))
    parts_s = max(1, min(math.ceil(wanted / parts_n), s_groups))
    return tiles * parts_n * parts_s, (bx, by), parts_n, parts_s, tiles


def elementwise_shape(shape):
    """(blocks, (bx, by), values per thread) of an elementwise pass over ``shape``."""
    outer, channels, inner = shape
    bx, by = _block(channels, inner)
    values = config.ELEMENTWISE_VALUES_PER_THREAD
    if inner > 1:
        blocks = math.ceil(outer * channels / by) * math.ceil(inner / (bx * values))
    else:
        blocks = math.ceil(outer / (by * values)) * math.ceil(channels / bx)
    return blocks, (bx, by), values


# ---------------------------------------------------------------------------------- workspace
# Each host thread keeps the device buffers its launches need besides their arguments, per GPU,
# and reuses them call after call: an allocation costs ~30 us of host time on an H200
# and a copy from the host ~115 us (it also waits for the GPU), more than the kernels of a small
# batch. Reuse is safe because one thread's launches run in the order it makes them (its
# stream): a call's launch 1 rewrites the partials and coefficients only after the launch 2 of
# the call before has read them. The last-block counters start at zero, and the last block of
# each tile sets its own back to zero (kernels._is_last_block); a call that checks for
# non-finite statistics (flags[0]) takes freshly zeroed flags instead.
_WORKSPACE = threading.local()
#: Buffers, and bytes, a thread keeps before it drops them all (the shapes of one training loop
#: repeat; a reduction's partials take up to 3 x C x BLOCKS_PER_CHANNEL float64 values).
WORKSPACE_BUFFERS = 64
WORKSPACE_BYTES = 64 * 2**20


def device_of(like):
    """The id of the GPU that holds the device array ``like`` (None under the simulator, whose
    arrays have no ``gpu_data``). Numba runs one (primary) context per GPU, so the id names the
    context; the context itself cannot be a key: it is unhashable, and arrays hold a weak proxy
    of it."""
    data = getattr(like, "gpu_data", None)
    return None if data is None else data.context.device.id


def _buffer(like, key, make):
    """The reusable buffer ``key`` of this thread on the GPU of the device array ``like``:
    ``make()`` the first time."""
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    key = (device_of(like), *key)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = make()
        held = sum(b.nbytes for b in buffers.values())
        if len(buffers) >= WORKSPACE_BUFFERS or held + buffer.nbytes > WORKSPACE_BYTES:
            buffers.clear()
        buffers[key] = buffer
    return buffer


def _scratch(x, rows, parts, tiles, fresh_flags=False):
    """(partial, flags) of a reduction over ``x``: float64 partials per block, int32 flags
    (flags[0]: a statistic is not finite; flags[1:]: the counters, zero). The counters are
    reused unless ``fresh_flags`` asks for a zeroed copy (a call that reads flags[0])."""
    shape = (rows, x.shape[1], parts)
    partial = _buffer(x, ("partial", shape), lambda: cuda.device_array(shape, np.float64))

    def zeroed():
        return cuda.to_device(np.zeros(1 + tiles, np.int32))

    return partial, zeroed() if fresh_flags else _buffer(x, ("flags", tiles), zeroed)


def reused(like, dtype, shape=(0,)):
    """A reusable device array of ``shape`` on the GPU of ``like``: zero-length
    placeholders, and per-channel coefficients written by launch 1 for launch 2."""
    dtype = np.dtype(dtype)
    return _buffer(like, ("empty", dtype, shape), lambda: cuda.device_array(shape, dtype))


# ------------------------------------------------------------------------------- operations
def _launch_stats(x, weight, bias, eps, save_mean, save_invstd, save_m2, coef, nan_check=False):
    """Launch channel_stats; returns its flags (with ``nan_check``, flags[0] != 0: a statistic
    is not finite)."""
    blocks, block, parts_n, parts_s, tiles = reduction_shape(x.shape)
    partial, flags = _scratch(x, 3, parts_n * parts_s, tiles, fresh_flags=nan_check)
    kernels.channel_stats[blocks, block](
        x,
        weight,
        bias,
        eps,
        x.dtype.itemsize <= 4,
        parts_n,
        parts_s,
        partial,
        flags,
        save_mean,
        save_invstd,
        save_m2,
        coef,
    )
    return flags


def _launch_affine(x, coef, y, residual, epilogue, running=None):
    """Launch affine: y from coef, then the ``epilogue`` (a code of :mod:`numba_bn.cpu.kernels`)
    with ``residual`` (None: x is passed and not read); ``running`` = (count, save_mean,
    save_m2, momentum, unbiased, nan_check, flags, running_mean, running_var) for the running
    update in the same launch."""
    blocks, block, values = elementwise_shape(x.shape)
    if running is None:
        stats, none = reused(x, np.float64), reused(x, x.dtype)
        running = (1.0, stats, stats, 0.0, True, False, reused(x, np.int32, (1,)), none, none)
    count, save_mean, save_m2, momentum, unbiased, nan_check, flags, run_mean, run_var = running
    kernels.affine[blocks, block](
        x,
        x if residual is None else residual,
        int(epilogue),
        coef,
        values,
        float(count),
        save_mean,
        save_m2,
        float(momentum),
        bool(unbiased),
        bool(nan_check),
        flags,
        run_mean,
        run_var,
        y,
    )


def forward_train(
    x,
    weight,
    bias,
    eps,
    running_mean,
    running_var,
    momentum,
    unbiased,
    nan_check,
    y,
    save_mean,
    save_invstd,
    save_m2,
    residual=None,
    epilogue=EPILOGUE_NONE,
):
    """Statistics (launch 1), then y with its epilogue and the running update (launch 2); see
    the CPU driver."""
    coef = reused(x, x.dtype, (4, x.shape[1]))
    flags = _launch_stats(x, weight, bias, float(eps), save_mean, save_invstd, save_m2, coef,
                          nan_check)  # fmt: skip
    count = x.shape[0] * x.shape[2]
    running = (count, save_mean, save_m2, momentum, unbiased, nan_check, flags)
    _launch_affine(x, coef, y, residual, epilogue, (*running, running_mean, running_var))
    return not nan_check or flags.copy_to_host()[0] == 0


def forward_eval(x, weight, bias, running_mean, running_var, eps, y, residual=None,
                 epilogue=EPILOGUE_NONE):  # fmt: skip
    """Coefficients from the running statistics (launch 1), then y with its epilogue
    (launch 2)."""
    coef = reused(x, x.dtype, (4, x.shape[1]))
    threads = min(128, x.shape[1])
    blocks = math.ceil(x.shape[1] / threads)
    kernels.eval_coefficients[blocks, threads](
        weight, bias, running_mean, running_var, float(eps), coef
    )
    _launch_affine(x, coef, y, residual, epilogue)


def _launch_sums(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """Launch backward_sums (dx coefficients too when ``coef`` has C columns)."""
    blocks, block, parts_n, parts_s, tiles = reduction_shape(x.shape)
    partial, flags = _scratch(x, 2, parts_n * parts_s, tiles)
    kernels.backward_sums[blocks, block](
        dy, x, mean, invstd, weight, parts_n, parts_s, partial, flags, sum_dy, sum_dy_xmu, coef
    )


def _launch_dx(dy, x, coef, dx):
    """dx from per-channel ``coef`` rows (mean_hi, mean_lo, proj, mean_dy, k)."""
    blocks, block, values = elementwise_shape(x.shape)
    kernels.backward_dx[blocks, block](dy, x, coef, values, dx)


def backward(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu):
    """The per-channel reduction and dx coefficients (launch 1), then dx (launch 2)."""
    coef = reused(x, x.dtype, (5, x.shape[1]))
    _launch_sums(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, coef)
    _launch_dx(dy, x, coef, dx)


def backward_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
    """dx from the float64 reductions over ``count`` values per channel (coefficients, dx)."""
    coef = reused(x, x.dtype, (5, x.shape[1]))
    _per_channel(kernels.dx_coefficients, x.shape[1], float(count), mean, invstd, weight, sum_dy,
                 sum_dy_xmu, coef)  # fmt: skip
    _launch_dx(dy, x, coef, dx)


# ------------------------------------------------------------- split primitives (SyncBN steps)
def _per_channel(kernel, channels, *args):
    """Launch a one-thread-per-channel kernel."""
    threads = min(128, channels)
    kernel[math.ceil(channels / threads), threads](*args)


def batch_stats(x, mean, m2):
    """mean, M2 (=, float64) of every channel; returns the count."""
    none = reused(x, x.dtype)
    _launch_stats(x, none, none, 0.0, mean, reused(x, np.float64), m2, reused(x, x.dtype, (4, 0)))
    return float(x.shape[0] * x.shape[2])


def normalize(x, mean, invstd, weight, bias, y, residual=None, epilogue=EPILOGUE_NONE):
    """y from float64 per-channel ``mean`` and ``invstd`` (coefficients, then y with its
    epilogue)."""
    coef = reused(x, x.dtype, (4, x.shape[1]))
    _per_channel(kernels.affine_coefficients, x.shape[1], mean, invstd, weight, bias, coef)
    _launch_affine(x, coef, y, residual, epilogue)


def backward_sums(dy, x, mean, sum_dy, sum_dy_xmu):
    """sum_dy, sum_dy_xmu (=, float64) of every channel."""
    none = reused(x, x.dtype)
    coef = reused(x, x.dtype, (5, 0))
    _launch_sums(dy, x, mean, reused(x, np.float64), none, sum_dy, sum_dy_xmu, coef)


# ---------------------------------------------------------------------- backward of an epilogue
def relu_grad(dy, y, grad):
    """grad (=) = dy where y > 0, else 0, over C-contiguous arrays of one shape: one launch, a
    thread per ELEMENTWISE_VALUES_PER_THREAD elements (a grid-stride loop)."""
    if grad.size == 0:  # a launch of no blocks is an error
        return
    threads, _ = _threads()
    blocks = math.ceil(grad.size / (threads * config.ELEMENTWISE_VALUES_PER_THREAD))
    flat = (dy.reshape(dy.size), y.reshape(y.size), grad.reshape(grad.size))
    kernels.relu_grad[blocks, threads](*flat)
