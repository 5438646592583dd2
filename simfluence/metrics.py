"""Metrics of simulated against true trajectories on held-out runs.

``pred`` and ``true`` are ``float[R, T+1, m]`` (runs x steps x test examples); step 0 is the
shared initial loss and is excluded, so every metric covers steps t = 1..T.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import numpy as np
import polars as pl
from scipy.stats import norm, rankdata

from simfluence.runset import RunSet


def _check(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 3 or pred.shape[1] < 2:
        raise ValueError(f"pred and true must both be [R, T+1, m] with T >= 1, got {pred.shape} and {true.shape}")
    return pred, true


def all_steps_mse(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over (run, test example) of the mean over t = 1..T of (pred - true)^2 (nats^2)."""
    pred, true = _check(pred, true)
    return float(np.mean((pred[:, 1:] - true[:, 1:]) ** 2))


def all_steps_mae(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over (run, test example) of the mean over t = 1..T of |pred - true| (nats)."""
    pred, true = _check(pred, true)
    return float(np.mean(np.abs(pred[:, 1:] - true[:, 1:])))


def final_step_spearman(pred: np.ndarray, true: np.ndarray, across: Literal["runs", "tests"] = "runs") -> float:
    """Spearman's rho of the final-step losses.

    ``across="runs"``: for each test example, rho across runs, averaged over test examples (does
    the simulator rank curricula right?). ``across="tests"``: for each run, rho across test
    examples, averaged over runs (the GPTfluence definition). Columns where either side is
    constant are skipped; NaN if none is left.
    """
    pred, true = _check(pred, true)
    if across not in ("runs", "tests"):
        raise ValueError(f"across must be 'runs' or 'tests', got {across!r}")
    p, t = pred[:, -1, :], true[:, -1, :]
    if across == "tests":
        p, t = p.T, t.T
    rho = _column_spearman(p, t) if p.shape[0] > 1 else np.array([np.nan])
    return float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan")


def _column_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column of ``x`` with the same column of ``y`` (ties averaged)."""
    rx, ry = rankdata(x, axis=0), rankdata(y, axis=0)
    rx -= rx.mean(axis=0)
    ry -= ry.mean(axis=0)
    denominator = np.sqrt((rx**2).sum(axis=0) * (ry**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=0) / denominator, np.nan)


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    pred: np.ndarray,
    true: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric``, resampling held-out runs with replacement.

    Right for metrics that are means over runs (all-steps MSE and MAE, across-tests Spearman).
    """
    rng = np.random.default_rng(seed)
    R = pred.shape[0]
    values = np.array([metric(pred[idx], true[idx]) for idx in rng.integers(0, R, (n_boot, R))])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def jackknife_ci(
    metric: Callable[[np.ndarray, np.ndarray], float], pred: np.ndarray, true: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """Normal interval with the leave-one-run-out jackknife standard error.

    For statistics that compare runs with each other (across-runs Spearman): a bootstrap
    resample repeats runs, has fewer distinct curricula, and its rank correlation is biased
    low, so percentile intervals of it miss the estimate itself. The jackknife has no such
    artefact.
    """
    R = pred.shape[0]
    point = metric(pred, true)
    keep = ~np.eye(R, dtype=bool)
    values = np.array([metric(pred[keep[r]], true[keep[r]]) for r in range(R)])
    if R < 3 or not np.isfinite(point) or not np.all(np.isfinite(values)):
        return float("nan"), float("nan")
    se = np.sqrt((R - 1) / R * np.sum((values - values.mean()) ** 2))
    z = float(norm.ppf(0.5 + level / 2))
    return float(max(point - z * se, -1.0)), float(min(point + z * se, 1.0))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "all_steps_mse": all_steps_mse,
    "all_steps_mae": all_steps_mae,
    "spearman_across_runs": lambda p, t: final_step_spearman(p, t, "runs"),
    "spearman_across_tests": lambda p, t: final_step_spearman(p, t, "tests"),
}


def confidence_interval(name: str, pred: np.ndarray, true: np.ndarray, n_boot: int = 1000,
                        level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """The interval each metric of :data:`METRICS` is reported with, over held-out runs:
    jackknife for across-runs Spearman, percentile bootstrap for the rest."""
    if name == "spearman_across_runs":
        return jackknife_ci(METRICS[name], pred, true, level)
    return bootstrap_ci(METRICS[name], pred, true, n_boot, level, seed)


def score(simulators: Mapping[str, object], heldout: RunSet, n_boot: int = 1000, seed: int = 0) -> pl.DataFrame:
    """Score fitted simulators on held-out runs (never used for fitting).

    Returns a tidy table with one row per (method, metric): columns ``method``, ``metric``,
    ``value``, ``ci_low``, ``ci_high`` (95% intervals over held-out runs, see
    :func:`confidence_interval`).
    """
    frames = []
    for name, simulator in simulators.items():
        pred = simulator.simulate(heldout.batches, heldout.initial_loss)  # type: ignore[attr-defined]
        frames.append(score_predictions(name, pred, heldout.losses, n_boot, seed))
    return pl.concat(frames)


def score_predictions(name: str, pred: np.ndarray, true: np.ndarray, n_boot: int = 1000,
                      seed: int = 0) -> pl.DataFrame:
    """:func:`score` of one method from its predictions ``float[R, T+1, m]`` of the held-out
    runs' true losses ``true`` (same shape)."""
    rows = []
    for metric_name, metric in METRICS.items():
        low, high = confidence_interval(metric_name, pred, true, n_boot=n_boot, seed=seed)
        rows.append({"method": name, "metric": metric_name, "value": metric(pred, true), "ci_low": low,
                     "ci_high": high})
    return pl.DataFrame(rows)


def leaderboard(scores: pl.DataFrame) -> pl.DataFrame:
    """One row per method (metric values as columns), best all-steps MSE first."""
    return scores.pivot(on="metric", index="method", values="value").sort("all_steps_mse")
