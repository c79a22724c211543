"""The first call: one line on stderr while a driver compiles, none on a warm cache; warm-up.

Compiles happen in child processes with their own NUMBA_CACHE_DIR, so that the cache starts
empty. Times are printed, not asserted (benchmarks time things; tests state behaviour).
"""

import importlib
import re
import sys
import time

import numba
import numpy as np
import pytest

import numba_bn as nbn
from numba_bn.cpu import drivers
from numba_bn.cpu.items import MEMORY_ANY as ANY
from numba_bn.cpu.items import MEMORY_PLANES as PLANES
from numba_bn.cpu.items import MEMORY_ROWS as ROWS
from numba_bn.cpu.items import MEMORY_SHORT as SHORT
from numba_bn.warmup import NORM_OPERATIONS, groups, label, plan

from conftest import finish_child, run_child, start_child

LINE = re.compile(r"^numba_bn: compiling .*$", re.MULTILINE)
STEP = re.compile(r"^(.+?) +(\d+\.\d\d) s  (compiled|from cache|in memory)$", re.MULTILINE)
# forward_eval alone: the cheapest first call (one driver and its kernels)
EVAL_ONCE = (
    "import numpy as np, numba_bn as nbn; "
    "x = np.ones((64, 32), np.float32); "
    "nbn.forward_eval(x, np.zeros(32, np.float32), np.ones(32, np.float32)); print('done')"
)


def _run(code, cache_dir, **env):
    """Run ``code`` in a new process on ``cache_dir``, its compile lines on (unless ``env`` sets
    NUMBA_BN_QUIET): a NUMBA_BN_QUIET=1 of the shell that runs the tests does not reach it."""
    start = time.perf_counter()
    status, output = run_child(
        [sys.executable, "-c", code],
        {"NUMBA_CACHE_DIR": str(cache_dir), "NUMBA_BN_QUIET": "", **env},
    )
    seconds = time.perf_counter() - start
    assert status == 0 and "done" in output, output
    return output, seconds


def test_a_cold_cache_prints_one_line_saying_what_why_how_long_and_where(tmp_path):
    output, seconds = _run(EVAL_ONCE, tmp_path)
    print(f"cold forward_eval process: {seconds:.1f} s\n{output}")
    lines = LINE.findall(output)
    assert len(lines) == 1, output  # the kernels forward_eval inlines compile silently
    (line,) = lines
    assert "forward_eval (rows, float32, serial twin)" in line
    assert "first call with these argument types" in line and "nothing cached yet" in line
    assert re.search(r"about \d+ s", line)
    assert f"cached in {tmp_path}" in line
    assert "NUMBA_BN_QUIET=1" in line


def test_a_warm_cache_prints_nothing(tmp_path):
    _run(EVAL_ONCE, tmp_path)
    output, seconds = _run(EVAL_ONCE, tmp_path)
    print(f"warm forward_eval process: {seconds:.1f} s")
    assert not LINE.findall(output), output


def test_numba_bn_quiet_silences_the_line(tmp_path):
    output, _ = _run(EVAL_ONCE, tmp_path, NUMBA_BN_QUIET="1")
    assert not LINE.findall(output), output


def test_a_norms_cold_call_announces_its_driver_too(tmp_path):
    code = ("import numpy as np, numba_bn as nbn; x = np.ones((4, 8, 6), np.float32); "
            "nbn.group_norm(x, 4); print('done')")  # fmt: skip
    output, _ = _run(code, tmp_path, NUMBA_NUM_THREADS="1")
    lines = LINE.findall(output)
    assert len(lines) == 1, output
    assert "group_forward (float32, serial twin)" in lines[0] and "about 3 s" in lines[0]


# Python's collector during compiles: a listener registered after numba_bn's sees its state
GC_DURING_COMPILES = """
import gc
import numba, numpy as np, numba_bn as nbn
from numba.core import event
seen = []
class Listener(event.Listener):
    def on_start(self, ev): seen.append((ev.data["dispatcher"].py_func.__name__, gc.isenabled()))
    def on_end(self, ev): pass
event.register("numba:compile", Listener())
x = np.ones((64, 32), np.float32)
nbn.forward_eval(x, np.zeros(32, np.float32), np.ones(32, np.float32))
print("driver and its kernels:", sorted(set(seen)), "after:", gc.isenabled())
seen.clear()
numba.njit(lambda a: a + 1)(1.0)  # a compile of the program's own
print("own:", seen)
gc.disable()
nbn.forward_eval(x.astype(np.float64), np.zeros(32), np.ones(32))
print("disabled before:", gc.isenabled())
print("done")
"""


def test_the_collector_is_off_while_a_driver_compiles_and_as_it_was_after(tmp_path):
    output, _ = _run(GC_DURING_COMPILES, tmp_path, NUMBA_BN_QUIET="1")
    compiled = eval(re.search(r"^driver and its kernels: (.*) after:", output, re.M).group(1))
    assert ("_forward_eval_rows_serial", False) in compiled, output
    # its kernels' too (first_negative, the running variance's check, compiles before, alone)
    assert all(enabled is False for name, enabled in compiled if name != "first_negative"), output
    assert "after: True" in output and "own: [('<lambda>', True)]" in output, output
    assert "disabled before: False" in output, output


# The objects a driver's compile leaves (compiling._release): the collections of each call, with
# Python's own full collections off (threshold 2), so that only numba_bn's gc.collect() runs one
GC_AFTER_COMPILES = """
import gc
import numpy as np, numba_bn as nbn
gc.set_threshold(700, 10, 10**9)
seen = []
gc.callbacks.append(lambda phase, info: phase == "stop" and seen.append(
    (info["generation"], info["collected"])))
def call(label, x):
    channels = x.shape[1]
    nbn.forward_eval(x, np.zeros(channels, x.dtype), np.ones(channels, x.dtype))
    [[] for _ in range(20000)]  # young collections after it
    print(label, seen); seen.clear()
call("first:", np.ones((64, 32), np.float32))
call("second:", np.ones((64, 32)))
print("collected after:", gc.collect())
gc.freeze()
call("frozen:", np.ones((2, 3, 5), np.float32))
print("still frozen:", gc.get_freeze_count() > 0, "collected after:", gc.collect())
print("done")
"""
MANY = 20_000  # an eval driver's compile leaves ~50-80K objects in cycles, a forward's ~300K


def test_a_compiles_garbage_waits_for_a_full_collection_or_the_next_compile(tmp_path):
    output, _ = _run(GC_AFTER_COMPILES, tmp_path, NUMBA_BN_QUIET="1")

    def collections(label):
        return eval(re.search(rf"^{label}: (.*)$", output, re.MULTILINE).group(1))

    # no young collection scans the compile's objects: they wait in the oldest generation
    assert all(collected < MANY for _, collected in collections("first")), output
    # the next compile collects them first, in one full collection; its own objects wait
    assert [c for generation, c in collections("second") if c >= MANY and generation == 2], output
    assert all(c < MANY for generation, c in collections("second") if generation < 2), output
    after = [int(n) for n in re.findall(r"collected after: (\d+)", output)]
    assert after[0] >= MANY, output
    # with objects frozen (a forked server's), nothing is unfrozen, and the young collections
    # take the compile's objects as before
    assert "still frozen: True" in output, output
    assert [c for generation, c in collections("frozen") if c >= MANY and generation < 2], output
    assert after[1] < MANY, output


# The kernels of one memory shape only (cpu/kernels.py): a call compiles its own shape's alone;
# and of the statistics' copies (stats.by_width) its dtype's alone, the one-pass one for float32.
ROWS_KERNELS = {"rows_chunk_stats_one_pass", "rows_chunk_sums", "rows_affine", "rows_dx"}
PLANES_KERNELS = {"plane_segment_stats", "plane_segment_sums", "affine_planes", "affine_range",
                  "dx_planes", "dx_range"}  # fmt: skip
# A child that prints, after each call, the functions Numba compiled for it, and the qualified
# names of the overloads' implementations among them (NumPy's and Python's functions).
COMPILED = """
import numpy as np, numba_bn as nbn
from numba.core import event
names, overloads = [], []
class Listener(event.Listener):
    def on_start(self, ev):
        function = ev.data["dispatcher"].py_func
        names.append(function.__name__)
        if ".<locals>." in function.__qualname__: overloads.append(function.__qualname__)
    def on_end(self, ev): pass
event.register("numba:compile", Listener())
def compiled(label):
    print(label, sorted(set(names))); names.clear()
    print(label.rstrip(":"), "overloads:", sorted(set(overloads))); overloads.clear()
"""
# Overloads whose implementations compiled as functions of their own, once per set of the
# caller's options or argument types (~25-85 ms each), which the kernels no longer call
# (stats.imin, imax, overflow_limit and empty), and Numba's allocator, which the serial twins
# (without Numba's runtime: drivers.twins) no longer call either
NOT_COMPILED = ("ol_min.", "ol_max.", "ol_np_finfo.", "generate_xinfo_body.", "ol_np_empty.",
                "_ol_array_allocate.")  # fmt: skip


def test_each_driver_of_a_training_step_announces_itself_once(tmp_path):
    code = COMPILED + (
        "x = np.ones((64, 32), np.float32)\n"
        "y, m, s = nbn.forward_train(x); nbn.backward(y, x, m, s); nbn.forward_train(x)\n"
        "nbn.backward(y, x, m, s); compiled('rows:')\n"
        "x = np.ones((2, 3, 5), np.float32)\n"
        "nbn.forward_eval(x, np.zeros(3, np.float32), np.ones(3, np.float32))\n"
        "compiled('planes:')\n"
        "from numba import njit\n"
        "njit(lambda: np.empty(1))(); compiled('probe:')\n"  # an overload the listener sees
        "print('done')"
    )
    output, seconds = _run(code, tmp_path)
    print(f"cold forward_train + backward (rows), forward_eval (planes): {seconds:.1f} s\n{output}")
    lines = LINE.findall(output)
    assert len(lines) == 3, output
    assert "forward_train (split, rows, float32, serial twin)" in lines[0]
    assert "backward (split, rows, float32, serial twin)" in lines[1]
    assert "forward_eval (planes, float32, serial twin)" in lines[2]
    # a driver is compiled for one memory shape: the other's kernels are not compiled with it
    rows = set(eval(re.search(r"^rows: (.*)$", output, re.MULTILINE).group(1)))
    planes = set(eval(re.search(r"^planes: (.*)$", output, re.MULTILINE).group(1)))
    assert ROWS_KERNELS <= rows and not rows & PLANES_KERNELS, rows
    assert {"affine_planes", "affine_range"} & planes and not planes & ROWS_KERNELS, planes
    assert not {name for name in rows | planes if name.endswith("_two_pass")}, output
    for memory in ("rows", "planes", "probe"):
        overloads = eval(re.search(rf"^{memory} overloads: (.*)$", output, re.MULTILINE).group(1))
        if memory == "probe":  # the listener sees them: np.empty's and the allocator
            seen = {name.split(".")[0] for name in overloads}
            assert seen >= {"ol_np_empty", "_ol_array_allocate"}, output
        else:
            assert not [name for name in overloads if name.startswith(NOT_COMPILED)], output


def test_a_batch_compiles_the_statistics_copy_of_its_dtype_alone(tmp_path):
    """stats.by_width: the statistics kernels' float32 (one-pass) and float64 (two-pass) bodies
    are copies of their own, and a batch's drivers compile its dtype's copy alone."""
    code = COMPILED + (
        "nbn.forward_train(np.ones((8, 16, 8, 8), np.float32)); compiled('float32:')\n"
        "nbn.forward_train(np.ones((64, 32), np.float64)); compiled('float64:')\n"
        "print('done')"
    )
    output, _ = _run(code, tmp_path, NUMBA_BN_COMPILE_AHEAD="0")
    narrow = set(eval(re.search(r"^float32: (.*)$", output, re.MULTILINE).group(1)))
    wide = set(eval(re.search(r"^float64: (.*)$", output, re.MULTILINE).group(1)))
    assert "runs_stats_one_pass" in narrow, output  # planes
    assert "rows_chunk_stats_two_pass" in wide, output  # rows
    assert not {name for name in narrow if name.endswith("_two_pass")}, output
    assert not {name for name in wide if name.endswith("_one_pass")}, output


def test_warmup_cli_prints_a_line_per_step_then_loads_from_the_cache(tmp_path, monkeypatch):
    """The first run compiles in two worker processes (--jobs 2), a line per step as it ends;
    the second, in this process, loads every driver they compiled, a line per step in the
    plan's order."""
    command = [sys.executable, "-m", "numba_bn", "warmup", "--dtype", "float32", "--distributed",
               "--norms"]  # fmt: skip
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "1"}  # serial twins only
    monkeypatch.setattr(numba, "get_num_threads", lambda: 1)  # the child's plan
    expected = [label(*step).split() for step in plan((np.float32,), distributed=True, norms=True)]
    assert all(step[-1] == ("-" if step[0] == "fronts" else "serial") for step in expected)
    assert [op for op, _ in NORM_OPERATIONS] == [" ".join(s[:2]) for s in expected[-4:]]
    outcomes = []
    for jobs in (2, 1):
        status, output = run_child([*command, "--jobs", str(jobs)], env)
        print(output)
        assert status == 0, output
        steps = [name.split() for name, _, _ in STEP.findall(output)]
        # workers report steps as they end: a group's in the plan's order, groups as they end
        assert steps == expected if jobs == 1 else sorted(steps) == sorted(expected), output
        assert ("in 2 worker processes" in output) == (jobs == 2), output
        assert f"machine code cached in {tmp_path}" in output, output
        assert not LINE.findall(output), output  # the step lines replace the compile lines
        outcomes.append({outcome for _, _, outcome in STEP.findall(output)})
    # a worker may load what the other saved first (a driver two groups call)
    assert "compiled" in outcomes[0]
    assert "from cache" in outcomes[1] and "compiled" not in outcomes[1]
    # a program's calls then compile nothing, their fronts (a shape's third call) included
    status, output = run_child([sys.executable, "-c", PLAIN_CALLS], env)
    assert status == 0 and "done" in output and not LINE.findall(output), output


# Every plain call of a training loop and its eval, functional and layer, four times on an
# MLP's batch and a feature map (a front serves each from its third call)
PLAIN_CALLS = """
import numpy as np, numba_bn as nbn
for shape in ((64, 32), (8, 16, 8, 8)):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    running_mean, running_var = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    layer = nbn.BatchNorm(shape[1])
    for _ in range(4):
        y, mean, invstd = nbn.forward_train(x)
        nbn.backward(x, x, mean, invstd)
        nbn.forward_eval(x, running_mean, running_var)
        nbn.batch_norm(x, running_mean, running_var, training=True)
        layer.train(), layer(x), layer.backward(x), layer.eval(), layer(x)
print("done")
"""


def test_groups_give_each_driver_to_one_worker_and_keep_the_plans_order():
    steps = plan((np.float32, np.float64), distributed=True, norms=True)
    parts = groups(steps)
    assert sorted(step for part in parts for step in part) == sorted(steps)
    owner = {}
    for number, part in enumerate(parts):
        assert part == [step for step in steps if step in part]  # the plan's order
        for _, dtype, layout, twin in part:
            memory = "planes" if layout == "fused" else layout  # one forward_eval, split drivers
            assert owner.setdefault((dtype, memory, twin), number) == number
    parallel = [part[0][3] == "parallel" for part in parts]
    assert parallel == sorted(parallel, reverse=True)  # the slower compiles first


def test_with_numbas_cache_off_the_jobs_steps_run_in_this_process(monkeypatch):
    """Workers would compile into nothing: the steps run here, where their drivers stay."""
    from numba_bn import compiling

    warmup = importlib.import_module("numba_bn.warmup")  # the module (nbn.warmup: the function)

    def no_workers(*args):
        raise AssertionError("workers started with Numba's cache off")

    monkeypatch.setattr(compiling, "cache_path", lambda: None)
    monkeypatch.setattr(warmup, "_run_in_workers", no_workers)
    steps = [("forward_train", "float64", "rows", "serial"),
             ("forward_eval", "float64", "rows", "serial")]  # fmt: skip
    assert [step[:4] for step in warmup.run_steps(steps, jobs=2).steps] == steps
    dispatcher = drivers.driver("forward_eval", ROWS)[1]
    assert numba.float64 in {sig[0].dtype for sig in dispatcher.signatures}


def test_warmup_takes_jobs_as_an_int_of_one_or_more():
    for jobs in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="jobs must be an int >= 1"):
            nbn.warmup(jobs=jobs)
    status, output = run_child([sys.executable, "-m", "numba_bn", "warmup", "--jobs", "0"])
    assert status == 2 and "expected an integer >= 1, got '0'" in output, output


def test_warmup_returns_the_total_and_a_step_each():
    timings = nbn.warmup((np.float32,))
    assert np.isfinite(timings) and timings == sum(step.seconds for step in timings.steps)
    assert [step[:4] for step in timings.steps] == plan((np.float32,))
    for step in timings.steps:
        print(step.line())
    twins = (1, 0) if numba.get_num_threads() > 1 else (1,)  # serial, parallel
    for name, memory in [
        ("forward_train_split", ROWS), ("forward_train_split", PLANES),
        ("forward_train_split", SHORT), ("forward_train_fused", ANY), ("backward_split", ROWS),
        ("backward_split", PLANES), ("backward_split", SHORT), ("backward_fused", ANY),
        ("forward_eval", ROWS), ("forward_eval", PLANES), ("forward_eval", SHORT),
    ]:  # fmt: skip
        # a serial fused driver runs only with one thread (items.FUSED_SERIAL_MIN_ELEMENTS)
        for twin in twins[-1:] if name.endswith("fused") else twins:
            dispatcher = drivers.driver(name, memory)[twin]
            assert numba.float32 in {sig[0].dtype for sig in dispatcher.signatures}, name


NORM_CALLS = """
from numba_bn.warmup import NORM_OPERATIONS, plan, run_steps
operations = [operation for operation, _ in NORM_OPERATIONS]
timings = run_steps([s for s in plan((np.float32,), norms=True) if s[0] in operations])
print("sources:", [step.source for step in timings.steps])
compiled("warmup:")
rng = np.random.default_rng(1)
x = (rng.standard_normal((3, 6, 7, 5)) + 2).astype(np.float32)
w, b = np.ones(6, np.float32), np.zeros(6, np.float32)
y, m, s = nbn.group_norm_forward(x, 3, w, b); nbn.group_norm_backward(y, x, m, s, 3, w)
y, m, s = nbn.layer_norm_forward(x, (7, 5)); nbn.layer_norm_backward(y, x, m, s, (7, 5))
rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
y, m, s = nbn.instance_norm_forward(x, rm, rv, w, b); nbn.instance_norm_backward(y, x, m, s, w)
layer = nbn.GroupNorm(2, 6); layer(x); layer.backward(x)
nbn.instance_norm(x[0], spatial_dims=2)
compiled("calls:")
print("done")
"""


def test_warmed_up_norms_compile_nothing_on_their_first_calls(tmp_path):
    """run_steps of the norms' steps (``numba-bn warmup --norms`` runs them after batch norm's)
    compiles their drivers; the calls of every norm, function and layer, then compile nothing."""
    output, seconds = _run(COMPILED + NORM_CALLS, tmp_path, NUMBA_NUM_THREADS="1")
    print(f"cold norms warm-up and calls: {seconds:.1f} s\n{output}")
    sources = eval(re.search(r"^sources: (.*)$", output, re.MULTILINE).group(1))
    assert sources[0] == "compiled" and "from cache" not in sources, output
    warmed = set(eval(re.search(r"^warmup: (.*)$", output, re.MULTILINE).group(1)))
    drivers = {"_group_forward_serial", "_group_backward_serial", "_layer_forward_serial",
               "_layer_backward_serial"}  # fmt: skip
    assert drivers <= warmed, warmed
    assert re.search(r"^calls: \[\]$", output, re.MULTILINE), output


# every module with a function in CACHED, for a child to eval its name
_CACHED_MODULES = """
import numba_bn.bench.peers, numba_bn.distributed
from numba_bn import stats
from numba_bn.cpu import drivers, threads
from numba_bn.cpu.items import MEMORY_ROWS
"""
_SAVES = """
import sys, time
from pathlib import Path
tag, where, cached = sys.argv[1], Path(sys.argv[2]), eval(sys.argv[3])
cache_file = cached._cache._cache_file
(where / tag).touch()
while not ((where / "a").exists() and (where / "b").exists()):  # the other process is ready
    time.sleep(0.001)
for i in range(200):
    cache_file.save((tag, i), (tag, i))
print("done")
"""
_LOADS = """
import sys
cache_file = eval(sys.argv[1])._cache._cache_file
keys = [(tag, i) for tag in "ab" for i in range(200)]
print("not its own:", [key for key in keys if cache_file.load(key) != key])
"""
#: every function numba_bn caches on disk: a driver, and those of stats.py, threads.py,
#: distributed.py and the benchmark
CACHED = [
    "drivers.driver('forward_eval', MEMORY_ROWS)[1]",
    "stats.first_negative",
    "stats.merge_moments",
    "threads._smallest_parallel_function",
    "numba_bn.distributed._merge_ranks",
    "numba_bn.bench.peers.parallel_copy",
]


@pytest.mark.parametrize("cached", CACHED)
def test_two_processes_saving_entries_of_one_function_at_once_keep_each_entry_its_own(
    tmp_path, cached
):
    """Two processes add entries (argument types, say) of one cached function to Numba's cache
    at the same time, as `numba-bn warmup --jobs` or two jobs on one NUMBA_CACHE_DIR do. Numba's
    unlocked save lost 112 of these 400 entries of a driver and pointed 27 at another entry's
    data (machine code of other types, in a real save) before codecache.lock_cache_saves; the
    functions of stats.py (the float32 and float64 first_negative of two warm-up workers), and
    the others cached on disk, saved unlocked until stop 43."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    saves = [sys.executable, "-c", _CACHED_MODULES + _SAVES]
    children = [start_child([*saves, tag, tmp_path, cached], env) for tag in "ab"]
    for child in children:
        status, output = finish_child(child, timeout=300)
        assert status == 0 and "done" in output, output
    status, output = run_child([sys.executable, "-c", _CACHED_MODULES + _LOADS, cached], env)
    assert status == 0 and "not its own: []" in output, output[-2000:]
