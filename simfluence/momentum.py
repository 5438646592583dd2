"""Momentum-aware, gradient-featured Simfluence: the optimizer is part of the model.

With momentum an example's gradient keeps moving the weights for about ``1 / (1 - beta)``
updates after its batch, so its effect on a test loss is spread over later steps. Every
feature of this family is therefore the curriculum *convolved with the optimizer's own
momentum kernel* (0-based update ``t``, earlier update ``u <= t``):

    Adam (beta = beta1, bias-corrected):  k(t, u) = (1 - beta) beta^(t-u) / (1 - beta^(t+1))
    SGD (heavy ball, momentum mu):        k(t, u) = mu^(t-u)          (plain SGD: mu = 0)

For test example j the change of its loss at update t is modelled as

    L_t - L_{t-1} = alpha0_t L_{t-1} + beta0_t                                  step intercepts
                  + s * G_t,   G_t = -(lr_t / b) sum_u k(t,u) sum_{i in c_u} <g_i, g_j>(u)
                  + sum_u k(t,u) sum_{i in c_u} (A_i L_{t-1} + B_i)              ridge residual

- the *gradient prior* ``G`` is TracIn's first-order prediction pushed through the momentum
  kernel, with gradient dot products at each update interpolated linearly between the
  checkpoints of a reference run (optionally Adam-preconditioned);
  its calibration ``s`` is one global scale, one per step (shared by all test examples), or
  one per test example (``prior``);
- ``alpha0_t, beta0_t`` are unpenalised intercepts per step (or one constant pair, or none):
  the generic learning every curriculum shares;
- ``A, B`` are the paper's per-example parameters (``float[n, m]``), penalised by ridge; they
  carry what the gradients miss (redundancy, interactions) once there are enough runs.

After the rollout the prediction is shrunk toward the curriculum-blind mean trajectory,
``mean + a (rollout - mean)``, with ``a`` in (0, 1] fitted on out-of-fold predictions: it can
only lower the MSE and never changes how curricula are ranked.

Fitting is exact linear least squares on the one-step transitions (teacher forcing): the
intercepts and a per-test scale are eliminated exactly (Frisch-Waugh-Lovell), the ridge part
is solved from one eigendecomposition per test example, which gives the whole penalty path at
once. A scale shared across test examples (global or per step) is fitted first, in closed
form with the intercepts, and held fixed while each test example's ridge residual is solved.
Every choice (prior mode, intercept, penalty) is made by cross-validation over whole runs,
by the out-of-fold all-steps MSE or the across-runs Spearman (``select``).

Because it is featurised by gradients, the family can simulate curricula holding training
examples that no fitting run contained: their ridge parameters are zero (ridge with no data)
and their effect comes from the prior.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from simfluence.gradients import GradientCheckpoints
from simfluence.metrics import final_step_spearman
from simfluence.runset import PAD, RunSet
from simfluence.simulators import Simulator, SimulatorError, _step_counts
from simfluence.solvers import GroupProjector, Intercept, count_matrix

PriorMode = Literal["none", "global", "step", "test"]
PRIOR_MODES: tuple[PriorMode, ...] = ("none", "global", "step", "test")
INTERCEPTS: tuple[Intercept, ...] = ("none", "constant", "step")
# Penalties on A and B per transition (the data term is a mean over transitions, so one grid
# fits every number of runs); ``None`` in a candidate means "no per-example residual".
DEFAULT_MOMENTUM_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SHRINK_FLOOR = 1e-3


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer of the training runs, as far as the simulators need it.

    Attributes:
        kind: ``adam`` (Adam or AdamW: bias-corrected exponential average of gradients) or
            ``sgd`` (heavy-ball momentum without dampening, as ``torch.optim.SGD``).
        momentum: Adam's beta1, or SGD's momentum (0: plain SGD), in [0, 1).
    """

    kind: Literal["adam", "sgd"] = "sgd"
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("adam", "sgd"):
            raise SimulatorError(f"optimizer kind must be 'adam' or 'sgd', got {self.kind!r}")
        if not 0 <= self.momentum < 1:
            raise SimulatorError(f"optimizer momentum must lie in [0, 1), got {self.momentum!r}")

    def kernel(self, steps: int) -> np.ndarray:
        """``float64[T, T]`` lower-triangular k(t, u): the weight of update u's gradient in
        update t's step direction."""
        t, u = np.meshgrid(np.arange(steps), np.arange(steps), indexing="ij")
        power = np.where(t >= u, self.momentum ** np.maximum(t - u, 0), 0.0)
        if self.kind == "adam":
            return (1 - self.momentum) * power / (1 - self.momentum ** (t + 1))
        return power

    def filter(self, values: np.ndarray) -> np.ndarray:
        """``sum_u k(t, u) values[:, u]`` for ``values: float[R, T, ...]`` (same shape)."""
        out = np.empty(values.shape, dtype=np.float64)
        state = MomentumState(self, values.shape[:1] + values.shape[2:])
        for t in range(values.shape[1]):
            out[:, t] = state.push(values[:, t])
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "momentum": self.momentum}


class MomentumState:
    """The running momentum buffer of one feature vector per run (for rollouts)."""

    def __init__(self, optimizer: OptimizerSpec, shape: tuple[int, ...]) -> None:
        self.optimizer = optimizer
        self.buffer = np.zeros(shape)
        self.step = 0

    def push(self, values: np.ndarray) -> np.ndarray:
        """Add the next update's values and return ``sum_u k(t, u) values_u`` for this t."""
        beta = self.optimizer.momentum
        if self.optimizer.kind == "adam":
            self.buffer = beta * self.buffer + (1 - beta) * values
            scale = 1.0 / (1 - beta ** (self.step + 1))
        else:
            self.buffer = beta * self.buffer + values
            scale = 1.0
        self.step += 1
        return self.buffer * scale


@dataclass(frozen=True)
class Candidate:
    """One point of the cross-validation grid; ``l2`` None means no ridge residual."""

    prior: PriorMode
    intercept: Intercept
    l2: float | None

    def label(self) -> str:
        return f"prior={self.prior} intercept={self.intercept} l2={'off' if self.l2 is None else f'{self.l2:g}'}"


class SimfluenceMomentum(Simulator):
    """Momentum-aware Simfluence with a calibrated gradient prior (see the module docstring).

    Args:
        optimizer: the training optimizer (its momentum kernel shapes every feature).
        gradients: gradient checkpoints of a reference run of the same experiment; without
            them only ``prior="none"`` is possible.
        prior: ``none``, ``global``, ``step``, ``test`` or ``cv``.
        intercept: ``none``, ``constant``, ``step`` or ``cv``.
        l2: penalty on A and B per transition, ``"off"`` (no per-example residual) or ``"cv"``.
        l2_grid: the penalties cross-validation tries (beside "off").
        shrink: shrink the rollout toward the mean trajectory by the out-of-fold factor.
        select: ``mse`` (out-of-fold all-steps MSE) or ``spearman`` (out-of-fold across-runs
            Spearman of the final loss; ties broken by MSE).
        cv_folds: folds over whole runs.
        seed: seed of the folds.
        preconditioned: use Adam-preconditioned dot products when stored (Adam only). Off by
            default: on the embedded default the plain dot products gave a far better prior
            (Adam's per-example step is not additive: its first update is nearly a sign).
    """

    method = "simfluence_momentum"

    def __init__(
        self,
        optimizer: OptimizerSpec = OptimizerSpec(),
        gradients: GradientCheckpoints | None = None,
        prior: PriorMode | Literal["cv"] = "cv",
        intercept: Intercept | Literal["cv"] = "cv",
        l2: float | Literal["cv", "off"] = "cv",
        l2_grid: tuple[float, ...] = DEFAULT_MOMENTUM_L2_GRID,
        shrink: bool = True,
        select: Literal["mse", "spearman"] = "mse",
        cv_folds: int = 4,
        seed: int = 0,
        preconditioned: bool = False,
    ) -> None:
        if not isinstance(optimizer, OptimizerSpec):
            optimizer = OptimizerSpec(**optimizer)
        if prior not in (*PRIOR_MODES, "cv"):
            raise SimulatorError(f"prior must be one of {', '.join(PRIOR_MODES)} or 'cv', got {prior!r}")
        if intercept not in (*INTERCEPTS, "cv"):
            raise SimulatorError(f"intercept must be one of {', '.join(INTERCEPTS)} or 'cv', got {intercept!r}")
        if l2 not in ("cv", "off") and not (isinstance(l2, (int, float)) and np.isfinite(l2) and l2 > 0):
            raise SimulatorError(f"l2 must be a positive number, 'off' or 'cv', got {l2!r}")
        if not l2_grid or any(not (np.isfinite(v) and v > 0) for v in l2_grid):
            raise SimulatorError(f"l2_grid must hold positive penalties, got {l2_grid!r}")
        if select not in ("mse", "spearman"):
            raise SimulatorError(f"select must be 'mse' or 'spearman', got {select!r}")
        if prior not in ("none", "cv") and gradients is None:
            raise SimulatorError(f"prior={prior!r} needs gradient checkpoints")
        self.optimizer = optimizer
        self.gradients = gradients
        self.prior = prior
        self.intercept = intercept
        self.l2 = l2
        self.l2_grid = tuple(float(v) for v in l2_grid)
        self.shrink = shrink
        self.select = select
        self.cv_folds = cv_folds
        self.seed = seed
        self.preconditioned = preconditioned
        self.cv_table: list[dict[str, Any]] = []

    # ---- the grid --------------------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        """Every (prior, intercept, penalty) cross-validation tries."""
        priors = [self.prior] if self.prior != "cv" else list(PRIOR_MODES if self.gradients is not None else ["none"])
        intercepts = [self.intercept] if self.intercept != "cv" else list(INTERCEPTS)
        penalties: list[float | None] = (
            [None, *self.l2_grid] if self.l2 == "cv" else [None] if self.l2 == "off" else [float(self.l2)])
        out = []
        for prior in priors:
            for intercept in intercepts:
                if prior == "step" and intercept == "constant":
                    continue  # a per-step scale is exact only with per-step (or no) intercepts
                out.extend(Candidate(prior, intercept, l2) for l2 in penalties)
        return out

    # ---- fitting -----------------------------------------------------------------------------

    def _fit(self, runs: RunSet) -> None:
        self._prepare(runs)
        candidates = self.candidates()
        chosen, factor = candidates[0], 1.0
        if len(candidates) > 1 or self.shrink:
            chosen, factor = self._cross_validate(runs, candidates)
        self._fit_candidate(runs, chosen)
        self.shrink_factor = factor if self.shrink else 1.0
        self.step_change = np.diff(runs.losses.mean(axis=0), axis=0)

    def _prepare(self, runs: RunSet) -> None:
        """Dot-product tables and learning rates for the runs' test examples."""
        self.n_train, self.test_ids = runs.n_train, runs.test_ids.copy()
        if self.gradients is None:
            self.dots = np.zeros((1, runs.n_train, runs.n_tests))
            self.dot_steps = np.zeros(1, dtype=np.int64)
            self.learning_rates = np.zeros(1)
            self.batch_size = float(runs.batch_size)
            return
        g = self.gradients
        n, m = g.train_grads.shape[1], g.test_grads.shape[1]
        if n != runs.n_train or runs.test_ids.max(initial=-1) >= m:
            raise SimulatorError(f"gradients are for n={n} training and m={m} test examples; the runs have "
                                 f"n={runs.n_train} and test ids up to {int(runs.test_ids.max(initial=0))}")
        use = self.preconditioned and self.optimizer.kind == "adam"
        self.dots = g.dots(preconditioned=use)[:, :, runs.test_ids]
        self.dot_steps = g.steps.copy()
        self.learning_rates = g.learning_rates.copy()
        self.batch_size = float(g.batch_size)

    def _features(self, batches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Z ``float64[R, T, n]`` momentum-filtered counts, G ``float64[R, T, m]`` prior)."""
        R, T, _ = batches.shape
        counts = count_matrix(batches, self.n_train)  # [R*T, n]
        dense = counts.toarray().reshape(R, T, self.n_train)
        raw = np.empty((R, T, self.dots.shape[2]))
        for u in range(T):
            raw[:, u] = _step_counts(batches[:, u], self.n_train, np.float64) @ self._dots_at(u)
        prior = self.optimizer.filter(raw) * (-self._rates(T) / self.batch_size)[None, :, None]
        return self.optimizer.filter(dense), prior

    def _dots_at(self, step: int) -> np.ndarray:
        """``float64[n, m]`` dot products at ``step`` updates, interpolated between checkpoints."""
        steps = self.dot_steps
        if step <= steps[0] or len(steps) == 1:
            return self.dots[0]
        if step >= steps[-1]:
            return self.dots[-1]
        k = int(np.searchsorted(steps, step, side="right")) - 1
        w = (step - steps[k]) / (steps[k + 1] - steps[k])
        return (1 - w) * self.dots[k] + w * self.dots[k + 1]

    def _rates(self, steps: int) -> np.ndarray:
        rates = self.learning_rates
        return rates[np.minimum(np.arange(steps), len(rates) - 1)]

    def _cross_validate(self, runs: RunSet, candidates: list[Candidate]) -> tuple[Candidate, float]:
        """Score every candidate out of fold; return the chosen one and its shrink factor."""
        stats = {c: np.zeros(5) for c in candidates}  # sum d.e, sum d.d, sum e.e, count, sum of fold rho
        folds = runs.run_folds(self.cv_folds, self.seed)
        for fit_index, val_index in folds:
            fitting, validation = runs.select_runs(fit_index), runs.select_runs(val_index)
            Z_fit, G_fit = self._features(fitting.batches)
            Z_val, G_val = self._features(validation.batches)
            mean = _mean_trajectory(fitting, validation.initial_loss, validation.n_steps)
            for candidate, params in _fit_path(fitting, Z_fit, G_fit, candidates):
                pred = _rollout(params, Z_val, G_val, validation.initial_loss)
                d, e = pred[:, 1:] - mean[:, 1:], validation.losses[:, 1:] - mean[:, 1:]
                rho = final_step_spearman(pred, validation.losses, across="runs")
                stats[candidate] += [np.sum(d * e), np.sum(d * d), np.sum(e * e), e.size,
                                     0.0 if np.isnan(rho) else rho]
        table = []
        for candidate, (de, dd, ee, count, rho_sum) in stats.items():
            factor = float(np.clip(de / dd, SHRINK_FLOOR, 1.0)) if dd > 0 else 1.0
            raw_mse = (ee - 2 * de + dd) / count
            shrunk_mse = (ee - 2 * factor * de + factor**2 * dd) / count
            table.append({"candidate": candidate, "prior": candidate.prior, "intercept": candidate.intercept,
                          "l2": candidate.l2, "cv_mse": float(shrunk_mse if self.shrink else raw_mse),
                          "cv_mse_unshrunk": float(raw_mse), "cv_spearman": float(rho_sum / len(folds)),
                          "shrink_factor": factor})
        if self.select == "mse":
            best = min(table, key=lambda row: row["cv_mse"])
        else:
            best = max(table, key=lambda row: (round(row["cv_spearman"], 6), -row["cv_mse"]))
        self.cv_table = [{k: v for k, v in row.items() if k != "candidate"} for row in table]
        grid = self.l2_grid
        if best["l2"] is not None and len(grid) > 1 and best["l2"] == min(grid):
            warnings.warn(f"{self.method}: cross-validation chose l2={best['l2']:g}, at the edge of l2_grid "
                          f"{min(grid):g}..{max(grid):g}; widen the grid", stacklevel=3)
        return best["candidate"], best["shrink_factor"]

    def refit(self, runs: RunSet) -> SimfluenceMomentum:
        """Refit the chosen candidate on ``runs`` (same gradients, same shrink factor)."""
        new = type(self).from_hyperparameters(self.hyperparameters())
        new.n_train, new.test_ids = runs.n_train, runs.test_ids.copy()
        new.dots, new.dot_steps, new.learning_rates = self.dots, self.dot_steps, self.learning_rates
        new._fit_candidate(runs, self.chosen)
        new.step_change = np.diff(runs.losses.mean(axis=0), axis=0)
        return new

    def _fit_candidate(self, runs: RunSet, candidate: Candidate) -> None:
        Z, G = self._features(runs.batches)
        (_, params), = _fit_path(runs, Z, G, [candidate])
        self.chosen = candidate
        self.params = params

    # ---- simulation --------------------------------------------------------------------------

    def _rollout(self, batches: np.ndarray, initial_loss: np.ndarray, max_chunk_bytes: int,
                 dtype: type) -> np.ndarray:
        """Roll forward with the momentum state and shrink toward the mean trajectory. Beyond the
        fitted number of steps the last step's intercepts, scale and learning rate are used and
        the mean trajectory stays flat."""
        R, T, _ = batches.shape
        m = len(self.test_ids)
        out = np.empty((R, T + 1, m), dtype=dtype)
        chunk = max(1, min(R, max_chunk_bytes // (8 * 4 * T * (self.n_train + m) + 1)))
        for start in range(0, R, chunk):
            rows = slice(start, min(R, start + chunk))
            Z, G = self._features(batches[rows])
            pred = _rollout(self.params, Z, G, initial_loss[rows])
            if self.shrink_factor != 1.0:
                mean = initial_loss[rows][:, None, :] + _cumulative_change(self.step_change, T)[None]
                pred = mean + self.shrink_factor * (pred - mean)
            out[rows] = pred
        return out

    # ---- persistence -------------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        hp: dict[str, Any] = {
            "optimizer": self.optimizer.as_dict(), "prior": self.prior, "intercept": self.intercept, "l2": self.l2,
            "l2_grid": list(self.l2_grid), "shrink": self.shrink, "select": self.select, "cv_folds": self.cv_folds,
            "seed": self.seed, "preconditioned": self.preconditioned,
        }
        if hasattr(self, "chosen"):
            hp.update(chosen={"prior": self.chosen.prior, "intercept": self.chosen.intercept, "l2": self.chosen.l2},
                      shrink_factor=self.shrink_factor, batch_size=self.batch_size, cv_table=self.cv_table)
        return hp

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> SimfluenceMomentum:
        simulator = cls(OptimizerSpec(**hp["optimizer"]), None, prior="none" if hp["prior"] != "cv" else "cv",
                        intercept=hp["intercept"], l2=hp["l2"], l2_grid=tuple(hp["l2_grid"]), shrink=hp["shrink"],
                        select=hp["select"], cv_folds=hp["cv_folds"], seed=hp["seed"],
                        preconditioned=hp["preconditioned"])
        simulator.prior = hp["prior"]
        if "chosen" in hp:
            simulator.chosen = Candidate(**hp["chosen"])
            simulator.shrink_factor = float(hp["shrink_factor"])
            simulator.batch_size = float(hp["batch_size"])
            simulator.cv_table = hp["cv_table"]
        return simulator

    def parameters(self) -> dict[str, np.ndarray]:
        return {**{f"param_{k}": v for k, v in self.params.items()}, "dots": self.dots, "dot_steps": self.dot_steps,
                "learning_rates": self.learning_rates, "step_change": self.step_change}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.params = {k.removeprefix("param_"): v for k, v in arrays.items() if k.startswith("param_")}
        self.dots, self.dot_steps = arrays["dots"], arrays["dot_steps"]
        self.learning_rates, self.step_change = arrays["learning_rates"], arrays["step_change"]

    @classmethod
    def from_prior(cls, gradients: GradientCheckpoints, optimizer: OptimizerSpec, test_ids: np.ndarray | None = None,
                   scale: float = 1.0) -> SimfluenceMomentum:
        """The bare calibrated prior with a given global scale: no intercepts, no residual, no
        shrinkage (with scale 1 and no momentum, TracIn-CP with interpolated checkpoints)."""
        simulator = cls(optimizer, gradients, prior="global", intercept="none", l2="off", shrink=False)
        n, m = gradients.train_grads.shape[1], gradients.test_grads.shape[1]
        test_ids = np.arange(m) if test_ids is None else np.asarray(test_ids)
        stub = RunSet(np.zeros((1, 1, 1), dtype=np.int64), np.zeros((1, 2, len(test_ids))), n,
                      test_ids=test_ids)
        simulator._prepare(stub)
        simulator.chosen = Candidate("global", "none", None)
        simulator.params = _empty_params(n, len(test_ids), np.array([scale]), "global")
        simulator.shrink_factor = 1.0
        simulator.step_change = np.zeros((1, len(test_ids)))
        return simulator


# ---- the exact solves ------------------------------------------------------------------------


def _empty_params(n: int, m: int, scale: np.ndarray, prior: PriorMode = "none") -> dict[str, np.ndarray]:
    """Parameters with no effect but the prior's: A, B ``[n, m]``, intercepts ``[1, m]``."""
    zeros = np.zeros((1, m))
    return {"A": np.zeros((n, m)), "B": np.zeros((n, m)), "alpha0": zeros, "beta0": zeros.copy(), "scale": scale,
            "prior_mode": np.array([PRIOR_MODES.index(prior)])}


def _fit_path(runs: RunSet, Z: np.ndarray, G: np.ndarray, candidates: list[Candidate]):
    """Yield ``(candidate, params)`` for every candidate, fitted exactly on ``runs``.

    ``Z``: ``float64[R, T, n]`` filtered counts; ``G``: ``float64[R, T, m]`` prior features.
    Work that does not depend on the penalty or on a shared scale (projections, Gram matrices,
    their eigendecompositions) is done once per intercept (and per-test prior column) and
    shared by the whole path.
    """
    prev = runs.losses[:, :-1, :]
    change = runs.losses[:, 1:, :] - prev
    R, T, m = prev.shape
    n = Z.shape[2]
    designs: dict[tuple[Intercept, bool], list[Candidate]] = {}
    for c in candidates:
        designs.setdefault((c.intercept, c.prior == "test"), []).append(c)
    for (intercept, per_test), group in designs.items():
        projector = GroupProjector(prev, intercept)
        PG = projector.apply(G) if any(c.prior != "none" for c in group) else None
        targets: dict[PriorMode, tuple[np.ndarray, np.ndarray]] = {}
        for prior in dict.fromkeys(c.prior for c in group):
            scale = np.zeros(0)
            target = change
            if prior in ("global", "step"):
                Py = projector.apply(change)
                axes = (0, 1, 2) if prior == "global" else (0, 2)
                scale = np.atleast_1d(_ratio(np.sum(PG * Py, axis=axes), np.sum(PG * PG, axis=axes)))
                target = change - _scale_values(prior, scale, T, m)[None] * G
            targets[prior] = (target, scale)
        penalties = sorted({c.l2 for c in group if c.l2 is not None})
        paths = _ridge_path(projector, prev, [t for t, _ in targets.values()], Z, PG if per_test else None,
                            penalties) if penalties else [{} for _ in targets]
        path_of = dict(zip(targets, paths))
        for c in group:
            target, scale = targets[c.prior]
            A, B = path_of[c.prior].get(c.l2, (np.zeros((n, m)), np.zeros((n, m))))
            residual = target - (prev * np.einsum("rtn,nm->rtm", Z, A) + np.einsum("rtn,nm->rtm", Z, B))
            if per_test:
                scale = _ratio(np.sum(PG * projector.apply(residual), axis=(0, 1)), np.sum(PG * PG, axis=(0, 1)))
                residual = residual - scale[None, None, :] * G
            alpha0, beta0 = projector.intercepts(residual)
            params = _empty_params(n, m, scale, c.prior)
            params.update(A=A, B=B)
            if alpha0 is not None:
                params.update(alpha0=alpha0, beta0=beta0)
            yield c, params


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (a feature that never varies)."""
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)


def _ridge_path(projector: GroupProjector, prev: np.ndarray, targets: list[np.ndarray], Z: np.ndarray,
                PG: np.ndarray | None, penalties: list[float], max_bytes: int = 256 * 2**20
                ) -> list[dict[float, tuple[np.ndarray, np.ndarray]]]:
    """For each target ``float64[R, T, m]``, ``{l2: (A, B)}``: the exact ridge solution of
    every penalty, for all test examples.

    Per test example j the design is ``[L_{t-1} Z, Z]`` (``[R*T, 2n]``) with the intercept
    groups (and, given ``PG``, the per-test prior column) projected out; the penalty is
    ``l2 * (number of transitions)``. One eigendecomposition per test example serves every
    penalty and target. Test examples are processed in chunks so the projected designs stay
    under ``max_bytes``.
    """
    R, T, m = prev.shape
    n = Z.shape[2]
    N = R * T
    out = [{l2: (np.zeros((n, m)), np.zeros((n, m))) for l2 in penalties} for _ in targets]
    chunk = max(1, min(m, max_bytes // (8 * N * 2 * n)))
    projected_targets = [projector.apply(target) for target in targets]
    for start in range(0, m, chunk):
        cols = slice(start, min(m, start + chunk))
        k = cols.stop - cols.start
        design = np.concatenate([prev[:, :, cols, None] * Z[:, :, None, :],
                                 np.broadcast_to(Z[:, :, None, :], (R, T, k, n))], axis=3)  # [R, T, k, 2n]
        design = _project_columns(projector, design, cols)
        ys = [Pt[:, :, cols] for Pt in projected_targets]
        if PG is not None:
            g = PG[:, :, cols]
            gg = np.sum(g * g, axis=(0, 1))
            safe = np.where(gg > 0, gg, 1.0)
            design = design - g[..., None] * (np.einsum("rtk,rtkp->kp", g, design) / safe[:, None])[None, None]
            ys = [y - g * (np.sum(g * y, axis=(0, 1)) / safe)[None, None] for y in ys]
        X = design.reshape(N, k, 2 * n).transpose(1, 0, 2)  # [k, N, 2n]
        eigenvalues, vectors = np.linalg.eigh(X.transpose(0, 2, 1) @ X)
        for target_index, y in enumerate(ys):
            rhs = np.einsum("knp,kn->kp", X, y.reshape(N, k).T)
            projected_rhs = np.einsum("kpq,kp->kq", vectors, rhs)
            for l2 in penalties:
                theta = np.einsum("kpq,kq->kp", vectors, projected_rhs / (eigenvalues + l2 * N))
                out[target_index][l2][0][:, cols] = theta[:, :n].T
                out[target_index][l2][1][:, cols] = theta[:, n:].T
    return out


def _project_columns(projector: GroupProjector, values: np.ndarray, cols: slice) -> np.ndarray:
    """The group projection of ``values: [R, T, k, p]`` (k test examples of ``cols``, p columns)."""
    if projector.intercept == "none":
        return values
    q2 = projector.q2[:, :, cols, None]
    mean = values.mean(axis=projector.axes, keepdims=True)
    coef = np.sum(q2 * values, axis=projector.axes, keepdims=True)
    return values - mean - q2 * coef


def _scale_values(prior: PriorMode, scale: np.ndarray, steps: int, m: int) -> np.ndarray:
    """``float64[T, m]`` the prior's scale at each step for each test example."""
    if prior == "none" or scale.size == 0:
        return np.zeros((steps, m))
    if prior == "global":
        return np.full((steps, m), float(scale[0]))
    if prior == "step":
        return np.repeat(scale[np.minimum(np.arange(steps), len(scale) - 1)][:, None], m, axis=1)
    return np.broadcast_to(scale[None, :], (steps, m)).copy()


def _rollout(params: dict[str, np.ndarray], Z: np.ndarray, G: np.ndarray, initial_loss: np.ndarray) -> np.ndarray:
    """``float64[R, T+1, m]`` predictions from ``initial_loss`` with features Z, G."""
    R, T, m = G.shape
    prior = PRIOR_MODES[int(params["prior_mode"][0])]
    ZA = np.einsum("rtn,nm->rtm", Z, params["A"])
    ZB = np.einsum("rtn,nm->rtm", Z, params["B"])
    groups = params["alpha0"].shape[0]
    index = np.minimum(np.arange(T), groups - 1)
    alpha = params["alpha0"][index][None] + ZA
    beta = params["beta0"][index][None] + ZB + _scale_values(prior, params["scale"], T, m)[None] * G
    out = np.empty((R, T + 1, m))
    loss = initial_loss.astype(np.float64)
    out[:, 0] = loss
    for t in range(T):
        loss = loss + alpha[:, t] * loss + beta[:, t]
        out[:, t + 1] = loss
    return out


def _cumulative_change(step_change: np.ndarray, steps: int) -> np.ndarray:
    """``float64[T+1, m]`` the mean trajectory's change from step 0 (flat beyond the horizon)."""
    change = np.zeros((steps, step_change.shape[1]))
    k = min(steps, len(step_change))
    change[:k] = step_change[:k]
    return np.concatenate([np.zeros((1, step_change.shape[1])), np.cumsum(change, axis=0)])


def _mean_trajectory(fitting: RunSet, initial_loss: np.ndarray, steps: int) -> np.ndarray:
    """The curriculum-blind mean trajectory of ``fitting`` from ``initial_loss`` (``[R, T+1, m]``)."""
    step_change = np.diff(fitting.losses.mean(axis=0), axis=0)
    return initial_loss[:, None, :] + _cumulative_change(step_change, steps)[None]
