"""Moments as a public, mergeable value, and exact population statistics (population_stats),
against float64 NumPy over the concatenated data."""

import numpy as np
import pytest

import numba_bn as nbn

from conftest import LAYOUTS, assert_mean_close, random_batch


def _reduce_axes(shape, axis):
    return tuple(a for a in range(len(shape)) if a != axis % len(shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_moments_are_the_float64_statistics(rng, shape, axis, dtype):
    x = random_batch(rng, shape, dtype, axis=axis)
    m = nbn.moments(x, axis=axis)
    reduce = _reduce_axes(shape, axis)
    x64 = x.astype(np.float64)
    assert m.count == x.size // shape[axis] and m.mean.dtype == np.float64
    assert_mean_close(m.mean, x64.mean(axis=reduce), x64)
    np.testing.assert_allclose(m.var(), x64.var(axis=reduce), rtol=1e-11)
    np.testing.assert_allclose(m.var(unbiased=True), x64.var(axis=reduce, ddof=1), rtol=1e-11)


def test_merging_any_split_in_any_grouping_gives_the_whole(rng):
    x = random_batch(rng, (97, 5, 3), np.float64, mean_scale=1e3)
    cuts = np.sort(rng.choice(np.arange(98), 9))  # uneven pieces, some empty
    pieces = [nbn.moments(x[a:b]) for a, b in zip([0, *cuts], [*cuts, 97], strict=True)]
    rng.shuffle(pieces)
    left_to_right = nbn.Moments.empty(5)
    for piece in pieces:
        left_to_right = left_to_right + piece
    while len(pieces) > 1:  # pairwise, as a tree
        pieces = [a.merge(b) for a, b in zip(pieces[::2], pieces[1::2], strict=False)] + (
            [pieces[-1]] if len(pieces) % 2 else []
        )
    x64 = x.transpose(1, 0, 2).reshape(5, -1)
    for merged in (left_to_right, pieces[0]):
        assert merged.count == 97 * 3
        assert_mean_close(merged.mean, x64.mean(axis=1), x64)
        np.testing.assert_allclose(merged.m2, ((x64 - x64.mean(1, keepdims=True)) ** 2).sum(1),
                                   rtol=1e-12)  # fmt: skip


def test_round_trip_through_an_array_and_the_empty_state(rng):
    m = nbn.moments(random_batch(rng, (6, 4), np.float32))
    assert nbn.Moments.from_array(m.to_array()) == m
    assert m.to_array().shape == (9,)
    empty = nbn.Moments.empty(4)
    assert empty.count == 0 and empty + m == m and m + empty == m
    assert np.isnan(empty.var()).all()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: m + nbn.Moments.empty(3), ValueError, "4 and 3 channels"),
        (lambda m: m.merge(m.to_array()), TypeError, "can only merge Moments"),
        (lambda m: nbn.Moments.from_array(np.ones(4)), ValueError, "2C \\+ 1 values"),
        (lambda m: nbn.Moments.from_array([1.5, 0, 0]), ValueError, "non-negative integer"),
        (lambda m: nbn.Moments(-1, [0.0], [0.0]), ValueError, "count must be"),
        (lambda m: nbn.Moments(1, [0.0], [0.0, 1.0]), ValueError, "one length"),
    ],
)
def test_bad_moments_are_named(rng, call, error, message):
    with pytest.raises(error, match=message):
        call(nbn.moments(random_batch(rng, (6, 4), np.float64)))


def _drifting_batches(rng, batches=20, rows=32, channels=3):
    """Batches whose means drift: the moving averages and the mean of variances go wrong."""
    return [
        random_batch(rng, (rows, channels), np.float64) + 3.0 * k / batches for k in range(batches)
    ]


@pytest.mark.parametrize("convention, ddof", [("torch", 1), ("keras", 0)])
def test_population_stats_are_exact_over_every_batch(rng, convention, ddof):
    batches = _drifting_batches(rng)
    bn = nbn.BatchNorm(3, dtype=np.float64, convention=convention, axis=1).eval()
    bn.num_batches_tracked = 7
    running_mean = bn.running_mean
    with nbn.population_stats(bn):
        for batch in batches:
            y = bn(batch)
            np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)  # batch statistics
    everything = np.concatenate(batches)
    assert bn.running_mean is running_mean  # updated in place
    assert_mean_close(bn.running_mean, everything.mean(axis=0), everything)
    np.testing.assert_allclose(bn.running_var, everything.var(axis=0, ddof=ddof), rtol=1e-12)
    assert not bn.training and bn.num_batches_tracked == 7
    y = bn(batches[0])  # eval mode with the population statistics
    expected = (batches[0] - everything.mean(0)) / np.sqrt(everything.var(0, ddof=ddof) + bn.eps)
    np.testing.assert_allclose(y, expected, atol=1e-12)


def test_the_usual_recipes_are_wrong_on_drifting_data_and_population_stats_is_not(rng):
    """The docs' example: the moving average and the mean of per-batch variances (PyTorch's
    update_bn, fvcore's PreciseBN) miss the population variance of drifting data."""
    batches = _drifting_batches(rng)
    exact_var = np.concatenate(batches).var(axis=0, ddof=1)
    moving = nbn.BatchNorm(3, dtype=np.float64)
    cumulative = nbn.BatchNorm(3, dtype=np.float64, momentum=None)
    exact = nbn.BatchNorm(3, dtype=np.float64)
    for batch in batches:
        moving(batch)
        cumulative(batch)
    with nbn.population_stats(exact):
        for batch in batches:
            exact(batch)

    def error(bn):
        return float(np.max(np.abs(bn.running_var / exact_var - 1)))

    assert error(exact) < 1e-12
    assert error(cumulative) > 0.2 and error(moving) > 0.2


def test_a_block_that_raises_changes_no_running_statistic(rng):
    bn = nbn.BatchNorm(3, dtype=np.float64)
    bn(random_batch(rng, (8, 3), np.float64))
    before = bn.running_mean.copy(), bn.running_var.copy()
    with pytest.raises(RuntimeError, match="stop"):
        with nbn.population_stats(bn):
            bn(random_batch(rng, (8, 3), np.float64) + 100)
            raise RuntimeError("stop")
    np.testing.assert_array_equal(bn.running_mean, before[0])
    np.testing.assert_array_equal(bn.running_var, before[1])
    assert bn.training
    bn(random_batch(rng, (8, 3), np.float64))  # the moving average is back
    assert not np.array_equal(bn.running_mean, before[0])


def test_population_stats_needs_layers_with_running_statistics():
    with pytest.raises(ValueError, match="running statistics"):
        with nbn.population_stats(nbn.BatchNorm(3, track_running_stats=False)):
            pass
    bn = nbn.BatchNorm(3)
    with pytest.raises(ValueError, match="same layer twice"):
        with nbn.population_stats(bn, bn):
            pass


def test_the_example_of_docs_population_prints_its_numbers(capsys):
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "population.md").read_text()
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", docs, re.DOTALL)[:2]
    exec(compile(code, "docs/population.md", "exec"), {})
    got, expected = capsys.readouterr().out.splitlines(), printed.splitlines()
    assert got[:2] == expected[:2]  # the recipes' errors, deterministic to the digits shown
    assert got[2].split()[:-1] == expected[2].split()[:-1] and float(got[2].split()[-1]) < 1e-12


def test_the_mean_of_variances_is_what_pytorch_update_bn_computes(rng):
    """The recipe population_stats replaces, as PyTorch ships it: update_bn resets the running
    statistics and averages the batches' with momentum None."""
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import update_bn

    batches = _drifting_batches(rng)
    model = torch.nn.BatchNorm1d(3).double()
    update_bn([torch.from_numpy(b) for b in batches], model)
    averaged = nbn.BatchNorm(3, dtype=np.float64, momentum=None)
    for batch in batches:
        averaged(batch)
    np.testing.assert_allclose(averaged.running_var, model.running_var.numpy(), rtol=1e-12)
    exact = np.concatenate(batches).var(axis=0, ddof=1)
    assert np.max(np.abs(model.running_var.numpy() / exact - 1)) > 0.2
