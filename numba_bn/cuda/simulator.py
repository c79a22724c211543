"""A thread-safe ``cuda.shared.array`` for Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

The simulator runs the threads of a block as Python threads and gives them one shared array per
source line: ``FakeCUDAShared.array`` looks the line up in a dict and, when it is missing,
creates the array and stores it, with no lock (numba 0.68's ``numba/cuda/simulator/kernelapi.py``
and numba-cuda 0.30's alike). Two threads of the first block that reach the same line while the
array does not exist yet both create one; the last store wins for everyone who comes later, and
the first thread keeps working on an array that no other thread reads. Its partial state is then
lost and the merge reads whatever the other array held: the statistics or sums of the block's
channels come out wrong in roughly one launch in a few hundred, more often under load or a
short ``sys.setswitchinterval``. (A real GPU allocates shared memory before a block starts,
so this is a simulator bug, not a kernel race.)

:func:`make_shared_arrays_thread_safe` replaces that method with the same allocation, keyed the
same way (file name and line of the caller), done under a lock. It changes nothing on a real
GPU and nothing when the simulator is off; dynamic shared memory (``shape == 0``) and
``alignment=`` still go to the simulator's own method.
"""

import sys
import threading

import numpy as np

_lock = threading.Lock()


def _thread_safe_array(kernelapi):
    original = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, *args, **kwargs):
        if args or kwargs or shape == 0:
            return original(self, shape, dtype, *args, **kwargs)
        if isinstance(dtype, kernelapi.types.Type):  # the dtype conversion of the original
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)  # the original's key
        with _lock:
            shared = self._allocations.get(key)
            if shared is None:
                shared = np.empty(shape, dtype)
                self._allocations[key] = shared
        return shared

    array.thread_safe = True
    return array


def make_shared_arrays_thread_safe():
    """Patch the simulator's ``FakeCUDAShared.array`` (once) if ``numba.cuda`` is the simulator.

    Call after importing ``numba.cuda``, which loads the simulator when NUMBA_ENABLE_CUDASIM=1.
    """
    kernelapi = sys.modules.get("numba.cuda.simulator.kernelapi")
    if kernelapi is None:
        return
    if not getattr(kernelapi.FakeCUDAShared.array, "thread_safe", False):
        kernelapi.FakeCUDAShared.array = _thread_safe_array(kernelapi)
