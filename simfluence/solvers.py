"""Exact ridge regression for the Simfluence-Linear family, all test examples at once.

For test example j, every one-step transition k = (run r, update t) gives one equation

    y_kj = d_kj * (C_k . A_j) + (C_k . B_j) + alpha0_g(k),j * d_kj + beta0_g(k),j

with ``C`` the sparse count matrix (transitions x n), ``d_kj`` the observed previous loss
L_{t-1}, ``y_kj`` the target (L_t - base * L_{t-1}) and an optional unpenalised intercept per
group g of transitions (one group per step, or one for all). The objective is

    sum_k (y_kj - ...)^2 + l2_a |A_j|^2 + l2_b |B_j|^2.

The intercepts are eliminated exactly (Frisch-Waugh-Lovell): within each group the equation
is projected onto the complement of span{1, d}, the ridge problem is solved for (A, B), and
the intercepts are recovered from the residual. Only the count matrix C is shared by all test
examples; the A features are weighted by each test example's own previous loss. Two exact
solvers, chosen automatically by a cost estimate:

- ``direct``: batched normal equations. The Gram blocks C^T D^2 C, C^T D C (per test example)
  and C^T C (shared) come from one sparse product with the pair-count matrix P (transitions x
  n^2), never from a dense (transitions x n) design per test example; the rank-2G intercept
  correction is subtracted, and the (2n x 2n) systems are solved in chunks of test examples.
- ``cg``: preconditioned conjugate gradients on the normal equations, batched over all test
  examples, matrix-free through the sparse count matrix. The preconditioner is the exact
  2 x 2 block of each training example (its A and B features are nearly collinear).

A grid of penalties is one path (:func:`solve_ridge_path`): the penalty-free structure is built
once, and on ``cg`` a path whose A and B penalties agree is solved by multi-shift CG (one
Krylov sequence for every penalty). :func:`solve_ridge` is the path of one penalty.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp

from simfluence._kernels import design_apply, design_transpose, multishift_iteration
from simfluence.errors import SimfluenceError
from simfluence.runset import PAD, RunSet

# Test examples per shard are chosen so that a shard's A and B tables ([n, columns] each, the
# rows the kernels gather and scatter) take at most this many bytes in float64: they stay in a
# core's L2 cache (at most 65 columns at n = 1,000, 218 at n = 300; at n = 300, shards of 100
# were about 1.2x faster per CG iteration than shards of 50, measured on 2 cores).
SHARD_TABLE_BYTES = 2**20
# The smallest CG tolerance asked of float32 operator products (``shift_dtype``).
FLOAT32_MIN_TOL = 1e-6

Intercept = Literal["none", "constant", "step"]
SolverName = Literal["auto", "direct", "cg"]


class SolverError(SimfluenceError):
    """Raised for invalid penalties or an unsolvable problem."""


@dataclass(frozen=True)
class TransitionProblem:
    """The regression data of the one-step transitions of a RunSet.

    Attributes:
        batches: ``int64[R, T, b]`` training ids (``-1`` pads).
        counts: ``csr[R*T, n]`` how often each training example is in each transition's batch;
            row ``r*T + t`` is update ``t+1`` of run ``r``.
        counts_t: the transpose of ``counts``, stored as CSR (``csr[n, R*T]``).
        prev: ``float64[R, T, m]`` observed loss before each update (the teacher-forced input).
        target: ``float64[R, T, m]`` L_t - base * L_{t-1}.
        intercept: which unpenalised intercepts the model has.
    """

    batches: np.ndarray
    counts: sp.csr_matrix
    counts_t: sp.csr_matrix
    prev: np.ndarray
    target: np.ndarray
    intercept: Intercept

    @classmethod
    def from_runs(cls, runs: RunSet, base: float, intercept: Intercept) -> TransitionProblem:
        """Build the problem of ``runs`` for ``alpha = base + ...`` (1: residual, 0: paper)."""
        if intercept not in ("none", "constant", "step"):
            raise SolverError(f"intercept must be 'none', 'constant' or 'step', got {intercept!r}")
        prev = runs.losses[:, :-1, :]
        target = runs.losses[:, 1:, :] - base * prev
        counts = count_matrix(runs.batches, runs.n_train)
        return cls(runs.batches, counts, counts.T.tocsr(), prev, target, intercept)

    def select_tests(self, cols: slice) -> TransitionProblem:
        """The same transitions for a contiguous range of test examples."""
        prev = np.ascontiguousarray(self.prev[:, :, cols])
        target = np.ascontiguousarray(self.target[:, :, cols])
        return TransitionProblem(self.batches, self.counts, self.counts_t, prev, target, self.intercept)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(R, T, m)."""
        return self.prev.shape  # type: ignore[return-value]

    @property
    def n_train(self) -> int:
        return self.counts.shape[1]


@dataclass(frozen=True)
class RidgeSolution:
    """Fitted parameters; arrays are ``None`` for blocks the model does not have.

    Attributes:
        A: ``float64[n, m]`` multiplicative effect of each training example on each test loss.
        B: ``float64[n, m]`` additive effect (nats).
        alpha0: ``float64[G, m]`` unpenalised multiplicative intercept per group of steps.
        beta0: ``float64[G, m]`` unpenalised additive intercept per group of steps.
        iterations: CG iterations used (0 for the direct solver).
        solver: the solver that produced it.
    """

    A: np.ndarray | None
    B: np.ndarray | None
    alpha0: np.ndarray | None
    beta0: np.ndarray | None
    iterations: int
    solver: str


def count_matrix(batches: np.ndarray, n_train: int) -> sp.csr_matrix:
    """``csr[R*T, n]`` counts of each training id in each batch of ``int[R, T, b]``."""
    flat = batches.reshape(-1, batches.shape[-1])
    rows, pos = np.nonzero(flat != PAD)
    data = np.ones(len(rows))
    counts = sp.csr_matrix((data, (rows, flat[rows, pos])), shape=(flat.shape[0], n_train))
    counts.sum_duplicates()
    return counts


def solve_ridge(
    problem: TransitionProblem,
    l2_a: float | np.ndarray,
    l2_b: float | np.ndarray,
    *,
    use_a: bool = True,
    use_b: bool = True,
    solver: SolverName = "auto",
    tol: float = 1e-8,
    max_iter: int = 2000,
    warm_start: RidgeSolution | None = None,
    threads: int | None = None,
    shard_size: int | None = None,
) -> RidgeSolution:
    """Solve the ridge problem exactly for every test example at one penalty: the penalty
    path (:func:`solve_ridge_path`) of length one. Arguments as there, for one penalty."""
    return solve_ridge_path(problem, [l2_a], [l2_b], use_a=use_a, use_b=use_b, solver=solver, tol=tol,
                            max_iter=max_iter, warm_start=warm_start, threads=threads, shard_size=shard_size)[0]


def solve_ridge_path(
    problem: TransitionProblem,
    l2_a: Sequence[float | np.ndarray],
    l2_b: Sequence[float | np.ndarray],
    *,
    use_a: bool = True,
    use_b: bool = True,
    solver: SolverName = "auto",
    tol: float = 1e-8,
    max_iter: int = 2000,
    warm_start: RidgeSolution | None = None,
    threads: int | None = None,
    shard_size: int | None = None,
    shift_dtype: type = np.float64,
) -> list[RidgeSolution]:
    """Solve the ridge problem exactly for every test example at every penalty of a path.

    Everything that does not depend on the penalty is built once per shard of test examples
    and shared by the whole path: the intercept projection, the right-hand sides, and either
    the Gram matrices (``direct``: one batched solve per penalty against the same Gram) or the
    normal operator (``cg``). On ``cg``, a path whose A and B share each penalty and has no
    ``warm_start`` is solved by multi-shift CG from zero (one Krylov sequence for every
    penalty, unpreconditioned); any other path by block-Jacobi PCG, each penalty started from
    the previous penalty's solution (so order the path from large to small penalties). Each
    solution is the one :func:`solve_ridge` gives at that penalty alone (to the CG tolerance).

    Test examples are independent problems; they are solved in equal shards of at most
    ``shard_size`` columns (cache-sized: by default as many as keep the A and B tables of a
    shard within ``SHARD_TABLE_BYTES`` in float64; a multiple of the threads when there are enough
    columns), in parallel on ``threads`` threads (default: every core), each shard walking the
    whole path.

    Args:
        problem: transitions of the fitting runs.
        l2_a, l2_b: the path, as equally long sequences of positive penalties on A and on B
            (on the sum of squared errors over transitions), each a scalar or ``float[m]`` (one
            per test example).
        use_a, use_b: which blocks the model has (Additive: no A; Multiplicative: no B).
        solver: ``direct``, ``cg`` or ``auto`` (the cheaper by a flop estimate).
        tol: CG stopping tolerance on each test example's relative residual norm of the normal
            equations (1e-8 gives parameters to about 1e-7 relative on the reference problems).
        max_iter: CG iteration cap per penalty; reaching it raises.
        warm_start: a solution to start CG from at the first penalty (default zeros); each
            later penalty starts from the previous one's solution.
        threads: worker threads (None: ``os.cpu_count()``).
        shard_size: test examples per shard (default: cache-sized, see above).
        shift_dtype: the type multi-shift CG computes its operator products in, and the
            solutions' fitted values for their intercepts (its vectors, inner products and
            recurrences stay float64); ``np.float32`` halves the memory traffic of the
            products, for solutions needed only to a loose ``tol`` (at least ``1e-6``: CG stops
            on the residual its recurrence updates, which float32 products let drift from the
            true one by more than that).

    Returns:
        One :class:`RidgeSolution` per penalty, in the order given.
    """
    if not (use_a or use_b):
        raise SolverError("the model needs at least one of the A and B blocks")
    if len(l2_a) != len(l2_b) or not len(l2_a):
        raise SolverError(f"l2_a and l2_b must be equally long, non-empty paths, got {len(l2_a)} and {len(l2_b)}")
    m = problem.shape[2]
    lams_a = [_penalty(v, m, "l2_a") if use_a else None for v in l2_a]
    lams_b = [_penalty(v, m, "l2_b") if use_b else None for v in l2_b]
    if solver == "auto":
        solver = choose_solver(problem, use_a, use_b)
    if solver not in ("direct", "cg"):
        raise SolverError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    if shift_dtype != np.float64 and tol < FLOAT32_MIN_TOL:
        raise SolverError(f"float32 operator products cannot reach tol={tol:g}; use a tolerance of at least "
                          f"{FLOAT32_MIN_TOL:g} or shift_dtype=np.float64")
    workers = max(1, threads or os.cpu_count() or 1)
    if shard_size is None:
        shard_size = max(8, SHARD_TABLE_BYTES // (16 * problem.n_train))
    count = -(-m // shard_size)  # shards of at most shard_size columns, as many as a multiple of
    count = min(m, -(-count // workers) * workers)  # the workers when there are enough columns,
    size = -(-m // count)  # equally sized so that no thread idles at the end
    shards = [slice(s, min(m, s + size)) for s in range(0, m, size)]

    def solve_shard(cols: slice) -> list[RidgeSolution]:
        warm = None if warm_start is None else RidgeSolution(
            *(None if a is None else a[:, cols] for a in (warm_start.A, warm_start.B, warm_start.alpha0,
                                                           warm_start.beta0)), warm_start.iterations, warm_start.solver)
        return _solve_shard_path(
            problem.select_tests(cols),
            [None if lam is None else lam[cols] for lam in lams_a],
            [None if lam is None else lam[cols] for lam in lams_b],
            solver, tol, max_iter, warm, shift_dtype,
        )

    workers = min(len(shards), workers)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(solve_shard, shards))
    else:
        parts = [solve_shard(cols) for cols in shards]

    def join(p: int, name: str) -> np.ndarray | None:
        arrays = [getattr(part[p], name) for part in parts]
        return None if arrays[0] is None else np.concatenate(arrays, axis=1)

    return [RidgeSolution(join(p, "A"), join(p, "B"), join(p, "alpha0"), join(p, "beta0"),
                          max(part[p].iterations for part in parts), solver) for p in range(len(lams_a))]


def _solve_shard_path(
    problem: TransitionProblem,
    lams_a: list[np.ndarray | None],
    lams_b: list[np.ndarray | None],
    solver: str,
    tol: float,
    max_iter: int,
    warm_start: RidgeSolution | None,
    shift_dtype: type = np.float64,
) -> list[RidgeSolution]:
    projector = GroupProjector(problem.prev, problem.intercept)
    operator = _NormalOperator(problem, projector)
    fitted_by = operator  # gives the solutions' fitted values, for their intercepts
    if solver == "direct":
        blocks = [(A, B, 0) for A, B in _solve_direct(problem, projector, operator, lams_a, lams_b)]
    else:
        system = _CGSystem(problem, projector, operator, lams_a[0] is not None, lams_b[0] is not None)
        isotropic = all(a is None or b is None or np.array_equal(a, b) for a, b in zip(lams_a, lams_b))
        if len(lams_a) > 1 and isotropic and warm_start is None:
            if shift_dtype != np.float64:
                fitted_by = _NormalOperator(problem, projector, shift_dtype)
            blocks = system.solve_shifts([b if a is None else a for a, b in zip(lams_a, lams_b)], tol, max_iter,
                                         fitted_by)
        else:
            blocks, previous = [], warm_start
            for lam_a, lam_b in zip(lams_a, lams_b):
                A, B, iterations = system.solve(lam_a, lam_b, tol, max_iter, previous)
                previous = RidgeSolution(A, B, None, None, iterations, solver)
                blocks.append((A, B, iterations))
    out = []
    for A, B, iterations in blocks:
        residual = problem.target - fitted_by.design(A, B).reshape(problem.shape)
        alpha0, beta0 = projector.intercepts(residual)
        out.append(RidgeSolution(A, B, alpha0, beta0, iterations, solver))
    return out


def choose_solver(problem: TransitionProblem, use_a: bool, use_b: bool) -> Literal["direct", "cg"]:
    """Pick the solver with the smaller flop estimate (CG assumed to need 60 iterations)."""
    R, T, m = problem.shape
    n = problem.n_train
    width = n * (int(use_a) + int(use_b))
    b = problem.batches.shape[-1]
    direct = m * (width**3 / 1.5 + 2.0 * R * T * b * b) + n * n * 8.0 * m
    cg = 60 * 8.0 * R * T * b * m
    return "direct" if direct < cg else "cg"


class GroupProjector:
    """Projection onto the complement of span{1, d} within each intercept group.

    Arrays are shaped ``[R, T, m]``; a group is one step (all runs) for ``step``, all
    transitions for ``constant``, and there is nothing to project for ``none``. Where the
    previous loss does not vary within a group (step 1: every run starts from the same
    model), the multiplicative intercept is not identifiable and is set to zero.
    """

    def __init__(self, prev: np.ndarray, intercept: Intercept) -> None:
        self.intercept = intercept
        R, T, m = prev.shape
        if intercept == "none":
            self.flat_q2 = np.zeros((0, m))
            self.group_of_transition = np.zeros(R * T, dtype=np.int64)
            self.group_size = np.full((1, 1), R * T)
            return
        self.axes = (0,) if intercept == "step" else (0, 1)
        self.size = prev.shape[0] if intercept == "step" else prev.shape[0] * prev.shape[1]
        self.prev_mean = prev.mean(axis=self.axes, keepdims=True)
        centred = prev - self.prev_mean
        norm = np.sqrt(np.sum(centred**2, axis=self.axes, keepdims=True))
        floor = 1e-9 * np.sqrt(self.size) * (np.abs(self.prev_mean) + 1e-12)
        self.inv_norm = np.where(norm > floor, 1.0 / np.maximum(norm, 1e-300), 0.0)
        self.q2 = centred * self.inv_norm
        self.flat_q2 = self.q2.reshape(R * T, m)
        steps = np.tile(np.arange(T, dtype=np.int64), R)
        self.group_of_transition = steps if intercept == "step" else np.zeros(R * T, dtype=np.int64)
        self.group_size = np.bincount(self.group_of_transition)[:, None]  # [G, 1] transitions per group

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``M v`` for ``v`` of shape ``[R, T, m]`` (returns a new array)."""
        if self.intercept == "none":
            return values
        mean = values.mean(axis=self.axes, keepdims=True)
        coef = np.sum(self.q2 * values, axis=self.axes, keepdims=True)
        return values - mean - self.q2 * coef

    def intercepts(self, residual: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Least-squares (alpha0, beta0) per group, each ``float64[G, m]``, of a residual."""
        if self.intercept == "none":
            return None, None
        mean = residual.mean(axis=self.axes, keepdims=True)
        coef = np.sum(self.q2 * residual, axis=self.axes, keepdims=True)
        alpha0 = coef * self.inv_norm
        beta0 = mean - alpha0 * self.prev_mean
        return alpha0.reshape(-1, residual.shape[2]), beta0.reshape(-1, residual.shape[2])

    def basis(self) -> tuple[np.ndarray, np.ndarray]:
        """(q1 value per group, q2 ``[R, T, m]``): q1 is the constant 1/sqrt(group size)."""
        return np.full(1, 1.0 / np.sqrt(self.size)), self.q2


def _penalty(value: float | np.ndarray, m: int, name: str) -> np.ndarray:
    lam = np.broadcast_to(np.asarray(value, dtype=np.float64), (m,)).copy()
    if not np.all(np.isfinite(lam)) or np.any(lam <= 0):
        raise SolverError(f"{name} must be positive and finite, got {value!r}")
    return lam


class _NormalOperator:
    """``X_j^T M_j X_j w_j`` for every test example of a shard (no penalty), computed in
    ``dtype``: the kernels' inputs (flattened transitions, previous losses and projection basis
    in that type) are prepared once, and the fitted values ``[R*T, m]`` are a reused buffer;
    the intercept groups' sums are float64 whatever the type (a group can hold every
    transition)."""

    def __init__(self, problem: TransitionProblem, projector: GroupProjector, dtype: type = np.float64) -> None:
        R, T, m = problem.shape
        self.n, self.m, self.dtype = problem.n_train, m, dtype
        self.batches = problem.batches.reshape(R * T, -1)
        self.prev = problem.prev.reshape(R * T, m).astype(dtype, copy=False)
        self.q2 = projector.flat_q2.astype(dtype, copy=False)
        self.group = projector.group_of_transition
        self.group_size = projector.group_size
        self.empty = np.zeros((0, m), dtype)

    @functools.cached_property
    def fitted(self) -> np.ndarray:
        """The products' buffer of fitted values, ``[R*T, m]``."""
        return np.empty(self.prev.shape, self.dtype)

    def _cast(self, block: np.ndarray | None) -> np.ndarray:
        return self.empty if block is None else np.ascontiguousarray(block, dtype=self.dtype)

    def design(self, A: np.ndarray | None, B: np.ndarray | None) -> np.ndarray:
        """``X_j w_j`` for every test example, ``[R*T, m]`` in this operator's dtype (no
        projection), for blocks ``[n, m]`` of any float type (None for a missing block)."""
        out = np.empty(self.prev.shape, self.dtype)
        no_groups = np.zeros((1, self.m))
        design_apply(self.batches, self.prev, self._cast(A), self._cast(B), A is not None, B is not None,
                     self.empty, self.group, out, no_groups, no_groups.copy())
        return out

    def transpose(self, values: np.ndarray, use_a: bool, use_b: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``X_j^T v_j`` for every test example (no projection), for ``v`` ``[R*T, m]``: (A
        part, B part), each ``[n, m]`` in this operator's dtype or None for a missing block."""
        out = self._outputs(use_a, use_b)
        no_groups = np.zeros((1, self.m))
        design_transpose(self.batches, self.prev, np.ascontiguousarray(values, dtype=self.dtype), use_a, use_b,
                         self.empty, self.group, no_groups, no_groups, *out)
        return (out[0] if use_a else None), (out[1] if use_b else None)

    def _outputs(self, use_a: bool, use_b: bool) -> tuple[np.ndarray, np.ndarray]:
        return (np.empty((self.n if use_a else 0, self.m), self.dtype),
                np.empty((self.n if use_b else 0, self.m), self.dtype))

    def __call__(self, A: np.ndarray | None, B: np.ndarray | None,
                 out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(A part, B part) of the product for blocks ``[n, m]`` of this operator's dtype (None
        for a block the model lacks); written into ``out`` (two ``[n, m]`` arrays, 0 rows for a
        missing block) when given."""
        use_a, use_b = A is not None, B is not None
        group_sum = np.zeros((len(self.group_size), self.m))  # float64 whatever the dtype: a group
        group_q2_sum = np.zeros_like(group_sum)  # can hold every transition
        design_apply(self.batches, self.prev, self._cast(A), self._cast(B), use_a, use_b, self.q2, self.group,
                     self.fitted, group_sum, group_q2_sum)
        if out is None:
            out = self._outputs(use_a, use_b)
        design_transpose(self.batches, self.prev, self.fitted, use_a, use_b, self.q2, self.group,
                         group_sum / self.group_size, group_q2_sum, *out)
        return (out[0] if use_a else None), (out[1] if use_b else None)


class _CGSystem:
    """The penalty-free part of the normal equations of one shard, for conjugate gradients at
    any penalty: the operator X^T M X (float64), the right-hand side X^T M y and, when
    preconditioned CG asks for it, the data part of the block-Jacobi preconditioner (each
    training example's 2 x 2 (A_i, B_i) block of X^T X)."""

    def __init__(self, problem: TransitionProblem, projector: GroupProjector, operator: _NormalOperator,
                 use_a: bool, use_b: bool) -> None:
        self.problem, self.operator, self.use_a, self.use_b = problem, operator, use_a, use_b
        R, T, m = problem.shape
        self.rhs_a, self.rhs_b = operator.transpose(projector.apply(problem.target).reshape(R * T, m), use_a, use_b)
        rhs_norm = np.sqrt(_col_dot(self.rhs_a, self.rhs_a, self.rhs_b, self.rhs_b))
        self.rhs_norm = np.where(rhs_norm == 0, 1.0, rhs_norm)

    @functools.cached_property
    def _data_blocks(self) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
        """(h_aa, h_ab, h_bb): each training example's 2 x 2 block of X^T X, ``[n, m]`` (h_bb
        ``[n, 1]``); only preconditioned CG needs them."""
        problem, use_a, use_b = self.problem, self.use_a, self.use_b
        R, T, m = problem.shape
        sq_counts_t = problem.counts_t.multiply(problem.counts_t).tocsr()
        prev = problem.prev.reshape(R * T, m)
        h_bb = np.asarray(sq_counts_t.sum(axis=1)).reshape(-1, 1)
        return (sq_counts_t @ (prev * prev) if use_a else None, sq_counts_t @ prev if use_a and use_b else None,
                h_bb)

    def _preconditioner(self, lam_a: np.ndarray | None, lam_b: np.ndarray | None):
        """The inverse of each training example's 2 x 2 block of X^T X + L, as a function."""
        h_aa, h_ab, h_bb = self._data_blocks
        if self.use_a and self.use_b:
            h_aa, h_bb = h_aa + lam_a, h_bb + lam_b
            det = h_aa * h_bb - h_ab * h_ab
            inv_aa, inv_bb, inv_ab = h_bb / det, h_aa / det, -h_ab / det
            return lambda ra, rb: (inv_aa * ra + inv_ab * rb, inv_ab * ra + inv_bb * rb)
        if self.use_a:
            inv_aa = 1.0 / (h_aa + lam_a)
            return lambda ra, rb: (inv_aa * ra, None)
        inv_bb = 1.0 / (h_bb + lam_b)
        return lambda ra, rb: (None, inv_bb * rb)

    def solve(
        self,
        lam_a: np.ndarray | None,
        lam_b: np.ndarray | None,
        tol: float,
        max_iter: int,
        start: RidgeSolution | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None, int]:
        """(A, B, iterations) at penalties ``float[m]`` by preconditioned CG from ``start``."""
        use_a, use_b = self.use_a, self.use_b
        n, m = self.problem.n_train, self.problem.shape[2]

        def normal_op(A, B):
            ga, gb = self.operator(A, B)
            if use_a:
                ga += lam_a * A
            if use_b:
                gb += lam_b * B
            return ga, gb

        precond = self._preconditioner(lam_a, lam_b)
        if start is not None:
            A = start.A.copy() if use_a else None
            B = start.B.copy() if use_b else None
        else:
            A = np.zeros((n, m)) if use_a else None
            B = np.zeros((n, m)) if use_b else None
        ha, hb = normal_op(A, B)
        ra = self.rhs_a - ha if use_a else None
        rb = self.rhs_b - hb if use_b else None
        za, zb = precond(ra, rb)
        pa = None if za is None else za.copy()
        pb = None if zb is None else zb.copy()
        rz = _col_dot(ra, za, rb, zb)
        for iteration in range(1, max_iter + 1):
            res = np.sqrt(_col_dot(ra, ra, rb, rb)) / self.rhs_norm
            if np.all(res <= tol):
                return A, B, iteration - 1
            qa, qb = normal_op(pa, pb)
            pq = _col_dot(pa, qa, pb, qb)
            step = np.divide(rz, pq, out=np.zeros_like(rz), where=pq > 0)
            if use_a:
                A += step * pa
                ra -= step * qa
            if use_b:
                B += step * pb
                rb -= step * qb
            za, zb = precond(ra, rb)
            rz_new = _col_dot(ra, za, rb, zb)
            beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
            rz = rz_new
            if use_a:
                pa = za + beta * pa
            if use_b:
                pb = zb + beta * pb
        worst = float(np.max(np.sqrt(_col_dot(ra, ra, rb, rb)) / self.rhs_norm))
        raise SolverError(
            f"conjugate gradients did not reach tolerance {tol:g} in {max_iter} iterations "
            f"(worst relative residual {worst:.3g}); raise the penalty or use solver='direct'"
        )


    def solve_shifts(
        self, lams: list[np.ndarray], tol: float, max_iter: int, operator: _NormalOperator
    ) -> list[tuple[np.ndarray | None, np.ndarray | None, int]]:
        """(A, B, iterations) at every penalty of ``lams`` (each ``float[m]``, the same on A
        and B) from one Krylov sequence: multi-shift conjugate gradients from zero.

        (X^T M X + lam I) x = b for every lam shares the Krylov space of the smallest penalty
        (a shift of the identity leaves it unchanged), so one operator product per iteration
        serves the whole path; each penalty's residual is a known multiple (zeta) of the base
        residual and stops when it reaches ``tol``. Preconditioning would break the shift
        structure; unpreconditioned CG needs somewhat more iterations than block-Jacobi PCG at
        one penalty but the path costs about as much as its smallest penalty alone.
        """
        use_a, use_b = self.use_a, self.use_b
        base = np.min(lams, axis=0)
        shifts = np.array([lam - base for lam in lams])  # [S, m]
        # The blocks stacked as [k, n, m] (k = 1 or 2) so that one kernel call updates them all.
        b = np.stack([x for x, used in ((self.rhs_a, use_a), (self.rhs_b, use_b)) if used])

        def blocks(v: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
            return (v[0] if use_a else None), (v[-1] if use_b else None)

        product = np.empty(b.shape, operator.dtype)  # K p (the penalty-free operator), [k, n, m]
        out = (product[0] if use_a else operator.empty, product[-1] if use_b else operator.empty)
        r, p = b.copy(), b.copy()
        p_operator = p.astype(operator.dtype)
        xs = np.zeros((len(lams),) + b.shape)
        ps = np.repeat(b[None], len(lams), axis=0)
        zeta, zeta_old = np.ones_like(shifts), np.ones_like(shifts)
        done = np.zeros(len(lams), dtype=np.int64)  # iteration at which each penalty converged (0: not yet)
        alpha_old, beta_old = np.ones_like(base), np.zeros_like(base)
        rr = np.einsum("knm,knm->m", r, r)
        for iteration in range(1, max_iter + 1):
            operator(*blocks(p_operator), out=out)
            multishift_iteration(product, p, p_operator, r, rr, alpha_old, beta_old, base, self.rhs_norm, xs, ps,
                                 shifts, zeta, zeta_old, tol, done, iteration)
            if done.all():
                return [(*blocks(x), int(it)) for x, it in zip(xs, done)]
        raise SolverError(
            f"conjugate gradients did not reach tolerance {tol:g} in {max_iter} iterations at every penalty "
            f"of the path; raise the penalties or use solver='direct'"
        )


def _col_dot(xa, ya, xb, yb) -> np.ndarray:
    """Per-test-example inner product over the A and B blocks: ``float64[m]``."""
    total = 0.0
    if xa is not None:
        total = total + np.einsum("nm,nm->m", xa, ya)
    if xb is not None:
        total = total + np.einsum("nm,nm->m", xb, yb)
    return total


def _solve_direct(
    problem: TransitionProblem,
    projector: GroupProjector,
    operator: _NormalOperator,
    lams_a: list[np.ndarray | None],
    lams_b: list[np.ndarray | None],
    max_chunk_bytes: int = 256 * 2**20,
) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """(A, B) at every penalty of the path: the penalty-free Gram matrices of a chunk of test
    examples are built once and solved against with each penalty added to their diagonal."""
    R, T, m = problem.shape
    n = problem.n_train
    use_a, use_b = lams_a[0] is not None, lams_b[0] is not None
    blocks = int(use_a) + int(use_b)
    pairs_t = _pair_count_matrix(problem.batches, n).T.tocsr()  # [n*n, R*T]
    shared_bb = np.asarray(pairs_t.sum(axis=1)).reshape(n, n)
    group_counts = _group_count_matrix(problem) if problem.intercept != "none" else None
    prev = problem.prev.reshape(R * T, m)
    rhs_a, rhs_b = operator.transpose(projector.apply(problem.target).reshape(R * T, m), use_a, use_b)
    rhs = np.concatenate([r for r in (rhs_a, rhs_b) if r is not None], axis=0)  # [blocks*n, m]
    width = blocks * n
    chunk = max(1, min(m, max_chunk_bytes // (8 * (4 * width * width + 2 * n * n))))
    solutions = [np.empty((width, m)) for _ in lams_a]
    diag = np.arange(width)
    for start in range(0, m, chunk):
        cols = slice(start, min(m, start + chunk))
        d = prev[:, cols]
        k = d.shape[1]
        gram = np.zeros((k, width, width))
        if use_a:
            gram[:, :n, :n] = _unflatten(pairs_t @ (d * d), n)
        if use_a and use_b:
            cross = _unflatten(pairs_t @ d, n)
            gram[:, :n, n:] = cross
            gram[:, n:, :n] = cross.transpose(0, 2, 1)
        if use_b:
            gram[:, width - n :, width - n :] = shared_bb
        if group_counts is not None:
            u = _intercept_cross_terms(problem, projector, group_counts, cols, use_a, use_b)
            gram -= u @ u.transpose(0, 2, 1)
        rhs_chunk = rhs[:, cols].T[:, :, None]
        for solution, lam_a, lam_b in zip(solutions, lams_a, lams_b):
            penalised = gram.copy()
            if use_a:
                penalised[:, diag[:n], diag[:n]] += lam_a[cols, None]
            if use_b:
                penalised[:, diag[width - n :], diag[width - n :]] += lam_b[cols, None]
            solution[:, cols] = np.linalg.solve(penalised, rhs_chunk)[:, :, 0].T
    return [(solution[:n] if use_a else None, solution[width - n :] if use_b else None) for solution in solutions]


def _unflatten(flat: np.ndarray, n: int) -> np.ndarray:
    """``[n*n, k]`` -> ``[k, n, n]``."""
    return flat.T.reshape(-1, n, n)


def _pair_count_matrix(batches: np.ndarray, n: int) -> sp.csr_matrix:
    """``csr[R*T, n*n]`` with entry (k, i*n + i') = C_ki * C_ki' (pairs of batch positions)."""
    flat = batches.reshape(-1, batches.shape[-1])
    width = flat.shape[1]
    first = np.repeat(flat, width, axis=1)
    second = np.tile(flat, (1, width))
    rows, cols = np.nonzero((first != PAD) & (second != PAD))
    keys = first[rows, cols] * n + second[rows, cols]
    pairs = sp.csr_matrix((np.ones(len(rows)), (rows, keys)), shape=(flat.shape[0], n * n))
    pairs.sum_duplicates()
    return pairs


def _group_count_matrix(problem: TransitionProblem) -> sp.csr_matrix:
    """``csr[G*n, R*T]``: row g*n + i sums C_ki over the transitions k of group g."""
    R, T, m = problem.shape
    n = problem.n_train
    coo = problem.counts.tocoo()
    group = coo.row % T if problem.intercept == "step" else np.zeros_like(coo.row)
    n_groups = T if problem.intercept == "step" else 1
    return sp.csr_matrix((coo.data, (group * n + coo.col, coo.row)), shape=(n_groups * n, R * T))


def _intercept_cross_terms(
    problem: TransitionProblem,
    projector: GroupProjector,
    group_counts: sp.csr_matrix,
    cols: slice,
    use_a: bool,
    use_b: bool,
) -> np.ndarray:
    """U_j = X_j^T Q_j for the test examples in ``cols``: ``float64[k, blocks*n, 2G]``."""
    R, T, m = problem.shape
    n = problem.n_train
    q1, q2 = projector.basis()
    d = problem.prev[:, :, cols].reshape(R * T, -1)
    q2 = q2[:, :, cols].reshape(R * T, -1)
    G = group_counts.shape[0] // n

    def grouped(values: np.ndarray) -> np.ndarray:  # [R*T, k] -> [k, n, G]
        return (group_counts @ values).reshape(G, n, -1).transpose(2, 1, 0)

    parts = []
    if use_a:
        parts.append(np.concatenate([grouped(d) * q1[0], grouped(d * q2)], axis=2))
    if use_b:
        ones_part = grouped(np.ones((R * T, 1))) * q1[0]
        parts.append(np.concatenate([np.broadcast_to(ones_part, (d.shape[1], n, G)), grouped(q2)], axis=2))
    return np.concatenate(parts, axis=1)


def dense_reference_solve(
    problem: TransitionProblem,
    l2_a: float,
    l2_b: float,
    test_index: int,
    use_a: bool = True,
    use_b: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(A_j, B_j) of one test example from a dense design and ``np.linalg.lstsq``.

    The slow, obviously correct reference the fast solvers are checked and timed against:
    it builds the whole (transitions x (2n + 2G)) design of one test example, with the
    intercept columns unpenalised, and solves the augmented least-squares problem.
    """
    R, T, m = problem.shape
    n = problem.n_train
    dense_counts = problem.counts.toarray()
    d = problem.prev[:, :, test_index].reshape(-1)
    columns = []
    if use_a:
        columns.append(dense_counts * d[:, None])
    if use_b:
        columns.append(dense_counts)
    penalised = np.concatenate(columns, axis=1)
    if problem.intercept == "step":
        onehot = np.tile(np.eye(T), (R, 1))
        free = np.concatenate([onehot * d[:, None], onehot], axis=1)
    elif problem.intercept == "constant":
        free = np.stack([d, np.ones_like(d)], axis=1)
    else:
        free = np.zeros((R * T, 0))
    design = np.concatenate([penalised, free], axis=1)
    lam = np.concatenate([np.full(n, l2_a)] * int(use_a) + [np.full(n, l2_b)] * int(use_b))
    penalty_rows = np.concatenate([np.diag(np.sqrt(lam)), np.zeros((len(lam), free.shape[1]))], axis=1)
    lhs = np.concatenate([design, penalty_rows], axis=0)
    rhs = np.concatenate([problem.target[:, :, test_index].reshape(-1), np.zeros(len(lam))])
    coef = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    A = coef[:n] if use_a else None
    B = coef[n * int(use_a) : n * (int(use_a) + int(use_b))] if use_b else None
    return A, B
