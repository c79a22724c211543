"""CPU backend: Numba drivers over serial range kernels, parallel or serial by a cost model."""

import contextlib
import functools
import math
import os
import threading
import weakref

import numba
import numpy as np

from .. import ahead
from ..stats import no_running_update
from . import drivers, fronts
from .drivers import loaded_for, machine_code
from .items import both_partitions, is_fused, memory_of
from .kernels import EPILOGUE_ADD, EPILOGUE_NONE, EPILOGUE_RELU
from .race import NOT_YET, RACE_MIN_ELEMENTS, RACE_REMATCH_SECONDS, THREADS_RACE_BOUNDS, Race
from .threads import compile_only as _twins_compile_only
from .threads import expected_layer, launcher, layer_known, layer_safe, num_threads

# Serial or parallel, by a measured cost model (benchmarks/serial_parallel.py measures it and
# prints these numbers; benchmarks/README.md records them). A parallel launch costs a wake-up
# more than a serial call (waking the pool, writing and merging the partials of every thread),
# then divides the serial time, NS_PER_ELEMENT[step] per element, among the threads. It runs when
#     NS_PER_ELEMENT[step] * size * (1 - 1 / threads) > wake_ns(layer)
# (an idle machine; on an oversubscribed one a wake-up takes milliseconds, and only large inputs
# repay it anyway).
# Measured 2026-12-01 (serial_parallel.py, float32, means of rows and planes): per element
# forward_train 0.46 ns, eval 0.13, backward 0.49, batch_stats 0.26, normalize 0.12,
# backward_sums 0.25, backward_dx 0.16; a wake-up 2-7 us when the other core was idle, so
# WAKE_NS takes 8 us (a wake-up that finds the other core busy costs milliseconds instead).
WAKE_NS = 8000.0
# The wake-up is that of Numba's OpenMP pool, whose threads spin a while after a launch. The
# other pools cost more (serial_parallel.py's median wake-up, 2026-12-05, this 2-core machine):
# TBB 12.2 us; the workqueue's threads sleep, 90 us, and OpenMP's do with OMP_WAIT_POLICY=passive
# (45 us) or GOMP_SPINCOUNT=0 (56 us): priced as WAKE_NS was, a little above the median.
WAKE_NS_BY_LAYER = {"omp": WAKE_NS, "tbb": 15000.0, "workqueue": 100000.0}
WAKE_NS_OMP_SLEEPING = 60000.0


def omp_threads_sleep(environ):
    """Whether GNU OpenMP's threads sleep as soon as a launch ends, by the variables of
    ``environ`` it reads when its pool starts."""
    return (environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
            or environ.get("GOMP_SPINCOUNT", "").strip() == "0")  # fmt: skip


@functools.cache
def _omp_threads_sleep_here():
    """omp_threads_sleep of this process's environment, read once as OpenMP reads it (a missing
    variable costs ``os.environ.get`` an exception: ~3 us, and the norms price every call)."""
    return omp_threads_sleep(os.environ)


def wake_ns(layer, environ=None):
    """The cost model's price of a parallel launch on Numba's threading ``layer`` ("omp", "tbb"
    or "workqueue"; None, not known yet: WAKE_NS, the least), OpenMP's variables read from
    ``environ`` (this process's, once, when None)."""
    if layer == "omp":
        sleeps = _omp_threads_sleep_here() if environ is None else omp_threads_sleep(environ)
        if sleeps:
            return WAKE_NS_OMP_SLEEPING
    return WAKE_NS_BY_LAYER.get(layer, WAKE_NS)


NS_PER_ELEMENT = {
    "forward_train": 0.46,
    "forward_eval": 0.13,
    "backward": 0.49,
    "batch_stats": 0.26,
    "normalize": 0.12,
    "backward_sums": 0.25,
    "backward_dx": 0.16,
    # warm buffers: 0.097 (serial_parallel.py, stop 45). In a step it reads the forward's y and
    # dy from L3 or memory: a fused layer's step of 98K-131K elements ran 10-12% faster with
    # it parallel, 65K 3% slower, so it takes the in-step cost (parallel from 80K elements)
    "relu_grad": 0.2,
    "backward_fused_relu": 0.49,  # not measured: the backward's
}
#: Below these sizes every thread count and layer runs serial: numba.set_num_threads cannot
#: exceed NUMBA_NUM_THREADS, the model's saving grows with the threads (with 2 at most, below
#: twice WAKE_NS / ns), and no layer's wake-up costs less than WAKE_NS. A size this small skips
#: asking the thread count (:func:`.threads.num_threads`) and the layer.
_MOST_THREADS = numba.config.NUMBA_NUM_THREADS


def serial_below(step, threads=_MOST_THREADS, wake=WAKE_NS):
    """The size (elements) below which the cost model runs ``step`` serially on up to
    ``threads`` threads (inf for one), a launch costing ``wake`` ns."""
    if threads == 1:
        return math.inf
    return wake / (NS_PER_ELEMENT[step] * (1.0 - 1.0 / threads))


_SERIAL_BELOW = {step: serial_below(step) for step in NS_PER_ELEMENT}


def parallel_min_elements():
    """The size from which every step runs in parallel when there are 2 threads or more, on the
    layer launches run on (warmup's and info's parallel inputs)."""
    return int(2 * wake_ns(expected_layer()) / min(NS_PER_ELEMENT.values())) + 1


def threads_for(step, size, threads=None):
    """How many threads the cost model gives ``step`` on ``size`` elements (1: serial), of
    ``threads`` (the calling thread's count when None), on the layer launches run on."""
    if size < _SERIAL_BELOW[step]:
        return 1
    if threads is None:
        threads = num_threads()
    saved = NS_PER_ELEMENT[step] * size * (1.0 - 1.0 / threads)
    if threads == 1 or saved <= wake_ns(expected_layer()):
        return 1
    return threads


def epilogue_code(residual, activation):
    """The kernels' epilogue code (:mod:`.kernels`) of a residual (an array or None) and a
    validated activation (None or "relu")."""
    code = EPILOGUE_NONE if residual is None else EPILOGUE_ADD
    return code | EPILOGUE_RELU if activation == "relu" else code


#: What the drivers take for an argument the caller does not give, by x's dtype (the kernels'
#: float32 and float64; zero-length: nothing to share between calls): no running update, and
#: backward's ``grads`` and forward_train's ``saved`` without a column (nothing written). A dict
#: lookup costs ~40 ns of a small call, a functools.cache ~110.
_NO_RUNNING = {np.dtype(t): no_running_update(t) for t in (np.float32, np.float64)}
_NO_ROWS = {np.dtype(t): np.empty((2, 0), t) for t in (np.float32, np.float64)}
#: The float64 vectors of the statistics or sums a caller does not want (None), by channel
#: count: the drivers write them and nothing reads them after the call. One set per Python
#: thread, whose calls run one after another: a parallel twin releases the GIL while its threads
#: run (Numba's launch), so another thread's call could write a set shared between threads
#: under it (tests/thread_worker.py caught it). A lookup costs ~0.1 us, three np.empty ~0.5
#: (allocated in the drivers they cost 0.15 s of a cold forward).
_local = threading.local()
_SCRATCH_MAX = 64


def _scratch(channels):
    """Three float64 vectors of ``channels`` values, this thread's (see _local)."""
    try:
        kept = _local.scratch
    except AttributeError:
        kept = _local.scratch = {}
    vectors = kept.get(channels)
    if vectors is None:
        vectors = (np.empty(channels), np.empty(channels), np.empty(channels))
        if len(kept) < _SCRATCH_MAX:
            kept[channels] = vectors
    return vectors


#: _plan's answers: a small batch's plan costs a dict lookup (~0.2 us) instead of ~1 us. A size
#: below the serial bound keeps its plan under (step, shape, dtype, may_fuse, epilogue): no
#: thread count changes it, and none is asked for. A larger one keeps a dict there, its plans
#: by the calling thread's count (:func:`.threads.num_threads`, asked at each call so that
#: numba.set_num_threads takes effect): ~0.4 us a call instead of ~0.8 for the cost model's sums
#: and a second key.
_PLANS = {}
_PLANS_MAX = 4096


def _plan(step, x, may_fuse=False, epilogue=EPILOGUE_NONE):
    """(run, fused) of ``step`` on ``x``: the twin the cost model picks for x's memory shape and
    ``epilogue`` (:func:`_driver`), the parallel one as :func:`.threads.launcher` calls it, and
    for a step with two partitions whether it takes fused planes."""
    key = (step, x.shape, x.dtype, may_fuse, epilogue)
    plan = _PLANS.get(key)
    if type(plan) is tuple:  # below the serial bound
        return plan
    threads = None
    if plan is not None:  # a size that may run in parallel: its plans by thread count
        threads = num_threads()
        plan = plan.get(threads)
        if plan is not None:
            return plan
    elif x.size >= _SERIAL_BELOW[step]:
        threads = num_threads()
    return _new_plan(key, step, x, may_fuse, epilogue, threads)


def _forget_plans():
    """Drop the plans, and the fronts' addresses of their drivers (:mod:`.fronts`)."""
    _PLANS.clear()
    fronts.forget()


def front_address(step, x, may_fuse=False):
    """(address, threads) of the twin that the kept plan of ``step`` on the canonical view
    ``x`` (without an epilogue) runs, for a front (:mod:`.fronts`): below the serial bound the
    serial twin's, for any thread count (0); above it the plan of the calling thread's count
    (``threads``), settled (no race under way) on a layer that is safe from several threads
    (the parallel twin is called as it is: :func:`.threads.launcher`). None for a plan not
    kept."""
    if _serial_only:
        return None
    plan = _PLANS.get((step, x.shape, x.dtype, may_fuse, EPILOGUE_NONE))
    if type(plan) is tuple:
        serial = _driver(step, x, 1, may_fuse)[0]
        return _address(serial, x.dtype, 0)
    if type(plan) is not dict or not layer_safe():
        return None
    threads = num_threads()
    run = plan.get(threads, (None,))[0]
    if isinstance(run, numba.core.dispatcher.Dispatcher):  # a twin as launcher hands it out
        return _address(run, x.dtype, threads)
    # a serial twin's machine code (the cost model's twin for one thread, or a race's winner);
    # its dispatcher under drivers.CHECK_CALLS
    serial = _driver(step, x, 1, may_fuse)[0]
    if run is not None and getattr(run, "__wrapped__", run) in (
        serial,
        machine_code(serial, x.dtype),
    ):
        return _address(serial, x.dtype, threads)
    return None


def _address(dispatcher, dtype, threads):
    """(native address of ``dispatcher``'s machine code for ``dtype``, ``threads``), or None."""
    address = drivers.native_address(dispatcher, dtype)
    return None if address is None else (address, threads)


def _new_plan(key, step, x, may_fuse, epilogue, threads):
    """_plan's answer made and kept: ``threads`` is the calling thread's count for a size that
    may run in parallel, None below the serial bound. A parallel twin a worker compiles gives
    way to the serial one (:func:`_meanwhile`), in a plan not kept. A serial twin is called
    through its machine code's entry point (:func:`.drivers.machine_code`), once it has one for
    x's dtype: until then its plans are not kept."""
    if _serial_only:
        threads = None
    parallel = 1 if threads is None else threads_for(step, x.size, threads)
    dispatcher, fused = _driver(step, x, parallel, may_fuse, epilogue)
    if parallel > 1 and not loaded_for(dispatcher, x.dtype):
        if _meanwhile(step, x, dispatcher, may_fuse, epilogue):
            return _driver(step, x, 1, may_fuse, epilogue)
    if step == "forward_train" and not dispatcher.overloads:
        _expect_siblings(dispatcher, x, epilogue)
    run = launcher(dispatcher) if parallel > 1 else machine_code(dispatcher, x.dtype)
    if run is None:  # its first call compiles (or loads) it, in a plan not kept
        return dispatcher, fused
    plan = run, fused
    if _serial_only:  # not kept
        return plan
    # a parallel plan made before numba chose its threading layer is guarded: not kept
    if len(_PLANS) < _PLANS_MAX and (parallel == 1 or layer_known()):
        if threads is None:
            _PLANS[key] = plan
        else:
            if parallel > 1:
                plan = _raced(key, threads, x, plan)
                if not isinstance(plan[0], Race):
                    plan = _threads_raced(key, threads, x, plan)
            _PLANS.setdefault(key, {})[threads] = plan
    return plan


#: What races chose in this process (:mod:`.race`): {(step, canonical shape, dtype name,
#: epilogue, threads): {"fused": us, "split": us (each one's fastest call), "rule": the
#: partition the rule picked, "kept": the faster}}; a race of the twins has "parallel" (the
#: cost model's, its "rule") and "serial" where a partitions race has "fused" and "split".
RACES = {}
#: The races of this process's plans that have not settled (weakly: a plan dropped before its
#: race settled takes the race with it)
_RACING = weakref.WeakSet()
_PARTITIONED = ("forward_train", "backward")
_forced = {}  # inside partitions(): {step: fused}
_no_races = []  # after compile_only()


def _raced(key, threads, x, plan):
    """The parallel ``plan`` (run, fused) kept for ``key`` on ``threads`` threads: where both
    partitions can run ``x`` (:mod:`.race`), one whose run is a :class:`.race.Race` of the
    rule's run and the other partition's, which puts the faster one's plan in its place. The
    plan's ``fused`` stays the rule's: the backward through a ReLU reads it, and takes the
    fused ReLU driver only where the rule compiled it."""
    step, _, _, may_fuse, epilogue = key
    if not may_fuse or step not in _PARTITIONED or x.size < RACE_MIN_ELEMENTS:
        return plan
    if _forced or _no_races or not both_partitions(*x.shape, threads):
        return plan
    rule, fused = plan
    batch = np.broadcast_to(x.dtype.type(0), x.shape)  # x's shape and dtype, not its memory
    ready = _other_partition(step, batch, threads, epilogue, not fused)
    names = ("fused", "split") if fused else ("split", "fused")
    return _race_plan(key, threads, rule, ready, names, fused)


def _threads_raced(key, threads, x, plan):
    """The parallel plan (run, fused) kept for ``key`` on ``threads`` threads: for a size up to
    :data:`.race.THREADS_RACE_BOUNDS` times the cost model's bound (that of ``threads`` threads
    on the layer launches run on), where it guesses, one whose run is a race (:mod:`.race`) of
    the parallel twin and the serial one, once that one is loaded or in Numba's cache (no worker
    compiles it)."""
    step, _, dtype, may_fuse, epilogue = key
    if _forced or _no_races:
        return plan
    if x.size >= THREADS_RACE_BOUNDS * serial_below(step, threads, wake_ns(expected_layer())):
        return plan
    rule, fused = plan
    serial, serial_fused = _driver(step, x, 1, may_fuse, epilogue)
    if serial_fused != fused:  # (the ReLU backward reads the plan's fused)
        return plan

    def ready():
        if ahead.working() or ahead.compiles(serial):
            return NOT_YET
        if not _can_load(serial, dtype):
            return None
        return machine_code(serial, dtype) or serial  # the dispatcher loads it on its first call

    def kept(run):  # loaded during the race, the serial twin's plan calls its machine code
        return (machine_code(serial, dtype) or run) if run is serial else run

    return _race_plan(key, threads, rule, ready, ("parallel", "serial"), fused, kept)


def _race_plan(key, threads, rule, ready, names, fused, resolve=None):
    """The plan (:class:`.race.Race`, ``fused``) of a race between the run ``rule`` and the one
    ``ready`` gives, named ``names`` (the rule's, the other's) in :data:`RACES`: settled, it puts
    the plan of the faster one (``resolve``: the run kept for it) in its place in _PLANS."""
    step, shape, dtype, _, epilogue = key
    name = (step, shape, dtype.name, epilogue, threads)

    def settle(winner, other_won, seconds):
        _RACING.discard(race)
        if resolve is not None:
            winner = resolve(winner)
        kept = _PLANS.get(key)
        if isinstance(kept, dict) and kept.get(threads) is raced:
            kept[threads] = (winner, fused)
        if seconds is not None:
            times = {names[0]: seconds[0] * 1e6, names[1]: seconds[1] * 1e6}
            RACES[name] = {**times, "rule": names[0], "kept": names[other_won]}

    race = Race(rule, ready, settle, rematch=RACE_REMATCH_SECONDS)  # (a test may shorten it)
    _RACING.add(race)
    raced = race, fused
    return raced


def races_running():
    """How many races of this process's plans (:mod:`.race`) have not settled: their plans
    still run the rule's partition or twin, and now and then the other one, timed. A benchmark
    calls its plans until none is left before it times them (numba_bn.bench)."""
    return len(_RACING)


def _other_partition(step, batch, threads, epilogue, fused):
    """The ``ready`` of a race (:class:`.race.Race`) for the parallel twin of ``step``'s
    ``fused`` partition on batches like ``batch``. It answers NOT_YET while any worker of this
    process lives (a compile takes a core the timed calls would run on); then the twin's run
    once it is loaded or in Numba's cache. The first time it finds the twin in neither, it
    starts a worker that compiles it (:func:`_compile_partitions`) and answers NOT_YET; when
    none can start, or the worker saved nothing, None."""
    twin, dtype = _driver(step, batch, threads, True, epilogue, fused=fused)[0], batch.dtype
    asked = []

    def ready():
        if ahead.working() or ahead.compiles(twin):
            return NOT_YET
        if _can_load(twin, dtype):
            return launcher(twin)
        if not asked:
            asked.append(True)
            if _compile_partitions(batch, threads, epilogue) is not None:
                return NOT_YET
        return None

    return ready


def _can_load(dispatcher, dtype):
    """Whether ``dispatcher`` has machine code for x's ``dtype`` here or in Numba's cache."""
    return loaded_for(dispatcher, dtype) or drivers.cached_for(dispatcher, dtype)


def _compile_partitions(x, threads, epilogue):
    """Start a worker compiling the parallel twins of the partitions the rule does not pick for
    a forward_train (with ``epilogue``) and a backward of batches like x, those neither here
    nor in the cache (:func:`.ahead.start_partitions`); its pid, or None when none started."""
    if x.size > ahead.AHEAD_MAX_ELEMENTS or not ahead.enabled():
        return None
    forced, twins = {}, []
    for step, code in (("forward_train", epilogue), ("backward", EPILOGUE_NONE)):
        fused = not _driver(step, x, threads, True, code)[1]  # the rule's, the other way
        twin = _driver(step, x, threads, True, code, fused=fused)[0]
        if not _can_load(twin, x.dtype) and not ahead.compiles(twin):
            forced[step] = fused
            twins.append(twin)
    if not twins:
        return None
    steps = " ".join(f"{step}={int(fused)}" for step, fused in forced.items())
    return ahead.start_partitions(x, threads, f"batch_norm_partitions {epilogue} {steps}", twins)


@contextlib.contextmanager
def partitions(**fused):
    """Inside the block, forward_train and backward (the keywords: whether fused) take the
    partition given where they may fuse, on batches both partitions can run
    (:func:`.items.both_partitions`), and no race starts (:mod:`.race`): the worker that
    compiles the partitions the rule does not pick (:func:`_compile_partitions`)."""
    _forget_plans()
    _forced.update(fused)
    try:
        yield
    finally:
        _forced.clear()
        _forget_plans()


def compile_only():
    """From now on in this process, parallel twins compile and do not run
    (:func:`.threads.compile_only`), those of the plans made before too (forgotten): a
    compile-ahead worker forked from a process (:mod:`numba_bn.ahead`)."""
    _twins_compile_only()
    _no_races.append(True)
    _forget_plans()


def _driver(step, x, threads, may_fuse=False, epilogue=EPILOGUE_NONE, fused=None):
    """(dispatcher, fused): the twin of ``step`` for ``threads`` threads (1: serial) on x's
    memory shape and ``epilogue`` (:func:`.drivers.driver`), and for a step with two
    partitions whether it takes fused planes: ``fused`` where given (for a batch both can
    run), else :func:`partitions`' inside it, else :func:`.items.is_fused`, the rule the C
    plugin's shim follows too."""
    if step in _PARTITIONED:
        if not may_fuse:
            fused = False
        elif fused is None:
            fused = _forced.get(step)
            if fused is None or not both_partitions(*x.shape, threads):
                forward = step == "forward_train"
                fused = is_fused(x.shape[1], x.shape[2], threads, x.size, forward)
        step += "_fused" if fused else "_split"
    else:
        fused = False
    # x.shape[0], x.shape[-1]: the canonical view's outer and inner (relu_grad takes any rank;
    # driver() gives the steps without a copy per memory shape their one copy whatever memory
    # says)
    parallel, serial = drivers.driver(step, memory_of(x.shape[0], x.shape[-1]), epilogue)
    return (parallel if threads > 1 else serial), fused


def _siblings(x, epilogue, serial=False):
    """The drivers the backward and the eval of a forward_train's batch ``x`` (and
    ``epilogue``) run: those :meth:`CpuBackend.backward` picks, through a ReLU too, then the
    eval's; the cost model's twins, or every ``serial`` one."""

    def threads(step):
        return 1 if serial else threads_for(step, x.size)

    backward, fused = _driver("backward", x, threads("backward"), may_fuse=True)
    siblings = [backward]
    if epilogue & EPILOGUE_RELU:  # backward_fused_relu instead, or relu_grad's pass first
        if fused:
            siblings = [_driver("backward_fused_relu", x, threads("backward"))[0]]
        else:
            siblings.append(_driver("relu_grad", x, threads("relu_grad"))[0])
    siblings.append(_driver("forward_eval", x, threads("forward_eval"), epilogue=epilogue)[0])
    return siblings


def _expect_siblings(forward, x, epilogue):
    """A forward_train driver not run yet in this process: if it compiles, the drivers the
    backward and the eval of the same batch (and ``epilogue``) run compile ahead in a worker
    (:mod:`numba_bn.ahead`)."""
    if x.size <= ahead.AHEAD_MAX_ELEMENTS:
        ahead.expect(forward, x, num_threads(), f"batch_norm {epilogue}", _siblings(x, epilogue))


#: The parallel forward_train twins a worker was started for (once each in a process: one that
#: ended without saving its machine code compiles here after it).
_TIERED = set()
_serial_only = []  # inside serial_plans()


def _meanwhile(step, x, parallel, may_fuse, epilogue):
    """Whether ``step`` runs its serial twin on ``x`` instead of the parallel twin ``parallel``,
    which has no machine code here for x's dtype: while a worker compiles it
    (:func:`.ahead.compiles`; another process's too, found by its lock), and, for a
    forward_train whose twin is not in Numba's cache either, after starting one that compiles
    the serial twins of its backward and eval, then the parallel twins of all three
    (:func:`.ahead.start_tiers`), where compiling ahead is on.
    The first training step of a batch large enough for threads then compiles as a small one
    does, and runs as one; the steps after the worker has ended load the parallel twins
    (README, "First call")."""
    if ahead.compiles(parallel):
        return True
    if step != "forward_train" or parallel in _TIERED or x.size > ahead.AHEAD_MAX_ELEMENTS:
        return False
    if not ahead.enabled():
        return False
    lock = ahead.tiers_lock(parallel, x.dtype)
    elsewhere = ahead.held_elsewhere(lock)  # another process's worker compiles them
    if not elsewhere and drivers.cached_for(parallel, x.dtype):
        return False
    serial = _siblings(x, epilogue, serial=True)
    twins = [parallel, *_siblings(x, epilogue)]
    if epilogue & EPILOGUE_RELU:  # the serial backward takes relu_grad's pass meanwhile
        twins.append(_driver("relu_grad", x, 2)[0])
    serial = [d for d in serial if not loaded_for(d, x.dtype)]
    twins = [d for d in dict.fromkeys(twins) if d not in serial and not loaded_for(d, x.dtype)]
    if elsewhere:  # the serial twins until it ends
        ahead.elsewhere(lock, twins)
        return True
    _TIERED.add(parallel)
    job = f"batch_norm_tiers {epilogue} {int(may_fuse)}"  # (a NaN check takes the split one)
    return ahead.start_tiers(x, num_threads(), job, serial, twins, lock) is not None


@contextlib.contextmanager
def serial_plans():
    """Inside the block, the plans made run the serial twins and are not kept (a tiered
    worker compiles the serial twins its parent runs meanwhile: :func:`_meanwhile`)."""
    _forget_plans()
    _serial_only.append(True)
    try:
        yield
    finally:
        _serial_only.pop()


class CpuBackend:
    """The backend interface (numba_bn.dispatch) on validated, C-contiguous canonical views.

    Per-channel vectors are float64 (mean, invstd, m2, the sums) or in x's dtype (weight, bias,
    running buffers: zero-length when absent). Outputs are overwritten. The forward steps take
    a ``residual`` (a view like x) and an ``activation`` (None or "relu"): y = activation(BN(x)
    + residual) in the same pass.
    """

    name = "cpu"

    # ----------------------------------------------------------- whole operations, fused
    def forward_train(self, x, *, weight, bias, eps, y, mean, invstd, m2, running=None,
                      nan_check=False, residual=None, activation=None, saved=None):  # fmt: skip
        """Batch statistics, y, and the running update (``running``: a RunningUpdate). False,
        with nothing written but the statistics, when nan_check finds them not finite.
        ``mean``, ``invstd`` and ``m2`` may be None together (not wanted); ``saved`` (=, (2, C)
        of x's dtype): mean and invstd rounded to it, when given."""
        # The fused pass writes y channel by channel as it goes; a NaN check must come before
        # any y is written (a call that raises leaves out= as it was), so it takes the split one.
        run, _ = _plan("forward_train", x, may_fuse=not nan_check,
                       epilogue=epilogue_code(residual, activation))  # fmt: skip
        running = running or _NO_RUNNING[x.dtype]
        if mean is None:
            mean, invstd, m2 = _scratch(x.shape[1])
        return run(x, weight, bias, eps, running.mean, running.var, running.momentum,
                   running.unbiased, nan_check, y, mean, invstd, m2,
                   x if residual is None else residual,
                   _NO_ROWS[x.dtype] if saved is None else saved)  # fmt: skip

    def forward_eval(self, x, *, weight, bias, running_mean, running_var, eps, y, residual=None,
                     activation=None):  # fmt: skip
        """Returns -1, or the index of the first negative running variance with nothing
        written (the dispatch interface)."""
        run, _ = _plan("forward_eval", x, epilogue=epilogue_code(residual, activation))
        return run(x, weight, bias, running_mean, running_var, eps, y,
                   x if residual is None else residual)  # fmt: skip

    def activation_grad(self, dy, y, *, activation, grad):
        """grad (=, like dy) = the gradient through ``activation`` of the forward that gave
        ``y``: dy where y > 0, else 0, for "relu"."""
        run, _ = _plan("relu_grad", dy)
        run(dy.reshape(dy.size), y.reshape(y.size), grad.reshape(grad.size))

    def backward(self, dy, x, *, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, activation=None,
                 y=None, grad=None, grads=None):  # fmt: skip
        """The backward; with an ``activation``, first through it (``grad`` (=) as in
        activation_grad, from the forward's ``y``): channel by channel in the fused partition,
        so that grad is read back from L2. ``grads`` (=, (2, C) of x's dtype): dweight and
        dbias, when given; ``sum_dy`` and ``sum_dy_xmu`` may be None together (not wanted)."""
        run, fused = _plan("backward", x, may_fuse=True)
        if grads is None:
            grads = _NO_ROWS[x.dtype]
        if sum_dy is None:
            sum_dy, sum_dy_xmu, _ = _scratch(x.shape[1])
        if activation is not None:
            if fused:
                run, _ = _plan("backward_fused_relu", x)  # the same threads
                run(dy, y, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, grad, grads)
                return
            self.activation_grad(dy, y, activation=activation, grad=grad)
            dy = grad
        run(dy, x, mean, invstd, weight, dx, sum_dy, sum_dy_xmu, grads)

    # ----------------------------------------------- the split steps (and their exchange)
    def batch_stats(self, x, *, mean, m2):
        """mean, M2 (=) per channel; returns the count of values per channel."""
        return _plan("batch_stats", x)[0](x, mean, m2)

    def normalize(self, x, *, mean, invstd, weight, bias, y, residual=None, activation=None):
        run, _ = _plan("normalize", x, epilogue=epilogue_code(residual, activation))
        run(x, mean, invstd, weight, bias, y, x if residual is None else residual)

    def backward_sums(self, dy, x, *, mean, sum_dy, sum_dy_xmu):
        _plan("backward_sums", x)[0](dy, x, mean, sum_dy, sum_dy_xmu)

    def backward_dx(self, dy, x, *, mean, invstd, weight, sum_dy, sum_dy_xmu, count, dx):
        """``count`` (the values per channel; a mask's is an int, an exchange's a float) goes to
        the driver as the float it divides by: one machine code for every caller."""
        run, _ = _plan("backward_dx", x)
        run(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, float(count), dx)
