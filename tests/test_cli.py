"""The numba-bn command: demo checks itself against a reference, through the benchmark's
verify-then-time path; info reports the machine."""

import argparse
import importlib.metadata
import importlib.util
import os
import sys

import numba
import numpy as np
import pytest

import numba_bn
from numba_bn.bench import cases, demo, measure, peers
from numba_bn.cli import main, parsers

from conftest import run_child


@pytest.fixture
def no_pause(monkeypatch):
    """The benchmark pauses between implementations so that threads go idle; no test here reads
    a timing, so the demo tests skip the pauses."""
    monkeypatch.setattr(measure, "PAUSE_SECONDS", 0.0)


def load_average(monkeypatch, per_cpu):
    """os.getloadavg() reports ``per_cpu`` x the number of CPUs for 1, 5 and 15 minutes."""
    load = per_cpu * os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    return load


def test_demo_passes_its_checks(capsys, monkeypatch, no_pause):
    load_average(monkeypatch, 0.1)
    assert main(["demo", "--shape", "8,16,6,6", "--repeat", "2"]) == 0
    output = capsys.readouterr().out
    assert "all checks passed" in output
    assert output.count(" ok") == 7
    assert "verified" in output
    rows = [line.split("|") for line in output.splitlines() if line.startswith("|")]
    timed = {row[2].strip(): row for row in rows if row[1].strip() == "demo"}
    assert set(timed) == set(cases.OPS)  # forward-train, eval, backward: one row each
    header = [cell.strip() for cell in rows[0]]
    for column in ("memcpy ms", "numba_bn ms", "numpy ms", "x numpy"):
        assert column in header


def test_demo_prints_threads_load_and_speed_up_on_a_quiet_machine(capsys, monkeypatch, no_pause):
    load_average(monkeypatch, 0.5)
    assert main(["demo", "--shape", "8,16,6,6", "--repeat", "2"]) == 0
    output = capsys.readouterr().out
    threads = numba.get_num_threads()
    assert f"load average (1 min) {0.5 * os.cpu_count():.2f} before" in output
    assert f"{threads} threads" in output
    speedup = next(line for line in output.splitlines() if line.startswith("speed-up of"))
    assert speedup.startswith("speed-up of numba_bn over numpy: forward-train ")
    assert "eval " in speedup and "backward " in speedup
    assert "machine busy" not in output


def test_demo_warns_instead_of_a_speed_up_on_a_busy_machine(capsys, monkeypatch, no_pause):
    load = load_average(monkeypatch, 0.8)  # above 0.75 per CPU
    assert main(["demo", "--shape", "8,16,6,6", "--repeat", "2"]) == 0
    output = capsys.readouterr().out
    cpus = os.cpu_count()
    warning = f"machine busy (load {load:.2f} on {cpus} CPUs): timings not meaningful; "
    assert warning + "speed-ups not shown" in output
    assert "speed-up of" not in output and "x numpy" not in output
    assert "numba_bn ms" in output  # the times are still printed
    assert "all checks passed" in output


def test_demo_on_channels_last_rows(capsys, no_pause):
    assert main(["demo", "--shape", "64,5,5,7", "--axis", "-1", "--dtype", "float64",
                 "--repeat", "2"]) == 0  # fmt: skip
    assert "(rows)" in capsys.readouterr().out


class DxOffByOnePercent(demo.BatchNorm):
    def backward(self, dy, **kwargs):
        return super().backward(dy, **kwargs) * 1.01


def test_demo_times_nothing_when_the_layer_is_wrong(capsys, monkeypatch):
    monkeypatch.setattr(demo, "BatchNorm", DxOffByOnePercent)
    assert main(["demo", "--shape", "8,16,6,6", "--repeat", "2"]) == 1
    output = capsys.readouterr().out
    dx_line = next(line for line in output.splitlines() if line.split()[:1] == ["dx"])
    assert dx_line.endswith("FAIL")
    assert output.count(" ok") == 6
    assert "CHECK FAILED, nothing timed" in output and "ms |" not in output


def test_demo_verifies_each_timed_call_as_bench_does(capsys, monkeypatch):
    """A tolerance of zero: float32 rounding alone fails the functional forward-train."""
    monkeypatch.setattr(peers.NumbaBn, "tolerance", {np.dtype(np.float32): 0.0})
    assert main(["demo", "--shape", "8,16,6,6", "--repeat", "2"]) == 1
    output = capsys.readouterr().out
    assert output.count(" ok") == 7  # the layer's own check uses peers.STRICT
    assert "CHECK FAILED, nothing timed: numba_bn forward-train on demo" in output
    assert "ms |" not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "8,x"], "--shape must be integers separated by commas"),
        (["--shape", "8"], "--shape must have 2 or more dimensions"),
        (["--shape", "1,4"], "--shape must give each channel 2 or more values"),
        (["--axis", "4"], "--axis must be in [-4, 3], got 4"),
        (["--repeat", "0"], "--repeat must be >= 1"),
    ],
)
def test_demo_rejects_bad_arguments_by_name(capsys, args, message):
    _assert_usage_error(capsys, ["demo", *args], "demo", message)


def test_bench_names_a_compiled_calls_directory_without_the_extension(capsys, tmp_path):
    argv = ["bench", "--shapes", "small-nc", "--compiled-calls", str(tmp_path)]
    _assert_usage_error(capsys, argv, "bench", f"--compiled-calls: directory '{tmp_path}' holds no")


def _assert_usage_error(capsys, argv, command, message):
    """argparse's usage line of ``command``, then one 'numba-bn <command>: error: ...' line
    holding ``message``, on stderr; exit status 2; no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith(f"usage: numba-bn {command}"), captured.err
    assert lines[-1].startswith(f"numba-bn {command}: error: ") and message in lines[-1], lines
    assert "Traceback" not in captured.err + captured.out


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"numba-bn {numba_bn.__version__}"


def test_help_describes_the_commands_for_users_and_every_option_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and "COMMANDS" not in text, text
    assert "Batch normalization for NumPy" in text
    parser, commands = parsers()
    assert sorted(commands) == sorted(["demo", "info", "build-plugin", "bench", "warmup"])
    for name, command in commands.items():
        assert name in text and command.description, name
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (name, action.option_strings)


@pytest.mark.parametrize(
    ("argv", "command", "message"),
    [
        (["build-plugin", "--out", "/proc/numba-bn-test"], "build-plugin", "--out '/proc/"),
        (["build-plugin", "--out", "/etc/passwd"], "build-plugin", "--out '/etc/passwd'"),
        (["bench", "--json", "/proc/x/y.json"], "bench", "--json '/proc/x/y.json'"),
        (["bench", "--plot", "/"], "bench", "--plot '/' is a directory"),
    ],
)
def test_unwritable_outputs_are_usage_errors_before_anything_runs(capsys, argv, command, message):
    _assert_usage_error(capsys, argv, command, message)


def test_info_lists_versions_and_layer(capsys):
    assert main(["info"]) == 0
    output = capsys.readouterr().out
    for key in ("numba ", "llvmlite", "threading layer", "threads", "cpu", "cuda available"):
        assert key in output
    layer = next(line for line in output.splitlines() if line.startswith("threading layer"))
    assert layer.split()[-1] in ("omp", "tbb", "workqueue")
    calls = next(line for line in output.splitlines() if line.startswith("compiled calls"))
    assert "off (use_compiled_calls, NUMBA_BN_COMPILED_CALLS)" in calls
    ahead_line = next(line for line in output.splitlines() if line.startswith("compile ahead"))
    assert ahead_line.endswith("off (NUMBA_BN_COMPILE_AHEAD=0)"), output  # (conftest.py)


@pytest.mark.parametrize(("policy", "price"), [("passive", "60"), ("active", "8")])
def test_info_says_what_a_parallel_launch_is_priced(policy, price):
    """Numba's OpenMP threads spin after a launch (8 us in the cost model), or sleep with
    OMP_WAIT_POLICY=passive (60 us): info names the price and the size it makes parallel."""
    env = {"OMP_WAIT_POLICY": policy, "NUMBA_THREADING_LAYER": "omp", "NUMBA_NUM_THREADS": "2"}
    status, output = run_child([sys.executable, "-m", "numba_bn", "info"], env, timeout=300)
    assert status == 0, output
    line = next(row for row in output.splitlines() if row.startswith("parallel "))
    least = {"8": 35, "60": 261}[price]  # 2 * price / 0.46 ns, in thousands of elements
    assert line.split(None, 1)[1] == (
        f"a launch priced {price} us: forward_train on 2 threads from {least}K elements"
    ), output


def test_info_names_the_cuda_target(capsys):
    assert main(["info"]) == 0
    line = next(
        row for row in capsys.readouterr().out.splitlines() if row.startswith("cuda target")
    )
    if importlib.util.find_spec("numba_cuda") is None:
        assert "built-in target (deprecated" in line
    else:
        assert line.split()[-2:] == ["numba-cuda", importlib.metadata.version("numba-cuda")]


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_info_compiles_no_driver_to_name_the_threading_layer(tmp_path):
    """Numba chooses its threading layer on the first parallel launch of a process: info makes
    one with the smallest parallel function, not a forward_train of a parallel-sized batch,
    whose driver took ~12 s to compile from an empty cache."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_BN_QUIET": ""}
    status, output = run_child([sys.executable, "-m", "numba_bn", "info"], env, timeout=300)
    assert status == 0, output
    layer = next(line for line in output.splitlines() if line.startswith("threading layer"))
    assert layer.split()[-1] in ("omp", "tbb", "workqueue"), output
    assert "numba_bn: compiling" not in output, output


@pytest.mark.parametrize(("cpus", "jobs"), [(1, 1), (2, 2), (3, 3), (64, 4)])
def test_warmup_compiles_in_a_worker_per_cpu_by_default_four_at_most(monkeypatch, cpus, jobs):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    _, commands = parsers()
    assert commands["warmup"].parse_args([]).jobs == jobs
    assert commands["warmup"].parse_args(["--jobs", "1"]).jobs == 1
