"""The benchmark tooling runs, verifies before it times, and writes what it promises.

Nothing here asserts a timing: the benchmarks run once on tiny shapes to prove they execute.
"""

import json
import sys
import time
from pathlib import Path

import numba
import numpy as np
import pytest

from numba_bn import cli
from numba_bn.bench import cases, measure, peers, report

from conftest import assert_mean_close, run_child

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


@pytest.fixture
def no_pause(monkeypatch):
    """No test here reads a timing: skip the pauses that let threads go idle between
    implementations."""
    monkeypatch.setattr(measure, "PAUSE_SECONDS", 0.0)


def bench(capsys, *args):
    """``numba-bn bench`` on two tiny shapes, one thread (any machine has one), two rounds."""
    base = ["bench", "--shapes", "small-nc,small-nhwc", "--repeat", "2", "--threads", "1"]
    code = cli.main([*base, *args])
    return code, capsys.readouterr().out


def table(out, first_column):
    """(header, rows) of the markdown table in ``out`` whose first header cell is
    ``first_column``, each a list of stripped cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("|") and not line.startswith("|-")]  # fmt: skip
    start = next(i for i, row in enumerate(rows) if row[0] == first_column)
    header, body = rows[start], []
    for row in rows[start + 1 :]:
        if len(row) != len(header):
            break
        body.append(row)
    return header, body


def test_bench_command_verifies_times_and_writes_pytest_benchmark_json(
    tmp_path, capsys, restore_threads
):
    out_json = tmp_path / "bench.json"
    code, out = bench(capsys, "--no-first-call", "--json", str(out_json))
    assert code == 0, out
    assert "verified" in out and "| numba_bn ms |" in out and "| numpy ms |" in out
    assert "API adds us" in out  # the per-call overhead table of the small shapes

    report = json.loads(out_json.read_text())
    expected_names = {"numba_bn", "numpy", "numba_bn kernels"}
    if peers.import_torch() is not None:
        expected_names.add("torch")
    timed = {
        (b["params"]["shape"], b["params"]["op"], b["params"]["impl"]) for b in report["benchmarks"]
    }
    for shape in ("small-nc", "small-nhwc"):
        assert {name for s, o, name in timed if (s, o) == (shape, "memcpy")} == set(peers.COPIES)
        for op in cases.OPS:
            assert {name for s, o, name in timed if (s, o) == (shape, op)} == expected_names
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


def test_bench_plot_is_a_png_bar_chart(tmp_path, capsys, restore_threads, no_pause):
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "bench.png"
    code, out = bench(
        capsys, "--impls", "numba_bn,memcpy", "--no-first-call", "--plot", str(out_png)
    )
    assert code == 0, out
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE


def sweep(capsys, *args):
    """``numba-bn bench --sweep`` on two of its shapes (one (N, C), one NCHW), one round."""
    base = ["bench", "--sweep", "--shapes", "small-nc,small-nchw", "--repeat", "1"]
    code = cli.main([*base, "--threads", "1", "--no-first-call", *args])
    return code, capsys.readouterr().out


def test_sweep_prints_each_operation_for_each_shape_and_implementation(
    capsys, restore_threads, no_pause
):
    code, out = sweep(capsys)
    assert code == 0, out
    header, rows = table(out, "shape")
    with_torch = peers.import_torch() is not None
    columns = ["shape", "elements", "memcpy us", "by", "impl", "fwd us", "eval us", "bwd us"]
    columns += ["fwd /memcpy", "eval /memcpy", "bwd /memcpy"]
    columns += ["x torch fwd", "x torch eval", "x torch bwd"] if with_torch else []
    columns += ["x numpy fwd"]
    assert header == columns
    implementations = ["numba_bn", "BatchNorm", *(["torch"] if with_torch else []), "numpy"]
    assert [row[4] for row in rows] == implementations * 2  # both APIs, the peers, per shape
    assert [row[0] for row in rows if row[0]] == ["(64, 32)", "(8, 16, 8, 8)"]  # rows, planes
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        for column in columns[5:]:
            if column.startswith(f"x {cells['impl']} "):  # no speed-up over itself
                assert cells[column] == "-", row
            else:
                assert float(cells[column]) > 0, (column, row)
        if cells["shape"]:  # a shape's first row carries its memcpy limit and which copy it was
            assert float(cells["memcpy us"]) > 0 and cells["by"] in peers.COPIES


def test_sweep_plot_draws_time_against_size(tmp_path, capsys, restore_threads, no_pause):
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "sweep.png"
    code, out = sweep(capsys, "--impls", "numba_bn,memcpy", "--plot", str(out_png))
    assert code == 0, out
    assert f"wrote {out_png}" in out
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_without_matplotlib_is_refused_before_anything_runs(
    tmp_path, capsys, monkeypatch, restore_threads
):
    monkeypatch.setattr("numba_bn.bench.has_matplotlib", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        sweep(capsys, "--plot", str(tmp_path / "sweep.png"))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "numba-bn bench: error: --plot needs matplotlib" in captured.err
    assert "verified" not in captured.out


def test_sweep_shapes_are_the_speed_issues_table():
    dims = [(cases.SHAPES[name].dims, cases.SHAPES[name].axis) for name in cases.SWEEP_SHAPES]
    assert dims == [
        ((64, 32), 1), ((64, 256), 1), ((256, 512), 1), ((1024, 1024), 1), ((4096, 1024), 1),
        ((8, 16, 8, 8), 1), ((16, 32, 16, 16), 1), ((32, 64, 28, 28), 1), ((64, 256, 14, 14), 1),
        ((32, 56, 56, 64), -1),
    ]  # fmt: skip


def test_memcpy_is_the_faster_of_the_two_copies():
    case = cases.Case(cases.SHAPES["small-nc"], np.float32)

    def result(op, name, seconds):
        return measure.Result(case, op, name, [seconds], 1, 0.0)

    copies = [result("memcpy", "copyto", 2e-6), result("memcpy", "parallel copy", 1e-6)]
    ours = [result(op, "numba_bn", 4e-6) for op in cases.OPS]
    header, rows = table(report.sweep_table(copies + ours, ["numba_bn"]), "shape")
    (row,) = rows
    assert row[2:5] == ["1.00", "parallel copy", "numba_bn"]
    assert row[header.index("fwd /memcpy")] == "4.00"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dims", [(7, 3), (64, 32), (8, 16, 8, 8), (3, 1000)])
def test_copies_write_2048_bytes_past_their_source_modulo_4096(dims, dtype):
    """The limit's copies never land a few bytes past a 4 KiB multiple of the source (glibc's
    rep movsb slows 4-10x there on AMD Zen); the copy is the source's values."""
    case = cases.Case(cases.Shape("t", dims, 1, "test", small=True), dtype)
    for copy in (peers.Memcpy(), peers.ParallelCopy(2)):
        (dst,) = copy.calls(case)["memcpy"]()
        assert (dst.ctypes.data - case.x.ctypes.data) % 4096 == peers.COPY_OFFSET
        assert dst.shape == case.x.shape and dst.dtype == case.x.dtype and dst.flags.c_contiguous
        np.testing.assert_array_equal(dst, case.x)
    for offset in range(0, 4096, 16):  # wherever the source starts
        src = np.empty(4096 // 2 + 100, np.float16)[offset // 2 :][:2000]
        dst = peers.copy_destination(src)
        assert (dst.ctypes.data - src.ctypes.data) % 4096 == peers.COPY_OFFSET


def test_layer_peer_checks_batch_statistics_from_its_running_buffers():
    """The layer's forward-train outputs are (y, running_mean, running_var) at momentum 1: the
    batch mean and the unbiased batch variance."""
    case = cases.Case(cases.SHAPES["small-nchw"], np.float64)
    layer = peers.NumbaBnLayer()
    y, running_mean, running_var = layer.calls(case)["forward-train"]()
    x = case.x.astype(np.float64)
    assert_mean_close(running_mean, x.mean(axis=(0, 2, 3)), x)
    np.testing.assert_allclose(running_var, x.var(axis=(0, 2, 3), ddof=1), rtol=1e-12)
    for op, call in layer.calls(case).items():
        assert measure.verify(layer, case, op, call) <= peers.STRICT[case.dtype]


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


def _runs(log):
    """The keys of ``log`` with each run of one key written once."""
    return [key for i, key in enumerate(log) if i == 0 or log[i - 1] != key]


def _logged_calls(log, seconds=0.0):
    """Four (operation, implementation) calls that log their key (and sleep ``seconds``)."""

    def call(key):
        def run():
            log.append(key)
            if seconds:
                time.sleep(seconds)

        return run

    return {(op, name): call((op, name)) for name in ("x", "y") for op in ("fwd", "bwd")}


def test_time_each_samples_a_small_case_in_rounds():
    """Calls shorter than a block: after warming and calibrating each key in turn, every key
    gets one sample (a block of its calls) per round, so a slow spell of the machine hits
    every implementation alike."""
    log = []
    calls = _logged_calls(log)
    samples, iterations = measure.time_each(calls, 3, rounds=True)
    warm = 7 * len(calls)  # four warm calls and three calibrating ones per key
    assert _runs(log[:warm]) == list(calls)
    assert _runs(log[warm:]) == list(calls) * 3
    assert all(n > 1 for n in iterations.values())
    assert all(len(s) == 3 and min(s) > 0 for s in samples.values())


def test_time_each_samples_a_large_case_key_by_key(no_pause):
    """A call longer than a block: each key's samples back to back (after one call to warm it
    again), one call a sample, rounds allowed or not."""
    log = []
    calls = _logged_calls(log, seconds=2 * measure.BLOCK_SECONDS)
    samples, iterations = measure.time_each(calls, 2, rounds=True)
    warm = 7 * len(calls)
    assert _runs(log[:warm]) == list(calls)
    assert _runs(log[warm:]) == list(calls)
    assert len(log) == warm + 3 * len(calls)
    assert set(iterations.values()) == {1}
    assert all(len(s) == 2 and min(s) >= 2 * measure.BLOCK_SECONDS for s in samples.values())


def test_time_each_takes_rounds_only_when_asked(no_pause):
    """Short calls of a large input (run_case: x above ROUNDS_MAX_BYTES) keep their samples
    back to back, as the fused bench's do."""
    log = []
    calls = _logged_calls(log)
    measure.time_each(calls, 3)
    assert _runs(log[7 * len(calls) :]) == list(calls)


def test_bench_takes_rounds_for_small_inputs_only(monkeypatch):
    """run_case asks for rounds on an input of at most ROUNDS_MAX_BYTES: the sweep's small
    shapes, not (256, 512) or (16, 32, 16, 16) (512 KB)."""
    asked = []

    def time_each(calls, repeat, rounds=False):
        asked.append(rounds)
        return {key: [1e-6] * repeat for key in calls}, dict.fromkeys(calls, 1)

    monkeypatch.setattr(measure, "time_each", time_each)
    names = ("small-nc", "64x256", "small-nchw", "256x512", "16x32x16x16")
    copy = peers.implementations(["memcpy"], 1, None)[0]
    for name in names:
        measure.run_case(cases.Case(cases.SHAPES[name], np.float32), [copy], 2)
    assert dict(zip(names, asked, strict=True)) == {
        "small-nc": True, "64x256": True, "small-nchw": True, "256x512": False,
        "16x32x16x16": False,
    }  # fmt: skip


def _racing_calls(monkeypatch, settles_after):
    """Calls of numba_bn's and of a peer, each logging its key, and races
    (numba_bn.cpu.races_running) that settle after ``settles_after`` calls of numba_bn's."""
    log, left = [], [settles_after]

    def call(key):
        def run():
            log.append(key)
            if key[1] == "numba_bn":
                left[0] = max(left[0] - 1, 0)

        return run

    monkeypatch.setattr(measure.cpu, "races_running", lambda: left[0])
    calls = {(op, name): call((op, name)) for name in ("numba_bn", "numpy") for op in ("f", "b")}
    return calls, log, left


def test_settle_races_calls_numba_bns_calls_until_no_race_is_left(monkeypatch):
    """A plan's race (numba_bn/cpu/race.py) runs the slower partition in half of its timed
    calls: the bench calls numba_bn's calls, all in turn, until none is left, and no peer's."""
    calls, log, left = _racing_calls(monkeypatch, 5)
    measure.settle_races(calls)
    assert left[0] == 0
    assert log == [("f", "numba_bn"), ("b", "numba_bn")] * 3


def test_settle_races_gives_up_after_its_seconds(monkeypatch):
    calls, log, left = _racing_calls(monkeypatch, 10**9)
    start = time.perf_counter()
    measure.settle_races(calls, seconds=0.05)
    assert 0.05 <= time.perf_counter() - start < 5 and log and left[0] > 0


def test_bench_times_after_the_races_settled(monkeypatch):
    """run_case settles the races of numba_bn's plans between its checks and its timing (in
    stop 68's sweeps they settled 0.34-0.52 s into the timed samples of every large case)."""
    calls, log, left = _racing_calls(monkeypatch, 7)
    at_timing = []

    def time_each(timed, repeat, rounds=False):
        at_timing.append(measure.cpu.races_running())
        return {key: [1e-6] * repeat for key in timed}, dict.fromkeys(timed, 1)

    class Logged(peers.Implementation):
        name, tolerance = "numba_bn", peers.STRICT

        def calls(self, case):
            right = peers.NumbaBn().calls(case)
            ours = {op: call for (op, name), call in calls.items() if name == "numba_bn"}
            return {op: lambda op=op: (ours["f"](), right[op]())[1] for op in right}

    monkeypatch.setattr(measure, "time_each", time_each)
    measure.run_case(cases.Case(cases.SHAPES["small-nc"], np.float32), [Logged()], 2)
    assert at_timing == [0] and len(log) >= 7


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
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage: numba-bn bench")
    assert f"numba-bn bench: error: {message}" in captured.err


def test_fused_and_norms_tables_verify_and_print(capsys, monkeypatch, restore_threads, no_pause):
    from numba_bn.bench import fused, norms

    monkeypatch.setattr(fused, "FUSED_SHAPES", ("small-nchw",))
    monkeypatch.setattr(norms, "GROUP_SHAPE", (4, 8, 5, 5))
    monkeypatch.setattr(norms, "GROUPS", 4)
    monkeypatch.setattr(norms, "LAYER_SHAPE", (4, 6, 16))
    code = cli.main(["bench", "--fused", "--norms", "--repeat", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    for row in ("  forward ", "  backward "):  # the fused table: plain, fused, unfused, torch
        assert len([line for line in out.splitlines() if line.startswith(row)]) == 1
    for case in ("group norm (4, 8, 5, 5) G=4", "layer norm (4, 6, 16)"):
        for impl in ("numba_bn", "torch", "numpy", "memcpy"):
            assert sum(line.startswith(case) and f" {impl} " in line
                       for line in out.splitlines()) == 2, (case, impl)  # fmt: skip


def test_first_call_is_timed_in_a_fresh_process():
    seconds = measure.first_call_seconds([((4, 3), 1), ((2, 3, 4), 1)], np.float32, threads=1)
    assert set(seconds) == {"import_s", "first_call_s"}
    assert seconds["import_s"] > 0 and seconds["first_call_s"] > 0


def test_library_and_bench_modules_do_not_import_torch():
    code, out = run_python(
        [
            "-c",
            "import sys, numba_bn, numba_bn.cli, numba_bn.bench, numba_bn.bench.peers, "
            "numba_bn.bench.demo, numba_bn.bench.fused, numba_bn.bench.norms; "
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


def test_the_report_says_what_each_race_kept():
    """A line per race: the planes partitions (the rule's pick) and the twins (the cost
    model's)."""
    from numba_bn.bench.report import race_lines

    assert race_lines({}) == []
    races = {("backward", (32, 64, 784), "float32", 0, 2):
             {"split": 613.7, "fused": 447.71, "rule": "split", "kept": "fused"},
             ("forward_eval", (256, 256, 1), "float32", 0, 2):
             {"serial": 15.24, "parallel": 13.1, "rule": "parallel", "kept": "parallel"},
             ("forward_train", (256, 256, 1), "float32", 3, 2):
             {"serial": 31.0, "parallel": 35.0, "rule": "parallel", "kept": "serial"}}  # fmt: skip
    title, partitions, twins, fused = race_lines(races)
    assert "race.py" in title
    assert partitions == ("  backward (32, 64, 784) float32 on 2 threads: fused 448 us, split "
                          "614 us: kept fused (the rule's: split)")  # fmt: skip
    assert twins == ("  forward_eval (256, 256, 1) float32 on 2 threads: parallel 13.1 us, "
                     "serial 15.2 us: kept parallel (the cost model's: parallel)")  # fmt: skip
    assert fused.startswith("  forward_train + residual + relu (256, 256, 1) float32 on 2 ")
