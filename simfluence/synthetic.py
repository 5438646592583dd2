"""Synthetic training runs with known ground truth, for tests and benchmarks.

(a) :func:`linear_runs`: runs produced by a known Simfluence-Linear simulator plus process noise.
(b) :func:`redundancy_runs`: each test example has a few related training examples; each
    appearance of one moves the loss a fixed fraction of the way to a floor, so repeats
    saturate. An additive model (a constant drop per appearance) cannot represent this.
(c) :func:`momentum_runs`: a gradient-similarity effect spread over later steps by the
    optimizer's momentum, the process the momentum-aware Simfluence assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simfluence.curricula import uniform
from simfluence.gradients import GradientCheckpoints
from simfluence.momentum import OptimizerSpec
from simfluence.runset import RunSet
from simfluence.solvers import count_matrix


@dataclass(frozen=True)
class LinearTruth:
    """The parameters that generated a synthetic RunSet (residual or paper form).

    ``A``, ``B``: ``float64[n, m]``; ``alpha0``, ``beta0``: ``float64[T, m]`` per-step intercepts
    (zeros when the generator had none); ``base``: 1 (residual) or 0 (paper).
    """

    A: np.ndarray
    B: np.ndarray
    alpha0: np.ndarray
    beta0: np.ndarray
    base: float


def linear_runs(
    n: int,
    m: int,
    runs: int,
    steps: int,
    batch_size: int,
    *,
    noise: float = 0.0,
    step_intercept: bool = False,
    seed: int = 0,
) -> tuple[RunSet, LinearTruth]:
    """Runs of a residual-form Simfluence-Linear simulator on uniform curricula.

    ``L_t = (1 + alpha0_t + sum A_i) L_{t-1} + beta0_t + sum B_i + noise * N(0, 1)``.
    Initial losses differ per run (a model re-initialised with jitter), so the multiplicative
    and additive effects are identifiable even at step 1.
    """
    rng = np.random.default_rng(seed)
    A = -np.abs(rng.normal(0.0, 0.03 / batch_size, (n, m)))
    B = rng.normal(0.0, 0.03 / batch_size, (n, m))
    alpha0 = np.zeros((steps, m))
    beta0 = np.zeros((steps, m))
    if step_intercept:
        alpha0 = rng.normal(-0.01, 0.005, (steps, m))
        beta0 = rng.normal(0.0, 0.01, (steps, m))
    batches = uniform(n, runs, steps, batch_size, seed=seed + 1)
    counts = count_matrix(batches, n)
    losses = np.empty((runs, steps + 1, m))
    losses[:, 0] = rng.uniform(1.0, 3.0, m) + rng.normal(0.0, 0.1, (runs, m))
    for t in range(steps):
        step_counts = counts[np.arange(runs) * steps + t]
        alpha = 1.0 + alpha0[t] + step_counts @ A
        beta = beta0[t] + step_counts @ B
        losses[:, t + 1] = alpha * losses[:, t] + beta + noise * rng.standard_normal((runs, m))
    return RunSet(batches, losses, n_train=n), LinearTruth(A, B, alpha0, beta0, 1.0)


def redundancy_runs(
    n: int,
    m: int,
    runs: int,
    steps: int,
    batch_size: int,
    *,
    related: int = 3,
    rate: float = 0.35,
    floor: float = 0.2,
    noise: float = 0.005,
    seed: int = 0,
) -> tuple[RunSet, np.ndarray]:
    """Runs where each appearance of a related example moves the loss ``rate`` of the way to
    ``floor``: ``L <- floor + (1 - rate) (L - floor)``; unrelated examples do nothing.

    Returns the RunSet and ``related_ids: int64[m, related]``.
    """
    rng = np.random.default_rng(seed)
    related_ids = np.stack([rng.choice(n, related, replace=False) for _ in range(m)])
    batches = uniform(n, runs, steps, batch_size, seed=seed + 1)
    counts = count_matrix(batches, n)
    relevance = np.zeros((n, m))
    relevance[related_ids, np.arange(m)[:, None]] = 1.0
    losses = np.empty((runs, steps + 1, m))
    losses[:, 0] = rng.uniform(1.5, 2.5, m)
    for t in range(steps):
        hits = counts[np.arange(runs) * steps + t] @ relevance
        keep = (1.0 - rate) ** hits
        losses[:, t + 1] = floor + keep * (losses[:, t] - floor) + noise * rng.standard_normal((runs, m))
    return RunSet(batches, losses, n_train=n), related_ids


@dataclass(frozen=True)
class MomentumTruth:
    """What generated :func:`momentum_runs`: the optimizer, the true scale of the gradient
    prior, per-example residual effects ``B: float64[n, m]`` and step intercepts
    ``beta0: float64[T, m]``."""

    optimizer: OptimizerSpec
    scale: float
    B: np.ndarray
    beta0: np.ndarray


def momentum_runs(
    n: int,
    m: int,
    runs: int,
    steps: int,
    batch_size: int,
    *,
    optimizer: OptimizerSpec = OptimizerSpec("adam", 0.9),
    dim: int = 16,
    learning_rate: float = 0.05,
    scale: float = 0.6,
    residual: float = 0.01,
    noise: float = 0.002,
    seed: int = 0,
    batches: np.ndarray | None = None,
) -> tuple[RunSet, GradientCheckpoints, MomentumTruth]:
    """Runs whose loss changes are a batch's effect spread over later steps by the optimizer's
    momentum kernel: ``L_t - L_{t-1} = beta0_t + sum_u k(t,u) sum_{i in c_u} (B_i - scale *
    lr/b <g_i, g_j>) + noise``, with gradients ``g`` fixed random vectors (one checkpoint at
    step 0, returned). A model without momentum attributes each effect to the wrong step.
    """
    rng = np.random.default_rng(seed)
    train = rng.normal(0.0, 1.0, (n, dim))
    test = rng.normal(0.0, 1.0, (m, dim))
    dots = train @ test.T
    B = rng.normal(0.0, residual, (n, m))
    beta0 = rng.normal(-0.01, 0.005, (steps, m))
    batches = uniform(n, runs, steps, batch_size, seed=seed + 1) if batches is None else np.asarray(batches)
    counts = count_matrix(batches, n).toarray().reshape(runs, steps, n)
    effect = counts @ (B - scale * learning_rate / batch_size * dots)  # [R, T, m]
    change = beta0[None] + optimizer.filter(effect) + noise * rng.standard_normal((runs, steps, m))
    losses = _accumulate(rng, change)
    gradients = GradientCheckpoints(np.array([0]), np.full(steps, learning_rate), train[None].astype(np.float32),
                                    test[None].astype(np.float32), batch_size=batch_size)
    return RunSet(batches, losses, n_train=n), gradients, MomentumTruth(optimizer, scale, B, beta0)


def helpful_runs(
    n: int,
    m: int,
    runs: int,
    steps: int,
    batch_size: int,
    *,
    helpful: int = 3,
    effect: float = 0.05,
    spread: float = 0.004,
    noise: float = 0.002,
    seed: int = 0,
) -> tuple[RunSet, np.ndarray, np.ndarray]:
    """Additive runs where ``helpful`` examples lower every test loss by ``effect`` nats per
    appearance and the others move it by ``N(spread, spread)`` (mostly up):
    ``L_t = L_{t-1} + sum_{i in c_t} B_i + noise * N(0, 1)``. The best curriculum is known: the
    helpful examples as often as allowed, then the examples with the lowest ``B`` row means.

    Returns the RunSet, ``helpful_ids: int64[helpful]`` and ``B: float64[n, m]``.
    """
    rng = np.random.default_rng(seed)
    B = rng.normal(spread, spread, (n, m))
    helpful_ids = np.sort(rng.choice(n, helpful, replace=False))
    B[helpful_ids] = -effect
    batches = uniform(n, runs, steps, batch_size, seed=seed + 1)
    counts = count_matrix(batches, n).toarray().reshape(runs, steps, n)
    change = counts @ B + noise * rng.standard_normal((runs, steps, m))
    losses = _accumulate(rng, change)
    return RunSet(batches, losses, n_train=n), helpful_ids, B


def _accumulate(rng: np.random.Generator, change: np.ndarray) -> np.ndarray:
    """``float64[R, T+1, m]`` losses from one-step changes ``[R, T, m]`` (nats): every run starts
    at the same initial loss per test example, drawn from U(1.5, 2.5)."""
    runs, _, m = change.shape
    start = np.broadcast_to(rng.uniform(1.5, 2.5, m), (runs, 1, m))
    return np.concatenate([start, start + np.cumsum(change, axis=1)], axis=1)
