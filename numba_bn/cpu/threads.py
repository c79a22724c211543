"""Make the parallel kernels safe to call from several Python threads at once.

Numba's ``workqueue`` threading layer aborts the process when two threads enter parallel code
together; ``omp`` and ``tbb`` are safe. Numba picks the layer on the first parallel call
(tbb, then omp, then workqueue, unless NUMBA_THREADING_LAYER says otherwise), so until that call
has happened, and for good if it chose workqueue, launches are serialised by a lock.
"""

import contextlib
import threading

import numba

_launch_lock = threading.Lock()
_safe_layer = None  # None: not known yet; True/False once numba has chosen


def threading_layer():
    """The threading layer numba chose, or None before the first parallel call."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def launch_guard():
    """A context manager to hold around a parallel kernel call."""
    global _safe_layer
    if _safe_layer:
        return contextlib.nullcontext()
    layer = threading_layer()
    if layer is not None:
        _safe_layer = layer != "workqueue"
        if _safe_layer:
            return contextlib.nullcontext()
    return _launch_lock


def guarded(parallel):
    """The parallel kernel ``parallel`` called inside the launch guard it may need. Serial twins
    are called as they are: a null guard's ``with`` costs ~0.15 us of a small call."""

    def run(*args):
        with launch_guard():
            return parallel(*args)

    run.__wrapped__ = parallel
    return run
