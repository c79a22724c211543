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
