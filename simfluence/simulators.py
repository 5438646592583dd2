"""Training-run simulators: fit on logged runs, predict every test loss at every step.

Every simulator here is an affine recurrence over the steps of a curriculum,

    L_t = alpha_t(c_t) * L_{t-1} + beta_t(c_t)        (alpha, beta: float[R, m] per step)

so they share one rollout (:meth:`Simulator.simulate`) and differ in how alpha and beta come
from the batch. Shapes: batches ``int[R, T, b]`` (``-1`` pads), initial loss ``float[R, m]``,
predictions ``float[R, T+1, m]`` (nats). Saved simulators are a folder with
``simulator.json`` (method, hyperparameters, sizes) and ``parameters.safetensors``; nothing is
pickled.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file

from simfluence._kernels import linear_rollout
from simfluence.errors import SimfluenceError
from simfluence.gradients import GradientCheckpoints
from simfluence.runset import PAD, RunSet
from simfluence.solvers import (
    Intercept,
    RidgeSolution,
    SolverName,
    TransitionProblem,
    count_matrix,
    solve_ridge_path,
)

FORMAT_VERSION = 1
# Penalties per transition, as in simfluence.momentum: the data term is the mean squared error
# over the R x T one-step transitions, so one grid fits every number of runs (the penalty on
# the summed squared errors is l2 * R * T). On the demo preset's 38 fitting runs
# cross-validation chose about 0.7 per transition (1000 on the sum).
DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# CG tolerance of the cross-validation paths (relative residual of the normal equations; the
# final fit is solved to 1e-8, the direct solver is exact either way). Against 1e-8 solves it
# moved the validation errors by at most 3e-4 relative per test example and 1e-5 for their mean
# over test examples on the CV benchmark (2e-3 and 3e-4 on the small problems of the tests, up
# to 3e-2 per test example on a tiny one), with the same choices in every case measured; it
# needs about half the iterations.
CV_TOLERANCE = 1e-4
# The type the cross-validation paths compute their operator products and their solutions'
# fitted values in (multi-shift CG's vectors, inner products and recurrences stay float64):
# float32 halves the memory traffic of the products, about 1.24x on a whole CV fit of the CV
# benchmark, and moved its validation errors by at most 9e-4 relative per test example (1.5e-5
# for the mean) against 1e-8 solves in float64, with the same choices.
CV_SHIFT_DTYPE = np.float32


class SimulatorError(SimfluenceError):
    """Raised for a simulator used wrongly: not fitted, mismatched data, a bad bundle."""


class Simulator(ABC):
    """Common interface: ``fit(runs) -> self``, ``simulate(batches, initial_loss)``."""

    method: ClassVar[str]
    _registry: ClassVar[dict[str, type[Simulator]]] = {}

    n_train: int | None = None
    test_ids: np.ndarray | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            Simulator._registry[cls.method] = cls

    # ---- fitting -------------------------------------------------------------------------

    def fit(self, runs: RunSet) -> Simulator:
        """Fit on the runs (teacher forcing on one-step transitions) and return ``self``."""
        self.n_train = runs.n_train
        self.test_ids = runs.test_ids.copy()
        self._fit(runs)
        return self

    @abstractmethod
    def _fit(self, runs: RunSet) -> None: ...

    def refit(self, runs: RunSet) -> Simulator:
        """A new simulator of this method fitted on ``runs`` with every choice this one's
        cross-validation made held fixed (no cross-validation): cheap, and the unit of the
        bootstrap intervals of :mod:`simfluence.whatif`. ``runs`` must have the same test
        examples."""
        return type(self).from_hyperparameters(self.hyperparameters()).fit(runs)

    # ---- simulation ----------------------------------------------------------------------

    def simulate(
        self,
        batches: np.ndarray,
        initial_loss: np.ndarray,
        *,
        max_chunk_bytes: int = 256 * 2**20,
        dtype: type = np.float64,
    ) -> np.ndarray:
        """Roll the simulator forward from ``initial_loss`` over ``batches``.

        Args:
            batches: ``int[R, T, b]`` curricula (``-1`` pads); ids must be < ``n_train``.
            initial_loss: ``float[R, m]`` observed losses before the first update.
            max_chunk_bytes: bound on the temporaries of one chunk of runs (the compiled
                Simfluence-Linear rollout has none).
            dtype: float64 (default) or float32 (half the memory, faster).

        Returns:
            ``dtype[R, T+1, m]`` predicted losses; ``[:, 0]`` is ``initial_loss``.
        """
        batches, initial_loss = self._check_inputs(batches, initial_loss)
        return self._rollout(batches, initial_loss, max_chunk_bytes, dtype)

    @abstractmethod
    def _rollout(self, batches: np.ndarray, initial_loss: np.ndarray, max_chunk_bytes: int,
                 dtype: type) -> np.ndarray:
        """:meth:`simulate` on checked inputs (``batches`` ``int[R, T, b]``, ``initial_loss``
        ``float64[R, m]``)."""

    def _check_inputs(self, batches: np.ndarray, initial_loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batches, initial_loss as float64), or a SimulatorError naming what is wrong."""
        if self.n_train is None or self.test_ids is None:
            raise SimulatorError(f"{self.method}: call fit() (or load a fitted simulator) before simulate()")
        batches = np.asarray(batches)
        if batches.ndim != 3 or not np.issubdtype(batches.dtype, np.integer):
            raise SimulatorError(f"batches must be an integer array [R, T, b], got {batches.dtype} {batches.shape}")
        bad = (batches < PAD) | (batches >= self.n_train)
        if bad.any():
            index = tuple(int(v) for v in np.argwhere(bad)[0])
            raise SimulatorError(
                f"unknown training id {int(batches[index])} at (run, step index, position) {index}: "
                f"this simulator was fitted on ids 0..{self.n_train - 1}"
            )
        initial_loss = np.asarray(initial_loss, dtype=np.float64)
        R, m = batches.shape[0], len(self.test_ids)
        if initial_loss.shape != (R, m):
            raise SimulatorError(
                f"initial_loss must have shape [R, m] = [{R}, {m}] (runs x test examples), got {initial_loss.shape}"
            )
        if not np.all(np.isfinite(initial_loss)):
            raise SimulatorError("initial_loss has NaN or infinite values")
        return batches, initial_loss

    # ---- persistence ---------------------------------------------------------------------

    def hyperparameters(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments and fitted scalars (none by default)."""
        return {}

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> Simulator:
        """An unfitted simulator from :meth:`hyperparameters`' output."""
        return cls()

    def parameters(self) -> dict[str, np.ndarray]:
        """The fitted arrays (names to arrays), as saved (none by default)."""
        return {}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Set the fitted arrays from :meth:`parameters`' output."""

    def save(self, path: str | Path) -> Path:
        """Write ``simulator.json`` and ``parameters.safetensors`` into the folder ``path``."""
        if self.n_train is None or self.test_ids is None:
            raise SimulatorError(f"{self.method}: only a fitted simulator can be saved")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {name: np.ascontiguousarray(a) for name, a in self.parameters().items()}
        arrays["test_ids"] = np.ascontiguousarray(self.test_ids)
        save_file(arrays, str(path / "parameters.safetensors"))
        meta = {
            "format": FORMAT_VERSION,
            "method": self.method,
            "hyperparameters": self.hyperparameters(),
            "n_train": self.n_train,
            "n_tests": len(self.test_ids),
        }
        (path / "simulator.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return path


def load_simulator(path: str | Path) -> Simulator:
    """Load a simulator saved by :meth:`Simulator.save` (no pickle involved)."""
    path = Path(path)
    meta_path, params_path = path / "simulator.json", path / "parameters.safetensors"
    if not meta_path.is_file() or not params_path.is_file():
        raise SimulatorError(f"{path} is not a saved simulator (needs simulator.json and parameters.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise SimulatorError(f"{meta_path}: not valid JSON: {error}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise SimulatorError(f"{meta_path}: unsupported format {meta.get('format')!r} (expected {FORMAT_VERSION})")
    import simfluence.momentum  # noqa: F401 - registers the simulators defined outside this module

    cls = Simulator._registry.get(meta.get("method", ""))
    if cls is None:
        raise SimulatorError(f"{meta_path}: unknown method {meta.get('method')!r}")
    simulator = cls.from_hyperparameters(meta["hyperparameters"])
    arrays = load_file(str(params_path))
    simulator.n_train = int(meta["n_train"])
    simulator.test_ids = arrays.pop("test_ids")
    simulator._restore(arrays)
    return simulator


def _step_counts(batch: np.ndarray, n: int, dtype: type) -> sp.csr_matrix:
    """``csr[R, n]`` counts of the ids in one step's batches ``int[R, b]``."""
    rows, pos = np.nonzero(batch != PAD)
    counts = sp.csr_matrix((np.ones(len(rows), dtype=dtype), (rows, batch[rows, pos])), shape=(batch.shape[0], n))
    counts.sum_duplicates()
    return counts


class StepwiseSimulator(Simulator):
    """A simulator given by one (alpha, beta) pair per update: ``L_t = alpha_t * L_{t-1} + beta_t``."""

    @abstractmethod
    def _coefficients(self, step_counts: sp.csr_matrix, step: int, dtype: type) -> tuple[Any, Any]:
        """(alpha, beta) of update ``step`` (0-based) for ``step_counts: csr[R, n]``; each a
        ``float[R, m]`` array or something that broadcasts to it."""

    def _rollout(self, batches: np.ndarray, initial_loss: np.ndarray, max_chunk_bytes: int,
                 dtype: type) -> np.ndarray:
        R, T, _ = batches.shape
        m = len(self.test_ids)
        out = np.empty((R, T + 1, m), dtype=dtype)
        chunk = max(1, min(R, max_chunk_bytes // (8 * 6 * m)))
        for start in range(0, R, chunk):
            rows = slice(start, min(R, start + chunk))
            size = rows.stop - rows.start
            loss = initial_loss[rows].astype(dtype)
            out[rows, 0] = loss
            # counts of every step of the chunk at once, row t * size + r (one sparse build)
            step_major = count_matrix(np.ascontiguousarray(batches[rows].transpose(1, 0, 2)), self.n_train)
            data, indices, indptr = step_major.data.astype(dtype), step_major.indices, step_major.indptr
            for t in range(T):
                lo, hi = indptr[t * size], indptr[(t + 1) * size]
                step_counts = sp.csr_matrix((data[lo:hi], indices[lo:hi], indptr[t * size : (t + 1) * size + 1] - lo),
                                            shape=(size, self.n_train))
                alpha, beta = self._coefficients(step_counts, t, dtype)
                loss = alpha * loss + beta
                out[rows, t + 1] = loss
        return out


# ---- baselines that ignore the curriculum --------------------------------------------------


class Constant(StepwiseSimulator):
    """L_t = L_0: no learning at all."""

    method = "constant"

    def _fit(self, runs: RunSet) -> None:
        pass

    def _coefficients(self, step_counts, step, dtype):
        return 1.0, 0.0


class MeanTrajectory(StepwiseSimulator):
    """L_t = L_0 + (mean_t - mean_0): the fitting runs' mean curve, blind to the curriculum.
    Beyond the fitted horizon the loss stays at its last value."""

    method = "mean_trajectory"

    def _fit(self, runs: RunSet) -> None:
        self.step_change = np.diff(runs.losses.mean(axis=0), axis=0)  # [T, m]

    def _coefficients(self, step_counts, step, dtype):
        if step >= len(self.step_change):
            return 1.0, 0.0
        return 1.0, self.step_change[step].astype(dtype)

    def parameters(self) -> dict[str, np.ndarray]:
        return {"step_change": self.step_change}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.step_change = arrays["step_change"]


# ---- Simfluence-Linear and its variants ----------------------------------------------------


@dataclass(frozen=True)
class LinearParameters:
    """The fitted parameters of a Simfluence-Linear model: a value, apart from the estimator
    that fits them.

    ``A``, ``B``: ``float64[n, m]`` multiplicative and additive effects of each training example
    on each test loss, or None when the model has no such block (Simfluence-Additive has no A,
    Simfluence-Multiplicative no B); ``alpha0``, ``beta0``: ``float64[G, m]`` step intercepts
    (G = 1: one for every step); ``base``: 1 for the residual form (alpha = 1 + sum A), 0 for
    the paper's (alpha = sum A).
    """

    A: np.ndarray | None
    B: np.ndarray | None
    alpha0: np.ndarray
    beta0: np.ndarray
    base: float

    def __post_init__(self) -> None:
        if self.A is None and self.B is None:
            raise SimulatorError("a Simfluence-Linear model needs an A block, a B block or both")
        shapes = {a.shape for a in (self.A, self.B) if a is not None}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise SimulatorError(f"A and B must both be [n, m], got {sorted(shapes)}")
        m = self.n_tests
        if self.alpha0.ndim != 2 or self.alpha0.shape[1] != m or self.beta0.shape != self.alpha0.shape:
            raise SimulatorError(f"alpha0 and beta0 must be [G, {m}], got {self.alpha0.shape} and {self.beta0.shape}")

    @property
    def n_train(self) -> int:
        return (self.A if self.A is not None else self.B).shape[0]

    @property
    def n_tests(self) -> int:
        return (self.A if self.A is not None else self.B).shape[1]

    @cached_property
    def _tables(self) -> dict[str, tuple[np.ndarray, ...]]:
        return {}

    def rollout(self, batches: np.ndarray, out: np.ndarray, threads: int | None = None) -> None:
        """Fill ``out[:, 1:]`` by rolling forward over ``batches`` (``int[R, T, b]``) from the
        initial losses in ``out[:, 0]`` (``out``: ``[R, T+1, m]``, float32 or float64; the
        arithmetic is in that type). Beyond the intercepts' horizon, the last group's are used.
        The compiled kernel runs on ``threads`` threads (default: every core), each on a range
        of runs, or of test examples when there are fewer runs than threads."""
        key = out.dtype.str
        if key not in self._tables:  # the parameters in out's dtype, contiguous, built once
            empty = np.zeros((0, self.n_tests))
            self._tables[key] = tuple(np.ascontiguousarray(empty if a is None else a, dtype=out.dtype)
                                      for a in (self.A, self.B, self.alpha0, self.beta0))
        A, B, alpha0, beta0 = self._tables[key]
        batches = np.ascontiguousarray(batches, dtype=np.int64)
        R, m = out.shape[0], out.shape[2]
        blocks = -(-m // 64)
        workers = max(1, min(threads or os.cpu_count() or 1, max(R, blocks)))
        if R >= workers:
            per = -(-R // workers)
            tasks = [((lo, min(R, lo + per)), (0, m)) for lo in range(0, R, per)]
        else:
            per = -(-blocks // workers) * 64
            tasks = [((0, R), (lo, min(m, lo + per))) for lo in range(0, m, per)]

        def run(task: tuple[tuple[int, int], tuple[int, int]]) -> None:
            linear_rollout(batches, A, B, self.A is not None, self.B is not None, alpha0, beta0, self.base, out,
                           np.array(task[0], dtype=np.int64), np.array(task[1], dtype=np.int64))

        if len(tasks) == 1:
            run(tasks[0])
        else:
            with ThreadPoolExecutor(len(tasks)) as pool:
                list(pool.map(run, tasks))

    @classmethod
    def join(cls, parts: list[LinearParameters]) -> LinearParameters:
        """The parameters of disjoint shards of test examples (same training set, same blocks,
        same form) as one, in order."""
        first = parts[0]
        if any((p.A is None) != (first.A is None) or (p.B is None) != (first.B is None) or p.base != first.base
               or p.n_train != first.n_train or len(p.alpha0) != len(first.alpha0) for p in parts):
            raise SimulatorError("only shards of one model (same blocks, form, training set, intercepts) can be joined")

        def stacked(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays, axis=1)

        return cls(stacked("A"), stacked("B"), stacked("alpha0"), stacked("beta0"), first.base)

    def arrays(self) -> dict[str, np.ndarray]:
        """For a bundle: every block, a missing one as zeros (the format is the same for all)."""
        def block(values: np.ndarray | None) -> np.ndarray:
            return np.zeros((self.n_train, self.n_tests)) if values is None else values

        return {"A": block(self.A), "B": block(self.B), "alpha0": self.alpha0, "beta0": self.beta0}


class SimfluenceLinear(Simulator):
    """Simfluence-Linear: ``L_t = alpha(c_t) L_{t-1} + beta(c_t)`` with per-example A and B.

    The estimator: it chooses hyperparameters by cross-validation and fits; what it fits is a
    :class:`LinearParameters` value (``params``), which simulation, bundles and the joining of
    Dask shards use.

    Args:
        parametrization: ``residual`` (alpha = 1 + sum A; the penalty shrinks an unseen example
            to "no effect") or ``paper`` (alpha = sum A; shrinks to "loss collapses").
        intercept: ``none``, ``constant`` (one unpenalised alpha0, beta0 per test example),
            ``step`` (one per step and test example; beyond the fitted horizon, the last one's),
            or ``cv`` to choose among the three by cross-validation.
        l2: positive penalty on A and B per transition (the data term is the mean squared
            error over the one-step transitions), or ``"cv"`` to choose it from ``l2_grid``.
        l2_b: penalty on B per transition if different from A's.
        l2_grid: candidate penalties (per transition) for cross-validation.
        cv_folds: folds over whole runs (never over steps of the same run).
        per_test_l2: choose the penalty per test example instead of one global value.
        solver: ``auto``, ``direct`` or ``cg`` (see :mod:`simfluence.solvers`).
        seed: seed of the cross-validation folds.
        threads: solver threads (None: every core; 1 inside a Dask worker).

    Cross-validation scores every candidate by the simulated all-steps MSE on the held-out
    fold (the metric the simulator is judged by). Per fold and intercept the whole penalty
    grid is one exact path (:func:`simfluence.solvers.solve_ridge_path`): what does not depend
    on the penalty is built once. The penalty is global by default: with a handful of folds the
    per-test-example argmin is noisy and overfits the folds; ``per_test_l2=True`` is offered
    for many runs.
    """

    method = "simfluence_linear"
    use_a: ClassVar[bool] = True
    use_b: ClassVar[bool] = True

    def __init__(
        self,
        parametrization: Literal["residual", "paper"] = "residual",
        intercept: Intercept | Literal["cv"] = "step",
        l2: float | Literal["cv"] = "cv",
        l2_b: float | None = None,
        l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
        cv_folds: int = 5,
        per_test_l2: bool = False,
        solver: SolverName = "auto",
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        if parametrization not in ("residual", "paper"):
            raise SimulatorError(f"parametrization must be 'residual' or 'paper', got {parametrization!r}")
        if intercept not in ("none", "constant", "step", "cv"):
            raise SimulatorError(f"intercept must be 'none', 'constant', 'step' or 'cv', got {intercept!r}")
        if l2 != "cv" and not (isinstance(l2, (int, float)) and np.isfinite(l2) and l2 > 0):
            raise SimulatorError(f"l2 must be a positive number or 'cv', got {l2!r}")
        if l2_b is not None and not (np.isfinite(l2_b) and l2_b > 0):
            raise SimulatorError(f"l2_b must be positive, got {l2_b!r}")
        if not l2_grid or any(not (np.isfinite(v) and v > 0) for v in l2_grid):
            raise SimulatorError(f"l2_grid must hold positive penalties, got {l2_grid!r}")
        self.parametrization = parametrization
        self.intercept = intercept
        self.l2 = l2
        self.l2_b = l2_b
        self.l2_grid = tuple(float(v) for v in l2_grid)
        self.cv_folds = cv_folds
        self.per_test_l2 = per_test_l2
        self.solver = solver
        self.seed = seed
        self.threads = threads
        # Penalties are per transition; a bundle saved before they were held its fitted penalty
        # on the summed errors ("sum"), which refit converts.
        self.penalty_unit = "transition"
        self.cv_scores: dict[str, list[float]] = {}

    @property
    def base(self) -> float:
        """1 for the residual form, 0 for the paper form."""
        return 1.0 if self.parametrization == "residual" else 0.0

    def _fit(self, runs: RunSet) -> None:
        intercept, penalty = self.intercept, self.l2
        if intercept == "cv" or penalty == "cv":
            intercept, penalty = self.choose(self.cross_validation_errors(runs))
        self.fit_with(runs, intercept, penalty)

    @classmethod
    def from_parameters(
        cls,
        A: np.ndarray,
        B: np.ndarray,
        alpha0: np.ndarray | None = None,
        beta0: np.ndarray | None = None,
        parametrization: Literal["residual", "paper"] = "residual",
        test_ids: np.ndarray | None = None,
    ) -> SimfluenceLinear:
        """A simulator with given parameters (no fitting): A, B ``float[n, m]``; alpha0, beta0
        ``float[G, m]`` per-step intercepts (G = 1 for a constant one; default zero)."""
        A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
        if A.ndim != 2 or A.shape != B.shape:
            raise SimulatorError(f"A and B must both be [n, m], got {A.shape} and {B.shape}")
        n, m = A.shape
        intercept: Intercept = "none" if alpha0 is None and beta0 is None else "step"
        simulator = cls(parametrization=parametrization, intercept=intercept, l2=1.0)
        zeros = np.zeros((1, m))
        alpha0 = zeros if alpha0 is None else np.asarray(alpha0, dtype=np.float64)
        beta0 = np.zeros_like(alpha0) if beta0 is None else np.asarray(beta0, dtype=np.float64)
        simulator.params = LinearParameters(A if cls.use_a else None, B if cls.use_b else None, alpha0, beta0,
                                            simulator.base)
        simulator.fitted_intercept = intercept
        simulator.fitted_l2 = np.full(m, np.nan)
        simulator.n_train = n
        simulator.test_ids = np.arange(m, dtype=np.int64) if test_ids is None else np.asarray(test_ids)
        return simulator

    def _parameters(self, solution: RidgeSolution) -> LinearParameters:
        m = (solution.A if solution.A is not None else solution.B).shape[1]
        zeros = np.zeros((1, m))
        return LinearParameters(solution.A, solution.B, solution.alpha0 if solution.alpha0 is not None else zeros,
                                solution.beta0 if solution.beta0 is not None else zeros, self.base)

    def _set_solution(self, solution: RidgeSolution) -> None:
        self.params = self._parameters(solution)

    @property
    def A(self) -> np.ndarray:
        """``float64[n, m]``; zeros when the model has no A block (``params.A is None``)."""
        return self.params.arrays()["A"]

    @property
    def B(self) -> np.ndarray:
        """``float64[n, m]``; zeros when the model has no B block (``params.B is None``)."""
        return self.params.arrays()["B"]

    def candidates(self) -> tuple[list[Intercept], list[float]]:
        """The intercepts and penalties cross-validation chooses among (penalties large to small)."""
        intercepts: list[Intercept] = ["none", "constant", "step"] if self.intercept == "cv" else [self.intercept]
        grid = sorted(self.l2_grid, reverse=True) if self.l2 == "cv" else [float(self.l2)]
        return intercepts, grid

    def cross_validation_errors(self, runs: RunSet) -> np.ndarray:
        """``float64[I, G, m]``: the all-steps MSE of each test example on the validation folds
        for each candidate intercept and penalty (see :meth:`candidates`). Test examples are
        independent, so shards of test examples can be scored separately and concatenated.

        The paths are solved to ``CV_TOLERANCE`` with operator products in ``CV_SHIFT_DTYPE``
        (the final fit to the solver's 1e-8 in float64): scoring needs the validation errors,
        not the last digits of the parameters."""
        intercepts, grid = self.candidates()
        errors = np.zeros((len(intercepts), len(grid), runs.n_tests))
        for fit_index, val_index in runs.run_folds(self.cv_folds, self.seed):
            fitting, validation = runs.select_runs(fit_index), runs.select_runs(val_index)
            for a, intercept in enumerate(intercepts):
                path = self._solve(fitting, intercept, grid, CV_TOLERANCE, CV_SHIFT_DTYPE)
                errors[a] += self._validation_sse(path, validation)
        return errors / (runs.n_runs * runs.n_steps)

    def _validation_sse(self, path: list[RidgeSolution], validation: RunSet,
                        max_bytes: int = 256 * 2**20) -> np.ndarray:
        """``float64[len(path), m]``: each solution's summed squared all-steps error on the
        validation runs. Solutions are simulated side by side (their parameters joined as
        ``k x m`` test columns, ``k`` bounded so the predictions stay under ``max_bytes``): one
        simulation per group of penalties instead of one per penalty."""
        R, T, m = validation.n_runs, validation.n_steps, validation.n_tests
        per_group = max(1, max_bytes // (8 * R * (T + 1) * m))
        probe = type(self).from_hyperparameters(self.hyperparameters())
        probe.n_train = validation.n_train
        sse = np.empty((len(path), m))
        for start in range(0, len(path), per_group):
            group = path[start:start + per_group]
            probe.params = LinearParameters.join([self._parameters(solution) for solution in group])
            probe.test_ids = np.tile(validation.test_ids, len(group))
            pred = probe.simulate(validation.batches, np.tile(validation.initial_loss, (1, len(group))))
            error = pred[:, 1:].reshape(R, T, len(group), m)  # a view: the errors are made in place
            error -= validation.losses[:, 1:, None, :]
            sse[start:start + len(group)] = np.einsum("rtkm,rtkm->km", error, error)
        return sse

    def choose(self, errors: np.ndarray) -> tuple[Intercept, float | np.ndarray]:
        """The intercept and penalty (or per-test penalties) with the least validation error;
        records ``cv_scores`` (mean over test examples per candidate)."""
        intercepts, grid = self.candidates()
        mean_errors = errors.mean(axis=2)
        self.cv_scores = {intercept: [float(v) for v in mean_errors[a]] for a, intercept in enumerate(intercepts)}
        a, g = np.unravel_index(np.argmin(mean_errors), mean_errors.shape)
        if len(grid) > 1 and g in (0, len(grid) - 1):
            warnings.warn(f"{self.method}: cross-validation chose l2={grid[g]:g}, at the edge of l2_grid "
                          f"{min(grid):g}..{max(grid):g}; widen the grid", stacklevel=2)
        if self.per_test_l2 and self.l2 == "cv":
            return intercepts[a], np.asarray(grid)[np.argmin(errors[a], axis=0)]
        return intercepts[a], grid[g]

    def fit_with(self, runs: RunSet, intercept: Intercept, l2: float | np.ndarray) -> SimfluenceLinear:
        """Fit with a given intercept and penalty (skipping cross-validation); returns self."""
        self.n_train, self.test_ids = runs.n_train, runs.test_ids.copy()
        self.fitted_intercept = intercept
        self.fitted_l2 = np.broadcast_to(np.asarray(l2, dtype=np.float64), (runs.n_tests,)).copy()
        self._set_solution(self._solve(runs, intercept, [self.fitted_l2])[0])
        return self

    def _solve(self, runs: RunSet, intercept: Intercept, path: list[float | np.ndarray],
               tol: float = 1e-8, shift_dtype: type = np.float64) -> list[RidgeSolution]:
        """The exact solutions on ``runs`` at each per-transition penalty of ``path`` (scalars
        or ``float[m]``; B's is ``l2_b`` when set), to CG tolerance ``tol`` (multi-shift CG's
        operator products in ``shift_dtype``): the penalties on the summed squared errors are
        these times the number of transitions R x T."""
        transitions = runs.n_runs * runs.n_steps
        problem = TransitionProblem.from_runs(runs, self.base, intercept)
        l2_a = [np.asarray(l2, dtype=np.float64) * transitions for l2 in path]
        l2_b = l2_a if self.l2_b is None else [self.l2_b * transitions] * len(path)
        return solve_ridge_path(problem, l2_a, l2_b, use_a=self.use_a, use_b=self.use_b, solver=self.solver,
                                tol=tol, threads=self.threads, shift_dtype=shift_dtype)

    def refit(self, runs: RunSet) -> SimfluenceLinear:
        """Refit with the fitted intercept and penalties (a penalty saved on the summed errors by an
        older bundle is converted per transition); a simulator built from given parameters has no
        fitted penalty, so its refit cross-validates one."""
        fresh = type(self).from_hyperparameters({**self.hyperparameters(), "penalty_unit": "transition"})
        if not np.all(np.isfinite(self.fitted_l2)):
            return fresh.fit(runs)
        scale = runs.n_runs * runs.n_steps if self.penalty_unit == "sum" else 1
        return fresh.fit_with(runs, self.fitted_intercept, self.fitted_l2 / scale)

    @classmethod
    def concatenate(cls, parts: list[SimfluenceLinear]) -> SimfluenceLinear:
        """One simulator from simulators fitted on disjoint shards of test examples (same runs,
        same hyperparameters), in order."""
        first = parts[0]
        if any(type(p) is not type(first) or p.n_train != first.n_train or p.fitted_intercept != first.fitted_intercept
               for p in parts):
            raise SimulatorError("only shards of one simulator (same class, runs and intercept) can be joined")
        whole = type(first).from_hyperparameters(first.hyperparameters())
        whole.n_train = first.n_train
        whole.test_ids = np.concatenate([p.test_ids for p in parts])
        whole.fitted_intercept = first.fitted_intercept
        whole.fitted_l2 = np.concatenate([p.fitted_l2 for p in parts])
        whole.cv_scores = first.cv_scores
        whole.params = LinearParameters.join([p.params for p in parts])
        return whole

    def _rollout(self, batches: np.ndarray, initial_loss: np.ndarray, max_chunk_bytes: int,
                 dtype: type) -> np.ndarray:
        R, T, _ = batches.shape
        out = np.empty((R, T + 1, initial_loss.shape[1]), dtype=dtype)
        out[:, 0] = initial_loss
        self.params.rollout(batches, out, self.threads)
        return out

    def hyperparameters(self) -> dict[str, Any]:
        hp: dict[str, Any] = {
            "parametrization": self.parametrization,
            "intercept": self.intercept,
            "l2": self.l2,
            "l2_b": self.l2_b,
            "l2_grid": list(self.l2_grid),
            "cv_folds": self.cv_folds,
            "per_test_l2": self.per_test_l2,
            "solver": self.solver,
            "seed": self.seed,
            "penalty_unit": self.penalty_unit,
        }
        if hasattr(self, "fitted_intercept"):
            hp["fitted_intercept"] = self.fitted_intercept
            hp["cv_scores"] = self.cv_scores
        return hp

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> SimfluenceLinear:
        simulator = cls(**{k: hp[k] for k in _LINEAR_ARGS if k in hp})
        simulator.fitted_intercept = hp.get("fitted_intercept", hp["intercept"])
        simulator.cv_scores = hp.get("cv_scores", {})
        simulator.penalty_unit = hp.get("penalty_unit", "sum")  # absent: saved before per-transition penalties
        return simulator

    def parameters(self) -> dict[str, np.ndarray]:
        return {**self.params.arrays(), "l2": self.fitted_l2}

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.params = LinearParameters(arrays["A"] if self.use_a else None, arrays["B"] if self.use_b else None,
                                       arrays["alpha0"], arrays["beta0"], self.base)
        self.fitted_l2 = arrays["l2"]


_LINEAR_ARGS = ("parametrization", "intercept", "l2", "l2_b", "l2_grid", "cv_folds", "per_test_l2", "solver", "seed")


class SimfluenceAdditive(SimfluenceLinear):
    """Simfluence-Linear with A = 0: each example adds B_i to the loss (TracIn-like, learned)."""

    method = "simfluence_additive"
    use_a = False


class SimfluenceMultiplicative(SimfluenceLinear):
    """Simfluence-Linear with B = 0: each example scales the loss by its own A_i."""

    method = "simfluence_multiplicative"
    use_b = False


# ---- gradient-based baselines expressed as simulators --------------------------------------


class _GradientSimulator(StepwiseSimulator):
    """Additive simulators whose per-example effects come from gradient dot products.

    ``beta_t = -scale * lr_t / b * sum_{i in c_t} effect_{k(t)}[i]``, alpha = 1, where k(t) is the
    latest checkpoint taken at or before update t-1. The rescaled variant fits the single
    global ``scale`` by least squares on the fitting runs' one-step changes; otherwise 1.
    """

    def __init__(self, gradients: GradientCheckpoints | None = None, rescaled: bool = False) -> None:
        self.gradients = gradients
        self.rescaled = rescaled
        self.scale = 1.0

    @abstractmethod
    def _effects(self, gradients: GradientCheckpoints) -> np.ndarray:
        """``float[K, n, m]`` per-checkpoint effect of each training on each test example."""

    def _effect_steps(self, gradients: GradientCheckpoints) -> np.ndarray:
        """``int64[K]`` the step at which each of :meth:`_effects`' tables starts to apply."""
        return gradients.steps.copy()

    def _fit(self, runs: RunSet) -> None:
        if self.gradients is None:
            raise SimulatorError(f"{self.method} needs gradient checkpoints to fit")
        self.gradients.check_matches(runs)
        self.effects = self._effects(self.gradients)
        self.checkpoint_steps = self._effect_steps(self.gradients)
        self.learning_rates = self.gradients.learning_rates.copy()
        self.batch_size = float(self.gradients.batch_size)
        self.scale = 1.0
        if self.rescaled:
            self.scale = self._fit_scale(runs)

    def _fit_scale(self, runs: RunSet) -> float:
        """Least-squares global scale of the predicted one-step changes (teacher forcing)."""
        numerator = denominator = 0.0
        for t in range(runs.n_steps):
            _, beta = self._coefficients(_step_counts(runs.batches[:, t], runs.n_train, np.float64), t, np.float64)
            change = runs.losses[:, t + 1] - runs.losses[:, t]
            numerator += float(np.sum(beta * change))
            denominator += float(np.sum(beta * beta))
        if denominator == 0:
            raise SimulatorError(f"{self.method}: every gradient effect is zero; cannot fit a scale")
        return self.scale * numerator / denominator

    def refit(self, runs: RunSet) -> _GradientSimulator:
        """The same effect tables; only the rescaled variant's global scale is refitted."""
        new = type(self).from_hyperparameters(self.hyperparameters())
        new.n_train, new.test_ids = runs.n_train, runs.test_ids.copy()
        new._restore(self.parameters())
        new.scale = 1.0
        if self.rescaled:
            new.scale = new._fit_scale(runs)
        return new

    def _coefficients(self, step_counts, step, dtype):
        k = max(0, int(np.searchsorted(self.checkpoint_steps, step, side="right")) - 1)
        lr = self.learning_rates[min(step, len(self.learning_rates) - 1)]
        factor = -self.scale * lr / self.batch_size
        return 1.0, (step_counts @ self.effects[k].astype(dtype)) * dtype(factor)

    def hyperparameters(self) -> dict[str, Any]:
        return {"rescaled": self.rescaled, "scale": self.scale, "batch_size": getattr(self, "batch_size", None)}

    def parameters(self) -> dict[str, np.ndarray]:
        return {
            "effects": self.effects,
            "checkpoint_steps": self.checkpoint_steps,
            "learning_rates": self.learning_rates,
        }

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        self.effects = arrays["effects"]
        self.checkpoint_steps = arrays["checkpoint_steps"]
        self.learning_rates = arrays["learning_rates"]


class TracInCP(_GradientSimulator):
    """TracIn-CP: the effect of example i on test j at checkpoint k is <grad l(z_i), grad l(z_j)>.

    Args:
        form: ``latest`` (each step uses the latest checkpoint at or before it) or ``sum``
            (the paper's TracIn-CP score, the sum over checkpoints, here averaged so that one
            occurrence of an example moves the loss by one step's worth whenever it appears).
        preconditioned: use the training gradients scaled by Adam's step scale (stored when
            training used Adam): the Adam-aware TracIn-CP; plain gradients otherwise.
    """

    method = "tracin_cp"

    def __init__(self, gradients: GradientCheckpoints | None = None, rescaled: bool = False,
                 form: Literal["latest", "sum"] = "latest", preconditioned: bool = False) -> None:
        super().__init__(gradients, rescaled)
        if form not in ("latest", "sum"):
            raise SimulatorError(f"form must be 'latest' or 'sum', got {form!r}")
        if preconditioned and gradients is not None and gradients.train_grads_preconditioned is None:
            raise SimulatorError("preconditioned TracIn-CP needs Adam-preconditioned gradients (training with AdamW)")
        self.form = form
        self.preconditioned = preconditioned

    def _effects(self, gradients: GradientCheckpoints) -> np.ndarray:
        dots = gradients.dots(preconditioned=self.preconditioned)
        return dots.mean(axis=0, keepdims=True) if self.form == "sum" else dots

    def _effect_steps(self, gradients: GradientCheckpoints) -> np.ndarray:
        return np.zeros(1, dtype=np.int64) if self.form == "sum" else gradients.steps.copy()

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "form": self.form, "preconditioned": self.preconditioned}

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> TracInCP:
        simulator = cls(rescaled=hp["rescaled"], form=hp.get("form", "latest"),
                        preconditioned=hp.get("preconditioned", False))
        simulator.scale, simulator.batch_size = hp["scale"], hp["batch_size"]
        return simulator


class InfluenceFunction(_GradientSimulator):
    """Influence functions: effect g_j^T (H + damping I)^-1 g_i at one checkpoint, H the damped
    Gauss-Newton matrix on projected gradients (given, or the empirical Fisher G^T G / n).

    A Gauss-Newton matrix estimated from n examples has rank at most n; in d > n/2 projected
    dimensions it is rank-deficient and the inverse is set by the damping alone. The gradients
    and H are therefore projected once more, by a seeded Gaussian map, to ``projection_dim``
    dimensions (default ``min(d, n // 2)``), where H is well estimated.

    Args:
        checkpoint: which checkpoint's gradients to use (default the last).
        damping: added to H's diagonal, relative to trace(H)/d.
        projection_dim: dimensions of the second projection (0: none; None: ``min(d, n // 2)``).
        seed: seed of the second projection.
    """

    method = "influence_function"

    def __init__(self, gradients: GradientCheckpoints | None = None, rescaled: bool = True,
                 checkpoint: int = -1, damping: float = 1e-3, projection_dim: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(gradients, rescaled)
        if not damping > 0:
            raise SimulatorError(f"damping must be positive, got {damping!r}")
        if projection_dim is not None and projection_dim < 0:
            raise SimulatorError(f"projection_dim must be non-negative, got {projection_dim!r}")
        self.checkpoint = checkpoint
        self.damping = damping
        self.projection_dim = projection_dim
        self.seed = seed

    def _effects(self, gradients: GradientCheckpoints) -> np.ndarray:
        k = self.checkpoint
        train = np.asarray(gradients.train_grads[k], dtype=np.float64)
        test = np.asarray(gradients.test_grads[k], dtype=np.float64)
        curvature = gradients.curvature(k)
        n, d = train.shape
        dim = min(d, max(1, n // 2)) if self.projection_dim is None else self.projection_dim
        if 0 < dim < d:
            projection = np.random.default_rng(self.seed).normal(0.0, 1.0 / np.sqrt(dim), (d, dim))
            train, test = train @ projection, test @ projection
            curvature = projection.T @ curvature @ projection
        d = curvature.shape[0]
        damped = curvature + self.damping * (np.trace(curvature) / d + 1e-12) * np.eye(d)
        scores = train @ np.linalg.solve(damped, test.T)  # [n, m]
        return scores[None]

    def _effect_steps(self, gradients: GradientCheckpoints) -> np.ndarray:
        return np.zeros(1, dtype=np.int64)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "checkpoint": self.checkpoint, "damping": self.damping,
                "projection_dim": self.projection_dim, "seed": self.seed}

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> InfluenceFunction:
        simulator = cls(rescaled=hp["rescaled"], checkpoint=hp["checkpoint"], damping=hp["damping"],
                        projection_dim=hp.get("projection_dim", 0), seed=hp.get("seed", 0))
        simulator.scale, simulator.batch_size = hp["scale"], hp["batch_size"]
        return simulator
