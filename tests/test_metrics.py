"""Metrics against hand-computed values and scipy."""

import numpy as np
import pytest
from scipy.stats import spearmanr

import simfluence as sf
from simfluence import metrics


def test_mse_and_mae_by_hand():
    true = np.zeros((2, 3, 1))
    pred = np.array([[[9.0], [1.0], [2.0]], [[9.0], [0.0], [-2.0]]])  # step 0 is ignored
    assert metrics.all_steps_mse(pred, true) == pytest.approx((1 + 4 + 0 + 4) / 4)
    assert metrics.all_steps_mae(pred, true) == pytest.approx((1 + 2 + 0 + 2) / 4)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(7, 4, 5))
    pred = true + rng.normal(scale=0.7, size=true.shape)
    pred[3, -1, 0] = pred[4, -1, 0]  # a tie
    across_runs = np.mean([spearmanr(pred[:, -1, j], true[:, -1, j])[0] for j in range(5)])
    across_tests = np.mean([spearmanr(pred[r, -1], true[r, -1])[0] for r in range(7)])
    assert metrics.final_step_spearman(pred, true, "runs") == pytest.approx(across_runs)
    assert metrics.final_step_spearman(pred, true, "tests") == pytest.approx(across_tests)


def test_spearman_skips_constant_columns():
    true = np.zeros((4, 2, 2))
    true[:, -1, 1] = [1, 2, 3, 4]
    pred = true.copy()
    assert metrics.final_step_spearman(pred, true, "runs") == pytest.approx(1.0)
    assert np.isnan(metrics.final_step_spearman(np.zeros((4, 2, 2)), np.zeros((4, 2, 2)), "runs"))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must both be"):
        metrics.all_steps_mse(np.zeros((2, 3, 1)), np.zeros((2, 4, 1)))
    with pytest.raises(ValueError, match="across"):
        metrics.final_step_spearman(np.zeros((2, 3, 1)), np.zeros((2, 3, 1)), "steps")


@pytest.mark.parametrize("noise", [0.1, 0.5, 2.0])
def test_intervals_bracket_the_estimate_and_are_seeded(noise):
    rng = np.random.default_rng(1)
    true = rng.normal(size=(16, 5, 40))
    pred = true + rng.normal(scale=noise, size=true.shape)
    for name, metric in metrics.METRICS.items():
        low, high = metrics.confidence_interval(name, pred, true, n_boot=300, seed=3)
        assert low <= metric(pred, true) <= high, name
        assert (low, high) == metrics.confidence_interval(name, pred, true, n_boot=300, seed=3)


def test_jackknife_matches_its_formula():
    rng = np.random.default_rng(2)
    true = rng.normal(size=(6, 2, 3))
    pred = true + rng.normal(size=true.shape)
    metric = metrics.METRICS["spearman_across_runs"]
    loo = np.array([metric(np.delete(pred, r, 0), np.delete(true, r, 0)) for r in range(6)])
    se = np.sqrt(5 / 6 * ((loo - loo.mean()) ** 2).sum())
    low, high = metrics.jackknife_ci(metric, pred, true)
    point = metric(pred, true)
    assert low == pytest.approx(max(-1, point - 1.959964 * se)) and high == pytest.approx(min(1, point + 1.959964 * se))


def test_score_is_a_tidy_table():
    runs, truth = sf.synthetic.linear_runs(20, 4, 10, 8, 4, seed=0)
    sims = {"true": sf.SimfluenceLinear.from_parameters(truth.A, truth.B), "constant": sf.Constant().fit(runs)}
    table = metrics.score(sims, runs, n_boot=20)
    assert table.columns == ["method", "metric", "value", "ci_low", "ci_high"]
    assert table.height == 2 * len(metrics.METRICS)
    board = metrics.leaderboard(table)
    assert board["method"].to_list() == ["true", "constant"]
    assert board.filter(board["method"] == "true")["all_steps_mse"][0] == pytest.approx(0.0, abs=1e-20)
