"""Time the CUDA backend's passes against the launch sizes of numba_bn.cuda.config, on a GPU.

    python benchmarks/gpu_launch_sizes.py [--shape 256,256,56,56 ...] [--repeat 20]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_launch_sizes.py --smoke   # simulator: runs only

For each shape (float32): the device-to-device copy; the elementwise passes (eval = affine,
backward) for ELEMENTWISE_VALUES_PER_THREAD in 4..32; the reductions (forward-train, backward)
for VALUES_PER_THREAD x TARGET_BLOCKS; and two plain Numba kernels as the floor of an
elementwise pass here: ``y = x * a + b`` over the flat array (grid-stride) and over the 3-D view
with a 3-D grid (no integer division in a thread). CUDA-event ms per call (mean of
``--repeat`` after a warm-up). The elementwise passes must give the same bits for
every values-per-thread (each value is computed alone); the reductions may differ in the last
bits (merge order).
"""

import argparse
import itertools
import sys

import gpu_bench
import numpy as np
from numba import cuda

from numba_bn import dispatch
from numba_bn.cuda import config
from numba_bn.layout import canonical_shape

DEFAULT_SHAPES = [
    "256,256,56,56",
    "32,256,56,56",
    "64,512,7,7",
    "64,256,14,14",
    "128,56,56,64:-1",
    "4096,1024",
]
SMOKE_SHAPES = ["2,3,5,4", "6,3:-1"]  # planes and rows, for the simulator (--smoke)


@cuda.jit
def flat_axpb(x, y):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.size, stride):
        y[i] = x[i] * np.float32(1.5) + np.float32(0.5)


@cuda.jit
def grid3_axpb(x, y, values):
    n, c = cuda.blockIdx.z, cuda.blockIdx.y
    s = cuda.blockIdx.x * cuda.blockDim.x * values + cuda.threadIdx.x
    stop = (cuda.blockIdx.x + 1) * cuda.blockDim.x * values
    inner = x.shape[2]
    stop = stop if stop < inner else inner
    while s < stop:
        y[n, c, s] = x[n, c, s] * np.float32(1.5) + np.float32(0.5)
        s += cuda.blockDim.x


def event_ms(fn, repeat):
    """gpu_bench's timer, after one synchronised warm-up call."""
    fn()
    cuda.synchronize()
    return gpu_bench.event_ms(fn, repeat, 0)


def run_shape(text, repeat):
    shape, axis = gpu_bench.parse_shape(text)
    axis %= len(shape)
    outer, channels, inner = view = canonical_shape(shape, axis)
    rng = np.random.default_rng(0)
    x = cuda.to_device((rng.standard_normal(view) * 3 + 10).astype(np.float32))
    dy = cuda.to_device(rng.standard_normal(view).astype(np.float32))
    y, dx, copy = (cuda.device_array(view, np.float32) for _ in range(3))
    w = cuda.to_device(rng.uniform(0.5, 1.5, channels).astype(np.float32))
    b = cuda.to_device(rng.standard_normal(channels).astype(np.float32))
    rm = cuda.to_device(np.full(channels, 10, np.float32))
    rv = cuda.to_device(np.full(channels, 9, np.float32))
    stats = [cuda.device_array(channels, np.float64) for _ in range(5)]
    mean64 = cuda.to_device(np.full(channels, 10.0))
    invstd64 = cuda.to_device(np.full(channels, 1 / 3))
    gpu = dispatch.get("cuda")
    mib = x.size * 4 / 2**20

    def evaluate():
        gpu.forward_eval(x, weight=w, bias=b, running_mean=rm, running_var=rv, eps=1e-5, y=y)

    def train():
        gpu.forward_train(x, weight=w, bias=b, eps=1e-5, y=y, mean=stats[0], invstd=stats[1],
                          m2=stats[2], running=None)  # fmt: skip

    def backward():
        gpu.backward(dy, x, mean=mean64, invstd=invstd64, weight=w, dx=dx, sum_dy=stats[3],
                     sum_dy_xmu=stats[4])  # fmt: skip

    copy_ms = event_ms(lambda: copy.copy_to_device(x), repeat)
    print(f"\n{shape} axis {axis} -> {view}, {mib:.1f} MiB; copy {copy_ms:.4f} ms")
    flat_x, flat_y = x.reshape(x.size), y.reshape(y.size)
    threads = config.THREADS_PER_BLOCK
    for per in (1, 4, 16):
        blocks = max(1, min(65535 * 32, -(-x.size // (threads * per))))
        ms = event_ms(lambda blocks=blocks: flat_axpb[blocks, threads](flat_x, flat_y), repeat)
        print(f"  flat y=ax+b, {per:2} per thread     {ms:8.4f} ms  {copy_ms / ms:5.0%} of copy")
    if inner > 1 and outer <= 65535 and channels <= 65535:
        bx = min(threads, 1 << (inner - 1).bit_length())
        for per in (1, 4, 16):
            grid = (-(-inner // (bx * per)), channels, outer)
            ms = event_ms(lambda grid=grid, per=per: grid3_axpb[grid, bx](x, y, per), repeat)
            print(f"  3-D grid y=ax+b, {per:2} per thread  {ms:8.4f} ms  {copy_ms / ms:5.0%} of "
                  "copy")  # fmt: skip

    saved = config.ELEMENTWISE_VALUES_PER_THREAD, config.VALUES_PER_THREAD, config.TARGET_BLOCKS
    bits = {}
    try:
        for per in (4, 8, 16, 32):
            config.ELEMENTWISE_VALUES_PER_THREAD = per
            eval_ms, back_ms = event_ms(evaluate, repeat), event_ms(backward, repeat)
            bits[per] = (y.copy_to_host(), dx.copy_to_host())
            print(f"  elementwise {per:2}/thread: eval {eval_ms:8.4f} ms ({copy_ms / eval_ms:4.0%} "
                  f"of copy), backward {back_ms:8.4f} ms")  # fmt: skip
        config.ELEMENTWISE_VALUES_PER_THREAD = saved[0]
        same = all(
            np.array_equal(a, b, equal_nan=True)
            for got in bits.values()
            for a, b in zip(got, bits[4], strict=True)
        )
        print(f"  elementwise outputs the same bits for every size: {same}")
        for per, target in itertools.product((16, 64, 256), (1024, 4096)):
            config.VALUES_PER_THREAD, config.TARGET_BLOCKS = per, target
            train_ms, back_ms = event_ms(train, repeat), event_ms(backward, repeat)
            print(f"  reduction {per:3}/thread, {target} blocks: train {train_ms:8.4f} ms "
                  f"({1.5 * copy_ms / train_ms:4.0%} of copy), backward {back_ms:8.4f} ms "
                  f"({2.5 * copy_ms / back_ms:4.0%})")  # fmt: skip
    finally:
        config.ELEMENTWISE_VALUES_PER_THREAD, config.VALUES_PER_THREAD, config.TARGET_BLOCKS = saved
    return same


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", help="N,C,... [:axis]; repeatable")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, every call once")
    args = parser.parse_args(argv)
    if not gpu_bench.prepare(args.smoke):
        return 2
    shapes = args.shape or (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)
    ok = all([run_shape(s, 1 if args.smoke else args.repeat) for s in shapes])
    print("result: the same bits at every elementwise size" if ok else "result: BITS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
