"""CPU backend: ``@njit(parallel=True)`` drivers over serial range kernels."""

import numba

from . import drivers
from .threads import launch_guard


def fuse_channels(x):
    """Planes layout with enough channels to give every thread whole channels (see drivers)."""
    return x.shape[2] > 1 and x.shape[1] >= 2 * numba.get_num_threads()


class CpuBackend:
    """Operations on validated, C-contiguous canonical views (see numba_bn.dispatch)."""

    name = "cpu"

    def forward_train(
        self,
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
    ):
        with launch_guard():
            return drivers.forward_train(
                x,
                weight,
                bias,
                eps,
                running_mean,
                running_var,
                momentum,
                unbiased,
                nan_check,
                fuse_channels(x),
                y,
                save_mean,
                save_invstd,
                save_m2,
            )

    def forward_eval(self, x, weight, bias, running_mean, running_var, eps, y):
        with launch_guard():
            drivers.forward_eval(x, weight, bias, running_mean, running_var, eps, y)

    def backward(self, dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu):
        with launch_guard():
            drivers.backward(dy, x, mean, invstd, weight, fuse_channels(x), dx, sum_dy, sum_dy_xmu)

    def channel_stats(self, x, mean, m2):
        with launch_guard():
            return drivers.channel_stats(x, mean, m2)

    def normalize(self, x, coef, y):
        with launch_guard():
            drivers.normalize(x, coef, y)

    def backward_sums(self, dy, x, mean, sum_dy, sum_dy_xmu):
        with launch_guard():
            drivers.backward_sums(dy, x, mean, sum_dy, sum_dy_xmu)

    def backward_dx(self, dy, x, coef, dx):
        with launch_guard():
            drivers.backward_dx(dy, x, coef, dx)
