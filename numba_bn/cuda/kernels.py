"""numba.cuda kernels on the canonical ``(outer, C, inner)`` view; two launches per call.

=============  ======================================  ========================================
call           launch 1                                launch 2
=============  ======================================  ========================================
train forward  channel_stats: (count, mean, M2) and    affine: y; block 0 applies the running
               the coefficients of y                   update (skipped if the check failed)
eval forward   eval_coefficients (one thread/channel)  affine
backward       backward_sums: sum_dy, sum_dy_xmu and   backward_dx
               the dx coefficients
ReLU gradient  relu_grad: dy where y > 0, else 0       (one launch; the backward above then
                                                       runs on its result)
=============  ======================================  ========================================

Outputs are overwritten (``=``), never accumulated. Bytes per element: the reductions read x
(and dy) once, the elementwise passes read x (and dy) and write y (dx) once; ``affine`` with a
residual (fused BN+Add(+ReLU)) also reads it once, and ``relu_grad`` reads dy, y and writes the
masked gradient.

Reductions (``channel_stats``, ``backward_sums``): a block works on one channel (planes,
``inner > 1``; threads.x run along a plane, threads.y over planes n) or on a tile of channels
(rows, ``inner == 1``; threads.x are neighbouring channels, threads.y rows), and a channel is
shared by ``parts_n * parts_s`` blocks, each taking a strided subset of its (n, s) values.

1. each thread accumulates its values in float64: for the statistics of float32 (and
   narrower) inputs, exact shifted sums in one pass, as the CPU's float32 blocks do; of float64
   inputs, Welford steps (:func:`numba_bn.stats.chan_merge` with a one-value state); both on
   ``x - shift`` (``shift`` = the channel's first value, so the merges keep their precision when
   the mean is large against the spread; :func:`_thread_stats`); sums for the backward;
2. the threads of a channel merge in shared memory, in float64, over a fixed tree (the simulator
   has no warp shuffles, so this is the reduction that CI tests);
3. each block stores its partial; the last block of the channel to finish (an atomic counter)
   merges the partials in block order, finalises, and writes the per-channel outputs and the
   coefficients of the elementwise pass. The merge order depends on the launch shape only, so
   results are deterministic.

Every merge is :func:`numba_bn.stats.chan_merge` and every finalisation
:func:`numba_bn.stats.finalize`: numba.cuda compiles the same ``@njit(inline="always")``
functions as device functions, and the simulator calls them as they are. Helpers that take
arrays cannot be shared that way (the simulator passes its own array type, which ``@njit``
cannot type), so the per-channel coefficients below are device-function twins of
``_train_coefficients`` / ``_dx_coefficients`` in :mod:`numba_bn.cpu.drivers` and of
:func:`numba_bn.stats.split_hi_lo`.
"""

import math

from numba import cuda, float64, int32, uint64

from ..cpu.kernels import EPILOGUE_ADD, EPILOGUE_RELU
from ..stats import batch_variance, chan_merge, finalize, folded_shift, running_step
from .config import MAX_THREADS


# --------------------------------------------------------------------------- block positions
@cuda.jit(device=True)
def _reduction_position(inner, parts_n, parts_s):
    """(channel, first n, n step, first s, s step, rank, ranks, width) of this thread.

    Planes: the block's threads all serve channel ``blockIdx // parts``; rows: threads.x are
    ``blockDim.x`` neighbouring channels. ``rank`` numbers the threads of one channel, ``width``
    is the thread-id distance between two ranks of a channel.
    """
    parts = parts_n * parts_s
    tile, part = cuda.blockIdx.x // parts, cuda.blockIdx.x % parts
    part_n, part_s = part // parts_s, part % parts_s
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    bx, by = cuda.blockDim.x, cuda.blockDim.y
    n0, n_step = part_n * by + ty, parts_n * by
    if inner > 1:
        channel = tile
        s0, s_step = part_s * bx + tx, parts_s * bx
        rank, ranks, width = ty * bx + tx, bx * by, 1
    else:
        channel = tile * bx + tx
        s0, s_step = 0, 1
        rank, ranks, width = ty, by, bx
    return channel, n0, n_step, s0, s_step, rank, ranks, width


@cuda.jit(device=True)
def _unsigned(a, b, c, d, e):
    """Five indices (or bounds) as uint64. Numba wraps a negative signed index around (adds the
    extent), and those selects keep every array's shape in registers in the loops: on sm_90
    (ptxas -v) ``affine`` took 56 registers a thread with signed indices, 40 with these, and so
    fits 6 blocks of 256 threads an SM instead of 4 (on an H200, a 784 MiB eval 0.91 -> 0.67
    ms). Mix them with uint64 only: uint64 with int64 is float64 in Numba, as in NumPy."""
    return uint64(a), uint64(b), uint64(c), uint64(d), uint64(e)


@cuda.jit(device=True)
def _elementwise_run(outer, channels, inner, values_per_thread):
    """(channel, n, s, stop, step), uint64: this thread's strided run of the (outer, C, inner)
    view, indexed as such: along s from (n, s) for planes (inner > 1), along n from (n, 0) for
    rows.
    A flat view would be a ``reshape`` in the kernel, which calls Numba's generic reshape helper,
    with its local-memory arrays, in every thread; and one loop over both n and s would compute
    the inner loop's trip count, a division, once per row.

    Planes: threads.y pick a plane (n, c), threads.x a stretch of it; rows: threads.x pick a
    channel of the tile, threads.y rows. (No ``min``: numba 0.68's CUDA target fails to type
    ``min`` of two integers.)
    """
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    bx, by = cuda.blockDim.x, cuda.blockDim.y
    if inner > 1:
        chunk = bx * values_per_thread
        chunks = (inner + chunk - 1) // chunk
        group, k = cuda.blockIdx.x // chunks, cuda.blockIdx.x % chunks
        plane = group * by + ty
        if plane >= outer * channels:
            return _unsigned(0, 0, 0, 0, 1)
        end = (k + 1) * chunk
        return _unsigned(
            plane % channels,
            plane // channels,
            k * chunk + tx,
            end if end < inner else inner,
            bx,
        )
    tiles = (channels + bx - 1) // bx
    group, tile = cuda.blockIdx.x // tiles, cuda.blockIdx.x % tiles
    channel = tile * bx + tx
    if channel >= channels:
        return _unsigned(0, 0, 0, 0, 1)
    rows = by * values_per_thread
    end = (group + 1) * rows
    return _unsigned(channel, group * rows + ty, 0, end if end < outer else outer, by)


# ------------------------------------------------------------------ per-channel coefficients
@cuda.jit(device=True)
def _store_mean(mean, coef, c):
    """coef[0, c] + coef[1, c] == mean (float64) in the input dtype: see stats.split_hi_lo."""
    coef[0, c] = mean
    coef[1, c] = mean - float64(coef[0, c])


@cuda.jit(device=True)
def _affine_scale_shift(c, invstd, weight, bias, coef):
    """Rows 2, 3 of channel c after _store_mean: scale, and the shift with mean_lo folded in
    (stats.folded_shift), for y = (x - mean_hi) * scale + shift."""
    coef[2, c] = invstd * weight[c] if weight.size else invstd
    coef[3, c] = folded_shift(bias[c] if bias.size else 0.0, coef[1, c], coef[2, c])


@cuda.jit(device=True)
def _train_coefficients(c, count, mean, m2, eps, weight, bias, coef, save_invstd):
    """Channel c: save invstd; coef rows of y = (x - mean_hi) * scale + shift."""
    invstd = finalize(count, m2, eps)
    save_invstd[c] = invstd
    _store_mean(mean, coef, c)
    _affine_scale_shift(c, invstd, weight, bias, coef)


@cuda.jit(device=True)
def _dx_coefficients(c, count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """Channel c: the terms of dx = k * (dy - mean_dy - (x - mean) * proj), docs/backward.md."""
    _store_mean(mean, coef, c)
    coef[2, c] = invstd * invstd * sum_dy_xmu / count  # term 3: projection onto x_hat
    coef[3, c] = folded_shift(sum_dy / count, coef[1, c], coef[2, c])  # term 2, mean_lo folded
    coef[4, c] = invstd * weight[c] if weight.size else invstd  # final scale


@cuda.jit
def affine_coefficients(mean, invstd, weight, bias, coef):
    """coef (=, 4 x C) of y = (x - mean) * invstd * weight + bias; one thread per channel."""
    c = cuda.grid(1)
    if c >= coef.shape[1]:
        return
    _store_mean(mean[c], coef, c)
    _affine_scale_shift(c, invstd[c], weight, bias, coef)


@cuda.jit
def dx_coefficients(count, mean, invstd, weight, sum_dy, sum_dy_xmu, coef):
    """coef (=, 5 x C) of dx from the reductions over ``count`` values; one thread per channel."""
    c = cuda.grid(1)
    if c >= coef.shape[1]:
        return
    _dx_coefficients(c, count, mean[c], invstd[c], weight, sum_dy[c], sum_dy_xmu[c], coef)


# ----------------------------------------------------------------------- cross-thread merges
@cuda.jit(device=True)
def _block_merge_stats(sh_count, sh_mean, sh_m2, t, rank, ranks, width):
    """Tree-merge the states of one channel's ranks (thread t is rank ``rank``) into rank 0."""
    half = ranks // 2
    while half > 0:
        cuda.syncthreads()
        if rank < half:
            o = t + half * width
            sh_count[t], sh_mean[t], sh_m2[t] = chan_merge(
                sh_count[t], sh_mean[t], sh_m2[t], sh_count[o], sh_mean[o], sh_m2[o]
            )
        half //= 2
    cuda.syncthreads()


@cuda.jit(device=True)
def _block_sum(sh_a, sh_b, t, rank, ranks, width):
    """Tree-add two values over one channel's ranks (thread t is rank ``rank``) into rank 0."""
    half = ranks // 2
    while half > 0:
        cuda.syncthreads()
        if rank < half:
            o = t + half * width
            sh_a[t] += sh_a[o]
            sh_b[t] += sh_b[o]
        half //= 2
    cuda.syncthreads()


@cuda.jit(device=True)
def _is_last_block(flags, tile, parts, sh_flag):
    """Count this block as done for ``tile``; True in every thread of the last one to finish.

    ``flags[1 + tile]`` starts at 0 and is 0 again once the last block has counted (the
    counters are reused by the next launch: numba_bn.cuda.launch's workspace). The fence before
    the count makes this block's partials visible before the count says so (release); the fence
    after it keeps the last block's reads of the partials after the count that announced them
    (acquire: the PTX memory model asks for it on the reading side too, and the barrier alone
    orders only within the block). The last block then reads them through atomics (L2), never
    a stale L1 line.
    """
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
        last = cuda.atomic.add(flags, 1 + tile, 1) == parts - 1
        if last:  # every block of the tile has counted: zero again for the next launch
            flags[1 + tile] = 0
        cuda.threadfence()
        sh_flag[0] = last
    cuda.syncthreads()
    return sh_flag[0] != 0


@cuda.jit(device=True)
def _read(partial, row, channel, part):
    """A partial written by another block: an atomic add of 0 reads it from L2."""
    return cuda.atomic.add(partial, (row, channel, part), 0.0)


# --------------------------------------------------------------------------------- forward
@cuda.jit(device=True)
def _thread_stats(x, c, n0, n_step, s0, s_step, shift, one_pass):
    """(count, mean - shift, M2) in float64 of this thread's values x[n, c, s] (n from n0 by
    n_step, s from s0 by s_step); ``shift`` is the channel's first value (float64).

    ``one_pass`` (inputs of 32 bits or fewer) sums d = x - K and d * d in float64, K the thread's
    first value: d and its square are exact, and M2 = S2 - S1 * S1 / n loses at most
    log2(n + 1) of float64's bits (stats.one_pass_exact, the CPU's float32 block). Otherwise
    (float64) a Welford step per value (stats.chan_merge with a one-value state) on x - shift.
    While loops, not range: a range with a step divides out its trip count at every entry.
    Signed indices, unlike the elementwise passes: a signed induction variable cannot wrap, so
    NVVM unrolls the loop and keeps several loads in flight; unsigned ones (fewer registers)
    made the statistics pass 1.6x slower on an H200 (0.42 -> 0.68 ms on 784 MiB).
    """
    outer, _, inner = x.shape
    if n0 >= outer or s0 >= inner:
        return 0.0, 0.0, 0.0
    if one_pass:
        first = float64(x[n0, c, s0])
        s1, s2, k = 0.0, 0.0, 0
        n = n0
        while n < outer:
            s = s0
            while s < inner:
                d = float64(x[n, c, s]) - first
                s1 += d
                s2 += d * d
                k += 1
                s += s_step
            n += n_step
        count = float64(k)
        offset = s1 / count
        return count, (first - shift) + offset, s2 - s1 * offset
    count, mean, m2 = 0.0, 0.0, 0.0
    n = n0
    while n < outer:
        s = s0
        while s < inner:
            count, mean, m2 = chan_merge(count, mean, m2, 1.0, x[n, c, s] - shift, 0.0)
            s += s_step
        n += n_step
    return count, mean, m2


@cuda.jit
def channel_stats(
    x,
    weight,
    bias,
    eps,
    one_pass,
    parts_n,
    parts_s,
    partial,
    flags,
    save_mean,
    save_invstd,
    save_m2,
    coef,
):
    """Batch statistics of every channel of ``x`` (outer, C, inner).

    Writes save_mean, save_m2 (float64, (C,)); when ``coef`` has C columns also save_invstd and
    ``coef`` (mean_hi, mean_lo, scale, shift) in the dtype of x. ``one_pass``: x has 32 bits or
    fewer (:func:`_thread_stats`). ``partial`` is (3, C, parts) float64 scratch; ``flags``
    int32 zeros: flags[0] is set to 1 if a statistic is not finite, flags[1:] count finished
    blocks per tile.
    """
    outer, channels, inner = x.shape
    sh_count = cuda.shared.array(MAX_THREADS, float64)
    sh_mean = cuda.shared.array(MAX_THREADS, float64)
    sh_m2 = cuda.shared.array(MAX_THREADS, float64)
    sh_flag = cuda.shared.array(1, int32)
    c, n0, n_step, s0, s_step, rank, ranks, width = _reduction_position(inner, parts_n, parts_s)
    t = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    count, mean, m2 = 0.0, 0.0, 0.0
    if c < channels:
        shift = float64(x[0, c, 0])
        count, mean, m2 = _thread_stats(x, c, n0, n_step, s0, s_step, shift, one_pass)
    sh_count[t], sh_mean[t], sh_m2[t] = count, mean, m2
    _block_merge_stats(sh_count, sh_mean, sh_m2, t, rank, ranks, width)

    parts = parts_n * parts_s
    part = cuda.blockIdx.x % parts
    if rank == 0 and c < channels:
        partial[0, c, part] = sh_count[t]
        partial[1, c, part] = sh_mean[t]
        partial[2, c, part] = sh_m2[t]
    if not _is_last_block(flags, cuda.blockIdx.x // parts, parts, sh_flag):
        return

    total, mean64, m2_64 = 0.0, 0.0, 0.0
    if c < channels:
        for p in range(rank, parts, ranks):
            total, mean64, m2_64 = chan_merge(
                total,
                mean64,
                m2_64,
                _read(partial, 0, c, p),
                _read(partial, 1, c, p),
                _read(partial, 2, c, p),
            )
    sh_count[t], sh_mean[t], sh_m2[t] = total, mean64, m2_64
    _block_merge_stats(sh_count, sh_mean, sh_m2, t, rank, ranks, width)
    if rank != 0 or c >= channels:
        return
    total, m2_64 = sh_count[t], sh_m2[t]
    mean64 = float64(x[0, c, 0]) + sh_mean[t]
    save_mean[c] = mean64
    save_m2[c] = m2_64
    if coef.shape[1]:
        _train_coefficients(c, total, mean64, m2_64, eps, weight, bias, coef, save_invstd)
    if not (math.isfinite(mean64) and math.isfinite(m2_64)):
        flags[0] = 1


@cuda.jit
def eval_coefficients(weight, bias, running_mean, running_var, eps, coef):
    """coef (=, 4 x C): running_mean, 0, invstd * weight, bias; one thread per channel."""
    c = cuda.grid(1)
    if c >= coef.shape[1]:
        return
    invstd = 1.0 / math.sqrt(float64(running_var[c]) + eps)
    coef[0, c] = running_mean[c]
    coef[1, c] = 0.0
    coef[2, c] = invstd * weight[c] if weight.size else invstd
    coef[3, c] = bias[c] if bias.size else 0.0


@cuda.jit(device=True)
def _affine_value(x, residual, y, n, c, s, mean_hi, scale, shift, add, relu):
    """y[n, c, s] of :func:`affine`."""
    v = (x[n, c, s] - mean_hi) * scale + shift
    if add:
        v += residual[n, c, s]
    if relu and v < 0:  # False for NaN, which passes through
        y[n, c, s] = 0
    else:
        y[n, c, s] = v


@cuda.jit
def affine(
    x,
    residual,
    epilogue,
    coef,
    values_per_thread,
    count,
    save_mean,
    save_m2,
    momentum,
    unbiased,
    nan_check,
    flags,
    running_mean,
    running_var,
    y,
):
    """y = (x - mean_hi) * scale + shift with the rows of ``coef`` (4 x C; row 1, mean_lo, is
    folded into shift: stats.folded_shift), then
    the ``epilogue`` (the codes of :mod:`numba_bn.cpu.kernels`): bit 0 adds ``residual`` (like
    x; x itself when there is none, never read then), bit 1 applies ReLU, keeping NaN as
    torch.relu does. The stored value of a negative one is a literal 0, so float32 stays float32.

    The epilogue is a runtime argument, the same in every thread, so its branches never diverge
    and cost nothing against the loads of this memory-bound pass; one compiled kernel per dtype
    serves all four codes (specialised kernels would compile four times as much).

    Block 0 also updates running_mean/running_var (when not empty) from save_mean, save_m2:
    ``r = (1 - momentum) * r + momentum * batch``, unless ``nan_check`` and flags[0] say a
    statistic is not finite.
    """
    outer, channels, inner = x.shape
    c, n, s, stop, step = _elementwise_run(outer, channels, inner, values_per_thread)
    mean_hi, scale, shift = coef[0, c], coef[2, c], coef[3, c]
    add, relu = (epilogue & EPILOGUE_ADD) != 0, (epilogue & EPILOGUE_RELU) != 0
    if inner > 1:  # while, not range: no trip count to divide out
        while s < stop:
            _affine_value(x, residual, y, n, c, s, mean_hi, scale, shift, add, relu)
            s += step
    else:
        while n < stop:
            _affine_value(x, residual, y, n, c, s, mean_hi, scale, shift, add, relu)
            n += step

    if cuda.blockIdx.x != 0 or running_mean.size == 0 or (nan_check and flags[0] != 0):
        return
    threads = cuda.blockDim.x * cuda.blockDim.y
    for ch in range(cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x, channels, threads):
        running_mean[ch] = running_step(running_mean[ch], save_mean[ch], momentum)
        var = batch_variance(count, save_m2[ch], unbiased)
        running_var[ch] = running_step(running_var[ch], var, momentum)


# -------------------------------------------------------------------------------- backward
@cuda.jit(device=True)
def _thread_sums(dy, x, c, n0, n_step, s0, s_step, mu):
    """(sum of dy, sum of dy * (x - mu)) in float64 over this thread's values of channel c,
    walked (and indexed) as :func:`_thread_stats` walks them."""
    outer, _, inner = x.shape
    total_dy, total_dy_xmu = 0.0, 0.0
    n = n0
    while n < outer:
        s = s0
        while s < inner:
            g = float64(dy[n, c, s])
            total_dy += g
            total_dy_xmu += g * (x[n, c, s] - mu)
            s += s_step
        n += n_step
    return total_dy, total_dy_xmu


@cuda.jit
def backward_sums(
    dy, x, mean, invstd, weight, parts_n, parts_s, partial, flags, sum_dy, sum_dy_xmu, coef
):
    """sum_dy, sum_dy_xmu (=, float64, (C,)) of docs/backward.md, accumulated in float64.

    When ``coef`` has C columns, also the dx coefficients (mean_hi, mean_lo, proj, mean_dy, k).
    ``partial`` is (2, C, parts) float64 scratch, ``flags`` as for :func:`channel_stats`.
    """
    outer, channels, inner = x.shape
    sh_a = cuda.shared.array(MAX_THREADS, float64)
    sh_b = cuda.shared.array(MAX_THREADS, float64)
    sh_flag = cuda.shared.array(1, int32)
    c, n0, n_step, s0, s_step, rank, ranks, width = _reduction_position(inner, parts_n, parts_s)
    t = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
    total_dy, total_dy_xmu = 0.0, 0.0
    if c < channels:
        total_dy, total_dy_xmu = _thread_sums(dy, x, c, n0, n_step, s0, s_step, mean[c])
    sh_a[t], sh_b[t] = total_dy, total_dy_xmu
    _block_sum(sh_a, sh_b, t, rank, ranks, width)

    parts = parts_n * parts_s
    part = cuda.blockIdx.x % parts
    if rank == 0 and c < channels:
        partial[0, c, part] = sh_a[t]
        partial[1, c, part] = sh_b[t]
    if not _is_last_block(flags, cuda.blockIdx.x // parts, parts, sh_flag):
        return

    total_dy, total_dy_xmu = 0.0, 0.0
    if c < channels:
        for p in range(rank, parts, ranks):
            total_dy += _read(partial, 0, c, p)
            total_dy_xmu += _read(partial, 1, c, p)
    sh_a[t], sh_b[t] = total_dy, total_dy_xmu
    _block_sum(sh_a, sh_b, t, rank, ranks, width)
    if rank != 0 or c >= channels:
        return
    sum_dy[c] = sh_a[t]
    sum_dy_xmu[c] = sh_b[t]
    if coef.shape[1]:
        count = float64(outer * inner)
        _dx_coefficients(c, count, mean[c], invstd[c], weight, sh_a[t], sh_b[t], coef)


@cuda.jit
def backward_dx(dy, x, coef, values_per_thread, dx):
    """dx = k * (dy - mean_dy - (x - mean_hi) * proj), docs/backward.md.

    ``coef`` rows: mean_hi, mean_lo, proj (term 3), mean_dy (term 2, with mean_lo * proj
    folded in: stats.folded_shift; row 1 is not read), k (final scale).
    """
    outer, channels, inner = x.shape
    c, n, s, stop, step = _elementwise_run(outer, channels, inner, values_per_thread)
    mean_hi, proj, mean_dy, k = coef[0, c], coef[2, c], coef[3, c], coef[4, c]
    if inner > 1:  # as in affine
        while s < stop:
            dx[n, c, s] = (dy[n, c, s] - mean_dy - (x[n, c, s] - mean_hi) * proj) * k
            s += step
    else:
        while n < stop:
            dx[n, c, s] = (dy[n, c, s] - mean_dy - (x[n, c, s] - mean_hi) * proj) * k
            n += step


# ------------------------------------------------------------------ backward of an epilogue
@cuda.jit
def relu_grad(dy, y, grad):
    """grad (=) = dy where y > 0, else 0, over flat arrays (torch's threshold_backward): the
    gradient through the ReLU of a fused forward, from its output y. NaN in y gives 0. A
    grid-stride loop; consecutive threads take consecutive elements."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, grad.size, stride):
        if y[i] > 0:
            grad[i] = dy[i]
        else:
            grad[i] = 0
