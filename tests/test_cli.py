"""The numba-bn command: demo checks itself against a reference; info reports the machine."""

import pytest

from numba_bn.cli import main


def test_demo_passes_its_checks(capsys):
    assert main(["demo", "--shape", "8,16,6,6", "--repeat", "2"]) == 0
    output = capsys.readouterr().out
    assert "all checks passed" in output
    assert output.count(" ok") == 7
    for op in ("forward-train", "forward-eval", "backward"):
        assert op in output


def test_demo_on_channels_last_rows(capsys):
    assert main(["demo", "--shape", "64,5,5,7", "--axis", "-1", "--dtype", "float64",
                 "--repeat", "2"]) == 0  # fmt: skip


def test_info_lists_versions_and_layer(capsys):
    assert main(["info"]) == 0
    output = capsys.readouterr().out
    for key in ("numba ", "llvmlite", "threading layer", "threads", "cpu", "cuda available"):
        assert key in output
    layer = next(line for line in output.splitlines() if line.startswith("threading layer"))
    assert layer.split()[-1] in ("omp", "tbb", "workqueue")


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
