"""Numba's on-disk cache as numba_bn keeps it: entries keyed on the kernels' sources, saves
under a lock.

Every function numba_bn caches on disk goes through :func:`lock_cache_saves`: the drivers
(numba_bn.cpu.drivers.twins), the callees (numba_bn.stats.callee), the two cached functions of
stats.py, those of cpu/threads.py, distributed.py and bench/peers.py. The drivers and the
callees, whose code holds kernels of other files, are keyed on those files too
(:func:`key_on_sources`).

A leaf of the package: it imports nothing of numba_bn (stats.py imports it).
"""

import contextlib
import functools
import hashlib
from pathlib import Path


@functools.cache
def sources_digest():
    """SHA-256 of the sources the drivers and callees are compiled from: numba_bn/stats.py and
    every module of numba_bn/cpu/."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in [package / "stats.py", *sorted((package / "cpu").glob("*.py"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key_on_sources(dispatcher):
    """Key ``dispatcher``'s entries in Numba's cache on :func:`sources_digest` too.

    Numba keys a cached function on its own file and bytecode; a driver's machine code also
    holds its kernels (inlined, or linked as copies) from the other files, so after an edit of
    stats.py or kernels.py (a `git pull` in an editable install) a cache next to the sources
    served the old kernels: at stop 27 the suite failed 42 float64 bitwise tests on a tree whose
    cache held drivers compiled before the strict kernel copies. An entry of other sources is
    now a miss, and the driver compiles (with its one line on stderr). A callee's IR holds the
    kernels it inlines, from stats.py and the other files of cpu/, in the same way."""
    cache = getattr(dispatcher, "_cache", None)
    index_key = getattr(cache, "_index_key", None)
    if index_key is None:  # caching off
        return
    cache._index_key = lambda sig, codegen: (*index_key(sig, codegen), sources_digest())


def lock_cache_saves(dispatcher):
    """Save ``dispatcher``'s entries in Numba's cache under an exclusive lock on its index.

    Numba saves an entry by reading the function's index, adding the entry under the first free
    data file name, and writing both back, unlocked: two processes that compile other argument
    types of one driver at once (`numba-bn warmup --jobs`, ranks or jobs of two dtypes on one
    NUMBA_CACHE_DIR) can both pick the same name, and one signature's entry then points at the
    other's machine code, which a later process loads and runs on the wrong types (numba's
    issue 4807). The lock, ``flock`` on a ``.lock`` file beside the index, makes each save one
    step; loads need none (files are replaced whole, and a name once given keeps its entry).
    Without ``fcntl`` (Windows) or a lock file to open, saves are as Numba makes them."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    index_path = getattr(cache_file, "_index_path", None)
    if index_path is None or _flock is None:  # caching off, or no locks here
        return
    save = cache_file.save

    def locked_save(key, data):
        with _locked(index_path + ".lock"):
            save(key, data)

    cache_file.save = locked_save


try:
    from fcntl import LOCK_EX as _LOCK_EX
    from fcntl import flock as _flock
except ImportError:  # not POSIX
    _flock = None


@contextlib.contextmanager
def _locked(path):
    """Hold an exclusive ``flock`` on ``path`` (made if need be); nothing if it cannot be
    opened (Numba's own save then reports a cache directory it cannot write)."""
    try:
        file = open(path, "a")  # noqa: SIM115 (closed below: closing releases the lock)
    except OSError:
        yield
        return
    with file:
        _flock(file.fileno(), _LOCK_EX)
        yield
