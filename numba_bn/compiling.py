"""What happens while Numba compiles numba_bn's drivers: one line on stderr, and a record of it.

Numba compiles a driver (:func:`numba_bn.cpu.drivers.twins`: batch norm's drivers and the
group and layer norms') on its first call with new argument types
and keeps the machine code in its on-disk cache; a later process loads it instead. Loading is
silent; a real compile takes seconds, so it says so, in one line per driver on stderr::

    numba_bn: compiling forward_train (split, rows, float32, serial twin) on its first call with
    these argument types (nothing cached yet); about 4 s, once: cached in /path/to/cache.
    NUMBA_BN_QUIET=1 hides this line

(wrapped here). A front (:mod:`numba_bn.cpu.fronts`, the checks of a plain call like one before,
~0.3 s) says so the same way, as "the front of forward_eval (float32, rank 2)". The line comes
from a listener on Numba's ``numba:compile`` event,
which fires only for a real compile (never for a cache load, never on a call that finds its
machine code), so a warm call pays nothing: there is no wrapper around the dispatchers. The
kernels a driver inlines compile inside it and say nothing. ``NUMBA_BN_QUIET=1`` (read at each
compile) silences the line; :func:`recording` collects what compiled, which is how
:func:`numba_bn.warmup` tells a compile from a cache load.
"""

import contextlib
import gc
import os
import sys
import threading
import time
from pathlib import Path

from numba.core import event

from . import ahead

#: Seconds a cold compile of each serial driver took on the 2-core machine of the README's
#: "First call" section (load 1), the kernels it inlines included, in a process that had
#: compiled nothing yet (2026-12-01; rows and planes within 20%). A parallel twin takes about
#: PARALLEL_FACTOR times as long; a driver whose kernels another one compiled already takes
#: less. The line scales these by how the previous compile of the same process compared with
#: its estimate.
ESTIMATED_SECONDS = {
    "forward_train_split": 4.0,
    "forward_train_fused": 2.3,
    "forward_eval": 1.2,
    "backward_split": 3.0,
    "backward_fused": 1.6,
    "batch_stats": 2.2,
    "normalize": 1.0,
    "backward_sums": 1.1,
    "backward_dx": 0.8,
    # the norms' drivers (benchmarks/README.md, "Warm-up of the norms"), scaled at stop 49 by
    # what their kernels' loops per group and row added (x1.1-1.35, benchmarks/README.md)
    "group_forward": 3.4,
    "group_backward": 3.1,
    "layer_forward": 1.5,
    "layer_backward": 1.9,
}
PARALLEL_FACTOR = 1.8
#: A front's compile (numba_bn/cpu/fronts.py: a plain call's checks before its driver),
#: 0.30-0.37 s on the 2-core machine (stop 63).
FRONT_SECONDS = 0.35
_DEFAULT_SECONDS = 2.0

_QUIET = "NUMBA_BN_QUIET"
_state = threading.local()  # per thread: the compiles under way (Numba's lock serialises them)
_recorders = []
_silenced = []
_speed = [1.0]  # the last driver compile's actual / estimated seconds


def quiet():
    """Whether the line is off: NUMBA_BN_QUIET set (to anything but '', '0', 'false', 'no'), or
    inside :func:`silenced`."""
    if _silenced:
        return True
    return os.environ.get(_QUIET, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def silenced():
    """No line inside the block (``numba-bn warmup`` prints its own, a line per step)."""
    _silenced.append(True)
    try:
        yield
    finally:
        _silenced.pop()


def driver_name(dispatcher):
    """``forward_train_split_serial`` for a driver's dispatcher (a copy that
    :func:`numba_bn.cpu.drivers.twins` made: batch norm's and the norms'), None for anything
    else."""
    py_func = getattr(dispatcher, "py_func", None)
    if getattr(py_func, "twin_of", None) is None:
        return None
    return py_func.__name__.lstrip("_")


def front_name(dispatcher):
    """``front forward_eval`` for the dispatcher of a front (:mod:`numba_bn.cpu.fronts`), None
    for anything else."""
    step = getattr(getattr(dispatcher, "py_func", None), "front_of", None)
    return None if step is None else "front " + step


_MEMORY = {"rows": "rows", "planes": "planes", "short": "short planes"}
_PARTITIONS = {"split": "split", "fused": "fused planes"}
_EPILOGUES = {"1": "+ residual", "2": "+ ReLU", "3": "+ residual + ReLU"}  # cpu.kernels' codes


def describe(name, args):
    """(what, estimated seconds) of driver ``name`` compiled for ``args`` (Numba types):
    ``forward_train (split, rows, float32, serial twin)`` for forward_train_split_rows_serial;
    ``the front of backward (float32, rank 2)`` for "front backward" (:func:`front_name`)."""
    if name.startswith("front "):  # (address, x or dy, ...)
        array = args[1] if len(args) > 1 else None
        kind = f"{getattr(array, 'dtype', '?')}, rank {getattr(array, 'ndim', '?')}"
        return f"the front of {name.removeprefix('front ')} ({kind})", FRONT_SECONDS
    serial = name.endswith("_serial")
    step, details = name.removesuffix("_serial"), []
    step, _, epilogue = step.partition("_epilogue")  # drivers.twins names its copies
    found = {}  # "memory" and "partition" suffixes, read from the end of the name
    for kind, labels in (("memory", _MEMORY), ("partition", _PARTITIONS)):
        for suffix, label in labels.items():
            if step.endswith("_" + suffix):
                step = step.removesuffix("_" + suffix)
                details.insert(0, label)
                found[kind] = suffix
    partition = found.get("partition")
    estimate = ESTIMATED_SECONDS.get(f"{step}_{partition}" if partition else step)
    dtype = getattr(args[0], "dtype", None) if args else None
    if dtype is not None:
        details.append(str(dtype))
    details.append("serial twin" if serial else "parallel twin")
    if epilogue:
        details.append(_EPILOGUES.get(epilogue, "epilogue " + epilogue))
    seconds = (estimate or _DEFAULT_SECONDS) * (1.0 if serial else PARALLEL_FACTOR)
    return f"{step} ({', '.join(details)})", seconds


def cache_state(dispatcher):
    """(why it compiles, where its machine code goes) from the dispatcher's Numba cache."""
    cache = getattr(dispatcher, "_cache", None)
    path = getattr(cache, "cache_path", None)
    if not path:
        return "Numba's cache is off for it", "not cached"
    try:
        index = cache._cache_file._index_path
        cached_before = os.path.exists(index)
    except AttributeError:  # another Numba's cache layout: say less
        cached_before = None
    if cached_before is False:
        why = "nothing cached yet"
    elif cached_before:
        why = "the cache holds other argument types, or code of an older source"
    else:
        why = "not in Numba's cache"
    return why, f"cached in {path}"


def cache_path():
    """The directory of the drivers' machine code in Numba's cache (NUMBA_CACHE_DIR, or next to
    the sources), None when the cache is off."""
    from .cpu import drivers

    dispatcher = drivers.driver("forward_eval")[0]  # the drivers share one cache directory
    return getattr(getattr(dispatcher, "_cache", None), "cache_path", None)


def child_environment(**settings):
    """The environment of a child Python process that imports (and compiles) this numba_bn:
    this one's, ``settings`` over it, and the directory holding this package first on
    PYTHONPATH, whatever the child's working directory (warm-up and compile-ahead workers, the
    C library's object builds, the benchmark's first call)."""
    env = dict(os.environ, **settings)
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    return env


def usable_cpus():
    """The CPUs this process may run on (its affinity; the machine's where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cache_location():
    """Where Numba keeps the drivers' machine code, in words."""
    return cache_path() or "nowhere (Numba's cache is off)"


def _line(name, args, dispatcher):
    what, estimate = describe(name, args)
    why, where = cache_state(dispatcher)
    seconds = max(1, round(estimate * _speed[0]))
    return (
        f"numba_bn: compiling {what} on its first call with these argument types ({why}); "
        f"about {seconds} s, once: {where}. {_QUIET}=1 hides this line"
    )


class _Listener(event.Listener):
    """Announces and records the compiles of drivers started from outside any other compile,
    and holds Python's cyclic garbage collector off while one compiles (:func:`_hold`)."""

    # Numba sends every compile of the process here, the user's own functions too; nothing here
    # may raise into a compile.
    def on_start(self, ev):
        stack = _state.__dict__.setdefault("stack", [])
        dispatcher = ev.data["dispatcher"]
        name = (driver_name(dispatcher) or front_name(dispatcher)) if not stack else None
        stack.append((name, time.perf_counter(), name is not None and _hold(compile=True)))
        if name is None:
            return
        args = ev.data["args"]
        if not quiet():
            try:
                print(_line(name, args, dispatcher), file=sys.stderr, flush=True)
            except Exception:  # a missing line must not stop the compile
                pass
        if name.startswith("front "):
            return  # no siblings to compile ahead, and the drivers' speed is not its
        dtype = str(getattr(args[0], "dtype", "")) if args else ""
        ahead.started(dispatcher, dtype, lambda sibling: describe(driver_name(sibling), args))

    def on_end(self, ev):
        stack = getattr(_state, "stack", None)
        if not stack:
            return
        name, start, held = stack.pop()
        _release(held, compile=True)
        if name is None:
            return
        seconds = time.perf_counter() - start
        if not name.startswith("front "):
            _, estimate = describe(name, ev.data["args"])
            _speed[0] = min(4.0, max(0.25, seconds / estimate))
        for record in list(_recorders):
            record.append((name, seconds))


# ------------------------------------------------------------ the collector while Numba works
# Numba's compile makes objects by the million, and the collections they set off took 0.84-0.93 s
# (1264 of them) of a cold (64, 32) training step, 0.43 s (259) with the collector off (the step
# 8.6-8.9 -> 8.2 s, 231 -> 263 MB at the peak; stop 43, benchmarks/README.md). So the collector
# is off while a driver compiles, and while a driver's machine code is looked up in the cache
# (ahead.hold_loads: the process's first lookup starts Numba's target, ~130 collections).
#
# When the collector comes back on, the compile's ~300K objects (~295K of them garbage in
# cycles) are all in the youngest generation, and the next allocation's collection scanned and
# freed them: 0.16-0.2 s after each compile, on the first call's path. _release moves the young
# objects (the program's few too) to the oldest generation instead (gc.freeze then gc.unfreeze:
# two list splices), where Python's next full collection frees them; if none has run by the next
# compile, that compile runs one first, so that one compile's garbage (~40 MB) waits at most.
# Not when objects are frozen already (a forked server's gc.freeze, or the compile-ahead worker's,
# :func:`.ahead._fork`): unfreezing would hand those to the collector, so the young collection
# takes the compile's objects as before.
_waiting = []  # [full collections so far] while a compile's garbage waits for the next one


def _full_collections():
    return gc.get_stats()[-1]["collections"]


def _hold(compile):
    """Turn Python's collector off if it is on; returns whether this call did. Before a
    ``compile``, the previous compile's garbage is collected if it still waits."""
    if not gc.isenabled():
        return False
    if compile and _waiting:
        if _waiting.pop() == _full_collections():
            gc.collect()
    gc.disable()
    return True


def _release(held, compile):
    """Turn the collector back on after :func:`_hold` turned it off (``held``), the objects of
    the block moved to the oldest generation (above)."""
    if not held:
        return
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()
        if compile:
            _waiting[:] = [_full_collections()]
    gc.enable()


@contextlib.contextmanager
def collector_held():
    """The collector off in the block (a cache lookup), as around a compile."""
    held = _hold(compile=False)
    try:
        yield
    finally:
        _release(held, compile=False)


_LISTENER = _Listener()
_installed = []


def install():
    """Register the listener with Numba's event system (once per process)."""
    if not _installed:
        event.register("numba:compile", _LISTENER)
        _installed.append(True)


@contextlib.contextmanager
def recording():
    """Collect ``(driver name, seconds)`` of each driver compiled inside the block."""
    record = []
    _recorders.append(record)
    try:
        yield record
    finally:
        _recorders.remove(record)
