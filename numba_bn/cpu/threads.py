"""Make the parallel kernels safe to call from several Python threads at once.

Numba's ``workqueue`` threading layer aborts the process when two threads enter parallel code
together; ``omp`` and ``tbb`` are safe. Numba picks the layer on the first parallel call
(tbb, then omp, then workqueue, unless NUMBA_THREADING_LAYER says otherwise), so until that call
has happened, and for good if it chose workqueue, launches are serialised by a lock; on a safe
layer a plan calls the parallel twin as it is (:func:`launcher`). The thread count a call asks
for is :func:`num_threads`.
"""

import contextlib
import threading

import numba
from numba.np.ufunc import parallel as _pool

from ..codecache import lock_cache_saves

_launch_lock = threading.Lock()
_safe_layer = None  # None: not known yet; True/False once numba has chosen
_compile_only = []  # after compile_only(): parallel twins compile and do not run


def threading_layer():
    """The threading layer numba chose, or None before the first parallel call."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


#: The layers NUMBA_THREADING_LAYER may name outright (the others name a property, and Numba
#: picks one of these for it on the first parallel launch).
LAYERS = ("omp", "tbb", "workqueue")


def expected_layer():
    """The threading layer parallel launches run on: Numba's choice once made, before it the
    one NUMBA_THREADING_LAYER names ("omp", "tbb", "workqueue"); None when neither is known."""
    layer = threading_layer()
    if layer is None:
        configured = str(numba.config.THREADING_LAYER).lower()
        layer = configured if configured in LAYERS else None
    return layer


@numba.njit(parallel=True, cache=True)
def _smallest_parallel_function(n):
    total = 0
    for i in numba.prange(n):
        total += i
    return total


lock_cache_saves(_smallest_parallel_function)


def choose_threading_layer():
    """The threading layer, made chosen first if need be: Numba chooses it on the first
    parallel launch of the process, and the smallest parallel function compiles in ~1 s where a
    driver's parallel twin took ~12 (``numba-bn info`` ran one)."""
    if threading_layer() is None:
        _smallest_parallel_function(2)
    return threading_layer()


def _layer_is_safe():
    """True or False once numba has chosen its threading layer, None before."""
    global _safe_layer
    if _safe_layer is None:
        layer = threading_layer()
        if layer is not None:
            _safe_layer = layer != "workqueue"
    return _safe_layer


def layer_safe():
    """Whether numba has chosen a threading layer that is safe from several threads at once
    (where :func:`launcher` hands out the parallel kernel as it is)."""
    return _layer_is_safe() is True


def launch_guard():
    """A context manager to hold around a parallel kernel call."""
    return contextlib.nullcontext() if _layer_is_safe() else _launch_lock


def num_threads():
    """``numba.get_num_threads()``, the calling thread's count, without the two locks around
    starting Numba's pool once it runs (~0.09 us instead of ~0.7 of every parallel-sized call):
    the pool's own accessor (``_get_num_threads``, Numba's since 0.49, which the public call
    wraps), else the public call (before the pool starts, for its errors, and on a Numba
    without these names)."""
    if getattr(_pool, "_is_initialized", False):
        count = getattr(_pool, "_get_num_threads", _unknown)()
        if count > 0:
            return count
    return numba.get_num_threads()


def _unknown():
    return 0


def launcher(parallel):
    """How to call the parallel kernel ``parallel``: as it is once Numba runs a layer that is
    safe from several threads at once (``omp``, ``tbb``: ~0.4 us less a call), else inside the
    launch guard (:func:`guarded`), also while the layer is not known yet (:func:`layer_known`);
    after :func:`compile_only`, a function that compiles it."""
    if _compile_only:
        return compiled(parallel)
    return parallel if _layer_is_safe() else guarded(parallel)


def compile_only():
    """From now on in this process, the parallel kernels :func:`launcher` hands out compile for
    the arguments they are called with and do not run: a compile-ahead worker forked from a
    process (:mod:`numba_bn.ahead`), where the thread pool the process may have started is not
    (the copy has one thread; its parent's pool would wait for threads that are not there)."""
    _compile_only.append(True)


def compiled(parallel):
    """``parallel`` compiled (or loaded from the cache) for the types of a call's arguments, as
    the call would, and not run."""

    def run(*args):
        parallel.compile(tuple(map(parallel.typeof_pyval, args)))

    run.__wrapped__ = parallel
    return run


def layer_known():
    """Whether numba has chosen its threading layer (on the first parallel call)."""
    return _layer_is_safe() is not None


def guarded(parallel):
    """The parallel kernel ``parallel`` called inside the launch guard it may need. Serial twins
    are called as they are: a null guard's ``with`` costs ~0.15 us of a small call."""

    def run(*args):
        with launch_guard():
            return parallel(*args)

    run.__wrapped__ = parallel
    return run
