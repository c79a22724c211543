"""Compile every CUDA kernel to PTX for a real GPU, without one: the simulator runs the kernels as
Python and never types them, so this is what catches code that numba.cuda cannot compile.

Needs NVVM and libdevice (the ``nvidia-cuda-nvcc-cu12`` wheel, or a toolkit under CUDA_HOME),
not a driver. Run as ``python tests/cuda_compile.py [major.minor]``; tests/test_cuda.py does.
"""

import sys
import types as pytypes

import numba.cuda.dispatcher
from numba import cuda, types

from numba_bn.cuda import _point_numba_at_pip_toolkit

CC = tuple(int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "9.0").split("."))
# Device functions ask the current device for its compute capability; there is none here.
numba.cuda.dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=CC)
_point_numba_at_pip_toolkit()

from numba_bn.cuda import arrays, kernels  # noqa: E402


def array(dtype, ndim):
    return types.Array(dtype, ndim, "C")


def signatures(dt):
    """The argument types numba_bn.cuda.launch passes, for data of dtype ``dt``."""
    f64, i64, i32 = types.float64, types.int64, types.int32
    x, v, v64 = array(dt, 3), array(dt, 1), array(f64, 1)
    partial, flags = array(f64, 3), array(i32, 1)
    return {
        kernels.channel_stats: (
            (x, v, v, f64, types.boolean, i64, i64, partial, flags, v64, v64, v64, array(dt, 2))
        ),
        kernels.eval_coefficients: (v, v, v, v, f64, array(dt, 2)),
        kernels.affine_coefficients: (v64, v64, v, v, array(dt, 2)),
        kernels.dx_coefficients: (f64, v64, v64, v, v64, v64, array(dt, 2)),
        kernels.affine: (
            (
                x,
                x,
                i64,
                array(dt, 2),
                i64,
                f64,
                v64,
                v64,
                f64,
                types.boolean,
                types.boolean,
                flags,
                v,
                v,
                x,
            )
        ),
        kernels.relu_grad: (v, v, v),
        kernels.backward_sums: (
            x,
            x,
            v64,
            v64,
            v,
            i64,
            i64,
            partial,
            flags,
            v64,
            v64,
            array(dt, 2),
        ),
        kernels.backward_dx: (x, x, array(dt, 2), i64, x),
        arrays._fill: (v, f64),
        arrays._product: (v64, v64, v),
        arrays._invstd: (v64, f64, v64),
    }


def casts():
    """The conversions of float16 data to float32 and back, and of statistics to float32."""
    f16, f32, f64 = (array(t, 1) for t in (types.float16, types.float32, types.float64))
    return [(f16, f32), (f32, f16), (f64, f32)]


def main():
    for dt in (types.float32, types.float64):
        for kernel, signature in signatures(dt).items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=CC)
            # a reshape in a kernel calls Numba's generic helper, with local-memory arrays, in
            # every thread (the elementwise passes that did so ran at 12% of a copy's bandwidth
            # on an H200)
            assert "numba_attempt_nocopy_reshape" not in ptx, f"{kernel.py_func.__name__} reshapes"
            print(f"sm_{CC[0]}{CC[1]} {dt} {kernel.py_func.__name__}: {ptx.count(chr(10))} lines")
    for signature in casts():
        cuda.compile_ptx(arrays._cast.py_func, signature, cc=CC)
        print(f"sm_{CC[0]}{CC[1]} _cast {signature[0].dtype} -> {signature[1].dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
