"""The partition of a large planes batch, and the thread count of a batch near the cost
model's bound, chosen by timing both on this machine.

A forward_train or backward on planes with a channel or more for each thread, twice over, has
two partitions (:mod:`.items`): fused (one channel per item, its statistics and normalisation
back to back while it is in L2) and split (a reduction pass, then an elementwise pass). They give
the same bits (tests/test_numerics.py), so which one runs decides only the time, and that
depends on the machine more than a fixed size can say: the split backward of (32, 64, 28, 28)
float32 took 1.3-1.5x the fused one's time on an Intel Xeon (2 MB of L2 a core) and ran faster
than it on an AMD Zen 3 (benchmarks/README.md, "Stop 56"). :func:`.items.is_fused` is the rule a
plan starts with (and the C library's shim keeps); where both partitions can run the batch, a
parallel plan's run is a :class:`Race` that times both on the first calls and keeps the faster
(timed again a second later when it is not the rule's, :data:`RACE_REMATCH_SECONDS`).

A race only times machine code this process has or can load from Numba's cache: the other
partition's parallel twin, when it is in neither, compiles in a compile-ahead worker
(:mod:`numba_bn.ahead`) while the rule's runs; where no worker may start and the cache does not
hold it, the rule's partition stays, as before.

The serial and the parallel twin of a step give the same bits too (tests/test_numerics.py), and
the cost model (:func:`numba_bn.cpu.threads_for`) that picks one prices a parallel launch and
an element with constants measured on one machine. Near its bound it guesses: on stop 57's
Intel Xeon (2 threads) the parallel twin of a (128, 256) backward, which it runs in parallel,
took 1.35-1.57x the serial one's time (five races; benchmarks/README.md, "Stop 57"). Up to four
times its bound (:data:`THREADS_RACE_BOUNDS`), a parallel plan races the parallel twin against
the serial one in the same way, once the serial one is loaded or in Numba's cache (no worker
compiles it).
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
#: Calls of the rule's partition, untimed, between two pairs, and at least RACE_GAP_SECONDS:
#: the pairs spread over 28 calls or more, so that one spell cannot spoil every sample (ten
#: calls in a row, timed in `numba-bn bench` after the other implementations' verification,
#: read 2-5x their time in one race of four).
RACE_SPACING = 4
#: A spell can be one core's: a race of the twins of a (16, 32, 16, 16) eval in ``python
#: benchmarks/ab_inprocess.py``, its pairs 0.1 ms apart, timed the parallel twin at 18.9 us
#: against 17.5 for the serial one, which took 1.3-1.8x the parallel twin's time in six races
#: of their own (stop 57). Pairs 2 ms apart at least put a stall of the other core in one.
RACE_GAP_SECONDS = 0.002
#: The other partition (or twin) replaces the rule's when its fastest sample is this much
#: faster: the rule is a measured guess, and a near tie is not worth trusting four samples.
RACE_MARGIN = 0.05
#: A race the other partition (or twin) wins is run again this many seconds later, the other's
#: run in between, and the other is kept only if it is still the faster by the margin over both
#: rounds' samples (each side's fastest); one the rule's wins settles at once. A spell slows
#: this machine for a second or more (benchmarks/README.md, stop 38), more than a race's ~8 ms
#: of pairs: in stop 69's sweep, the twins' race of a (256, 512) eval ran in one, timed the
#: parallel twin at 18.0 us against 16.9 for the serial one, and kept the serial twin, which
#: took 1.5x the parallel one's time for the rest of the process. The rule is the measured
#: guess; overturning it takes two rounds apart in time.
RACE_REMATCH_SECONDS = 1.0
#: Calls of a plan before its race asks for the other partition: a program that calls once
#: (a first-call measurement, a script) starts no worker and loads nothing it will not run.
RACE_AFTER = 2
#: The largest size whose thread count a race decides, in the cost model's serial bounds
#: (:func:`numba_bn.cpu.serial_below`) on the plan's threads. On stop 57's Intel Xeon (2
#: threads), at 3.8-4x the bound the parallel twin took 0.67-0.77x the serial one's time
#: (forward_train and backward of (256, 512) and (16, 32, 16, 16)); at 1-2x it, 0.8-1.6x.
THREADS_RACE_BOUNDS = 4
#: What a race's ``ready`` answers while the other partition is not ready yet.
NOT_YET = "not yet"


class Race:
    """A plan's run that times two partitions (or twins) and keeps the faster.

    ``rule``: the run of the partition the rule picks (or the cost model's twin). ``ready()``:
    the other partition's run once it can be called (loaded, or in Numba's cache), NOT_YET
    while a worker compiles it, None when it will not be had (the rule's run stays).
    ``settle(run, other_won, seconds)``: called once with the faster run, whether it is the
    other's, and the two fastest times (rule's, other's; None when there was no race), to put
    the plan in place of this one.
    ``clock``: seconds (a fake in the tests).

    The first ``after`` calls run the rule's; then, until ``ready`` gives a run, every call
    asks it and runs the rule's; then ``samples`` pairs of samples (:data:`RACE_SAMPLES`), the
    rule's then the other's, ``spacing`` calls of the rule's and ``gap`` seconds at least
    between pairs, and it settles: on the other's run when its fastest sample took less than
    ``1 - margin`` times the rule's fastest. When the other's wins, a second round of pairs
    follows ``rematch`` seconds later (the other's run meanwhile), and the other is kept when
    its fastest sample over both rounds is still that much faster than the rule's
    (:data:`RACE_REMATCH_SECONDS`; None: one round).
    A call's arguments and result pass through. Results do not depend on which partition runs
    (the module's docstring).
    """

    def __init__(self, rule, ready, settle, clock=time.perf_counter, samples=RACE_SAMPLES,
                 after=RACE_AFTER, spacing=RACE_SPACING, gap=RACE_GAP_SECONDS,
                 margin=RACE_MARGIN, rematch=RACE_REMATCH_SECONDS):  # fmt: skip
        self.rule, self.ready, self._settle, self.clock = rule, ready, settle, clock
        self.samples, self.after, self.spacing = samples, after, spacing
        self.gap, self.margin, self.rematch = gap, margin, rematch
        self.rounds = 1  # the rounds of pairs whose samples the race waits for
        self.times = ([], [])  # the rule's, the other's: seconds of each sample's timed call
        self.runs = None  # (rule, other) while racing
        self.between = 0  # calls of the rule's still to run before the next pair
        self.resume = 0.0  # and the clock's reading before which the next pair waits (none yet)
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
        if self.between > 0 or self.clock() < self.resume:
            self.between = max(self.between - 1, 0)
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
            self.between, self.resume = self.spacing, self.clock() + self.gap
        # (both counts: calls from several Python threads may have run one side more often)
        if min(len(rule_times), len(other_times)) >= self.samples * self.rounds:
            rule_best, other_best = min(rule_times), min(other_times)
            other_won = other_best < (1.0 - self.margin) * rule_best
            if other_won and self.rounds == 1 and self.rematch is not None:
                self.rounds, self.resume = 2, self.clock() + self.rematch
                self.between, self._call = 0, self._between_rounds
            else:
                self._done(self.runs[other_won], other_won, (rule_best, other_best))
        return result

    def _between_rounds(self, *args):
        if self.clock() < self.resume:
            return self.runs[1](*args)
        self._call = self._racing
        return self._racing(*args)

    def _done(self, winner, other_won, seconds):
        self.winner = winner
        self._call = winner
        self._settle(winner, other_won, seconds)
