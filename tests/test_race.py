"""The partition of a large planes batch chosen by timing both (numba_bn/cpu/race.py): a race
times them on the first calls and keeps the faster, and what a call returns does not depend on
which one ran."""

import gc

import numba
import numpy as np
import pytest

import numba_bn as nbn
from numba_bn import ahead, cpu
from numba_bn.cpu import drivers, items
from numba_bn.cpu.race import (
    NOT_YET,
    RACE_AFTER,
    RACE_MARGIN,
    RACE_MIN_ELEMENTS,
    RACE_REMATCH_SECONDS,
    RACE_SAMPLES,
    THREADS_RACE_BOUNDS,
    Race,
)

from conftest import random_batch


class Partition:
    """A run that records its calls and advances a fake clock by its ``seconds`` a call (the
    next from the list, then the last one again)."""

    def __init__(self, name, clock, seconds):
        self.name, self.clock, self.seconds, self.calls = name, clock, list(seconds), []

    def __call__(self, *args):
        self.calls.append(args)
        self.clock.now += self.seconds.pop(0) if len(self.seconds) > 1 else self.seconds[0]
        return self.name, args


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def _race(rule_seconds, other_seconds, ready_answers=(), after=0, spacing=0, gap=0.0,
          rematch=None):  # fmt: skip
    """A race of two fake partitions; ``ready_answers``: what ready() says first (then the
    other's run); the settle calls are recorded in race.settled, ready's in race.asked. One
    round unless ``rematch`` is given (the tests of the rematch below)."""
    clock = Clock()
    rule = Partition("rule", clock, rule_seconds)
    other = Partition("other", clock, other_seconds)
    answers, asked = list(ready_answers), []

    def ready():
        asked.append(True)
        return answers.pop(0) if answers else other

    settled = []
    race = Race(rule, ready, lambda *args: settled.append(args), clock=clock, after=after,
                spacing=spacing, gap=gap, rematch=rematch)  # fmt: skip
    race.settled, race.asked = settled, asked
    return race, rule, other


CALLS = 4 * RACE_SAMPLES  # a race's calls without spacing: two calls a sample, a pair of samples


def test_a_race_alternates_samples_then_keeps_the_faster_partition():
    """A sample is an untimed call (the first of each loads its twin: slow) and a timed one;
    the other partition is faster."""
    race, rule, other = _race([9.0, 3.0], [50.0, 2.0])
    results = [race(n) for n in range(CALLS)]
    assert [name for name, _ in results] == ["rule", "rule", "other", "other"] * RACE_SAMPLES
    assert race.settled == [(other, True, (3.0, 2.0))]
    assert race(99) == ("other", (99,)) and race.winner is other
    assert len(rule.calls) == 2 * RACE_SAMPLES  # none after the race


def test_a_race_spaces_its_pairs_with_calls_of_the_rules_partition():
    """A busy spell as long as a few calls spoils the pairs in it, not every pair."""
    # a spell over the first pair of samples and the two calls after it
    race, rule, other = _race([50.0] * 4 + [3.0], [50.0] * 2 + [2.0], spacing=2)
    names = [race(n)[0] for n in range(CALLS + 2 * (RACE_SAMPLES - 1) + 2)]
    pair = ["rule", "rule", "other", "other"]
    assert names == pair + (["rule"] * 2 + pair) * (RACE_SAMPLES - 1) + ["other", "other"]
    assert race.settled == [(other, True, (3.0, 2.0))]
    assert [t > 10 for t in race.times[0]] == [True] + [False] * (RACE_SAMPLES - 1)


def test_a_race_spaces_its_pairs_in_time_too():
    """A stall longer than the calls between two pairs (one core's, say) spoils one pair: the
    next waits for ``gap`` seconds, calls of the rule's meanwhile."""
    race, rule, other = _race([1.0], [50.0] * 2 + [0.5], spacing=1, gap=3.0)
    names = [race(n)[0] for n in range(4 + 4)]
    # after the first pair: one call (spacing), then two more until 3 s have passed, a pair
    assert names == ["rule", "rule", "other", "other", "rule", "rule", "rule", "rule"]
    assert race.resume == 2 * 1.0 + 2 * 50.0 + 3.0  # the clock after the pair, plus the gap


@pytest.mark.parametrize("other_seconds", [[4.0], [3.0], [2.875]])  # slower; a tie; 4% faster
def test_the_rules_partition_stays_unless_the_other_is_faster(other_seconds):
    """And at once: the rule's win needs no second round."""
    race, rule, other = _race([3.0], other_seconds, rematch=RACE_REMATCH_SECONDS)
    for n in range(CALLS + 3):
        race(n)
    assert race.settled == [(rule, False, (3.0, other_seconds[0]))]
    assert len(other.calls) == 2 * RACE_SAMPLES


def test_a_race_the_other_wins_runs_again_later_before_it_settles():
    """The other's run between the rounds, ``rematch`` seconds; then a second round of pairs;
    the other kept, faster over both rounds."""
    race, rule, other = _race([3.0], [2.0], rematch=10.0)
    names = [race(n)[0] for n in range(CALLS)]
    assert names == ["rule", "rule", "other", "other"] * RACE_SAMPLES and race.settled == []
    between = [race(n)[0] for n in range(5)]  # 10 s of the other's 2 s calls
    assert between == ["other"] * 5 and race.settled == [] and race.times == (
        [3.0] * RACE_SAMPLES, [2.0] * RACE_SAMPLES)  # fmt: skip
    names = [race(n)[0] for n in range(CALLS)]
    assert names == ["rule", "rule", "other", "other"] * RACE_SAMPLES
    assert race.settled == [(other, True, (3.0, 2.0))] and race(99) == ("other", (99,))
    assert len(race.times[0]) == len(race.times[1]) == 2 * RACE_SAMPLES


def test_a_second_round_keeps_the_rule_whose_first_round_ran_in_a_spell():
    """Stop 69's race of a (256, 512) eval's twins: a busy spell slowed the parallel twin's
    samples (the rule's) and the serial one won by 6%; the second round, out of the spell,
    times the rule faster than the other, whose first-round win does not count alone."""
    spell = [6.0] * (2 * RACE_SAMPLES)  # the rule's calls of the first round
    race, rule, other = _race(spell + [3.0], [5.6, 5.6] * RACE_SAMPLES + [5.0], rematch=1.0)
    for n in range(2 * CALLS + 1):
        race(n)
    assert race.settled == [(rule, False, (3.0, 5.0))] and race.winner is rule
    assert race(99) == ("rule", (99,))


def test_a_race_keeps_each_partitions_fastest_call():
    """A busy spell slows one sample of the faster partition: its other samples decide."""
    race, rule, other = _race([3.0] * 3 + [2.5], [2.0, 40.0, 2.0])
    for n in range(CALLS):
        race(n)
    assert race.settled == [(other, True, (2.5, 2.0))]
    assert max(race.times[1]) == 40.0  # the spoilt sample, timed


def test_a_sample_times_the_second_of_two_calls():
    """The first lays the batch out in the caches as its partition reads it (and loads it)."""
    race, rule, other = _race([7.0, 3.0], [7.0, 2.0])
    for n in range(4):
        race(n)
    assert race.times == ([3.0], [2.0])


def test_a_race_settles_once_both_partitions_have_their_samples():
    """Python threads calling one plan at once may run a side more often than the other (both
    read the counts before either appends): the race waits for the samples of both."""
    race, rule, other = _race([3.0], [1.0])
    race(0)  # the race's first call: the rule's, untimed
    race.times[1].extend([1.0] * (RACE_SAMPLES + 1))  # the other's, run by other threads
    for n in range(2 * RACE_SAMPLES - 2):
        assert race(n)[0] == "rule" and race.settled == []
    race(2 * RACE_SAMPLES)  # the rule's last sample
    assert race.settled == [(other, True, (3.0, 1.0))]


def test_a_race_asks_for_the_other_partition_from_the_plans_third_call_on():
    """A program that calls once or twice starts no worker and loads nothing more."""
    race, rule, other = _race([3.0], [1.0], after=RACE_AFTER)
    for n in range(RACE_AFTER):
        assert race(n) == ("rule", (n,))
    assert not race.asked and not other.calls
    race(RACE_AFTER)
    assert race.asked and len(rule.calls) == RACE_AFTER + 1  # the race's first: the rule's


def test_a_race_runs_the_rule_until_the_other_partition_is_ready():
    race, rule, other = _race([3.0], [1.0], ready_answers=[NOT_YET] * 5)
    for n in range(5):
        assert race(n) == ("rule", (n,))
    assert race.settled == [] and not other.calls and race.times == ([], [])
    for n in range(CALLS):
        race(n)
    assert race.settled == [(other, True, (3.0, 1.0))]


def test_the_rule_stays_when_the_other_partition_cannot_be_had():
    race, rule, other = _race([3.0], [1.0], ready_answers=[NOT_YET, None])
    assert [race(n)[0] for n in range(4)] == ["rule"] * 4
    assert race.settled == [(rule, False, None)] and not other.calls


# ------------------------------------------------------------------- in the CPU backend
SHAPE = (8, 8, RACE_MIN_ELEMENTS // 64)  # planes: both partitions run it on 2 threads


def _plans_for(x, threads, key):
    plans = cpu._PLANS.get(key)
    return plans.get(threads) if isinstance(plans, dict) else None


def _both_partitions_loaded(x):
    """The parallel twins of both partitions of forward_train and backward for x: loaded."""
    dy = x + 1
    for fused in (True, False):
        with cpu.partitions(forward_train=fused, backward=fused):
            _, mean, invstd = nbn.forward_train(x)
            nbn.backward(dy, x, mean, invstd)
    for step in ("forward_train", "backward"):
        for fused in (True, False):
            twin = cpu._driver(step, x, 2, True, fused=fused)[0]
            assert drivers.loaded_for(twin, x.dtype), (step, fused)


def _steps_until_settled(x, dy, expected, races, most=5000):
    """Training steps on x (forward_train, then backward of dy; poisoned outputs), each giving
    the ``expected`` (y, mean, invstd, dx, dweight, dbias) bits, until the ``races`` (names in
    cpu.RACES) have settled: their pairs come RACE_GAP_SECONDS apart, so the calls that takes
    depend on the machine's speed (fails after ``most`` steps)."""
    for call in range(most):
        y, dx = np.full_like(x, np.nan), np.full_like(x, np.nan)
        _, mean, invstd = nbn.forward_train(x, out=y)
        _, dweight, dbias = nbn.backward(dy, x, mean, invstd, out=dx)
        for got, want in zip((y, mean, invstd, dx, dweight, dbias), expected, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"call {call}")
        if call >= RACE_AFTER + CALLS and all(name in cpu.RACES for name in races):
            return
    raise AssertionError(f"not settled after {most} training steps: {races}")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one thread: nothing to race")
def test_a_training_step_races_its_partitions_with_the_same_bits(rng, monkeypatch):
    """A forward_train and backward on a planes batch time both partitions on their first calls
    and keep the faster one's plan; every call, during the race and after, gives the bits of
    the rule's partition alone."""
    monkeypatch.setattr(cpu, "num_threads", lambda: 2)
    monkeypatch.setattr(cpu, "RACES", {})
    monkeypatch.setattr(cpu, "RACE_REMATCH_SECONDS", 0.05)  # a second round, if one, soon
    x = random_batch(rng, SHAPE, np.float32)
    dy = random_batch(rng, SHAPE, np.float32, mean_scale=0.5)
    assert x.size == RACE_MIN_ELEMENTS and items.both_partitions(*SHAPE, 2)
    _both_partitions_loaded(x)
    rule = {step: items.is_fused(8, SHAPE[2], 2, x.size, step == "forward_train")
            for step in ("forward_train", "backward")}  # fmt: skip
    with cpu.partitions(**rule):  # the rule's partition alone
        expected = nbn.forward_train(x)
        expected_grads = nbn.backward(dy, x, *expected[1:])
    cpu._PLANS.clear()
    names = [(step, SHAPE, "float32", 0, 2) for step in ("forward_train", "backward")]
    _steps_until_settled(x, dy, (*expected, *expected_grads), names)
    for step in ("forward_train", "backward"):
        key = (step, SHAPE, x.dtype, True, 0)
        run, fused = _plans_for(x, 2, key)
        assert not isinstance(run, Race) and fused is rule[step]  # (the ReLU path reads it)
        race = cpu.RACES[step, SHAPE, "float32", 0, 2]
        assert race["rule"] == ("fused" if rule[step] else "split")
        other = "split" if rule[step] else "fused"
        other_won = race[other] < (1 - RACE_MARGIN) * race[race["rule"]]  # else the rule's
        chosen = (other if other_won else race["rule"]) == "fused"
        assert race["kept"] == ("fused" if chosen else "split")
        twin = cpu._driver(step, x, 2, True, fused=chosen)[0]
        assert twin in (run, getattr(run, "__wrapped__", None))  # as it is, or in its guard


def test_the_rules_plan_stays_where_the_other_partition_cannot_be_had(monkeypatch):
    """Neither here nor in the cache, and no worker may start (compile-ahead is off in the
    suite): the race settles on the rule's run, whose plan takes its place, untimed."""
    monkeypatch.setattr(cpu, "_can_load", lambda *_: False)
    monkeypatch.setattr(cpu, "_PLANS", {})
    monkeypatch.setattr(cpu, "RACES", {})
    x = np.empty(SHAPE, np.float32)
    key = ("backward", SHAPE, x.dtype, True, 0)
    rule = Partition("rule", Clock(), [1.0])
    cpu._PLANS[key] = {2: cpu._raced(key, 2, x, (rule, False))}
    race = cpu._PLANS[key][2][0]
    for n in range(RACE_AFTER + 1):
        assert race(n) == ("rule", (n,))
    assert cpu._PLANS[key][2] == (rule, False) and cpu.RACES == {}


def test_a_race_counts_as_running_until_it_settles(monkeypatch):
    """cpu.races_running: the races of plans not settled yet (a benchmark calls its plans until
    there are none before it times them); a plan dropped with its race takes it along."""
    monkeypatch.setattr(cpu, "_can_load", lambda *_: False)
    monkeypatch.setattr(cpu, "_PLANS", {})
    monkeypatch.setattr(cpu, "_RACING", type(cpu._RACING)())
    x = np.empty(SHAPE, np.float32)
    key = ("backward", SHAPE, x.dtype, True, 0)
    rule = Partition("rule", Clock(), [1.0])
    cpu._PLANS[key] = {2: cpu._raced(key, 2, x, (rule, False))}
    race = cpu._PLANS[key][2][0]
    assert isinstance(race, Race) and cpu.races_running() == 1
    for n in range(RACE_AFTER):
        race(n)
        assert cpu.races_running() == 1
    race(RACE_AFTER)  # asks for the other partition: none to be had, settled on the rule's
    assert cpu.races_running() == 0
    cpu._PLANS[key] = {2: cpu._raced(key, 2, x, (rule, False))}
    assert cpu.races_running() == 1
    cpu._PLANS.clear()
    del race
    gc.collect()
    assert cpu.races_running() == 0


def test_a_race_waits_for_the_worker_that_compiles_the_other_partition(monkeypatch):
    """The other partitions, neither here nor in the cache, compile in one worker (the rule's
    split: forward_train and backward fused); the race runs the rule's meanwhile, and also
    while any worker of this process lives (a compile takes a core)."""
    started, compiling = [], [False]

    def start_partitions(*args):
        started.append(args)
        compiling[0] = True
        return 12345  # its pid

    monkeypatch.setattr(cpu, "_can_load", lambda *_: False)
    monkeypatch.setattr(ahead, "enabled", lambda: True)
    monkeypatch.setattr(ahead, "start_partitions", start_partitions)
    monkeypatch.setattr(ahead, "compiles", lambda twin: compiling[0])
    monkeypatch.setattr(ahead, "working", lambda: compiling[0])
    x = np.empty((64, 8, 1000), np.float32)  # rule: split (short of the fused bounds)
    assert x.size >= RACE_MIN_ELEMENTS and not items.is_fused(8, 1000, 2, x.size, True)
    assert not items.is_fused(8, 1000, 2, x.size, False)
    key = ("backward", x.shape, x.dtype, True, 0)
    plan = cpu._raced(key, 2, x, ("rule", False))
    assert isinstance(plan[0], Race) and plan[1] is False
    ready = plan[0].ready
    assert not started  # until the race asks
    assert ready() is NOT_YET
    ((batch, threads, job, twins),) = started
    assert (batch.shape, batch.dtype, threads, job) == (
        x.shape, x.dtype, 2, "batch_norm_partitions 0 forward_train=1 backward=1")  # fmt: skip
    assert twins == [cpu._driver(step, x, 2, True, fused=True)[0]
                     for step in ("forward_train", "backward")]  # fmt: skip
    monkeypatch.setattr(ahead, "compiles", lambda twin: False)
    assert ready() is NOT_YET  # another worker still lives
    compiling[0] = False
    assert ready() is None  # it ended and saved nothing: the rule's stays
    monkeypatch.setattr(cpu, "_can_load", lambda *_: True)
    assert ready() is not None


def test_the_partitions_job_runs_the_partitions_it_names(rng, monkeypatch):
    """The worker's job (ahead.JOBS) plans and runs forward_train and backward in the
    partitions named, whose twins then have machine code (here: it runs in this process), and
    leaves no partition forced."""
    planned, driver = [], cpu._driver

    def recorded(step, *args, **kwargs):
        dispatcher, fused = driver(step, *args, **kwargs)
        planned.append((step, fused, dispatcher))
        return dispatcher, fused

    monkeypatch.setattr(cpu, "_driver", recorded)
    x = random_batch(rng, (8, 8, 1000), np.float32)  # the rule: split, both steps
    ahead.JOBS["batch_norm_partitions"](x, "0", "forward_train=1", "backward=0")
    assert cpu._forced == {} and cpu._PLANS == {}
    named = {("forward_train", True), ("backward", False)}
    steps = [(step, fused, twin) for step, fused, twin in planned if step in cpu._PARTITIONED]
    assert {(step, fused) for step, fused, _ in steps} == named
    for step, _, twin in steps:
        assert drivers.loaded_for(twin, x.dtype), step


def test_a_race_holds_no_reference_to_the_batch(monkeypatch):
    """A plan outlives its calls: its race keeps x's shape and dtype, not x's memory."""
    import gc
    import weakref

    monkeypatch.setattr(cpu, "_PLANS", {})
    x = np.empty(SHAPE, np.float32)
    gone = weakref.ref(x)
    plan = cpu._raced(("backward", SHAPE, x.dtype, True, 0), 2, x, ("rule", False))
    assert isinstance(plan[0], Race)
    del x
    gc.collect()
    assert gone() is None


# ------------------------------------------------------------- the twins near the model's bound
ROWS = (128, 256)  # 32K elements: at the backward's bound on 2 threads, just under the forward's


def _bound(step, threads=2):
    """The cost model's serial bound of ``step`` on ``threads`` threads here."""
    return cpu.serial_below(step, threads, cpu.wake_ns(cpu.expected_layer()))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one thread: nothing to race")
def test_a_backward_near_the_bound_races_its_twins_with_the_same_bits(rng, monkeypatch):
    """A backward the cost model runs in parallel, up to four times its bound, times the
    parallel and the serial twin on its first calls and keeps the faster one's plan; every call
    gives the serial twin's bits. The forward, serial by the model, does not race."""
    monkeypatch.setattr(cpu, "num_threads", lambda: 2)
    monkeypatch.setattr(cpu, "RACES", {})
    monkeypatch.setattr(cpu, "RACE_REMATCH_SECONDS", 0.05)  # a second round, if one, soon
    monkeypatch.setattr(cpu, "_PLANS", {})
    x = random_batch(rng, ROWS, np.float32)
    dy = random_batch(rng, ROWS, np.float32, mean_scale=0.5)
    view = x.reshape(*ROWS, 1)
    assert _bound("backward") <= x.size < THREADS_RACE_BOUNDS * _bound("backward")
    assert cpu.threads_for("forward_train", x.size, 2) == 1
    with cpu.serial_plans():  # the serial twins alone, loaded
        expected = nbn.forward_train(x)
        expected_grads = nbn.backward(dy, x, *expected[1:])
    with monkeypatch.context() as patched:  # the parallel twins, loaded (the layer known)
        patched.setattr(cpu, "threads_for", lambda *_: 2)
        cpu._PLANS.clear()
        nbn.backward(dy, x, *nbn.forward_train(x)[1:])
    cpu._PLANS.clear()
    cpu.RACES.clear()
    name = ("backward", view.shape, "float32", 0, 2)
    _steps_until_settled(x, dy, (*expected, *expected_grads), [name])
    race = cpu.RACES[name]
    run, fused = _plans_for(x, 2, ("backward", view.shape, x.dtype, True, 0))
    assert not isinstance(run, Race) and fused is False
    assert race["rule"] == "parallel"
    faster = race["serial"] < (1 - RACE_MARGIN) * race["parallel"]  # else the model's
    assert race["kept"] == ("serial" if faster else "parallel")
    twin = cpu._driver("backward", view, 1 if faster else 2, True)[0]
    assert _runs(run, twin, x.dtype)
    assert not faster or run is not twin  # the serial twin: its entry point, as a plan's
    assert list(cpu.RACES) == [("backward", view.shape, "float32", 0, 2)]  # no forward race


def _runs(run, twin, dtype):
    """Whether ``run`` calls the twin ``twin``: it is the twin, its machine code's entry point,
    or a wrapper of the twin (the launch guard, the checked entry point of the test suite)."""
    return (run in (twin, drivers.machine_code(twin, dtype))
            or getattr(run, "__wrapped__", None) is twin)  # fmt: skip


@pytest.mark.parametrize("bounds, races", [(1.1, True), (3.9, True), (4.1, False)])
def test_a_parallel_plan_races_its_twins_up_to_four_times_the_models_bound(bounds, races):
    """Sizes from the bound (parallel plans) to THREADS_RACE_BOUNDS times it race."""
    x = np.empty((int(bounds * _bound("backward")) // 8, 8, 1), np.float32)  # rows: one partition
    key = ("backward", x.shape, x.dtype, True, 0)
    plan = cpu._threads_raced(key, 2, x, ("rule", False))
    assert isinstance(plan[0], Race) is races and plan[1] is False


def test_a_twins_race_times_only_a_serial_twin_it_can_load(monkeypatch):
    """The serial twin: NOT_YET while a worker of this process lives, None when it is neither
    loaded nor cached (the parallel twin stays), else its run: its entry point, or its
    dispatcher before it is loaded (its first call loads it)."""
    x = np.empty((int(2 * _bound("backward")) // 8, 8, 1), np.float32)
    key = ("backward", x.shape, x.dtype, True, 0)
    ready = cpu._threads_raced(key, 2, x, ("rule", False))[0].ready
    serial = cpu._driver("backward", x, 1, True)[0]
    working = [True]
    monkeypatch.setattr(ahead, "working", lambda: working[0])
    assert ready() is NOT_YET
    working[0] = False
    monkeypatch.setattr(cpu, "_can_load", lambda *_: False)
    assert ready() is None
    monkeypatch.setattr(cpu, "_can_load", lambda *_: True)
    assert _runs(ready(), serial, x.dtype)
