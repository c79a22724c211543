"""Check the CUDA kernels against the CPU, then time them against a device-to-device copy and,
when it is installed with CUDA, PyTorch's (cuDNN) BatchNorm.

    python benchmarks/gpu_bench.py                                  # NVIDIA GPU, default shapes
    python benchmarks/gpu_bench.py --shape 32,256,56,56 --dtype float32 --repeat 50
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_bench.py --smoke   # simulator: checks only

Bytes moved per call (the napkin math behind GB/s): forward-train reads x twice and writes y
(3 x nbytes: statistics pass, then normalise), eval reads x and writes y (2x), backward reads dy
and x twice and writes dx (5x), the copy reads and writes once (2x). "of copy" is the kernel's
bandwidth as a fraction of the copy's. Times are CUDA-event times per call, averaged over
``--repeat`` calls after ``--warmup``: "kernels" calls the backend with preallocated buffers,
"API" the public function (validation and allocation included).
"""

import argparse
import sys
import time

import numba
import numpy as np
from numba import cuda

import numba_bn as nbn
from numba_bn import dispatch, reference
from numba_bn.cuda import config
from numba_bn.layout import canonical_shape

DEFAULT_SHAPES = ["32,256,56,56", "64,128,64,64", "256,1024", "128,56,56,64:-1"]
SMOKE_SHAPES = ["3,4,5", "2,3,2,5:-1"]


def parse_shape(text):
    shape, _, axis = text.partition(":")
    return tuple(int(s) for s in shape.split(",")), int(axis or 1)


def rel_err(value, ref):
    value = np.asarray(value, np.float64)
    return float(np.linalg.norm(value - ref) / max(np.linalg.norm(ref), 1e-300))


# -------------------------------------------------------------------------------------- check
def check(shape, axis, dtype, rng):
    """Relative L2 errors of every GPU output against a float64 NumPy reference."""
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    x_d, dy_d, w_d, b_d = (cuda.to_device(a) for a in (x, dy, weight, bias))
    running_mean, running_var = (
        cuda.to_device(np.zeros(channels, dtype)),
        cuda.to_device(np.ones(channels, dtype)),
    )
    y = nbn.batch_norm(x_d, running_mean, running_var, w_d, b_d, training=True, axis=axis)
    _, mean, invstd = nbn.forward_train(x_d, w_d, b_d, axis=axis)
    dx, dweight, dbias = nbn.backward(dy_d, x_d, mean, invstd, w_d, axis)
    y_eval = nbn.forward_eval(x_d, running_mean, running_var, w_d, b_d, axis=axis)

    x64, dy64, w64, b64 = (a.astype(np.float64) for a in (x, dy, weight, bias))
    y_ref, mean_ref, invstd_ref = reference.forward_train(x64, w64, b64, 1e-5, axis)
    dx_ref, dw_ref, db_ref = reference.backward(dy64, x64, mean_ref, invstd_ref, w64, axis)
    count = x.size // channels
    var_ref = 1.0 / invstd_ref**2 - 1e-5
    rm_ref, rv_ref = 0.1 * mean_ref, 0.9 + 0.1 * var_ref * count / (count - 1)
    eval_ref = reference.forward_eval(x64, rm_ref, rv_ref, w64, b64, 1e-5, axis)
    return [
        ("y (train)", rel_err(y.copy_to_host(), y_ref)),
        ("mean", rel_err(mean.copy_to_host(), mean_ref)),
        ("invstd", rel_err(invstd.copy_to_host(), invstd_ref)),
        ("running_var", rel_err(running_var.copy_to_host(), rv_ref)),
        ("dx", rel_err(dx.copy_to_host(), dx_ref)),
        ("dweight", rel_err(dweight.copy_to_host(), dw_ref)),
        ("dbias", rel_err(dbias.copy_to_host(), db_ref)),
        ("y (eval)", rel_err(y_eval.copy_to_host(), eval_ref)),
    ]


# ------------------------------------------------------------------------------------- timing
def event_ms(fn, repeat, warmup):
    """Milliseconds per call of ``fn`` between two CUDA events (under the simulator, which has
    none, the wall clock: a smoke run's number, meaningless)."""
    for _ in range(warmup):
        fn()
    if numba.config.ENABLE_CUDASIM:
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) * 1e3 / repeat
    start, end = cuda.event(), cuda.event()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return cuda.event_elapsed_time(start, end) / repeat


def torch_ops(x_d, dy_d, channels, axis):
    """PyTorch CUDA BatchNorm on the same device memory, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or axis not in (1, x_d.ndim - 1):
        return None
    x = torch.as_tensor(x_d, device="cuda")
    dy = torch.as_tensor(dy_d, device="cuda")
    if axis != 1:  # channels-last: the same memory seen as NCHW with channels_last strides
        x = x.movedim(-1, 1)
        dy = dy.movedim(-1, 1)
    bn = torch.nn.BatchNorm2d(channels).to(device="cuda", dtype=x.dtype) if x.ndim == 4 else None
    bn = bn or torch.nn.BatchNorm1d(channels).to(device="cuda", dtype=x.dtype)
    xg = x.detach().requires_grad_(True)

    def train():
        with torch.no_grad():
            bn.train()(x)

    def evaluate():
        with torch.no_grad():
            bn.eval()(x)

    def backward():
        bn.train()
        y = bn(xg)
        y.backward(dy)

    return {"forward-train": train, "forward-eval": evaluate, "backward (+fwd)": backward}


def time_shape(shape, axis, dtype, repeat, warmup, smoke):
    channels = shape[axis]
    rng = np.random.default_rng(1)
    host = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
    x_d, dy_d = cuda.to_device(host), cuda.to_device(rng.standard_normal(shape).astype(dtype))
    w_d, b_d = cuda.to_device(np.ones(channels, dtype)), cuda.to_device(np.zeros(channels, dtype))
    rm, rv = cuda.to_device(np.zeros(channels, dtype)), cuda.to_device(np.ones(channels, dtype))
    y_d, dx_d, copy_d = (cuda.device_array_like(x_d) for _ in range(3))
    _, mean, invstd = nbn.forward_train(x_d, axis=axis)

    view = canonical_shape(shape, axis % len(shape))
    x3, y3, dy3, dx3 = (a.reshape(view) for a in (x_d, y_d, dy_d, dx_d))
    stats = [cuda.device_array(channels, np.float64) for _ in range(5)]
    mean64, invstd64 = (cuda.to_device(np.ones(channels)) for _ in range(2))
    gpu = dispatch.get("cuda")
    ops = {
        "copy": (2, lambda: copy_d.copy_to_device(x_d), None),
        "forward-train": (
            3,
            lambda: gpu.forward_train(
                x3,
                weight=w_d,
                bias=b_d,
                eps=1e-5,
                y=y3,
                mean=stats[0],
                invstd=stats[1],
                m2=stats[2],
                running=(rm, rv, 0.1, True),
            ),
            lambda: nbn.batch_norm(x_d, rm, rv, w_d, b_d, training=True, axis=axis, out=y_d),
        ),
        "forward-eval": (
            2,
            lambda: gpu.forward_eval(
                x3, weight=w_d, bias=b_d, running_mean=rm, running_var=rv, eps=1e-5, y=y3
            ),
            lambda: nbn.forward_eval(x_d, rm, rv, w_d, b_d, axis=axis, out=y_d),
        ),
        "backward": (
            5,
            lambda: gpu.backward(
                dy3,
                x3,
                mean=mean64,
                invstd=invstd64,
                weight=w_d,
                dx=dx3,
                sum_dy=stats[3],
                sum_dy_xmu=stats[4],
            ),
            lambda: nbn.backward(dy_d, x_d, mean, invstd, w_d, axis, out=dx_d),
        ),
    }
    nbytes = host.nbytes
    print(f"\nx {shape} axis {axis} {np.dtype(dtype).name}: {nbytes / 2**20:.1f} MiB per tensor")
    if smoke:
        for _, kernels_fn, api_fn in ops.values():
            kernels_fn()
            if api_fn:
                api_fn()
        print("  smoke mode (simulator): every timed call ran once; no timings are claimed")
        return
    copy_ms = event_ms(ops["copy"][1], repeat, warmup)
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    print(f"  {'operation':<16} {'kernels ms':>10} {'GB/s':>8} {'of copy':>8} {'API ms':>8}")
    print(f"  {'copy (D2D)':<16} {copy_ms:10.4f} {copy_gbs:8.1f} {'100%':>8} {'':>8}")
    timings = {}
    for name, (passes, kernels_fn, api_fn) in ops.items():
        if name == "copy":
            continue
        ms = event_ms(kernels_fn, repeat, warmup)
        api_ms = event_ms(api_fn, repeat, warmup)
        gbs = passes * nbytes / ms / 1e6
        timings[name] = ms
        print(f"  {name:<16} {ms:10.4f} {gbs:8.1f} {gbs / copy_gbs:8.0%} {api_ms:8.4f}")
    peers = torch_ops(x_d, dy_d, channels, axis % len(shape))
    if peers is None:
        print("  PyTorch CUDA: not installed with CUDA (or no matching layout); no comparison")
        return
    print(f"  {'PyTorch (cuDNN)':<16} {'ms':>10} {'numba_bn/torch time':>21}")
    forward_backward = timings["forward-train"] + timings["backward"]
    for name, fn in peers.items():
        ms = event_ms(fn, repeat, warmup)
        ours = forward_backward if name.startswith("backward") else timings[name]
        print(f"  {name:<16} {ms:10.4f} {ours / ms:21.2f}")


def prepare(smoke):
    """False (saying why) without a GPU or the simulator; else True, with the simulator's
    threads paced and, for ``smoke``, blocks of 8 threads (the simulator runs each thread as a
    Python thread). gpu_host_overhead.py starts the same way."""
    if not cuda.is_available():
        print("no CUDA GPU (numba.cuda.is_available() is False); --smoke: NUMBA_ENABLE_CUDASIM=1")
        return False
    if numba.config.ENABLE_CUDASIM:
        sys.setswitchinterval(1e-4)  # the simulator polls its threads holding the GIL
    if smoke:
        config.THREADS_PER_BLOCK, config.ROW_TILE, config.VALUES_PER_THREAD = 8, 2, 1
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", help="N,C,... [:axis]; repeatable")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, checks only")
    args = parser.parse_args(argv)
    if not prepare(args.smoke):
        return 2
    simulated = bool(numba.config.ENABLE_CUDASIM)
    shapes = [
        parse_shape(s) for s in (args.shape or (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES))
    ]
    dtypes = [np.float32, np.float64] if args.smoke else [np.dtype(args.dtype).type]
    ok = True
    print("check against a float64 NumPy reference (relative L2 error)")
    for shape, axis in shapes:
        for dtype in dtypes:
            tol = 2e-5 if dtype == np.float32 else 1e-12
            errors = check(shape, axis, dtype, np.random.default_rng(0))
            worst = max(errors, key=lambda e: e[1])
            good = worst[1] <= tol
            ok &= good
            name = np.dtype(dtype).name
            verdict = "ok" if good else "FAIL"
            print(
                f"  {shape} axis {axis} {name:<8} worst {worst[0]:<12} {worst[1]:9.2e} "
                f"(tolerance {tol:g}) {verdict}"
            )
    if not ok:
        print("result: CHECK FAILED, nothing timed")
        return 1
    for shape, axis in shapes:
        time_shape(shape, axis, dtypes[0], args.repeat, args.warmup, args.smoke or simulated)
    print("\nresult: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
