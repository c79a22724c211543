"""The partition of a large planes batch, chosen by timing both on this machine.

A forward_train or backward on planes with a channel or more for each thread, twice over, has
two partitions (:mod:`.items`): fused (one channel per item, its statistics and normalisation
back to back while it is in L2) and split (a reduction pass, then an elementwise pass). They give
the same bits (tests/test_numerics.py), so which one runs decides only the time, and that
depends on the machine more than a fixed size can say: the split backward of (32, 64, 28, 28)
float32 took 1.3-1.5x the fused one's time on an Intel Xeon (2 MB of L2 a core) and ran faster
than it on an AMD Zen 3 (benchmarks/README.md, "Stop 56"). :func:`.items.is_fused` is the rule a
plan starts with (and the C library's shim keeps); where both partitions can run the batch, a
parallel plan's run is a :class:`Race` that times both on the first calls and keeps the faster.

A race only times machine code this process has or can load from Numba's cache: the other
partition's parallel twin, when it is in neither, compiles in a compile-ahead worker
(:mod:`numba_bn.ahead`) while the rule's runs; where no worker may start and the cache does not
hold it, the rule's partition stays, as before.
"""

import time

#: The smallest batch (elements) whose partition is timed: below, the fused one was never more
#: than 6% the faster on the machines measured (131K elements, split / fused time: 0.79-0.97 on
#: stop 56's Intel Xeon, 0.95-1.06 on stop 55's; the AMD Zen 3 ran split up to 2M), and a
#: race's calls would cost more than it could save.
RACE_MIN_ELEMENTS = 1 << 18
#: Samples of each partition: a sample is two calls of it, the second timed. The first lays
#: the batch out in the cores' caches as that partition reads it (a fused item reads a channel
#: of every row; a split one, rows): timed right after the other partition's calls, a fused
#: forward of (8, 32, 32, 32) read 61-65 us, 43 in a loop of its own (benchmarks/README.md,
#: stop 56). Samples come in pairs, the rule's then the other's, so that a busy spell of the
#: machine slows both of a pair; each partition keeps its fastest.
RACE_SAMPLES = 4
#: Calls of the rule's partition, untimed, between two pairs: the pairs spread over 28 calls,
#: so that one spell cannot spoil every sample (ten calls in a row, timed in `numba-bn bench`
#: after the other implementations' verification, read 2-5x their time in one race of four).
RACE_SPACING = 4
#: Calls of a plan before its race asks for the other partition: a program that calls once
#: (a first-call measurement, a script) starts no worker and loads nothing it will not run.
RACE_AFTER = 2
#: What a race's ``ready`` answers while the other partition is not ready yet.
NOT_YET = "not yet"


class Race:
    """A plan's run that times two partitions and keeps the faster.

    ``rule``: the run of the partition the rule picks. ``ready()``: the other partition's run
    once it can be called (loaded, or in Numba's cache), NOT_YET while a worker compiles it,
    None when it will not be had (the rule's run stays). ``settle(run, other_won, seconds)``:
    called once with the faster run, whether it is the other's, and the two fastest times
    (rule's, other's; None when there was no race), to put the plan in place of this one.
    ``clock``: seconds (a fake in the tests).

    The first ``after`` calls run the rule's; then, until ``ready`` gives a run, every call
    asks it and runs the rule's; then ``samples`` pairs of samples (:data:`RACE_SAMPLES`), the
    rule's then the other's, ``spacing`` calls of the rule's between pairs, and it settles.
    A call's arguments and result pass through. Results do not depend on which partition runs
    (the module's docstring).
    """

    def __init__(self, rule, ready, settle, clock=time.perf_counter, samples=RACE_SAMPLES,
                 after=RACE_AFTER, spacing=RACE_SPACING):  # fmt: skip
        self.rule, self.ready, self._settle, self.clock = rule, ready, settle, clock
        self.samples, self.after, self.spacing = samples, after, spacing
        self.times = ([], [])  # the rule's, the other's: seconds of each sample's timed call
        self.runs = None  # (rule, other) while racing
        self.between = 0  # calls of the rule's still to run before the next pair
        self.laid_out = False  # whether this sample's untimed call has run
        self.winner = None
        self._call = self._waiting

    def __call__(self, *args):
        return self._call(*args)

    def _waiting(self, *args):
        if self.after > 0:
            self.after -= 1
            return self.rule(*args)
        other = self.ready()
        if other is NOT_YET:
            return self.rule(*args)
        if other is None:
            self._done(self.rule, False, None)
            return self.rule(*args)
        self.runs = (self.rule, other)
        self._call = self._racing
        return self._racing(*args)

    def _racing(self, *args):
        if self.between > 0:
            self.between -= 1
            return self.rule(*args)
        rule_times, other_times = self.times
        side = 0 if len(rule_times) <= len(other_times) else 1
        if not self.laid_out:
            self.laid_out = True
            return self.runs[side](*args)
        self.laid_out = False
        start = self.clock()
        result = self.runs[side](*args)
        self.times[side].append(self.clock() - start)
        if side == 1:
            self.between = self.spacing
        # (both counts: calls from several Python threads may have run one side more often)
        if min(len(rule_times), len(other_times)) >= self.samples:
            rule_best, other_best = min(rule_times), min(other_times)
            other_won = other_best < rule_best
            self._done(self.runs[other_won], other_won, (rule_best, other_best))
        return result

    def _done(self, winner, other_won, seconds):
        self.winner = winner
        self._call = winner
        self._settle(winner, other_won, seconds)
