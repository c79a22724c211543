"""Where the host time of a CUDA call goes: the cost of Numba's primitives (an allocation, a copy
from and to the host, a launch of 1 and of 13 arguments), the backend's calls on prepared
buffers and the public calls, each as host wall-clock time per call over synchronised loops,
then a cProfile of the public forward_train and backward (numba_bn's functions by cumulative
time, everything by own time).

    python benchmarks/gpu_host_overhead.py                                 # an NVIDIA GPU
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_host_overhead.py --smoke  # runs, claims nothing

On a small batch the GPU is idle most of a call: what it costs is this host time.
"""

import argparse
import cProfile
import io
import pstats
import sys
import time

import numba
import numpy as np
from gpu_bench import prepare
from numba import cuda

import numba_bn as nbn
from numba_bn import dispatch


@cuda.jit
def _one(a):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = 1.0


@cuda.jit
def _thirteen(a, b, c, d, e, f, g, h, s1, s2, s3, s4, s5):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = b[i] + c[i] + d[i] + e[i] + f[i] + g[i] + h[i] + s1 + s2 + s3 + s4 + s5


def per_call_us(fn, calls, warmup):
    """Host wall-clock microseconds per call of ``fn``, synchronised before and after."""
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def primitives():
    vectors = [cuda.device_array(256, np.float32) for _ in range(8)]
    zeros = np.zeros(5, np.int32)
    return {
        "device_array (1024 float64)": lambda: cuda.device_array(1024, np.float64),
        "to_device (5 int32)": lambda: cuda.to_device(zeros),
        "copy_to_host (5 float32)": lambda: vectors[0][:5].copy_to_host(),
        "launch, 1 argument": lambda: _one[1, 256](vectors[0]),
        "launch, 13 arguments": lambda: _thirteen[1, 256](*vectors, 1.0, 2.0, 3.0, 4.0, 5.0),
    }


def calls_on(x):
    """The backend's calls on prepared buffers, and the public calls, on device array ``x``."""
    channels = x.shape[1]
    view = x.reshape(x.shape[0], channels, x.size // (x.shape[0] * channels))
    stats = [cuda.device_array(channels, np.float64) for _ in range(5)]
    weight, bias = (cuda.to_device(np.full(channels, v, np.float32)) for v in (1.0, 0.0))
    rm, rv = (cuda.to_device(np.full(channels, v, np.float32)) for v in (0.0, 1.0))
    y, dx = cuda.device_array_like(view), cuda.device_array_like(view)
    _, mean, invstd = nbn.forward_train(x)
    gpu = dispatch.get("cuda")
    return {
        "backend forward_train": lambda: gpu.forward_train(
            view, weight=weight, bias=bias, eps=1e-5, y=y, mean=stats[0], invstd=stats[1],
            m2=stats[2], running=(rm, rv, 0.1, True),
        ),
        "backend forward_eval": lambda: gpu.forward_eval(
            view, weight=weight, bias=bias, running_mean=rm, running_var=rv, eps=1e-5, y=y
        ),
        "backend backward": lambda: gpu.backward(
            view, view, mean=stats[0], invstd=stats[1], weight=weight, dx=dx, sum_dy=stats[3],
            sum_dy_xmu=stats[4],
        ),
        "forward_train": lambda: nbn.forward_train(x, weight, bias),
        "batch_norm (training)": lambda: nbn.batch_norm(x, rm, rv, weight, bias, training=True),
        "forward_eval": lambda: nbn.forward_eval(x, rm, rv, weight, bias),
        "backward": lambda: nbn.backward(x, x, mean, invstd, weight),
    }  # fmt: skip


def profile(name, fn, calls):
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    cuda.synchronize()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats("numba_bn", 25)
    stats.sort_stats("tottime").print_stats(12)
    print(f"\n-- cProfile of {calls} calls of {name}: numba_bn by cumulative time, all by own time")
    print("\n".join(line[:150] for line in out.getvalue().splitlines() if line.strip()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,256", help="N,C,... of x (float32)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="tiny, 1 call each, no claims")
    args = parser.parse_args(argv)
    smoke = args.smoke or bool(numba.config.ENABLE_CUDASIM)
    if not prepare(smoke):
        return 2
    calls, warmup = (1, 0) if smoke else (args.calls, 20)
    shape = (4, 3, 5) if smoke else tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = cuda.to_device((rng.standard_normal(shape) * 3 + 5).astype(np.float32))
    print(f"host us per call, {calls} synchronised calls" + (" (smoke: no claims)" * smoke))
    for name, fn in primitives().items():
        print(f"  {name:<30} {per_call_us(fn, calls, warmup):9.1f}")
    functions = calls_on(x)
    print(f"x {shape} float32")
    for name, fn in functions.items():
        print(f"  {name:<30} {per_call_us(fn, calls, warmup):9.1f}")
    for name in ("forward_train", "backward"):
        profile(name, functions[name], calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
