"""The implementations timed side by side, each mapping a Case to {operation: call}.

A call returns its outputs in the order of ``Case.expected``; ``numpy_outputs`` turns them into
NumPy arrays for the check (outside the timed call). Outputs are allocated by each call, as a
user calls each library; memcpy writes into a preallocated array, as the limit it stands for.
"""

import numpy as np

from .. import reference
from ..dispatch import get as get_backend
from ..functional import backward, forward_eval, forward_train
from ..layout import canonical_shape

# Largest relative L2 error against the float64 reference that passes the check before timing.
# numba_bn accumulates in float64, so its float32 error is output rounding (~5e-8): the strict
# bound catches a kernel that trades accuracy for speed. Peers compute in the input dtype
# (naive NumPy float32 reaches ~5e-5 on channels-last): their bound only catches wrong results.
STRICT = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
PEER = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-9}


class NumbaBn:
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

    def numpy_outputs(self, outputs, case):
        return outputs


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


class NumpyNaive(NumbaBn):
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


class Torch:
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


class Memcpy(NumbaBn):
    """np.copyto(dst, x) into a preallocated dst, one thread: the bytes limit."""

    name = "memcpy"
    tolerance = PEER

    def calls(self, case):
        dst = np.empty_like(case.x)

        def copy():
            np.copyto(dst, case.x)
            return (dst,)

        return {"memcpy": copy}


def import_torch():
    """torch, or None when it is not installed (nothing but the benchmark imports it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


PEERS = ("numba_bn", "torch", "numpy", "memcpy")


def implementations(names, threads, torch):
    """The implementations named in ``names`` (a subset of PEERS), torch only if it is given."""
    available = {"numba_bn": NumbaBn(), "numpy": NumpyNaive(), "memcpy": Memcpy()}
    if torch is not None:
        available["torch"] = Torch(torch, threads)
    return [available[name] for name in names if name in available]
