"""The implementations timed side by side, each mapping a Case to {operation: call}.

A call returns the outputs that ``expected(case, op)`` lists (``Case.expected`` unless the
implementation says otherwise); ``numpy_outputs`` turns them into NumPy arrays for the check
(outside the timed call). Outputs are allocated by each call, as a user calls each library; the
two copies write into a preallocated array, as the limit they stand for.
"""

import numba
import numpy as np
from numba import prange, uint64

from .. import reference
from ..codecache import lock_cache_saves
from ..dispatch import get as get_backend
from ..functional import backward, forward_eval, forward_train
from ..layer import BatchNorm
from ..layout import canonical_shape

# Largest relative L2 error against the float64 reference that passes the check before timing.
# numba_bn accumulates in float64, so its float32 error is output rounding (~5e-8): the strict
# bound catches a kernel that trades accuracy for speed. Peers compute in the input dtype
# (naive NumPy float32 reaches ~5e-5 on channels-last): their bound only catches wrong results.
STRICT = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
PEER = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-9}


class Implementation:
    """What every implementation has: a ``name``, a ``tolerance`` per dtype, ``calls(case)``."""

    def expected(self, case, op):
        """The float64 results that the outputs of ``op`` are checked against."""
        return case.expected[op]

    def numpy_outputs(self, outputs, case):
        return outputs


class NumbaBn(Implementation):
    """The public functions: forward_train, forward_eval, backward."""

    name = "numba_bn"
    tolerance = STRICT

    def calls(self, case):
        x, dy, w, b, eps, axis = case.x, case.dy, case.weight, case.bias, case.eps, case.axis
        rm, rv = case.running_mean, case.running_var
        mean, invstd = case.saved_mean, case.saved_invstd
        return {
            "forward-train": lambda: forward_train(x, w, b, eps, axis),
            "eval": lambda: (forward_eval(x, rm, rv, w, b, eps, axis),),
            "backward": lambda: backward(dy, x, mean, invstd, w, axis),
        }


class NumbaBnLayer(Implementation):
    """numba_bn.BatchNorm called as a user calls it: ``bn(x)`` in training mode (batch
    statistics and the running update), ``bn(x)`` in eval mode, ``bn.backward(dy)``.

    One layer per operation. The training layer has momentum 1, so that after each call its
    running buffers hold the batch mean and unbiased variance: the check reads the statistics
    from the layer's public state, and the update costs what it costs at momentum 0.1.
    ``backward()`` releases what its forward saved (one backward per forward, as PyTorch frees
    its graph); the backward call restores that state, so that backward alone is timed.
    """

    name = "BatchNorm"
    tolerance = STRICT

    def calls(self, case):
        x, dy = case.x, case.dy
        train, frozen, differentiated = (
            self._layer(case, momentum) for momentum in (1.0, 0.1, 0.1)
        )
        frozen.eval()
        frozen.running_mean[:], frozen.running_var[:] = case.running_mean, case.running_var
        differentiated(x)
        differentiated(x)  # a training step's: through the plan of the first (numba_bn/plans.py)
        saved = differentiated._saved

        def differentiate():
            differentiated._saved = saved
            dx = differentiated.backward(dy)
            return dx, differentiated.grad_weight, differentiated.grad_bias

        return {
            "forward-train": lambda: (train(x), train.running_mean, train.running_var),
            "eval": lambda: (frozen(x),),
            "backward": differentiate,
        }

    @staticmethod
    def _layer(case, momentum):
        bn = BatchNorm(case.channels, case.eps, momentum, axis=case.shape.axis, dtype=case.dtype)
        bn.weight[:], bn.bias[:] = case.weight, case.bias
        return bn

    def expected(self, case, op):
        """forward-train: (y, batch mean, unbiased batch variance); backward: through the
        layer's own batch statistics (float64 here), not the case's rounded ones."""
        if op not in ("forward-train", "backward"):
            return case.expected[op]
        y, mean, invstd = case.expected["forward-train"]
        if op == "forward-train":
            count = case.x.size // case.channels
            return y, mean, (1.0 / invstd**2 - case.eps) * count / (count - 1)
        x64, dy64 = case.x.astype(np.float64), case.dy.astype(np.float64)
        w64 = case.weight.astype(np.float64)
        return reference.backward(dy64, x64, mean, invstd, w64, case.axis)


class NumbaBnKernels(NumbaBn):
    """The CPU backend on prepared canonical views and output buffers: the public call minus
    validation, allocation and dispatch."""

    name = "numba_bn kernels"

    def calls(self, case):
        backend = get_backend("cpu")
        view = canonical_shape(case.x.shape, case.axis)
        x, dy = case.x.reshape(view), case.dy.reshape(view)
        y, dx = np.empty_like(x), np.empty_like(x)
        w, b, eps = case.weight, case.bias, case.eps
        rm, rv = case.running_mean, case.running_var
        mean, invstd, m2, sum_dy, sum_dy_xmu = (np.empty(case.channels) for _ in range(5))
        saved_mean = case.saved_mean.astype(np.float64)
        saved_invstd = case.saved_invstd.astype(np.float64)
        shape = case.x.shape

        def train():
            backend.forward_train(x, weight=w, bias=b, eps=eps, y=y, mean=mean, invstd=invstd,
                                  m2=m2)  # fmt: skip
            return y.reshape(shape), mean, invstd

        def evaluate():
            backend.forward_eval(x, weight=w, bias=b, running_mean=rm, running_var=rv, eps=eps,
                                 y=y)  # fmt: skip
            return (y.reshape(shape),)

        def differentiate():
            backend.backward(dy, x, mean=saved_mean, invstd=saved_invstd, weight=w, dx=dx,
                             sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)  # fmt: skip
            return dx.reshape(shape), saved_invstd * sum_dy_xmu, sum_dy

        return {"forward-train": train, "eval": evaluate, "backward": differentiate}


class NumpyNaive(Implementation):
    """numba_bn.reference in the input dtype: batch norm as written by hand in NumPy."""

    name = "numpy"
    tolerance = PEER

    def calls(self, case):
        x, dy, w, b, eps, axis = case.x, case.dy, case.weight, case.bias, case.eps, case.axis
        rm, rv = case.running_mean, case.running_var
        mean, invstd = case.saved_mean, case.saved_invstd
        return {
            "forward-train": lambda: reference.forward_train(x, w, b, eps, axis),
            "eval": lambda: (reference.forward_eval(x, rm, rv, w, b, eps, axis),),
            "backward": lambda: reference.backward(dy, x, mean, invstd, w, axis),
        }


class Torch(Implementation):
    """The ATen CPU kernels that torch.nn.functional.batch_norm reaches, called directly (no
    autograd): native_batch_norm (training=True without running buffers; training=False with
    them for eval) and native_batch_norm_backward. The tensors share the NumPy arrays' memory:
    a channels-last input is an NCHW-sized tensor with channels_last strides.

    (The ``.out`` overloads exist, but native_batch_norm_backward.out computes into a temporary
    and copies, which made it ~1.8x slower than the allocating call on torch 2.13.)
    """

    name = "torch"
    tolerance = PEER

    def __init__(self, torch, threads):
        self.torch = torch
        torch.set_num_threads(threads)

    def calls(self, case):
        torch, eps = self.torch, case.eps
        aten = torch.ops.aten
        x, dy = (torch.from_numpy(a).movedim(case.axis, 1) for a in (case.x, case.dy))
        vectors = (case.weight, case.bias, case.running_mean, case.running_var)
        w, b, rm, rv = (torch.from_numpy(v) for v in vectors)
        mean, invstd = torch.from_numpy(case.saved_mean), torch.from_numpy(case.saved_invstd)
        grads = [True, True, True]
        return {
            "forward-train": lambda: aten.native_batch_norm(x, w, b, None, None, True, 0.1, eps),
            "eval": lambda: aten.native_batch_norm(x, w, b, rm, rv, False, 0.1, eps)[:1],
            "backward": lambda: aten.native_batch_norm_backward(
                dy, x, w, None, None, mean, invstd, True, eps, grads
            ),
        }

    def numpy_outputs(self, outputs, case):
        tensor, *vectors = outputs
        return (tensor.movedim(1, case.axis).numpy(), *(v.numpy() for v in vectors))


#: Where a copy's destination lies from its source, in bytes modulo 4096 (:func:`copy_destination`)
COPY_OFFSET = 2048


def copy_destination(src):
    """An uninitialised C-contiguous array like ``src`` whose first byte lies COPY_OFFSET bytes
    past src's modulo 4096 (4 KiB of padding before it).

    On this project's AMD EPYC (Zen 4, ``erms`` and ``fsrm``) with glibc 2.36, memcpy of 4 KiB to
    128 KiB runs 4-10x slower when ``dst - src`` is 4-31 bytes past a multiple of 4096 (a 32 KiB
    copy 11.5 us instead of 1.2; glibc bug 30994: ``rep movsb`` and 4 KiB aliasing), and two
    arrays of one size allocated in a row are often 16 bytes past (malloc's header). np.copyto
    and :func:`parallel_copy` (LLVM turns its loop into memcpy calls) both hit it; numba_bn's
    kernels, which compute, do not. The limit is the copy without that accident, on every run.
    """
    pad = 4096 // src.itemsize
    buffer = np.empty(src.size + pad, src.dtype)
    start = (src.ctypes.data + COPY_OFFSET - buffer.ctypes.data) % 4096 // src.itemsize
    return buffer[start : start + src.size].reshape(src.shape)


class Memcpy(Implementation):
    """np.copyto(dst, x) into a preallocated dst, one thread."""

    name = "copyto"
    tolerance = PEER

    def calls(self, case):
        dst = copy_destination(case.x)

        def copy():
            np.copyto(dst, case.x)
            return (dst,)

        return {"memcpy": copy}


@numba.njit(parallel=True, cache=True)
def parallel_copy(dst, src, blocks):
    """dst[:] = src[:] for 1-D arrays, as ``blocks`` contiguous slices in a prange loop."""
    n = uint64(src.size)
    for block in prange(blocks):
        start, stop = n * uint64(block) // uint64(blocks), n * uint64(block + 1) // uint64(blocks)
        for i in range(start, stop):  # unsigned, so that LLVM sees a plain copy loop
            dst[i] = src[i]


lock_cache_saves(parallel_copy)


class ParallelCopy(Memcpy):
    """The same copy on the benchmark's threads: one contiguous slice per numba thread."""

    name = "parallel copy"

    def __init__(self, threads):
        self.threads = threads

    def calls(self, case):
        dst = copy_destination(case.x)
        flat_dst, flat_x = dst.reshape(-1), case.x.reshape(-1)

        def copy():
            parallel_copy(flat_dst, flat_x, self.threads)
            return (dst,)

        return {"memcpy": copy}


def import_torch():
    """torch, or None when it is not installed (nothing but the benchmark imports it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


# --impls names; "memcpy" is the two copies, of which the faster is the limit in the tables
PEERS = ("numba_bn", "BatchNorm", "torch", "numpy", "memcpy")
DEFAULT_PEERS = ("numba_bn", "torch", "numpy", "memcpy")  # --sweep adds BatchNorm
COPIES = ("copyto", "parallel copy")


def implementations(names, threads, torch):
    """The implementations named in ``names`` (a subset of PEERS), torch only if it is given."""
    available = {
        "numba_bn": [NumbaBn()],
        "BatchNorm": [NumbaBnLayer()],
        "numpy": [NumpyNaive()],
        "memcpy": [Memcpy(), ParallelCopy(threads)],
    }
    if torch is not None:
        available["torch"] = [Torch(torch, threads)]
    return [chosen for name in names for chosen in available.get(name, [])]
