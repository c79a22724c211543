"""Compile ahead (numba_bn/ahead.py): a first forward_train's compile starts a worker process
that compiles the same batch's backward and eval drivers into the on-disk cache, and this
process loads them instead of compiling them itself.

The rest of the suite runs with it off (conftest.py); here children turn it on, each with an
empty NUMBA_CACHE_DIR of its own. Times are printed, not asserted.
"""

import os
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest
from numba.core.dispatcher import Dispatcher

from numba_bn import ahead

import naive
from conftest import run_child

SHAPE = (8, 16, 8, 8)  # planes, the serial twins
PARALLEL_SHAPE = (256, 512)  # rows; every step runs its parallel twin on 2 threads
# a second Python thread keeps the worker from being a fork of the process (ahead._may_fork)
SECOND_THREAD = """
import threading
threading.Thread(target=threading.Event().wait, daemon=True).start()
"""


def training_step(shape=SHAPE, second_thread=False):
    """A child's code: forward_train, backward and forward_eval of a float32 batch of ``shape``,
    the compiles recorded; it saves inputs and outputs in argv[1]."""
    return (
        (SECOND_THREAD if second_thread else "")
        + f"""
import sys, time
import numpy as np, numba_bn as nbn
from numba_bn import compiling
rng = np.random.default_rng(5)
x = (rng.standard_normal({shape}) * 3 + 2).astype(np.float32)
dy = (rng.standard_normal({shape}) - 0.5).astype(np.float32)
start = time.perf_counter()
with compiling.recording() as compiled:
    y, mean, invstd = nbn.forward_train(x)
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
    y_eval = nbn.forward_eval(x, mean, 1 / invstd**2)
print("seconds:", round(time.perf_counter() - start, 2))
np.savez(sys.argv[1], x=x, dy=dy, y=y, mean=mean, invstd=invstd, dx=dx, dweight=dweight,
         dbias=dbias, y_eval=y_eval)
print("compiled:", ",".join(name for name, _ in compiled))
"""
    )


# the fused layer, y = relu(BN(x) + residual): its backward runs through the ReLU
FUSED_LAYER_STEP = f"""
import sys
import numpy as np, numba_bn as nbn
from numba_bn import compiling
rng = np.random.default_rng(6)
x = (rng.standard_normal({SHAPE}) * 3 + 2).astype(np.float32)
skip = rng.standard_normal({SHAPE}).astype(np.float32)
dy = (rng.standard_normal({SHAPE}) - 0.5).astype(np.float32)
bn = nbn.BatchNorm({SHAPE[1]}, activation="relu")
with compiling.recording() as compiled:
    y = bn(x, residual=skip)
    dx = bn.backward(dy)
    bn.eval()
    y_eval = bn(x, residual=skip)
np.savez(sys.argv[1], y=y, dx=dx, dskip=bn.grad_residual, dweight=bn.grad_weight,
         dbias=bn.grad_bias, y_eval=y_eval)
print("compiled:", ",".join(name for name, _ in compiled))
"""
# a norm's forward then its backward (group norm in 4 groups of (8, 16, 8, 8); layer norm over
# the last two axes)
NORM_STEP = """
import sys
import numpy as np, numba_bn as nbn
from numba_bn import compiling
rng = np.random.default_rng(7)
x = (rng.standard_normal((8, 16, 8, 8)) * 3 + 2).astype(np.float32)
dy = (rng.standard_normal((8, 16, 8, 8)) - 0.5).astype(np.float32)
with compiling.recording() as compiled:
    if "{norm}" == "group":
        y, mean, invstd = nbn.group_norm_forward(x, 4)
        dx, dweight, dbias = nbn.group_norm_backward(dy, x, mean, invstd, 4)
    else:
        y, mean, invstd = nbn.layer_norm_forward(x, (8, 8))
        dx, dweight, dbias = nbn.layer_norm_backward(dy, x, mean, invstd, (8, 8))
np.savez(sys.argv[1], y=y, mean=mean, invstd=invstd, dx=dx, dweight=dweight, dbias=dbias)
print("compiled:", ",".join(name for name, _ in compiled))
"""
AHEAD_LINE = re.compile(
    r"^numba_bn: compiling (.*) ahead, in a worker process \(pid \d+, ([^)]*)\) .*$", re.MULTILINE
)


def _against_naive(run, step="", sums_atol=1e-3):
    """A child's training step (its saved x, dy and outputs, named with ``step`` after them)
    against tests/naive.py: forward_train, backward, and the eval on the step's statistics.
    ``sums_atol``: dweight's and dbias's (sums over the batch)."""
    x, dy = run["x"].astype(np.float64), run["dy"].astype(np.float64)
    y, mean, invstd = naive.forward_train(x)
    dx, dweight, dbias = naive.backward(dy, x)
    np.testing.assert_allclose(run["y" + step], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run["mean" + step], mean, rtol=1e-6)
    np.testing.assert_allclose(run["invstd" + step], invstd, rtol=1e-6)
    var = 1 / run["invstd" + step].astype(np.float64) ** 2  # as the child passed it
    y_eval = naive.forward(x, run["mean" + step], var)
    np.testing.assert_allclose(run["y_eval" + step], y_eval, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run["dx" + step], dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run["dweight" + step], dweight, rtol=1e-4, atol=sums_atol)
    np.testing.assert_allclose(run["dbias" + step], dbias, rtol=1e-4, atol=sums_atol)


def _training_step(tmp_path, name, compile_ahead, code=None):
    cache, out = tmp_path / f"cache_{name}", tmp_path / f"{name}.npz"
    env = {"NUMBA_CACHE_DIR": str(cache), "NUMBA_BN_QUIET": "", ahead.ENVIRONMENT: compile_ahead}
    code = training_step() if code is None else code
    status, output = run_child([sys.executable, "-c", code, out], env, timeout=300)
    assert status == 0, output
    print(f"compile ahead {compile_ahead}:\n{output}")
    compiled = re.search(r"^compiled: (.*)$", output, re.MULTILINE).group(1).split(",")
    return output, compiled, dict(np.load(out))


@pytest.mark.parametrize("how", ["forked", "a new interpreter"])
def test_a_first_training_step_compiles_its_backward_and_eval_in_a_worker(tmp_path, how):
    code = training_step(second_thread=how == "a new interpreter")
    output, compiled, ahead_run = _training_step(tmp_path, "ahead", "1", code)
    assert compiled == ["forward_train_split_planes_serial"], output
    ((what, started),) = AHEAD_LINE.findall(output)
    assert started == how
    assert "backward (split, planes, float32, serial twin)" in what
    assert "forward_eval (planes, float32, serial twin)" in what
    assert f"cached in {tmp_path / 'cache_ahead'}" in output

    output, compiled, here = _training_step(tmp_path, "here", "0", code)
    assert compiled == [
        "forward_train_split_planes_serial",
        "backward_split_planes_serial",
        "forward_eval_planes_serial",
    ], output
    assert not AHEAD_LINE.search(output)
    for name, value in here.items():  # the worker's machine code is this process's, bit for bit
        np.testing.assert_array_equal(ahead_run[name], value, err_msg=name)

    _against_naive(ahead_run)


def test_the_fused_layers_training_step_compiles_its_relu_backward_and_eval_in_a_worker(tmp_path):
    output, compiled, ahead_run = _training_step(tmp_path, "ahead", "1", FUSED_LAYER_STEP)
    assert compiled == ["forward_train_split_planes_epilogue3_serial"], output
    ((line, started),) = AHEAD_LINE.findall(output)
    assert started == "forked"
    assert "backward (split, planes, float32, serial twin)" in line
    assert "relu_grad (float32, serial twin)" in line
    assert "forward_eval (planes, float32, serial twin, + residual + ReLU)" in line
    output, compiled, here = _training_step(tmp_path, "here", "0", FUSED_LAYER_STEP)
    assert len(compiled) == 4 and not AHEAD_LINE.search(output), output
    for name, value in here.items():
        np.testing.assert_array_equal(ahead_run[name], value, err_msg=name)


# the eval first: Numba's thread pool runs (OpenMP's here) when the forward forks its worker
POOL_THEN_STEP = f"""
import os, sys, time
import numpy as np, numba_bn as nbn
from numba_bn import ahead, compiling
rng = np.random.default_rng(3)
x = (rng.standard_normal({PARALLEL_SHAPE}) * 3 + 2).astype(np.float32)
dy = (rng.standard_normal({PARALLEL_SHAPE}) - 0.5).astype(np.float32)
running_mean, running_var = x.mean(axis=0) + 0.5, x.var(axis=0) * 2
with compiling.recording() as compiled:
    y_eval = nbn.forward_eval(x, running_mean, running_var)
    y, mean, invstd = nbn.forward_train(x)
    (worker,) = ahead._workers
    dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
while not worker.done():
    time.sleep(0.05)
print("worker's exit status:", os.waitstatus_to_exitcode(worker.status))
with compiling.recording() as after:
    y2, mean2, invstd2 = nbn.forward_train(x)
    dx2, dweight2, dbias2 = nbn.backward(dy, x, mean2, invstd2)
np.savez(sys.argv[1], x=x, dy=dy, y_eval=y_eval, running_mean=running_mean,
         running_var=running_var, dx=dx, dweight=dweight, dbias=dbias, y=y, mean=mean,
         invstd=invstd, y2=y2, mean2=mean2, invstd2=invstd2, dx2=dx2, dweight2=dweight2,
         dbias2=dbias2)
print("compiled:", ",".join(name for name, _ in compiled))
print("compiled after the worker:", ",".join(name for name, _ in after))
"""


def test_a_forked_worker_compiles_parallel_twins_without_running_them(tmp_path):
    """The copy has none of the parent's running thread pool: its parallel twins compile and do
    not run (cpu.compile_only; run there, OpenMP's pool ended the copy with -15); the parent
    runs the serial twins meanwhile, then loads the parallel ones and runs them."""
    output, compiled, run = _training_step(tmp_path, "ahead", "1", POOL_THEN_STEP)
    assert compiled == ["forward_eval_rows", "forward_train_split_rows_serial"], output
    ((what, started),) = AHEAD_LINE.findall(output)
    assert started == "forked" and what.startswith("backward (split, rows, float32, serial")
    assert ", then forward_train (split, rows, float32, parallel twin)" in what
    assert "backward (split, rows, float32, parallel twin)" in what
    assert "forward_eval (rows, float32, parallel" not in what  # run here already
    assert "worker's exit status: 0" in output
    assert re.search(r"^compiled after the worker: $", output, re.MULTILINE), output  # loaded
    for name in ("y", "mean", "invstd", "dx", "dweight", "dbias"):  # the twins' bits agree
        np.testing.assert_array_equal(run[name], run[name + "2"], err_msg=name)
    x, dy = run["x"].astype(np.float64), run["dy"].astype(np.float64)
    dx, dweight, dbias = naive.backward(dy, x)
    np.testing.assert_allclose(run["dx"], dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run["dweight"], dweight, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(run["dbias"], dbias, rtol=1e-4, atol=1e-2)
    y_eval = naive.forward(x, run["running_mean"], run["running_var"])
    np.testing.assert_allclose(run["y_eval"], y_eval, rtol=1e-5, atol=1e-5)


# a first training step of a batch that runs on threads, then the steps after the worker
TIERED_STEP = f"""
import sys
import numpy as np, numba_bn as nbn
from numba_bn import ahead, compiling, cpu
from numba_bn.cpu import drivers
rng = np.random.default_rng(4)
x = (rng.standard_normal({PARALLEL_SHAPE}) * 3 + 2).astype(np.float32)
dy = (rng.standard_normal({PARALLEL_SHAPE}) - 0.5).astype(np.float32)
forward = cpu._driver("forward_train", x.reshape(*x.shape, 1), 2)[0]
print("cached before:", drivers.cached_for(forward, x.dtype))
lock = ahead.tiers_lock(forward, x.dtype)
outputs = {{}}
for step in (1, 2, 3):
    with compiling.recording() as compiled:
        y, mean, invstd = nbn.forward_train(x)
        dx, dweight, dbias = nbn.backward(dy, x, mean, invstd)
        y_eval = nbn.forward_eval(x, mean, 1 / invstd**2)
    outputs.update({{f"{{name}}{{step}}": value for name, value in dict(
        y=y, mean=mean, invstd=invstd, dx=dx, dweight=dweight, dbias=dbias, y_eval=y_eval
    ).items()}})
    # (a shape's third call compiles the fronts: numba_bn/cpu/fronts.py, not a driver)
    print(f"step {{step}} compiled:", ",".join(
        name for name, _ in compiled if not name.startswith("front ")))
    runs = [plan[threads][0] for plan in cpu._PLANS.values() if type(plan) is dict
            for threads in plan]
    runs = [getattr(run, "rule", run) for run in runs]  # a race's: the cost model's twin
    print(f"step {{step}} runs:", ",".join(sorted(
        getattr(run, "__wrapped__", run).__name__ for run in runs)))
    print(f"step {{step}} lock held:", ahead.held_elsewhere(lock))
    ahead.settle()
print("cached after:", drivers.cached_for(forward, x.dtype))
np.savez(sys.argv[1], x=x, dy=dy, **outputs)
print("compiled: -")
"""


def test_a_first_step_on_threads_runs_the_serial_twins_while_a_worker_compiles_the_parallel(
    tmp_path,
):
    """A batch large enough for threads: its first step compiles what a small batch's does (the
    serial forward here, the serial backward and eval in the worker), runs on them, and the
    steps after the worker has ended load the parallel twins it compiled, with the same bits."""
    output, _, run = _training_step(tmp_path, "ahead", "1", TIERED_STEP)
    assert "cached before: False" in output and "cached after: True" in output
    ((what, started),) = AHEAD_LINE.findall(output)
    assert started == "forked"
    assert what == (
        "backward (split, rows, float32, serial twin) and forward_eval (rows, float32, serial "
        "twin), then forward_train (split, rows, float32, parallel twin), backward (split, rows, "
        "float32, parallel twin) and forward_eval (rows, float32, parallel twin)"
    )
    assert "while this one runs the serial twins (the same results)" in output
    assert "step 1 compiled: forward_train_split_rows_serial\n" in output
    assert "step 1 runs: \n" in output  # no plan kept: each call looks again
    assert "step 1 lock held: True" in output  # by the worker, still compiling
    assert "step 2 lock held: False" in output
    assert "step 2 compiled: \n" in output and "step 3 compiled: \n" in output  # loaded
    assert "step 3 runs: _backward_split_rows,_forward_eval_rows,_forward_train_split_rows" in (
        output
    )
    for name in ("y", "mean", "invstd", "dx", "dweight", "dbias", "y_eval"):
        for step in "23":
            np.testing.assert_array_equal(run[name + "1"], run[name + step], err_msg=name)
    _against_naive(run, "1", sums_atol=1e-2)


COMPILE_ONLY = """
import numba, numpy as np
from numba import types
from numba_bn import cpu
from numba_bn.cpu import threads

@numba.njit(parallel=True)
def fill(a, value):
    for i in numba.prange(a.size):
        a[i] = value

x = np.random.default_rng(0).standard_normal((8, 16, 64)).astype(np.float32)
none, y, buffer = np.empty(0, np.float32), np.empty_like(x), np.ones(16, np.float32)
for _ in range(2):  # a plan made before (the first, whose call compiles, is not kept)
    run, _ = cpu._plan("forward_eval", x)
    run(x, none, none, buffer, buffer, 1e-5, y, x)
assert cpu._PLANS
cpu.compile_only()
assert not cpu._PLANS
a = np.zeros(10)
assert threads.launcher(fill)(a, 1.0) is None
assert (a == 0).all(), a
assert fill.signatures == [(types.Array(types.float64, 1, "C"), types.float64)], fill.signatures
print("ok")
"""


def test_compile_only_compiles_parallel_twins_and_runs_nothing(tmp_path):
    status, output = run_child([sys.executable, "-c", COMPILE_ONLY],
                               {"NUMBA_CACHE_DIR": str(tmp_path)}, timeout=300)  # fmt: skip
    assert status == 0 and "ok" in output, output


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_a_norms_first_forward_compiles_its_backward_in_a_worker(tmp_path, norm):
    code = NORM_STEP.replace("{norm}", norm)
    output, compiled, ahead_run = _training_step(tmp_path, "ahead", "1", code)
    assert compiled == [f"{norm}_forward_serial"], output
    ((line, started),) = AHEAD_LINE.findall(output)
    assert line.startswith(f"{norm}_backward (float32, serial twin)") and started == "forked"
    output, compiled, here = _training_step(tmp_path, "here", "0", code)
    assert compiled == [f"{norm}_forward_serial", f"{norm}_backward_serial"], output
    for name, value in here.items():
        np.testing.assert_array_equal(ahead_run[name], value, err_msg=name)


# --------------------------------------------------------------------------- when it is on
@pytest.fixture
def two_cpus(monkeypatch):
    """Two CPUs, one of them idle half the time, and NUMBA_BN_COMPILE_AHEAD unset."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0.5, 0.5))
    monkeypatch.delenv(ahead.ENVIRONMENT, raising=False)


def test_it_is_on_by_default_with_two_cpus_and_a_load_of_1_5(two_cpus):
    assert ahead.enabled()


def test_a_busy_machine_turns_it_off_unless_the_environment_says_always(two_cpus, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 0.5, 0.5))
    assert not ahead.enabled()
    monkeypatch.setenv(ahead.ENVIRONMENT, "1")
    assert ahead.enabled()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert ahead.enabled()


@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_the_environment_turns_it_off(two_cpus, monkeypatch, value):
    monkeypatch.setenv(ahead.ENVIRONMENT, value)
    assert not ahead.enabled()


def test_one_cpu_an_mpi_rank_an_embedding_program_and_warmup_turn_it_off(two_cpus, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert not ahead.enabled()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "mpi4py.MPI", object())
        assert not ahead.enabled()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "executable", "/opt/app/bin/blender")
        assert not ahead.enabled()
    with ahead.off():
        assert not ahead.enabled()
    assert ahead.enabled()


def test_status_says_what_a_first_compile_does_here_and_why(two_cpus, monkeypatch):
    monkeypatch.setattr(ahead, "_may_fork", lambda: True)
    assert ahead.status() == "in a forked worker"
    monkeypatch.setattr(ahead, "_may_fork", lambda: False)
    assert ahead.status() == "in a new interpreter"
    monkeypatch.setattr(os, "getloadavg", lambda: (1.75, 0.5, 0.5))
    assert ahead.status() == "off (the machine is busy: load 1.75 on 2 CPUs)"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert ahead.status() == "off (one CPU)"
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", object())
    assert ahead.status() == "off (an MPI rank)"
    monkeypatch.setenv(ahead.ENVIRONMENT, "off")
    assert ahead.status() == "off (NUMBA_BN_COMPILE_AHEAD=off)"
    with ahead.off():
        assert ahead.status() == "off (inside numba-bn warmup)"


def test_a_compile_of_another_driver_starts_no_worker(two_cpus, monkeypatch):
    forward, other = object(), object()
    request = ((8, 16, 64), "float32", 1, "batch_norm 0", ())
    monkeypatch.setattr(ahead, "_expected", [(forward, request)])
    monkeypatch.setattr(ahead, "_start", lambda *args: pytest.fail("a worker started"))
    assert ahead.started(other, "float32", describe=None) is None
    assert ahead._expected[0][0] is forward  # still expected: the forward has not compiled
    with ahead.off():
        assert ahead.started(forward, "float32", describe=None) is None
    assert ahead._expected[0] is None  # a compile consumes what was expected, on or off


def test_a_compile_of_the_forward_for_another_dtype_starts_no_worker(two_cpus, monkeypatch):
    """A plan serves every dtype: one noted for float32 whose driver then compiles for float64
    (the float32 one came from the cache) has siblings of the wrong dtype to compile."""
    forward = object()
    request = ((8, 16, 64), "float32", 1, "batch_norm 0", ())
    monkeypatch.setattr(ahead, "_expected", [(forward, request)])
    monkeypatch.setattr(ahead, "_start", lambda *args: pytest.fail("a worker started"))
    assert ahead.started(forward, "float64", describe=None) is None
    assert ahead._expected[0] is None


# ------------------------------------------------------------------ waiting for the worker
def _sleeper(seconds):
    """A child process that sleeps (a stand-in for a worker)."""
    code = f"import time; time.sleep({seconds})"
    return os.posix_spawn(sys.executable, [sys.executable, "-c", code], os.environ)


@pytest.fixture
def worker(monkeypatch):
    """A sleeping worker registered as compiling ``compiled``; killed afterwards."""
    workers = []
    monkeypatch.setattr(ahead, "_workers", workers)

    def start(seconds, compiled, deadline_s=30.0):
        started = ahead.Worker(_sleeper(seconds), frozenset(map(id, compiled)),
                               time.monotonic() + deadline_s)  # fmt: skip
        workers.append(started)
        return started

    yield start
    for started in workers:
        if not started.done():
            os.kill(started.pid, 9)
            os.waitpid(started.pid, 0)


def test_a_load_waits_until_the_worker_has_saved_the_entry(worker):
    dispatcher, loads = object(), []
    running = worker(30, [dispatcher])

    def load():
        loads.append(time.monotonic())
        return "entry" if len(loads) >= 4 else None

    start = time.monotonic()
    assert ahead.wait_for(dispatcher, load) == "entry"
    assert len(loads) == 4 and time.monotonic() - start < 5
    assert not running.done()  # it returned as soon as the entry was there


def test_a_load_of_a_driver_the_worker_does_not_compile_does_not_wait(worker):
    worker(30, [object()])
    start = time.monotonic()
    assert ahead.wait_for(object(), lambda: None) is None
    assert time.monotonic() - start < 0.5


def test_a_load_looks_again_once_the_worker_has_ended_and_forgets_it(worker):
    dispatcher = object()
    running = worker(0.2, [dispatcher])
    assert ahead.wait_for(dispatcher, lambda: "entry" if running.status is not None else None) == (
        "entry"
    )
    assert ahead._workers == []


def test_a_load_stops_waiting_at_the_workers_deadline(worker):
    dispatcher = object()
    worker(30, [dispatcher], deadline_s=0.3)
    start = time.monotonic()
    assert ahead.wait_for(dispatcher, lambda: None) is None  # then the driver compiles here
    assert time.monotonic() - start < 5


def test_settle_waits_for_every_worker_and_forgets_them(worker):
    running = [worker(0.3, [object()]), worker(0.1, [])]
    ahead.settle()
    assert all(started.status is not None for started in running)
    assert ahead._workers == []


class _Dispatcher:
    def __init__(self, name, compiled):
        self.name, self.overloads = name, {"sig": None} if compiled else {}


@pytest.fixture
def siblings(two_cpus, monkeypatch):
    """A forward expected with two siblings, its eval compiled here; no workers yet."""
    monkeypatch.setattr(ahead, "_workers", [])
    monkeypatch.setenv("NUMBA_BN_QUIET", "")
    forward = object()
    backward, evaluate = _Dispatcher("backward", False), _Dispatcher("forward_eval", True)
    request = ((8, 16, 64), "float32", 2, "batch_norm 3", (backward, evaluate))
    monkeypatch.setattr(ahead, "_expected", [(forward, request)])
    return forward, backward


def _start(forward, backward, capsys):
    pid = ahead.started(forward, "float32", lambda d: (f"{d.name} (what)", 3.0))
    (worker,) = ahead._workers
    assert worker.pid == pid and worker.dispatchers == {id(backward)}  # the eval: compiled here
    line = capsys.readouterr().err
    assert "forward_eval" not in line and "about 3 s" in line
    return pid, line


def test_a_new_interpreter_compiles_the_siblings_not_compiled_here_and_says_so(
    siblings, monkeypatch, capsys
):
    spawned = []
    monkeypatch.setattr(ahead, "_may_fork", lambda: False)
    monkeypatch.setattr(os, "posix_spawn", lambda *args, **kw: spawned.append(args) or 999_999)
    pid, line = _start(*siblings, capsys)
    ((executable, argv, env),) = spawned
    assert argv[-4:] == ["8x16x64", "float32", "2", "batch_norm 3"]
    assert env[ahead.ENVIRONMENT] == "0"
    assert pid == 999_999
    assert (
        "compiling backward (what) ahead, in a worker process (pid 999999, a new interpreter)"
        in (line)
    )


def test_a_copy_of_this_process_is_the_worker_where_it_may_be(siblings, monkeypatch, capsys):
    monkeypatch.setattr(ahead, "_may_fork", lambda: True)
    monkeypatch.setattr(os, "fork", lambda: 888_888)  # (this process is the parent)
    monkeypatch.setattr(os, "posix_spawn", lambda *args, **kw: pytest.fail("spawned"))
    pid, line = _start(*siblings, capsys)
    assert pid == 888_888
    assert "compiling backward (what) ahead, in a worker process (pid 888888, forked)" in line


def test_a_refused_fork_starts_a_new_interpreter(siblings, monkeypatch, capsys):
    def refuse():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(ahead, "_may_fork", lambda: True)
    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(os, "posix_spawn", lambda *args, **kw: 777_777)
    pid, line = _start(*siblings, capsys)
    assert pid == 777_777 and "(pid 777777, a new interpreter)" in line


def _sleep(x, seconds):
    time.sleep(float(seconds))


def _fail(x):
    raise RuntimeError("a job that fails")


def _ready_then_sleep(x, path, seconds):
    open(path, "w").close()
    time.sleep(float(seconds))


def test_a_forked_worker_runs_its_job_holding_none_of_this_processs_files(monkeypatch):
    monkeypatch.setitem(ahead.JOBS, "sleep", _sleep)
    monkeypatch.setitem(ahead.JOBS, "fail", _fail)
    read, write = os.pipe()
    try:
        pid = ahead._fork((4, 3), "float32", "sleep 3")
        os.close(write)
        start = time.monotonic()
        assert os.read(read, 1) == b""  # at once: the copy holds no end of the pipe
        assert time.monotonic() - start < 2
    finally:
        os.close(read)
    assert os.waitpid(pid, 0)[1] == 0  # it ran the job and ended
    failed = ahead._fork((4, 3), "float32", "fail")
    assert os.waitstatus_to_exitcode(os.waitpid(failed, 0)[1]) == 1


def test_a_forked_worker_runs_none_of_this_processs_signal_handlers(monkeypatch, tmp_path):
    """A training script's handler (a checkpoint on SIGTERM, say) must not run in the copy."""
    monkeypatch.setitem(ahead.JOBS, "ready", _ready_then_sleep)
    ran, ready = tmp_path / "handler ran", tmp_path / "ready"
    previous = signal.signal(signal.SIGUSR1, lambda *args: ran.touch())
    try:
        pid = ahead._fork((4, 3), "float32", f"ready {ready} 30")
        while not ready.exists():  # the copy is in its job
            time.sleep(0.01)
        os.kill(pid, signal.SIGUSR1)
        status = os.waitpid(pid, 0)[1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGUSR1  # the default action: it ended
    assert not ran.exists()


def test_it_forks_on_linux_with_one_python_thread(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert ahead._may_fork()
    hold = threading.Event()
    second = threading.Thread(target=hold.wait)
    second.start()
    try:
        assert not ahead._may_fork()  # it could hold a lock the copy would wait on for ever
    finally:
        hold.set()
        second.join()
    assert ahead._may_fork()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not ahead._may_fork()


# ------------------------------------------------- parallel twins behind serial ones (tiers)
@pytest.fixture
def tiers(two_cpus, worker, monkeypatch):
    """The CPU backend planning a rows batch of 524K values on two threads of OpenMP, with no
    driver in memory or in the cache, and a sleeping stand-in for each worker it starts: the
    batch and the (job, serial, twins) each start was given."""
    from numba_bn import cpu

    monkeypatch.setattr(cpu, "_PLANS", {})
    monkeypatch.setattr(cpu, "_TIERED", set())
    monkeypatch.setattr(cpu, "num_threads", lambda: 2)
    monkeypatch.setattr(cpu, "expected_layer", lambda: "omp")
    monkeypatch.setattr(cpu, "_omp_threads_sleep_here", lambda: False)
    monkeypatch.setattr(cpu, "loaded_for", lambda dispatcher, dtype: False)
    monkeypatch.setattr(cpu.drivers, "cached_for", lambda dispatcher, dtype: False)
    monkeypatch.setattr(ahead, "_expected", [None])
    monkeypatch.setattr(ahead, "_foreign", {})
    monkeypatch.setattr(ahead, "_POLL_SECONDS", 0.0)  # (it looks at every plan)
    started = []

    def start_tiers(x, threads, job, serial, twins, lock):
        started.append((job, serial, twins))
        return worker(60, [*serial, *twins]).pid  # (ended by _end_workers)

    monkeypatch.setattr(ahead, "start_tiers", start_tiers)
    return np.zeros((1024, 512, 1), np.float32), started


def _end_workers():
    """End the stand-in workers now (as a worker that ends without saving anything)."""
    for started in ahead._workers:
        os.kill(started.pid, signal.SIGKILL)
    ahead.settle()


def _unwrapped(plan):
    """The dispatcher a plan runs (the launch guard's wrapper, before a parallel call chose the
    threading layer, holds it)."""
    run = plan[0]
    return run if isinstance(run, Dispatcher) else run.__wrapped__


def test_a_forward_without_its_parallel_twin_runs_serial_while_a_worker_compiles_it(tiers):
    from numba_bn import cpu

    x, started = tiers
    (forward, forward_serial), (backward, backward_serial), (evaluate, evaluate_serial) = (
        (cpu._driver(step, x, 2, may_fuse=True)[0], cpu._driver(step, x, 1, may_fuse=True)[0])
        for step in ("forward_train", "backward", "forward_eval")
    )
    assert cpu._plan("forward_train", x, may_fuse=True) == (forward_serial, False)
    ((job, serial, twins),) = started
    assert job == "batch_norm_tiers 0 1"
    assert serial == [backward_serial, evaluate_serial] and twins == [forward, backward, evaluate]
    # while the worker lives: the serial twins, in plans not kept, and no second worker
    assert cpu._plan("backward", x, may_fuse=True) == (backward_serial, False)
    assert cpu._plan("forward_eval", x) == (evaluate_serial, False)
    assert cpu._plan("forward_train", x, may_fuse=True) == (forward_serial, False)
    assert cpu._PLANS == {} and len(started) == 1
    _end_workers()  # it ended (without saving a thing, here): they compile here, once
    for step, parallel in (("forward_train", forward), ("backward", backward)):
        assert _unwrapped(cpu._plan(step, x, may_fuse=True)) is parallel
    assert len(started) == 1


def test_a_fused_layers_serial_backward_takes_relu_grad_while_the_worker_compiles(tiers):
    from numba_bn import cpu
    from numba_bn.cpu import EPILOGUE_RELU

    x, started = tiers
    assert (
        cpu._plan("forward_train", x, may_fuse=True, epilogue=EPILOGUE_RELU)[0]
        is cpu._driver("forward_train", x, 1, epilogue=EPILOGUE_RELU)[0]
    )
    ((job, serial, twins),) = started
    relu_grad, relu_grad_serial = (
        cpu._driver("relu_grad", x, 2)[0],
        cpu._driver("relu_grad", x, 1)[0],
    )
    assert job == "batch_norm_tiers 2 1" and relu_grad_serial in serial and relu_grad in twins
    assert cpu._plan("relu_grad", x)[0] is relu_grad_serial  # not the parallel one, here


def test_a_forward_whose_parallel_twin_is_cached_starts_no_worker(tiers, monkeypatch):
    from numba_bn import cpu

    x, started = tiers
    monkeypatch.setattr(cpu.drivers, "cached_for", lambda dispatcher, dtype: True)
    assert _unwrapped(cpu._plan("forward_train", x)) is cpu._driver("forward_train", x, 2)[0]
    monkeypatch.setattr(cpu.drivers, "cached_for", lambda dispatcher, dtype: False)
    monkeypatch.setenv(ahead.ENVIRONMENT, "0")  # off: it compiles here
    assert _unwrapped(cpu._plan("forward_train", x)) is cpu._driver("forward_train", x, 2)[0]
    assert started == []


def test_a_forward_whose_twins_another_processs_worker_compiles_runs_serial_until_it_ends(
    tiers,
):
    """A script run again while the worker of its first run still compiles (a process that
    ends leaves its worker to finish): no second worker for the same twins."""
    from fcntl import LOCK_EX, flock

    from numba_bn import cpu

    x, started = tiers
    forward, forward_serial = (cpu._driver("forward_train", x, n, may_fuse=True)[0] for n in (2, 1))
    backward_serial = cpu._driver("backward", x, 1, may_fuse=True)[0]
    lock = ahead.tiers_lock(forward, x.dtype)
    other = os.open(lock, os.O_RDONLY | os.O_CREAT)  # another open file: another holder
    try:
        flock(other, LOCK_EX)
        assert ahead.held_elsewhere(lock) and ahead._take(lock) is None
        assert cpu._plan("forward_train", x, may_fuse=True) == (forward_serial, False)
        assert cpu._plan("backward", x, may_fuse=True) == (backward_serial, False)
        assert cpu._plan("forward_train", x, may_fuse=True) == (forward_serial, False)
        assert started == []
    finally:
        os.close(other)  # it ended (without saving, here): a worker of this process now
    assert not ahead.held_elsewhere(lock)
    assert cpu._plan("forward_train", x, may_fuse=True) == (forward_serial, False)
    assert len(started) == 1


def test_a_worker_holds_its_lock_until_it_ends(monkeypatch, tmp_path):
    monkeypatch.setitem(ahead.JOBS, "sleep", _sleep)
    lock = str(tmp_path / "forward.nbi.float32.tiers")
    held = ahead._take(lock)
    assert held >= 0 and ahead._take(lock) is None
    pid = ahead._fork((4, 3), "float32", "sleep 1", held)
    os.close(held)
    assert ahead.held_elsewhere(lock)  # the copy holds it
    assert os.waitpid(pid, 0)[1] == 0
    assert not ahead.held_elsewhere(lock)
    assert ahead.held_elsewhere(None) is False and ahead._take(None) == -1
