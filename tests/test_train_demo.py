"""The digits example (examples/train_digits/): the whole network's gradient against finite
differences, then a short run through training, eval mode, state_dict, the command line and the
script itself."""

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from numba_bn.layer import BatchNorm

# The example is a script beside its network module, not part of the package: import both the
# way running the script does, with its folder on sys.path.
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits"
sys.path.insert(0, str(EXAMPLE))
import train_digits  # noqa: E402
from mlp import MLP, cross_entropy  # noqa: E402

sys.path.remove(str(EXAMPLE))

SIZES = (6, 9, 7, 4)  # fc1, bn1, relu1, fc2, bn2, relu2, fc3
BATCH = 8
GRAD_TOL = 1e-6  # relative L2 error; central differences in float64 reach ~1e-9 here


# ------------------------------------------------------------------------- gradient check
def make_batch(seed):
    """Features with non-zero means and scales from 0.3 to 5, and random labels."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.3, 5.0, SIZES[0])
    means = rng.uniform(-4.0, 4.0, SIZES[0])
    x = rng.standard_normal((BATCH, SIZES[0])) * scales + means
    return x, rng.integers(0, SIZES[-1], BATCH)


def make_model(batch_norm, seed):
    """A float64 MLP whose parameters are all moved off their initial values (BN: ones, zeros)."""
    model = MLP(SIZES, batch_norm, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    for _, layer, key in model.parameters():
        param = getattr(layer, key)
        param += rng.normal(0.0, 0.5, param.shape)
    return model


def numerical_gradient(loss, array, h=1e-6):
    """Central differences of ``loss()`` with respect to every entry of ``array`` (in place)."""
    grad = np.empty_like(array)
    for i in np.ndindex(array.shape):
        saved = array[i]
        array[i] = saved + h
        up = loss()
        array[i] = saved - h
        down = loss()
        array[i] = saved
        grad[i] = (up - down) / (2 * h)
    return grad


def gradient_errors(model, x, labels):
    """Relative L2 error, per parameter array and for the input, of backward against
    finite differences of the mean cross-entropy of the whole network."""
    _, dlogits = cross_entropy(model.forward(x), labels)
    analytic = {"input": model.backward(dlogits)}
    for name, layer, key in model.parameters():
        analytic[name] = getattr(layer, f"grad_{key}").copy()

    def loss():
        return cross_entropy(model.forward(x), labels)[0]

    errors = {}
    arrays = {"input": x} | {name: getattr(layer, key) for name, layer, key in model.parameters()}
    for name, array in arrays.items():
        numeric = numerical_gradient(loss, array)
        errors[name] = np.linalg.norm(analytic[name] - numeric) / np.linalg.norm(numeric)
    return errors


@pytest.mark.parametrize(
    "batch_norm, mode",
    [(True, "train"), (True, "eval"), (False, "train")],
    ids=["bn-batch-statistics", "bn-running-statistics", "no-bn"],
)
def test_whole_network_gradient_matches_finite_differences(batch_norm, mode):
    model = make_model(batch_norm, seed=3)
    x, labels = make_batch(seed=4)
    if mode == "eval":  # running statistics away from their (0, 1) start
        for seed in (5, 6, 7):
            model.forward(make_batch(seed)[0])
        model.eval()
    errors = gradient_errors(model, x, labels)
    expected = {"input"} | {name for name, _, _ in model.parameters()}
    assert set(errors) == expected
    if batch_norm:
        assert {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"} <= set(errors)
        assert "fc1.bias" not in errors  # BatchNorm's bias replaces it
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_TOL, f"{worst}: relative error {errors[worst]:.2e}"


class BatchStatisticsAsConstants:
    """bn2 with the classic backward mistake: the batch mean and variance treated as constants
    (dx = dy * weight * invstd), which drops two of the three terms of docs/backward.md."""

    def __init__(self, bn):
        self.bn = bn

    def __getattr__(self, name):
        return getattr(self.bn, name)

    def forward(self, x):
        self.x = x
        return self.bn.forward(x)

    def backward(self, dy):
        self.bn.backward(dy)  # grad_weight and grad_bias stay right
        return dy * self.bn.weight / np.sqrt(self.x.var(axis=0) + self.bn.eps)


def test_gradient_check_catches_a_backward_that_ignores_batch_statistics():
    model = make_model(batch_norm=True, seed=3)
    model.layers["bn2"] = BatchStatisticsAsConstants(model.layers["bn2"])
    errors = gradient_errors(model, *make_batch(seed=4))
    for name in ("fc3.weight", "fc3.bias", "bn2.weight", "bn2.bias"):  # above the mistake
        assert errors[name] < GRAD_TOL, name
    for name in ("fc2.weight", "bn1.weight", "bn1.bias", "fc1.weight", "input"):  # below it
        assert errors[name] > 1e-2, name


# ---------------------------------------------------------------------------- a short run
@pytest.fixture(scope="module")
def short_run():
    pytest.importorskip("sklearn")
    lines = []
    result = train_digits.train_digits(epochs=2, lr=0.05, high_lr=0.5, log=lines.append)
    return result, lines


def test_short_run_trains_both_models_at_both_learning_rates(short_run):
    result, lines = short_run
    labels = [run.history.label for run in result.runs]
    assert labels == [
        "without BN, lr 0.05",
        "with BN, lr 0.05",
        "without BN, lr 0.5",
        "with BN, lr 0.5",
    ]
    for run in result.runs:
        h = run.history
        assert len(h.train_loss) == len(h.val_accuracy) == len(h.epoch_seconds) == 2
    for run in (result.runs[0], result.runs[1], result.runs[3]):
        h = run.history
        assert h.diverged_at is None
        assert h.train_loss[1] < h.train_loss[0] < np.log(10)  # below chance after one epoch
        assert h.val_accuracy[1] > 0.7 and h.test_accuracy > 0.7  # chance is 0.1
    assert sum(line.lstrip().startswith(("1 ", "2 ")) for line in lines) == 4  # epoch rows


def test_running_statistics_count_each_training_batch_once(short_run):
    result, _ = short_run
    batches = 2 * (len(train_digits.load_digits_split()["train"][0]) // 64)
    for run in result.runs[1::2]:
        for name in ("bn1", "bn2", "bn3"):
            bn = run.model.layers[name]
            assert isinstance(bn, BatchNorm)
            assert bn.num_batches_tracked == batches
            assert not np.allclose(bn.running_mean, 0.0)


def test_eval_mode_predictions_use_running_statistics(short_run):
    trained = short_run[0].runs[1].model
    model = MLP(trained.sizes, True).load_state_dict(trained.state_dict())  # leave the fixture be
    x = train_digits.load_digits_split()["test"][0][:16]
    model.eval()
    batch = model.forward(x)
    one_by_one = np.concatenate([model.forward(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(one_by_one, batch, rtol=1e-5, atol=1e-5)
    model.train()
    assert not np.allclose(model.forward(x), batch, atol=1e-3)  # batch statistics differ
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.forward(x[:1])


def test_state_dict_round_trip_reproduces_eval_predictions(short_run):
    result, _ = short_run
    assert result.state_dict_round_trip
    model = result.runs[1].model
    state = model.state_dict()
    assert {"fc1.weight", "bn1.running_var", "bn3.num_batches_tracked", "fc4.bias"} <= set(state)
    assert "fc1.bias" not in state
    fresh = MLP(model.sizes, batch_norm=True, seed=99)
    x = train_digits.load_digits_split()["test"][0]
    model.eval(), fresh.eval()
    assert not np.allclose(fresh.forward(x), model.forward(x))
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.forward(x), model.forward(x))
    with pytest.raises(KeyError, match="fc1.bias"):
        fresh.load_state_dict(result.runs[0].model.state_dict())  # the model without BN


def test_a_diverging_run_stops_and_is_reported():
    pytest.importorskip("sklearn")
    lines = []
    result = train_digits.train_digits(epochs=2, lr=5.0, high_lr=None, log=lines.append)
    h = result.runs[0].history
    assert h.diverged_at == 1
    assert np.isnan(h.train_loss[1]) and np.isnan(h.val_accuracy[1])
    assert "(diverged)" in lines[-1]


# ------------------------------------------------------------------------ command, script
def test_command_prints_results_and_writes_the_plot(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sub" / "curves.png"
    argv = ["--epochs", "1", "--high-lr", "0", "--batch-size", "256"]
    assert train_digits.main([*argv, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy (eval mode, running statistics)" in out
    assert "with BN, lr 0.05" in out and "identical test logits" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_plot_goes_to_the_current_directory_and_says_where(
    tmp_path, monkeypatch, capsys
):
    """Not docs/train_digits.png, which overwrote the docs' figure in a checkout and made a
    docs/ folder anywhere else."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert train_digits.main(["--epochs", "1", "--high-lr", "0", "--batch-size", "256"]) == 0
    written = tmp_path / "train_digits.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {written}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_digits.png"]


def test_example_runs_as_a_script(monkeypatch, capsys):
    """``python examples/train_digits/train_digits.py ...`` in this process (the kernels are
    compiled already): the script runs as __main__ with only its own folder on sys.path, as
    Python puts it there, and imports its network module afresh from it."""
    pytest.importorskip("sklearn")
    script = EXAMPLE / "train_digits.py"
    argv = ["--epochs", "1", "--high-lr", "0", "--batch-size", "256", "--no-plot"]
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "mlp")
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "without BN, lr 0.05" in out and "identical test logits" in out


@pytest.mark.parametrize(
    "argument, value, named",
    [
        ("--epochs", "0", "epochs"),
        ("--batch-size", "1", "batch_size"),
        ("--lr", "-1", "lr"),
        ("--hidden", "64,x", "--hidden"),
    ],
)
def test_command_rejects_bad_arguments_naming_them(argument, value, named, capsys):
    pytest.importorskip("sklearn")
    assert train_digits.main([argument, value, "--no-plot"]) == 2
    assert capsys.readouterr().out.startswith(f"error: {named} must")
