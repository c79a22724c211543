"""The benchmark tooling runs, verifies before it times, and writes what it promises.

Nothing here asserts a timing: the benchmarks run once on tiny shapes to prove they execute.
"""

import json
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from numba_bn import cli
from numba_bn.bench import cases, measure, peers

from conftest import run_child

ROOT = Path(__file__).resolve().parents[1]


def run_python(args, timeout):
    """(returncode, stdout + stderr) of ``python args`` at the repository root, killed with its
    process group on timeout."""
    return run_child([sys.executable, *args], timeout=timeout)


@pytest.fixture
def restore_threads():
    """The bench sets numba's (and torch's) thread count; give the rest of the suite its own."""
    torch = peers.import_torch()
    before = numba.get_num_threads(), torch.get_num_threads() if torch else None
    yield
    numba.set_num_threads(before[0])
    if torch is not None:
        torch.set_num_threads(before[1])


def bench(capsys, *args):
    """``numba-bn bench`` on two tiny shapes, one thread (any machine has one), two rounds."""
    base = ["bench", "--shapes", "small-nc,small-nhwc", "--repeat", "2", "--threads", "1"]
    code = cli.main([*base, *args])
    return code, capsys.readouterr().out


def test_bench_command_verifies_times_and_writes_pytest_benchmark_json(
    tmp_path, capsys, restore_threads
):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out = bench(capsys, "--no-first-call", "--json", str(out_json), "--plot", str(out_png))
    assert code == 0, out
    assert "verified" in out and "| numba_bn ms |" in out and "| numpy ms |" in out
    assert "API adds us" in out  # the per-call overhead table of the small shapes

    report = json.loads(out_json.read_text())
    expected_names = {"numba_bn", "numpy", "memcpy", "numba_bn kernels"}
    if peers.import_torch() is not None:
        expected_names.add("torch")
    timed = {
        (b["params"]["shape"], b["params"]["op"], b["params"]["impl"]) for b in report["benchmarks"]
    }
    for shape in ("small-nc", "small-nhwc"):
        assert (shape, "memcpy", "memcpy") in timed
        for op in cases.OPS:
            assert {name for s, o, name in timed if (s, o) == (shape, op)} == expected_names - {
                "memcpy"
            }
    stats_fields = {"min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3"}
    stats_fields |= {"iqr_outliers", "stddev_outliers", "outliers", "ld15iqr", "hd15iqr"}
    stats_fields |= {"ops", "total", "iterations"}
    try:
        from pytest_benchmark.stats import Stats

        stats_fields = set(Stats.fields) | {"iterations"}
    except ImportError:
        pass
    for entry in report["benchmarks"]:
        assert set(entry["stats"]) == stats_fields
        assert entry["stats"]["rounds"] == 2
        assert entry["group"] == entry["params"]["shape"]
    assert report["numba_bn"]["threads"] == 1
    if out_png.exists():
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in out


def test_pytest_benchmark_compare_reads_the_json(tmp_path, capsys, restore_threads):
    pytest.importorskip("pytest_benchmark")
    out_json = tmp_path / "bench.json"
    code, out = bench(
        capsys, "--impls", "numba_bn,memcpy", "--no-first-call", "--json", str(out_json)
    )
    assert code == 0, out
    compare = "import sys; from pytest_benchmark.cli import main; sys.exit(main())"
    code, out = run_python(["-c", compare, "compare", str(out_json), "--group-by=param:shape"], 120)
    assert code == 0, out
    assert "shape=small-nc" in out and "forward-train[small-nc-numba_bn]" in out


def test_bench_times_nothing_when_an_implementation_is_wrong(capsys, monkeypatch, restore_threads):
    original = peers.NumpyNaive.calls

    def off_by_a_little(self, case):
        calls = original(self, case)
        right = calls["eval"]
        calls["eval"] = lambda: (right()[0] * 1.01,)
        return calls

    monkeypatch.setattr(peers.NumpyNaive, "calls", off_by_a_little)
    code, out = bench(capsys, "--impls", "numba_bn,numpy,memcpy", "--no-first-call")
    assert code == 1
    assert "CHECK FAILED" in out and "numpy eval on small-nc" in out
    assert "ms per call" not in out


def test_verify_rejects_nan_outputs():
    case = cases.Case(cases.SHAPES["small-nc"], np.float32)
    poisoned = {"eval": lambda: (np.full(case.x.shape, np.nan, np.float32),)}
    implementation = peers.NumpyNaive()
    with pytest.raises(measure.VerificationError, match="numpy eval on small-nc"):
        measure.verify(implementation, case, "eval", poisoned["eval"])


def test_bench_without_torch_says_its_columns_are_absent(capsys, monkeypatch, restore_threads):
    monkeypatch.setattr("numba_bn.bench.import_torch", lambda: None)
    code, out = bench(capsys, "--no-first-call")
    assert code == 0, out
    assert "torch not installed: its columns are absent" in out
    assert "torch ms" not in out and "torch us" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "A,Z"], "unknown shape 'Z' in --shapes"),
        (["--impls", "numba_bn,jax"], "--impls takes names from"),
        (["--threads", "0"], "--threads must be in [1,"),
        (["--repeat", "0"], "--repeat must be >= 1"),
    ],
)
def test_bench_rejects_bad_arguments_by_name(capsys, args, message):
    code = cli.main(["bench", *args])
    assert code == 2
    assert message in capsys.readouterr().out


def test_first_call_is_timed_in_a_fresh_process():
    seconds = measure.first_call_seconds([((4, 3), 1), ((2, 3, 4), 1)], np.float32, threads=1)
    assert set(seconds) == {"import_s", "first_call_s"}
    assert seconds["import_s"] > 0 and seconds["first_call_s"] > 0


def test_library_and_bench_modules_do_not_import_torch():
    code, out = run_python(
        [
            "-c",
            "import sys, numba_bn, numba_bn.cli, numba_bn.bench, numba_bn.bench.peers, "
            "numba_bn.bench.demo; "
            "assert 'torch' not in sys.modules, 'torch imported'",
        ],
        120,
    )
    assert code == 0, out


def test_benchmark_suites_run_each_case_once():
    """`pytest benchmarks` on the small shapes with timing disabled: every suite executes and
    every implementation passes its check against the float64 reference."""
    pytest.importorskip("pytest_benchmark")
    code, out = run_python(
        [
            "-m",
            "pytest",
            "benchmarks",
            "--bn-shapes=small",
            "--bn-threads=1",
            "--benchmark-disable",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        600,
    )
    assert code == 0, out
    assert " passed" in out and "failed" not in out
