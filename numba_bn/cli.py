"""The ``numba-bn`` command: ``demo``, ``info`` and the subcommands registered in COMMANDS."""

import argparse
import sys
import time

import numpy as np


def _median_seconds(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _rel_err(value, ref):
    ref = np.asarray(ref, dtype=np.float64)
    return float(
        np.linalg.norm(np.asarray(value, np.float64) - ref) / max(np.linalg.norm(ref), 1e-300)
    )


# --------------------------------------------------------------------------------------- demo
def _demo_arguments(parser):
    parser.add_argument("--shape", default="32,64,28,28", help="input shape (default %(default)s)")
    parser.add_argument("--axis", type=int, default=1, help="channel axis (default 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per operation")


def _demo(args):
    """A default batch through train forward, backward and eval, checked, then timed."""
    import numba_bn as nbn
    from numba_bn import reference

    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3.0 + 10.0).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[args.axis]
    bn = nbn.BatchNorm(channels, axis=args.axis, dtype=dtype)
    bn.weight[:] = rng.uniform(0.5, 1.5, channels)
    bn.bias[:] = rng.standard_normal(channels)
    print(f"numba_bn {nbn.__version__} demo: x {shape} {dtype}, axis {args.axis}")

    start = time.perf_counter()
    y = bn(x)
    dx = bn.backward(dy)
    bn.eval()
    y_eval = bn(x)
    first_call = time.perf_counter() - start

    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    w64, b64 = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    y_ref, mean_ref, invstd_ref = reference.forward_train(x64, w64, b64, bn.eps, args.axis)
    dx_ref, dw_ref, db_ref = reference.backward(dy64, x64, mean_ref, invstd_ref, w64, args.axis)
    var_ref = 1.0 / invstd_ref**2 - bn.eps
    count = x.size // channels
    running_var_ref = 0.9 + 0.1 * var_ref * count / (count - 1)
    eval_ref = reference.forward_eval(
        x64, 0.1 * mean_ref, running_var_ref, w64, b64, bn.eps, args.axis
    )
    tol = 1e-5 if dtype == np.float32 else 1e-12
    checks = [
        ("y (train)", _rel_err(y, y_ref)),
        ("dx", _rel_err(dx, dx_ref)),
        ("dweight", _rel_err(bn.grad_weight, dw_ref)),
        ("dbias", _rel_err(bn.grad_bias, db_ref)),
        ("running_mean", _rel_err(bn.running_mean, 0.1 * mean_ref)),
        ("running_var", _rel_err(bn.running_var, running_var_ref)),
        ("y (eval)", _rel_err(y_eval, eval_ref)),
    ]
    print(f"\ncheck against a float64 NumPy reference (relative L2 error, tolerance {tol:g})")
    ok = True
    for name, err in checks:
        good = err <= tol
        ok &= good
        print(f"  {name:<13} {err:9.2e}  {'ok' if good else 'FAIL'}")

    a = args.axis
    w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
    _, mean, invstd = nbn.forward_train(x, w, b, axis=a)
    ops = [
        ("forward-train",
         lambda: nbn.forward_train(x, w, b, axis=a),
         lambda: reference.forward_train(x, w, b, axis=a)),
        ("forward-eval",
         lambda: nbn.forward_eval(x, rm, rv, w, b, axis=a),
         lambda: reference.forward_eval(x, rm, rv, w, b, axis=a)),
        ("backward",
         lambda: nbn.backward(dy, x, mean, invstd, w, axis=a),
         lambda: reference.backward(dy, x, mean, invstd, w, axis=a)),
    ]  # fmt: skip
    print(f"\nmedian of {args.repeat} runs, {x.nbytes / 2**20:.1f} MiB per tensor")
    print(f"  {'operation':<14} {'numba_bn ms':>12} {'NumPy ms':>10} {'speed-up':>9}")
    for name, ours, numpy_version in ops:
        t_ours = _median_seconds(ours, args.repeat)
        t_numpy = _median_seconds(numpy_version, max(3, args.repeat // 4))
        print(f"  {name:<14} {t_ours * 1e3:12.3f} {t_numpy * 1e3:10.3f} {t_numpy / t_ours:8.1f}x")
    print(
        f"\nfirst call (train forward + backward + eval, compile or cache load included): "
        f"{first_call:.2f} s"
    )
    print("result:", "all checks passed" if ok else "CHECK FAILED")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------- info
def _info_arguments(parser):
    pass


def _info(args):
    import platform

    import llvmlite
    import llvmlite.binding as llvm
    import numba

    import numba_bn as nbn
    from numba_bn.cpu import SERIAL_MAX_ELEMENTS
    from numba_bn.cpu.threads import threading_layer

    # one call large enough for the parallel kernels, so that numba picks its threading layer
    nbn.forward_train(np.ones((SERIAL_MAX_ELEMENTS // 2, 2)))
    features = sorted(
        f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f[0] == "+"
    )
    simd = [f for f in features if f.startswith(("sse4", "avx", "fma"))]
    try:
        from numba import cuda

        cuda_available = cuda.is_available()
    except Exception as exc:  # pragma: no cover - depends on the machine
        cuda_available = f"no ({exc})"
    rows = [
        ("numba_bn", nbn.__version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("numba", numba.__version__),
        ("llvmlite", llvmlite.__version__),
        ("threading layer", threading_layer()),
        ("threads", numba.get_num_threads()),
        ("cpu", llvm.get_host_cpu_name()),
        ("simd", " ".join(simd)),
        ("cuda available", cuda_available),
        ("cache dir", numba.config.CACHE_DIR or "(next to the package sources)"),
    ]
    for name, value in rows:
        print(f"{name:<16} {value}")
    return 0


# -------------------------------------------------------------------------------- train-demo
def _train_demo_arguments(parser):
    from .train_demo import add_arguments

    add_arguments(parser)


def _train_demo(args):
    from .train_demo import run_from_args

    return run_from_args(args)


# ------------------------------------------------------------------------------- build-plugin
def _build_plugin_arguments(parser):
    from .plugin import add_arguments

    add_arguments(parser)


def _build_plugin(args):
    from .plugin import run_from_args

    return run_from_args(args)


# -------------------------------------------------------------------------------------- bench
def _bench_arguments(parser):
    from .bench import add_arguments

    add_arguments(parser)


def _bench(args):
    from .bench import command

    return command(args)


# ------------------------------------------------------------------------------------ commands
COMMANDS = {
    "demo": (_demo_arguments, _demo, "check and time a default batch (train, backward, eval)"),
    "info": (_info_arguments, _info, "versions, threading layer, CPU, CUDA"),
    "train-demo": (
        _train_demo_arguments,
        _train_demo,
        "train an MLP on scikit-learn's digits with and without BatchNorm, plot the curves",
    ),
    "build-plugin": (
        _build_plugin_arguments,
        _build_plugin,
        "build the C library libnumba_bn.so and its header from the kernels",
    ),
    "bench": (_bench_arguments, _bench, "verify, then time against memcpy, NumPy and PyTorch"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="numba-bn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    sys.exit(main())
