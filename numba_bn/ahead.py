"""Compile ahead: a first forward compiles its backward and eval in a worker process.

A training loop's first step compiles three drivers one after the other (forward_train, then
backward, then forward_eval at the first validation): ~10 s from an empty cache on a 2-core
machine, where Numba compiles one function at a time in a process. When the forward's driver
starts to compile, the drivers the same batch's backward and eval will run (the cost model's
choice for its canonical view: twin, partition, memory shape) compile in one worker process
at the same time, into Numba's on-disk cache; this process then waits for that worker
instead of compiling them again, and loads them (benchmarks/README.md, "Stop 42: compile
ahead"). Group and layer norm's forwards do the same for their backward (:data:`JOBS`).

A batch large enough for threads has parallel twins to compile too, ~1.6x longer than the
serial ones: its first forward_train, when the parallel twin is neither in memory nor in the
cache, starts the worker at once (:func:`start_tiers`): it compiles the serial twins of the
backward and eval first, then the parallel twins of all three, while this process compiles the
serial forward and runs the serial twins (the same bits) until the worker has ended; the calls
after it load the parallel twins (numba_bn.cpu._meanwhile). A worker outlives a process that
ends first, and fills the cache for the next one.

The worker is a copy of this process (``os.fork``: numba_bn imported and Numba started
already, so it begins compiling at once; parallel twins compile there and do not run) on Linux
when this is the process's only Python thread; else a new interpreter (``posix_spawn``), which
first imports numba_bn and starts Numba (~2 s of its ~6 on the 2-core machine).

One line on stderr says so (NUMBA_BN_QUIET=1 hides it, as the compile lines). It happens only
on a real compile of a forward driver (batch norm's plain one, or the fused BN + Add + ReLU's,
whose backward runs through the ReLU; group and layer norm's), never on a cache load, and only
where it can help and cannot harm: Numba's cache on, a POSIX ``posix_spawn``, an interpreter
that is plain Python, mpi4py's MPI not imported (a rank does not start processes behind its
launcher's back), an array of at most AHEAD_MAX_ELEMENTS values (the worker runs the steps on
one like it), and, unless ``NUMBA_BN_COMPILE_AHEAD`` is true (1, true, yes, on: always), two
CPUs or more for this process with half of one idle (the 1-minute load average at most their
count less 0.5): on a busy machine the worker's start and Numba's own start-up in it cost more
than they save. ``NUMBA_BN_COMPILE_AHEAD=0`` (false, no, off) turns it off. The worker writes
nothing; a worker that fails costs this process its wait, and the driver then compiles here as
it would have.
"""

import gc
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

#: 0 / false / no / off: never; 1 / true / yes / on: always (where it can run); unset: by load.
ENVIRONMENT = "NUMBA_BN_COMPILE_AHEAD"
#: The largest batch (values) whose backward and eval compile ahead: the worker allocates x, dy
#: and the outputs of its shape.
AHEAD_MAX_ELEMENTS = 1 << 24
#: How long a load waits for the worker at most: its estimated compile times this many times,
#: plus WAIT_SLACK_SECONDS (a loaded machine), then the driver compiles here.
WAIT_FACTOR = 4.0
WAIT_SLACK_SECONDS = 30.0
_POLL_SECONDS = 0.02

_lock = threading.Lock()
_expected = [None]  # the (forward dispatcher, request) a compile event may start a worker for
_workers = []  # the workers started: Worker
_off = []  # inside off(): warm-up runs its steps itself
_foreign = {}  # id(dispatcher): the lock of another process's worker compiling it (elsewhere)
_looked = [-math.inf]  # when compiles() last looked whether workers had ended


class Worker:
    """A worker process started here: its pid, the dispatchers it compiles, and by when."""

    def __init__(self, pid, dispatchers, deadline):
        self.pid, self.dispatchers, self.deadline = pid, dispatchers, deadline
        self.status = None  # the exit status, once reaped

    def done(self):
        """Whether it has ended (reaping it)."""
        if self.status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not our child (a fork of this process), or reaped
                pid, status = self.pid, -1
            if pid:
                self.status = status
        return self.status is not None


class off:
    """No compile ahead inside the block (``numba_bn.warmup`` runs every step itself)."""

    def __enter__(self):
        _off.append(True)

    def __exit__(self, *exc):
        _off.pop()


def enabled():
    """Whether a compile may start a worker here (the module's docstring)."""
    return _refusal() is None


def _refusal():
    """Why a compile may not start a worker here, in words; None when it may."""
    setting = os.environ.get(ENVIRONMENT, "").strip().lower()
    if _off:
        return "inside numba-bn warmup"
    if setting in ("0", "false", "no", "off"):
        return f"{ENVIRONMENT}={os.environ[ENVIRONMENT]}"
    if not hasattr(os, "posix_spawn") or getattr(sys, "frozen", False):
        return "no posix_spawn here"
    if not Path(sys.executable or "").name.lower().startswith("python"):
        return "not a Python interpreter"  # an application embedding Python
    if "mpi4py.MPI" in sys.modules:
        return "an MPI rank"
    if setting in ("1", "true", "yes", "on"):
        return None
    from .compiling import usable_cpus

    cpus, load = usable_cpus(), os.getloadavg()[0]
    if cpus < 2:
        return "one CPU"
    if load > cpus - 0.5:
        return f"the machine is busy: load {load:.2f} on {cpus} CPUs"
    return None


def status():
    """What a forward driver's first compile does here now, in words (``numba-bn info``)."""
    from . import compiling

    why = "Numba's cache is off" if compiling.cache_path() is None else _refusal()
    if why is not None:
        return f"off ({why})"
    return "in a forked worker" if _may_fork() else "in a new interpreter"


def expect(forward, view, threads, job, siblings):
    """Note that the driver ``forward`` is about to run on ``view`` (the array its kernels see)
    for the first time in this process, whose Numba threads are ``threads``, and that the steps
    after it (``job``, :data:`JOBS`) run the dispatchers ``siblings``: if ``forward`` now
    compiles (:func:`started`), a worker compiles them. Called by the CPU backend when it plans
    a forward_train whose driver has not run here, and by the norms' forwards."""
    request = (tuple(view.shape), view.dtype.name, threads, job, tuple(siblings))
    _expected[0] = (forward, request)


def started(dispatcher, dtype, describe):
    """A driver's compile for x of ``dtype`` (a name) has started (numba_bn.compiling's
    listener): the worker for what :func:`expect` noted, if it is this driver's for that dtype
    and compiling ahead is on; ``describe(d)`` names a dispatcher's compile for the line on
    stderr. Never raises."""
    try:
        _reap()
        expected = _expected[0]
        if expected is None or expected[0] is not dispatcher:
            return None
        _expected[0] = None
        if expected[1][1] != dtype or not enabled():  # (a plan is one for every dtype)
            return None
        return _start(*expected[1], describe)
    except Exception:  # compiling ahead is an optimisation: nothing may stop the compile
        return None


def start_tiers(x, threads, job, serial, twins, lock):
    """Start a worker that compiles the dispatchers ``serial`` (the serial twins this process
    runs meanwhile, first), then the parallel ``twins`` of a training step on batches like
    ``x`` (the canonical view of its forward_train), whose job (:data:`JOBS`) runs them there,
    holding the file ``lock`` (:func:`tiers_lock`) while it lives; its pid, or None when none
    started (also when another process's worker holds the lock: :func:`compiles` then answers
    for it). Called by the CPU backend when it plans a forward_train whose parallel twin is
    neither here nor in the cache, where :func:`enabled`."""
    held = _take(lock)
    if held is None:
        return None
    try:
        return _start(tuple(x.shape), x.dtype.name, threads, job, serial, _describer(x), twins,
                      held)  # fmt: skip
    except Exception:  # no worker (no process to spare, say): the twins compile here, as before
        return None
    finally:
        if held >= 0:
            os.close(held)  # the worker holds it now (or none started: released)


def start_partitions(x, threads, job, twins):
    """Start a worker that compiles the parallel ``twins`` of the partitions the rule does not
    pick for batches like ``x``, which a race in this process times once they are in the cache
    (numba_bn.cpu.race), running ``job`` (:data:`JOBS`); its pid, or None when none started.
    Called by the CPU backend where :func:`enabled`."""
    meanwhile = "runs the partition it has; then it times both and keeps the faster"
    try:
        return _start(tuple(x.shape), x.dtype.name, threads, job, twins, _describer(x),
                      meanwhile=meanwhile)  # fmt: skip
    except Exception:  # no worker: the rule's partition stays
        return None


def _describer(x):
    """How the line on stderr names a dispatcher's compile for arrays like ``x`` (what
    numba_bn.compiling.describe reads of the arguments: x's dtype)."""
    import numba

    from . import compiling

    args = (numba.typeof(x),)

    def describe(dispatcher):
        return compiling.describe(compiling.driver_name(dispatcher), args)

    return describe


def compiles(dispatcher):
    """Whether a live worker compiles ``dispatcher`` (and is within its deadline): one of this
    process's, or another process's whose lock :func:`elsewhere` noted. Whether a worker has
    ended is looked up every _POLL_SECONDS at most (a ``waitpid`` or a lock's probe: ~1.5-2.5
    us of each call's plan while the serial twins stand in)."""
    now = _look()
    if id(dispatcher) in _foreign:
        return True
    return any(id(dispatcher) in w.dispatchers and now <= w.deadline for w in _workers)


def working():
    """Whether a worker this process started is alive, within its deadline (looked up as
    :func:`compiles` does): a race waits for it (numba_bn.cpu.race), as its compile takes a
    core that the timed calls' threads would run on."""
    now = _look()
    return any(now <= worker.deadline for worker in _workers)


def _look():
    """Now (time.monotonic), having forgotten the workers that ended, if the last look was
    _POLL_SECONDS ago or more."""
    now = time.monotonic()
    if now - _looked[0] >= _POLL_SECONDS:
        _looked[0] = now
        _reap()
        free = {lock for lock in set(_foreign.values()) if not held_elsewhere(lock)}
        for key in [key for key, lock in _foreign.items() if lock in free]:
            del _foreign[key]
    return now


def tiers_lock(dispatcher, dtype):
    """The file a worker compiling the parallel twin ``dispatcher`` for ``dtype`` (a NumPy
    dtype) holds locked while it lives, beside the twin's index in Numba's cache: a process
    started meanwhile (a script run again, say) runs its serial twins until it is free instead
    of compiling them again in a worker of its own. None where the cache is off."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    index = getattr(cache_file, "_index_path", None)
    return None if index is None else f"{index}.{dtype.name}.tiers"


def held_elsewhere(lock):
    """Whether another process's worker holds the file ``lock`` (False for None, for a file not
    made yet, or where there are no file locks)."""
    fd = _take(lock, create=False)
    if fd is not None and fd >= 0:
        os.close(fd)  # (releases the lock taken to look)
    return fd is None


def elsewhere(lock, dispatchers):
    """Note that another process's worker, holding ``lock``, compiles ``dispatchers``:
    :func:`compiles` answers for them until it ends."""
    for dispatcher in dispatchers:
        _foreign[id(dispatcher)] = lock


def _take(lock, create=True):
    """A descriptor of ``lock`` locked here, for the worker to hold (made if need be, when
    ``create``); -1 where there is nothing to lock (no cache, no file locks, a directory it
    cannot write, no such file); None when another process holds it."""
    if lock is None or _flock is None:
        return -1
    try:
        fd = os.open(lock, os.O_RDONLY | (os.O_CREAT if create else 0), 0o644)
    except OSError:
        return -1
    try:
        _flock(fd, _LOCK_EX | _LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        return -1
    return fd


try:
    from fcntl import LOCK_EX as _LOCK_EX
    from fcntl import LOCK_NB as _LOCK_NB
    from fcntl import flock as _flock
except ImportError:  # not POSIX
    _flock = None


def _start(shape, dtype, threads, job, siblings, describe, twins=(), held=-1, meanwhile=None):
    """A worker of ``job`` compiling ``siblings`` (those not compiled here) then ``twins``; it
    keeps the descriptor ``held`` (a lock: -1 for none) open until it ends. Its pid, or None.
    ``meanwhile``: what this process does meanwhile, in words, for the line on stderr."""
    from . import compiling

    siblings = [d for d in siblings if not d.overloads]  # (those compiled here are loaded)
    if not (siblings or twins) or compiling.cache_path() is None:
        return None
    named, tiers = [describe(d) for d in siblings], [describe(d) for d in twins]
    pid, how = (_fork(shape, dtype, job, held) if _may_fork() else None), "forked"
    if pid is None:
        pid, how = _spawn(shape, dtype, threads, job, held), "a new interpreter"
    seconds = sum(estimate for _, estimate in named + tiers)
    deadline = time.monotonic() + WAIT_FACTOR * seconds + WAIT_SLACK_SECONDS
    with _lock:
        _workers.append(Worker(pid, frozenset(map(id, [*siblings, *twins])), deadline))
    if not compiling.quiet():
        what = ", then ".join(filter(None, [_listed(named), _listed(tiers)]))
        if meanwhile is None:
            meanwhile = (
                "runs the serial twins (the same results) until they are loaded"
                if twins else "compiles the forward"
            )  # fmt: skip
        print(
            f"numba_bn: compiling {what} ahead, in a worker process (pid {pid}, {how}) while "
            f"this one {meanwhile}; about {max(1, round(seconds))} s: cached in "
            f"{compiling.cache_location()}. {ENVIRONMENT}=0 turns this off",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    return pid


def _listed(named):
    """Names "a, b and c" of the (what, seconds) ``named``; "" for none."""
    names = [name for name, _ in named]
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]])) if names else ""


def _may_fork():
    """Whether the worker may be a copy of this process (:func:`_fork`): on Linux, where a fork
    of a process that runs NumPy's and Numba's thread pools is multiprocessing's everyday case,
    and with no other Python thread, which could hold a lock the copy would wait on for ever."""
    return sys.platform.startswith("linux") and threading.active_count() == 1


def _fork(shape, dtype, job, held=-1):
    """The worker as a copy of this process: its pid, or None when the system refuses one.

    The copy has numba_bn imported and Numba started, ~2 s of a new interpreter's ~6 on the
    2-core machine. It runs the job with every parallel twin compiled and not run
    (:func:`.cpu.compile_only`: a thread pool this process started is not in the copy), with
    every descriptor of this process's on /dev/null and the default action for every signal
    this process handles in Python (Ctrl-C ends it), and ends with os._exit, running nothing
    of this process's on the way out.
    """
    try:
        with warnings.catch_warnings():  # Python 3.12's, on any process with a second thread
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:  # no memory to copy the page tables into, too many processes
        return None
    if pid:
        return pid
    status = 1
    try:
        # This process's objects stay as they are in the copy (none collected: a file object
        # of theirs would close a descriptor number the copy may have reused), and its
        # descriptors, pipes and sockets among them, point at /dev/null from here on.
        gc.freeze()
        for signum in signal.valid_signals():  # none of its signal handlers runs here either
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd not in (null, held):  # (the lock it holds stays)
                try:
                    os.dup2(null, fd)
                except OSError:  # nothing to point at /dev/null
                    pass
        os.close(null)
        _off.append(True)  # no worker of its own
        _workers.clear()  # and no waits for its parent's
        from .cpu import compile_only

        compile_only()
        _run(shape, dtype, job)
        status = 0
    finally:
        os._exit(status)


def _spawn(shape, dtype, threads, job, held=-1):
    """The worker as a new interpreter (:func:`_serve`), inheriting the descriptor ``held``
    (-1: none): its pid."""
    from . import compiling

    env = compiling.child_environment(**{ENVIRONMENT: "0", "NUMBA_BN_QUIET": "1"})
    argv = [sys.executable, "-c", "from numba_bn.ahead import _serve; _serve()",
            "x".join(map(str, shape)), dtype, str(threads), job]  # fmt: skip
    quiet = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    if held >= 0:
        os.set_inheritable(held, True)
    return os.posix_spawn(sys.executable, argv, env, file_actions=quiet)


def _reap():
    """Forget the workers that have ended (reaping them)."""
    with _lock:
        _workers[:] = [worker for worker in _workers if not worker.done()]


def wait_for(dispatcher, load):
    """``load()``, Numba's cache lookup for ``dispatcher``: while a live worker compiles it,
    again until the worker has saved it, has ended, or is past its deadline; a worker that
    ended is forgotten."""
    found = load()
    for worker in list(_workers):
        if id(dispatcher) not in worker.dispatchers:
            continue
        while found is None and not worker.done():
            if time.monotonic() > worker.deadline:
                break
            time.sleep(_POLL_SECONDS)
            found = load()
        if worker.done():
            _reap()
        if found is None:  # it ended first: its last save came before the end
            found = load()
    return found


def settle():
    """Wait for every live worker to end (up to its deadline): before timing anything, say."""
    for worker in list(_workers):
        while not worker.done() and time.monotonic() <= worker.deadline:
            time.sleep(_POLL_SECONDS)
    _reap()


def hold_loads(dispatcher):
    """Make ``dispatcher``'s loads from Numba's cache wait for a worker compiling it first
    (:func:`wait_for`); nothing when its cache is off."""
    cache = getattr(dispatcher, "_cache", None)
    load = getattr(cache, "load_overload", None)
    if load is None or not getattr(cache, "cache_path", None):
        return

    def load_overload(sig, target_context):
        from .compiling import collector_held  # (compiling imports this module)

        with collector_held():
            if _workers:
                return wait_for(dispatcher, lambda: load(sig, target_context))
            return load(sig, target_context)

    cache.load_overload = load_overload


def _batch_norm(x, epilogue):
    """The backward (through the ReLU of ``epilogue``, a code of numba_bn.cpu.kernels) and the
    eval (with the epilogue) of a canonical view ``x`` (outer, C, inner), as CpuBackend runs
    them after its forward_train."""
    import numpy as np

    from .cpu import EPILOGUE_ADD, EPILOGUE_RELU, CpuBackend

    channels, dtype = x.shape[1], x.dtype
    activation = "relu" if int(epilogue) & EPILOGUE_RELU else None
    residual = x if int(epilogue) & EPILOGUE_ADD else None
    _backward(x, activation)
    running_mean, running_var = np.zeros(channels, dtype), np.ones(channels, dtype)
    empty = np.empty(0, dtype)
    CpuBackend().forward_eval(x, weight=empty, bias=empty, running_mean=running_mean,
                              running_var=running_var, eps=1e-5, y=np.empty_like(x),
                              residual=residual, activation=activation)  # fmt: skip


def _backward(x, activation):
    """CpuBackend's backward of a canonical view ``x`` (through ``activation``: None or
    "relu")."""
    import numpy as np

    from .cpu import CpuBackend

    channels = x.shape[1]
    CpuBackend().backward(x, x, mean=np.zeros(channels), invstd=np.ones(channels),
                          weight=np.ones(channels, x.dtype), dx=np.empty_like(x),
                          sum_dy=np.empty(channels), sum_dy_xmu=np.empty(channels),
                          activation=activation, y=x, grad=np.empty_like(x))  # fmt: skip


def _forward_train(x, epilogue, nan_check=False):
    """CpuBackend's forward_train of a canonical view ``x`` with ``epilogue``."""
    import numpy as np

    from .cpu import EPILOGUE_ADD, EPILOGUE_RELU, CpuBackend

    channels, dtype = x.shape[1], x.dtype
    CpuBackend().forward_train(
        x, weight=np.empty(0, dtype), bias=np.empty(0, dtype), eps=1e-5, y=np.empty_like(x),
        mean=np.empty(channels), invstd=np.empty(channels), m2=np.empty(channels),
        residual=x if int(epilogue) & EPILOGUE_ADD else None,
        activation="relu" if int(epilogue) & EPILOGUE_RELU else None,
        nan_check=nan_check,
    )  # fmt: skip


def _group_norm(x, groups):
    """Group norm's backward on ``x`` (N, C, S) in ``groups`` groups, as its forward saw it."""
    import numpy as np

    from .norm_ops import group_kernels_backward

    stats = np.zeros(x.shape[0] * int(groups))
    group_kernels_backward(x, x, int(groups), stats, stats + 1.0, np.empty(0, x.dtype),
                           np.empty_like(x))  # fmt: skip


def _layer_norm(x):
    """Layer norm's backward on ``x`` (1, rows, width), as its forward saw it."""
    import numpy as np

    from .norm_ops import layer_kernels_backward

    rows, width = x.shape[1:]
    dweight, dbias = np.empty(width), np.empty(width)
    layer_kernels_backward(x, x, np.zeros(rows), np.ones(rows), np.empty(0, x.dtype),
                           np.empty_like(x), dweight, dbias)  # fmt: skip


def _batch_norm_tiers(x, epilogue, may_fuse):
    """The serial twins of the backward and eval of a batch like ``x`` (``epilogue``: as in
    :func:`_batch_norm`), which its parent runs meanwhile, then the twins the cost model picks
    for its forward_train (fused planes where ``may_fuse`` is "1": no NaN check), backward and
    eval (numba_bn.cpu._meanwhile)."""
    from .cpu import serial_plans

    with serial_plans():
        _batch_norm(x, epilogue)
    _forward_train(x, epilogue, nan_check=may_fuse == "0")
    _batch_norm(x, epilogue)


def _batch_norm_partitions(x, epilogue, *steps):
    """The forward_train (with ``epilogue``) and the backward of a batch like ``x`` in the
    partitions ``steps`` names ("forward_train=1": fused, "backward=0": split), those the
    rule does not pick, which a race in the parent times (numba_bn.cpu._compile_partitions)."""
    from .cpu import partitions

    fused = {step: value == "1" for step, value in (word.split("=") for word in steps)}
    with partitions(**fused):
        if "forward_train" in fused:
            _forward_train(x, epilogue)
        if "backward" in fused:
            _backward(x, None)


#: What a worker runs after a forward, by the job's first word (its other words: arguments).
JOBS = {
    "batch_norm": _batch_norm,
    "batch_norm_tiers": _batch_norm_tiers,
    "batch_norm_partitions": _batch_norm_partitions,
    "group_norm": _group_norm,
    "layer_norm": _layer_norm,
}


def _run(shape, dtype, job):
    """A worker's work: the job's steps (:data:`JOBS`, the job's first word; its other words
    are arguments) on an array of ``shape`` and ``dtype`` (a name) like the forward's, which
    compiles (or loads) the drivers the parent will run, into the shared on-disk cache."""
    import numpy as np

    dtype, job = np.dtype(dtype), job.split()
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype) + dtype.type(1)
    JOBS[job[0]](x, *job[1:])


def _serve():
    """The spawned worker: argv gives the shape of the forward's array ("8x16x64"), the dtype,
    the threads and the job; it runs the job (:func:`_run`) on as many Numba threads."""
    import numba

    shape = tuple(int(n) for n in sys.argv[1].split("x"))
    numba.set_num_threads(min(int(sys.argv[3]), numba.config.NUMBA_NUM_THREADS))
    _run(shape, sys.argv[2], sys.argv[4])
