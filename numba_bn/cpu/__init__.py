"""CPU backend: Numba drivers over serial range kernels, parallel or serial by input size."""

import contextlib
from types import SimpleNamespace

import numba

from ..stats import no_running_update
from . import drivers
from .items import is_fused
from .threads import launch_guard

# Below this many elements a call runs on the calling thread: waking the pool costs ~5 us on an
# idle machine (and milliseconds on an oversubscribed one), more than the work itself.
SERIAL_MAX_ELEMENTS = 1 << 15

_NAMES = ("forward_train", "forward_eval", "backward", "batch_stats", "normalize",
          "backward_sums", "backward_dx")  # fmt: skip
_PARALLEL = SimpleNamespace(**{name: getattr(drivers, name) for name in _NAMES})
_SERIAL = SimpleNamespace(**{name: getattr(drivers, name + "_serial") for name in _NAMES})


def _plan(x):
    """(drivers, guard, fused) for an input: which twin runs it, and whether channels run whole
    (:func:`.items.is_fused`, the rule the C plugin's shim follows too)."""
    threads = 1 if x.size < SERIAL_MAX_ELEMENTS else numba.get_num_threads()
    fused = is_fused(x.shape[1], x.shape[2], threads)
    if threads == 1:
        return _SERIAL, contextlib.nullcontext(), fused
    return _PARALLEL, launch_guard(), fused


class CpuBackend:
    """The backend interface (numba_bn.dispatch) on validated, C-contiguous canonical views.

    Per-channel vectors are float64 (mean, invstd, m2, the sums) or in x's dtype (weight, bias,
    running buffers: zero-length when absent). Outputs are overwritten.
    """

    name = "cpu"

    # ----------------------------------------------------------- whole operations, fused
    def forward_train(self, x, *, weight, bias, eps, y, mean, invstd, m2, running=None,
                      nan_check=False):  # fmt: skip
        """Batch statistics, y, and the running update (``running``: a RunningUpdate). False,
        with nothing written but the statistics, when nan_check finds them not finite."""
        run, guard, fused = _plan(x)
        # The fused pass writes y channel by channel as it goes; a NaN check must come before
        # any y is written (a call that raises leaves out= as it was), so it takes the split one.
        fused = fused and not nan_check
        running = running or no_running_update(x.dtype)
        with guard:
            return run.forward_train(x, weight, bias, eps, running.mean, running.var,
                                     running.momentum, running.unbiased, nan_check, fused, y,
                                     mean, invstd, m2)  # fmt: skip

    def forward_eval(self, x, *, weight, bias, running_mean, running_var, eps, y):
        run, guard, _ = _plan(x)
        with guard:
            run.forward_eval(x, weight, bias, running_mean, running_var, eps, y)

    def backward(self, dy, x, *, mean, invstd, weight, dx, sum_dy, sum_dy_xmu):
        run, guard, fused = _plan(x)
        with guard:
            run.backward(dy, x, mean, invstd, weight, fused, dx, sum_dy, sum_dy_xmu)

    # ----------------------------------------------- the split steps (and their exchange)
    def batch_stats(self, x, *, mean, m2):
        """mean, M2 (=) per channel; returns the count of values per channel."""
        run, guard, _ = _plan(x)
        with guard:
            return run.batch_stats(x, mean, m2)

    def normalize(self, x, *, mean, invstd, weight, bias, y):
        run, guard, _ = _plan(x)
        with guard:
            run.normalize(x, mean, invstd, weight, bias, y)

    def backward_sums(self, dy, x, *, mean, sum_dy, sum_dy_xmu):
        run, guard, _ = _plan(x)
        with guard:
            run.backward_sums(dy, x, mean, sum_dy, sum_dy_xmu)

    def backward_dx(self, dy, x, *, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
        run, guard, _ = _plan(x)
        with guard:
            run.backward_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx)
