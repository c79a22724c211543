"""Group norm and layer norm (issue 16) against PyTorch's CPU kernels, NumPy and a memcpy.

    numba-bn bench --norms [--threads 2] [--repeat 10]

Shapes of the issue: group norm on (32, 64, 56, 56) with 32 groups, layer norm on
(64, 512, 768), float32. Every implementation is checked against a float64 NumPy reference
before it is timed. Times are medians; "memcpy" is np.copyto of the bytes each pass must move
at least (forward: read x, write y; backward: read dy and x, write dx), and GB/s counts those
bytes. PyTorch runs its native kernels (aten.native_group_norm / native_layer_norm and their
_backward, what autograd calls) with the same number of threads. The load average before and
after is printed: on a shared machine, compare runs made at the same load.
"""

import os
import time

import numpy as np

from ..norms import (
    group_norm_backward,
    group_norm_forward,
    layer_norm_backward,
    layer_norm_forward,
)
from .peers import copy_destination

EPS = 1e-5
#: The issue's shapes: group norm (x, groups), layer norm (x, normalized size).
GROUP_SHAPE, GROUPS = (32, 64, 56, 56), 32
LAYER_SHAPE = (64, 512, 768)


def median_ms(function, repeat):
    function()  # compiled and warm
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples)) * 1e3


# ------------------------------------------------------------------------------- NumPy
def numpy_group_forward(x, groups, weight, bias):
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    mean = grouped.mean(axis=2, keepdims=True)
    invstd = 1.0 / np.sqrt(grouped.var(axis=2, keepdims=True) + EPS)
    x_hat = ((grouped - mean) * invstd).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return x_hat * weight.reshape(shape) + bias.reshape(shape), mean, invstd


def numpy_group_backward(dy, x, mean, invstd, groups, weight):
    n, c = x.shape[:2]
    shape = (1, c) + (1,) * (x.ndim - 2)
    g = (dy * weight.reshape(shape)).reshape(n, groups, -1)
    x_hat = (x.reshape(n, groups, -1) - mean) * invstd
    projection = x_hat * (g * x_hat).mean(axis=2, keepdims=True)
    dx = invstd * (g - g.mean(axis=2, keepdims=True) - projection)
    axes = (0,) + tuple(range(2, x.ndim))
    dweight = (dy * x_hat.reshape(x.shape)).sum(axis=axes)
    return dx.reshape(x.shape), dweight, dy.sum(axis=axes)


def numpy_layer_forward(x, weight, bias):
    mean = x.mean(axis=-1, keepdims=True)
    invstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True) + EPS)
    return (x - mean) * invstd * weight + bias, mean, invstd


def numpy_layer_backward(dy, x, mean, invstd, weight):
    g = dy * weight
    x_hat = (x - mean) * invstd
    projection = x_hat * (g * x_hat).mean(axis=-1, keepdims=True)
    dx = invstd * (g - g.mean(axis=-1, keepdims=True) - projection)
    lead = tuple(range(x.ndim - 1))
    return dx, (dy * x_hat).sum(axis=lead), dy.sum(axis=lead)


# -------------------------------------------------------------------------------- cases
def group_case(rng, torch):
    shape, groups = GROUP_SHAPE, GROUPS
    n, c = shape[:2]
    hw = shape[2] * shape[3]
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.uniform(-1, 1, c).astype(np.float32)
    _, mean, invstd = group_norm_forward(x, groups, w, b)
    _, np_mean, np_invstd = numpy_group_forward(x, groups, w, b)
    out = np.empty_like(x)
    forward = {
        "numba_bn": lambda: group_norm_forward(x, groups, w, b, out=out),
        "numpy": lambda: numpy_group_forward(x, groups, w, b),
    }
    backward = {
        "numba_bn": lambda: group_norm_backward(dy, x, mean, invstd, groups, w, out=out),
        "numpy": lambda: numpy_group_backward(dy, x, np_mean, np_invstd, groups, w),
    }
    if torch is not None:
        aten = torch.ops.aten
        tx, tdy, tw, tb = (torch.from_numpy(a) for a in (x, dy, w, b))
        _, t_mean, t_rstd = aten.native_group_norm(tx, tw, tb, n, c, hw, groups, EPS)
        forward["torch"] = lambda: aten.native_group_norm(tx, tw, tb, n, c, hw, groups, EPS)
        backward["torch"] = lambda: aten.native_group_norm_backward(
            tdy, tx, t_mean, t_rstd, tw, n, c, hw, groups, [True, True, True]
        )
    x64, dy64, w64, b64 = (a.astype(np.float64) for a in (x, dy, w, b))
    ref_y, ref_mean, ref_invstd = numpy_group_forward(x64, groups, w64, b64)
    reference = (ref_y, numpy_group_backward(dy64, x64, ref_mean, ref_invstd, groups, w64)[0])
    return f"group norm {shape} G={groups}", x, forward, backward, reference


def layer_case(rng, torch):
    shape = LAYER_SHAPE
    width = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, width).astype(np.float32)
    b = rng.uniform(-1, 1, width).astype(np.float32)
    _, mean, invstd = layer_norm_forward(x, width, w, b)
    _, np_mean, np_invstd = numpy_layer_forward(x, w, b)
    out = np.empty_like(x)
    forward = {
        "numba_bn": lambda: layer_norm_forward(x, width, w, b, out=out),
        "numpy": lambda: numpy_layer_forward(x, w, b),
    }
    backward = {
        "numba_bn": lambda: layer_norm_backward(dy, x, mean, invstd, width, w, out=out),
        "numpy": lambda: numpy_layer_backward(dy, x, np_mean, np_invstd, w),
    }
    if torch is not None:
        aten = torch.ops.aten
        tx, tdy, tw, tb = (torch.from_numpy(a) for a in (x, dy, w, b))
        _, t_mean, t_rstd = aten.native_layer_norm(tx, [width], tw, tb, EPS)
        forward["torch"] = lambda: aten.native_layer_norm(tx, [width], tw, tb, EPS)
        backward["torch"] = lambda: aten.native_layer_norm_backward(
            tdy, tx, [width], t_mean, t_rstd, tw, tb, [True, True, True]
        )
    x64, dy64, w64, b64 = (a.astype(np.float64) for a in (x, dy, w, b))
    ref_y, ref_mean, ref_invstd = numpy_layer_forward(x64, w64, b64)
    reference = (ref_y, numpy_layer_backward(dy64, x64, ref_mean, ref_invstd, w64)[0])
    return f"layer norm {shape}", x, forward, backward, reference


def _first(result):
    value = result[0] if isinstance(result, tuple) else result
    return value if isinstance(value, np.ndarray) else value.numpy()  # torch's, else


def run(threads, repeat, torch, log=print):
    """Verify, time and print the table (``torch`` None: without PyTorch's rows)."""
    rng = np.random.default_rng(0)
    log(f"group and layer norm: float32, threads {threads}, median of {repeat}, load average "
        f"before {os.getloadavg()[0]:.2f}")  # fmt: skip
    log(f"{'case':34} {'pass':8} {'impl':9} {'ms':>8} {'GB/s':>7} {'/memcpy':>8} {'/torch':>7}")
    for make_case in (group_case, layer_case):
        name, x, forward, backward, reference = make_case(rng, torch)
        src = np.ones(x.size * 3 // 2, np.float32)
        dst = copy_destination(src)  # the copy without glibc's 4 KiB aliasing accident
        for label, impls, expected, moved in (
            ("forward", forward, reference[0], 2 * x.nbytes),
            ("backward", backward, reference[1], 3 * x.nbytes),
        ):
            for impl, call in impls.items():  # verify before timing
                error = np.abs(_first(call()) - expected).max() / np.abs(expected).max()
                assert error < 1e-4, f"{name} {label} {impl}: relative error {error:.2e}"
            half = moved // 2 // 4  # float32 elements copied: read + write = moved bytes
            copy = (dst[:half], src[:half])
            times = {"memcpy": median_ms(lambda c=copy: np.copyto(*c), repeat)}
            times.update({impl: median_ms(call, repeat) for impl, call in impls.items()})
            for impl, ms in times.items():
                versus = ms / times["torch"] if "torch" in times else float("nan")
                ratios = f"{ms / times['memcpy']:8.2f} {versus:7.2f}"
                log(f"{name:34} {label:8} {impl:9} {ms:8.2f} {moved / ms / 1e6:7.1f} {ratios}")
    log(f"load average after {os.getloadavg()[0]:.2f}")
