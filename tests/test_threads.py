"""Concurrent calls from several Python threads give correct results on every threading layer."""

import sys
from pathlib import Path

import pytest

from conftest import run_child

HERE = Path(__file__).parent


@pytest.mark.parametrize("layer", ["default", "workqueue", "omp"])
def test_four_threads_fifty_calls_each(layer):
    env = {"NUMBA_THREADING_LAYER": layer, "NUMBA_NUM_THREADS": "2"}
    code, output = run_child([sys.executable, HERE / "thread_worker.py"], env, timeout=300)
    assert code == 0, output
    assert "failures=0" in output
    assert "parallel=4" in output  # the parallel twins ran (a layer starts on the first launch)
    if layer != "default":
        assert f"layer={layer}" in output


SLEEPING_POOL = """
import numpy as np
import numba_bn as nbn
from numba_bn import cpu
x = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32) * 3 + 1
plan = cpu.threads_for("forward_train", x.size)  # asking the thread count starts Numba's pool
y = nbn.forward_train(x)[0]
print(cpu.expected_layer(), plan, np.array_equal(nbn.forward_train(x)[0], y))
"""


@pytest.mark.parametrize("policy, threads", [("passive", "1"), ("active", "2")])
def test_a_medium_batch_runs_serial_where_the_pools_threads_sleep(policy, threads):
    """A (256, 512) batch, 131K elements, runs on 2 threads when Numba's OpenMP threads spin
    after a launch, serially when they sleep (OMP_WAIT_POLICY=passive: a wake-up ~45 us
    instead of ~3); the layer is known from the first plan on (asking the thread count starts
    the pool)."""
    env = {"NUMBA_THREADING_LAYER": "default", "NUMBA_NUM_THREADS": "2",
           "OMP_WAIT_POLICY": policy}  # fmt: skip
    code, output = run_child([sys.executable, "-c", SLEEPING_POOL], env, timeout=300)
    assert code == 0, output
    assert output.split()[-3:] == ["omp", threads, "True"], output


def test_the_thread_count_a_call_asks_is_numbas_in_every_thread():
    """cpu.threads.num_threads (Numba's pool accessor without its locks) answers as
    numba.get_num_threads: after numba.set_num_threads in this thread, and in a new thread, which
    starts from NUMBA_NUM_THREADS whatever this one set."""
    import threading

    import numba

    from numba_bn.cpu.threads import num_threads

    before = numba.get_num_threads()  # starts the pool
    most = numba.config.NUMBA_NUM_THREADS
    try:
        for count in sorted({1, most}):
            numba.set_num_threads(count)
            assert num_threads() == numba.get_num_threads() == count
        numba.set_num_threads(1)
        answers = []
        worker = threading.Thread(
            target=lambda: answers.append((num_threads(), numba.get_num_threads()))
        )
        worker.start()
        worker.join()
        assert answers == [(most, most)]
    finally:
        numba.set_num_threads(before)


def test_the_thread_count_falls_back_to_numbas_public_call(monkeypatch):
    """Without the pool's private accessor (another Numba), or before the pool starts, the count
    is numba.get_num_threads'."""
    import numba
    from numba.np.ufunc import parallel

    from numba_bn.cpu import threads

    numba.get_num_threads()  # starts the pool
    monkeypatch.setattr(numba, "get_num_threads", lambda: 7)
    monkeypatch.delattr(parallel, "_get_num_threads")
    assert threads.num_threads() == 7
    monkeypatch.setattr(parallel, "_is_initialized", False)
    assert threads.num_threads() == 7
    monkeypatch.delattr(parallel, "_is_initialized")
    assert threads.num_threads() == 7
