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
