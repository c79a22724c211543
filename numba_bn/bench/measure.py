"""Verify against the float64 reference, then time: hot runs, and first calls."""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from .. import ahead, compiling, cpu
from .cases import BYTES_PER_ELEMENT_MOVED
from .peers import NumbaBn, NumbaBnKernels, NumbaBnLayer

PAUSE_SECONDS = 0.3
BLOCK_SECONDS = 1e-3  # calls faster than this are timed in blocks (small shapes)
#: Inputs up to this size may be sampled in rounds (time_each). It is glibc's default mmap
#: threshold; with 512 KB outputs, rounds slowed PyTorch's calls more than ours (stop 38)
ROUNDS_MAX_BYTES = 128 * 1024
#: The longest run_case calls numba_bn's calls to let their plans' races settle (settle_races)
RACES_SECONDS = 20.0
#: The implementations whose calls run numba_bn's plans
OURS = (NumbaBn.name, NumbaBnLayer.name, NumbaBnKernels.name)


class VerificationError(AssertionError):
    pass


def relative_error(value, expected):
    """||value - expected|| / ||expected|| in float64 (inf for a wrong shape, NaN stays NaN)."""
    value, expected = np.asarray(value, np.float64), np.asarray(expected, np.float64)
    if value.shape != expected.shape:
        return math.inf
    return float(np.linalg.norm(value - expected) / max(np.linalg.norm(expected), 1e-300))


def verify(implementation, case, op, call):
    """Run ``call`` once; its largest relative error over the outputs of ``op``.

    Raises VerificationError above the implementation's tolerance for the dtype (and for NaN).
    """
    outputs = implementation.numpy_outputs(call(), case)
    expected = implementation.expected(case, op)
    where = f"{implementation.name} {op} on {case.shape.name} ({case.dtype})"
    if len(outputs) != len(expected):
        raise VerificationError(f"{where}: {len(outputs)} outputs, expected {len(expected)}")
    error = max(relative_error(v, e) for v, e in zip(outputs, expected, strict=True))
    tolerance = implementation.tolerance[case.dtype]
    if not error <= tolerance:
        raise VerificationError(
            f"{where}: relative error {error:.3g} against the float64 reference "
            f"(tolerance {tolerance:g})"
        )
    return error


def time_each(calls, repeat, rounds=False):
    """({key: seconds per call, ``repeat`` samples}, {key: calls per sample}); keys (op, name).

    Each (operation, implementation) first gets four untimed calls (hot caches, compiled code)
    and a calibration: calls faster than BLOCK_SECONDS are timed in blocks of back-to-back
    calls, a block a sample. Then the ``repeat`` samples:
    - with ``rounds`` (a small input: run_case) and calls that are all that short, in rounds,
      every (operation, implementation) one sample per round. On this project's shared 2-core
      VMs a process runs 1.5-2x slower for spells of a second or more, so samples taken back
      to back put one implementation in a spell and the next out of it: over six runs of the
      smallest sweep shapes, a cell's x torch moved by 2.5x (max / min, median of the cells)
      in blocks and by 1.4x in rounds (benchmarks/README.md, stop 38);
    - else each (operation, implementation)'s samples back to back, with a pause before each
      implementation, the best case for every peer. Rounds on larger inputs were not fair:
      with 512 KB outputs PyTorch's (256, 512) backward took 84-110 us in rounds against
      54 alternated in 25 ms blocks (``benchmarks/vs_torch_inprocess.py``), ours 62-69
      against 53-58; the (4096, 1024) copy 1470 us against 548 (outputs above glibc's mmap
      threshold, whose pages depend on what the other calls allocated and freed: suspected,
      not pinned down). Interleaving call by call made both Numba and PyTorch 2-5x slower on
      2 cores.
    """
    iterations = {}
    for key, call in calls.items():
        for _ in range(4):
            call()
        single = min(_seconds(call) for _ in range(3))
        iterations[key] = max(1, min(10_000, int(BLOCK_SECONDS / max(single, 1e-9))))
    samples = {key: [] for key in calls}
    if rounds and min(iterations.values()) > 1:
        for _ in range(repeat):
            for key, call in calls.items():
                samples[key].append(_sample(call, iterations[key]))
        return samples, iterations
    previous = None
    for key, call in calls.items():
        if key[1] != previous:
            time.sleep(PAUSE_SECONDS)  # let the previous implementation's threads go idle
            previous = key[1]
        call()  # hot again after the others
        for _ in range(repeat):
            samples[key].append(_sample(call, iterations[key]))
    return samples, iterations


def _sample(call, n):
    """Seconds per call of ``n`` calls back to back."""
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n


def _seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


class Result:
    """One timed (shape, operation, implementation); times in seconds per call."""

    def __init__(self, case, op, name, samples, iterations, error):
        self.shape, self.dtype, self.op, self.name = case.shape, case.dtype, op, name
        self.samples, self.iterations, self.error = samples, iterations, error
        self.median, self.best = float(np.median(samples)), float(np.min(samples))
        self.bytes = BYTES_PER_ELEMENT_MOVED[op] * case.x.nbytes
        self.gb_per_s = self.bytes / self.median / 1e9


def run_case(case, chosen, repeat):
    """Verify every (operation, implementation) of ``case``, then time them (see time_each).

    Small shapes also time numba_bn's backend alone (per-call overhead). Returns (results,
    {implementation name: largest error}); VerificationError before any timing if one is wrong.
    """
    chosen = list(chosen)
    if case.shape.small and any(i.name == "numba_bn" for i in chosen):
        chosen.append(NumbaBnKernels())
    calls, errors, worst = {}, {}, {}
    for implementation in chosen:
        name = implementation.name
        for op, call in implementation.calls(case).items():
            errors[op, name] = verify(implementation, case, op, call)
            calls[op, name] = call
            worst[name] = max(worst.get(name, 0.0), errors[op, name])
    ahead.settle()  # no compile-ahead worker of a first call still busy while this times
    settle_races(calls)
    samples, iterations = time_each(calls, repeat, case.x.nbytes <= ROUNDS_MAX_BYTES)
    results = [
        Result(case, op, name, samples[op, name], iterations[op, name], errors[op, name])
        for op, name in calls
    ]
    return results, worst


def settle_races(calls, seconds=RACES_SECONDS):
    """Call numba_bn's ``calls`` ({(op, implementation name): call}), all in turn, until no race
    of its plans is left (numba_bn.cpu.races_running), waiting for the compile-ahead workers
    a race starts; ``seconds`` at most. A large planes batch times both partitions on its first
    ~30 calls, a batch near the cost model's bound both twins (numba_bn/cpu/race.py), and runs
    the slower one in half of the timed calls: left to the timed samples, the races of
    (32, 64, 28, 28), (64, 256, 14, 14), (256, 512) and (16, 32, 16, 16) settled 0.34-0.52 s
    into them, in numba_bn's first cells (stop 69). The samples time what a program runs from
    then on, as they time compiled code, not its compilation."""
    ours = [call for (_, name), call in calls.items() if name in OURS]
    deadline = time.perf_counter() + seconds
    while ours and cpu.races_running() and time.perf_counter() < deadline:
        for call in ours:
            call()
        ahead.settle()


# --------------------------------------------------------------------------------- first call
_FIRST_CALL = """
import json, time
start = time.perf_counter()
import numpy as np
import numba_bn as nbn
imported = time.perf_counter()
for shape, axis in {shapes!r}:
    x = np.random.default_rng(0).standard_normal(shape).astype({dtype!r}) + 1.0
    y, mean, invstd = nbn.forward_train(x, axis=axis)
    nbn.forward_eval(x, mean, 1.0 / invstd**2, axis=axis)
    nbn.backward(y, x, mean, invstd, axis=axis)
print(json.dumps({{"import_s": imported - start, "first_call_s": time.perf_counter() - imported}}))
from numba_bn import ahead
ahead.settle()  # a worker compiling the parallel twins ends before the warm process starts
"""


def first_call_seconds(shapes, dtype, threads, cache_dir=None, timeout=900):
    """{"import_s", "first_call_s"}: ``import numba_bn``, then the first forward-train + eval +
    backward on each (dims, axis) of ``shapes``, in a new Python process.

    ``cache_dir`` is that process's NUMBA_CACHE_DIR (None: inherited from this one).
    """
    env = compiling.child_environment(NUMBA_NUM_THREADS=str(threads))
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    code = _FIRST_CALL.format(shapes=[tuple(s) for s in shapes], dtype=np.dtype(dtype).name)
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"the first-call process failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])


# one planes and one rows input, large enough for the parallel kernels (small inputs run serial
# twins, compiled separately): what a first real batch costs
FIRST_CALL_INPUTS = [((16, 32, 32, 32), 1), ((4096, 64), 1)]


def cold_and_warm_first_call(dtype, threads):
    """First calls on FIRST_CALL_INPUTS with an empty Numba cache (compile and store), then in
    another process with that cache (load)."""
    with tempfile.TemporaryDirectory(prefix="numba-bn-cache-") as cache_dir:
        cold = first_call_seconds(FIRST_CALL_INPUTS, dtype, threads, cache_dir)
        warm = first_call_seconds(FIRST_CALL_INPUTS, dtype, threads, cache_dir)
    return {"shapes": FIRST_CALL_INPUTS, "cold": cold, "warm": warm}
