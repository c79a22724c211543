"""Host side of the CUDA backend: launch shapes from :mod:`.config`, scratch buffers, launches.

Arguments come validated from :mod:`numba_bn.functional` as C-contiguous Numba device arrays in
one compute dtype; per-channel statistics are float64; absent weight/bias/running buffers are
zero-length device arrays. Every call launches at most two kernels (see :mod:`.kernels`).

Under the simulator, importing this module first makes its shared arrays thread-safe (see
:mod:`.simulator`).
"""

import math

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


def _scratch(rows, channels, parts, tiles):
    """(partial, flags) of a reduction: float64 partials per block, zeroed int32 flags (a copy
    from the host, not a launch)."""
    partial = cuda.device_array((rows, channels, parts), np.float64)
    return partial, cuda.to_device(np.zeros(1 + tiles, np.int32))


def _empty(dtype, shape=(0,)):
    return cuda.device_array(shape, dtype)


# ------------------------------------------------------------------------------- operations
def _launch_stats(x, weight, bias, eps, save_mean, save_invstd, save_m2, coef):
    """Launch channel_stats; returns its flags (flags[0] != 0: a statistic is not finite)."""
    blocks, block, parts_n, parts_s, tiles = reduction_shape(x.shape)
    partial, flags = _scratch(3, x.shape[1], parts_n * parts_s, tiles)
    one = x.dtype.type(1)
    kernels.channel_stats[blocks, block](
        x,
        weight,
        bias,
        eps,
        one,
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
        stats, none = _empty(np.float64), _empty(x.dtype)
        running = (1.0, stats, stats, 0.0, True, False, _empty(np.int32, (1,)), none, none)
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
    coef = _empty(x.dtype, (4, x.shape[1]))
    flags = _launch_stats(x, weight, bias, float(eps), save_mean, save_invstd, save_m2, coef)
    count = x.shape[0] * x.shape[2]
    running = (count, save_mean, save_m2, momentum, unbiased, nan_check, flags)
    _launch_affine(x, coef, y, residual, epilogue, (*running, running_mean, running_var))
    return not nan_check or flags.copy_to_host()[0] == 0


def forward_eval(x, weight, bias, running_mean, running_var, eps, y, residual=None,
                 epilogue=EPILOGUE_NONE):  # fmt: skip
    """Coefficients from the running statistics (launch 1), then y with its epilogue
    (launch 2)."""
    coef = _empty(x.dtype, (4, x.shape[1]))
    threads = min(128, x.shape[1])
    blocks = math.ceil(x.shape[1] / threads)
    kernels.eval_coefficients[blocks, threads](
        weight, bias, running_mean, running_var, float(eps), coef
    )
    _launch_affine(x, coef, y, residual, epilogue)


def _launch_sums(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """Launch backward_sums (dx coefficients too when ``coef`` has C columns)."""
    blocks, block, parts_n, parts_s, tiles = reduction_shape(x.shape)
    partial, flags = _scratch(2, x.shape[1], parts_n * parts_s, tiles)
    kernels.backward_sums[blocks, block](
        dy, x, mean, invstd, weight, parts_n, parts_s, partial, flags, sum_dy, sum_dy_xmu, coef
    )


def _launch_dx(dy, x, coef, dx):
    """dx from per-channel ``coef`` rows (mean_hi, mean_lo, proj, mean_dy, k)."""
    blocks, block, values = elementwise_shape(x.shape)
    kernels.backward_dx[blocks, block](dy, x, coef, values, dx)


def backward(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu):
    """The per-channel reduction and dx coefficients (launch 1), then dx (launch 2)."""
    coef = _empty(x.dtype, (5, x.shape[1]))
    _launch_sums(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, coef)
    _launch_dx(dy, x, coef, dx)


def backward_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
    """dx from the float64 reductions over ``count`` values per channel (coefficients, dx)."""
    coef = _empty(x.dtype, (5, x.shape[1]))
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
    none = _empty(x.dtype)
    _launch_stats(x, none, none, 0.0, mean, _empty(np.float64), m2, _empty(x.dtype, (4, 0)))
    return float(x.shape[0] * x.shape[2])


def normalize(x, mean, invstd, weight, bias, y, residual=None, epilogue=EPILOGUE_NONE):
    """y from float64 per-channel ``mean`` and ``invstd`` (coefficients, then y with its
    epilogue)."""
    coef = _empty(x.dtype, (4, x.shape[1]))
    _per_channel(kernels.affine_coefficients, x.shape[1], mean, invstd, weight, bias, coef)
    _launch_affine(x, coef, y, residual, epilogue)


def backward_sums(dy, x, mean, sum_dy, sum_dy_xmu):
    """sum_dy, sum_dy_xmu (=, float64) of every channel."""
    none = _empty(x.dtype)
    coef = _empty(x.dtype, (5, 0))
    _launch_sums(dy, x, mean, _empty(np.float64), none, sum_dy, sum_dy_xmu, coef)


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
