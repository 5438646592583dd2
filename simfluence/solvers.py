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
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from simfluence._kernels import design_apply, design_transpose
from simfluence.errors import SimfluenceError
from simfluence.runset import PAD, RunSet

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
    shard_size: int = 128,
) -> RidgeSolution:
    """Solve the ridge problem exactly for every test example.

    Test examples are independent problems; they are solved in shards of ``shard_size``
    columns (cache-sized), in parallel on ``threads`` threads (default: every core).

    Args:
        problem: transitions of the fitting runs.
        l2_a, l2_b: positive penalties on A and B, scalars or ``float[m]`` (one per test example).
        use_a, use_b: which blocks the model has (Additive: no A; Multiplicative: no B).
        solver: ``direct``, ``cg`` or ``auto`` (the cheaper by a flop estimate).
        tol: CG stopping tolerance on each test example's relative residual norm of the normal
            equations (1e-8 gives parameters to about 1e-7 relative on the reference problems).
        max_iter: CG iteration cap; reaching it raises.
        warm_start: a previous solution to start CG from (used along a penalty path).
        threads: worker threads (None: ``os.cpu_count()``).
        shard_size: test examples per shard.
    """
    if not (use_a or use_b):
        raise SolverError("the model needs at least one of the A and B blocks")
    m = problem.shape[2]
    lam_a = _penalty(l2_a, m, "l2_a") if use_a else None
    lam_b = _penalty(l2_b, m, "l2_b") if use_b else None
    if solver == "auto":
        solver = choose_solver(problem, use_a, use_b)
    if solver not in ("direct", "cg"):
        raise SolverError(f"solver must be 'auto', 'direct' or 'cg', got {solver!r}")
    shards = [slice(s, min(m, s + shard_size)) for s in range(0, m, shard_size)]

    def solve_shard(cols: slice) -> RidgeSolution:
        warm = None
        if warm_start is not None:
            warm = RidgeSolution(*(None if a is None else a[:, cols] for a in
                                   (warm_start.A, warm_start.B, warm_start.alpha0, warm_start.beta0)),
                                 warm_start.iterations, warm_start.solver)
        return _solve_shard(
            problem.select_tests(cols),
            None if lam_a is None else lam_a[cols],
            None if lam_b is None else lam_b[cols],
            solver, tol, max_iter, warm,
        )

    workers = min(len(shards), threads or os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(solve_shard, shards))
    else:
        parts = [solve_shard(cols) for cols in shards]

    def join(name: str) -> np.ndarray | None:
        arrays = [getattr(part, name) for part in parts]
        return None if arrays[0] is None else np.concatenate(arrays, axis=1)

    iterations = max(part.iterations for part in parts)
    return RidgeSolution(join("A"), join("B"), join("alpha0"), join("beta0"), iterations, solver)


def _solve_shard(
    problem: TransitionProblem,
    lam_a: np.ndarray | None,
    lam_b: np.ndarray | None,
    solver: str,
    tol: float,
    max_iter: int,
    warm_start: RidgeSolution | None,
) -> RidgeSolution:
    projector = GroupProjector(problem.prev, problem.intercept)
    if solver == "direct":
        A, B = _solve_direct(problem, projector, lam_a, lam_b)
        iterations = 0
    else:
        A, B, iterations = _solve_cg(problem, projector, lam_a, lam_b, tol, max_iter, warm_start)
    residual = problem.target - _apply_design(problem, A, B)
    alpha0, beta0 = projector.intercepts(residual)
    return RidgeSolution(A, B, alpha0, beta0, iterations, solver)


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

    @property
    def n_groups(self) -> int:
        """Number of intercept groups G (1 for ``none``, where nothing is projected)."""
        return int(self.group_of_transition.max()) + 1

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


def _apply_design(problem: TransitionProblem, A: np.ndarray | None, B: np.ndarray | None) -> np.ndarray:
    """X_j w_j for every test example: ``float64[R, T, m]``."""
    R, T, m = problem.shape
    out = np.empty((R * T, m))
    no_groups = np.zeros((1, m))
    design_apply(
        problem.batches.reshape(R * T, -1), problem.prev.reshape(R * T, m), *_blocks(A, B, m),
        np.zeros((0, m)), np.zeros(R * T, dtype=np.int64), out, no_groups, no_groups.copy(),
    )
    return out.reshape(R, T, m)


def _apply_design_transpose(
    problem: TransitionProblem, values: np.ndarray, use_a: bool, use_b: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """X_j^T v_j for every test example, for ``v`` of shape ``[R, T, m]``: (A part, B part)."""
    R, T, m = problem.shape
    out_a, out_b = _outputs(problem.n_train, m, use_a, use_b)
    no_groups = np.zeros((1, m))
    design_transpose(
        problem.batches.reshape(R * T, -1), problem.prev.reshape(R * T, m),
        np.ascontiguousarray(values).reshape(R * T, m), use_a, use_b, np.zeros((0, m)),
        np.zeros(R * T, dtype=np.int64), no_groups, no_groups, out_a, out_b,
    )
    return (out_a if use_a else None), (out_b if use_b else None)


def _normal_product(
    problem: TransitionProblem, projector: GroupProjector, A: np.ndarray | None, B: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """X_j^T M_j X_j w_j for every test example (no penalty), fused in two kernel passes."""
    R, T, m = problem.shape
    use_a, use_b = A is not None, B is not None
    batches = problem.batches.reshape(R * T, -1)
    prev = problem.prev.reshape(R * T, m)
    fitted = np.empty((R * T, m))
    group_sum = np.zeros((projector.n_groups, m))
    group_q2_sum = np.zeros((projector.n_groups, m))
    design_apply(batches, prev, *_blocks(A, B, m), projector.flat_q2, projector.group_of_transition,
                 fitted, group_sum, group_q2_sum)
    group_size = np.bincount(projector.group_of_transition, minlength=projector.n_groups)[:, None]
    out_a, out_b = _outputs(problem.n_train, m, use_a, use_b)
    design_transpose(batches, prev, fitted, use_a, use_b, projector.flat_q2,
                     projector.group_of_transition, group_sum / group_size, group_q2_sum, out_a, out_b)
    return (out_a if use_a else None), (out_b if use_b else None)


def _blocks(A: np.ndarray | None, B: np.ndarray | None, m: int) -> tuple:
    """Kernel arguments (A, B, use_a, use_b) with empty arrays for a missing block."""
    empty = np.zeros((0, m))
    return (
        empty if A is None else np.ascontiguousarray(A),
        empty if B is None else np.ascontiguousarray(B),
        A is not None,
        B is not None,
    )


def _outputs(n: int, m: int, use_a: bool, use_b: bool) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((n, m) if use_a else (0, m)), np.empty((n, m) if use_b else (0, m))


def _solve_cg(
    problem: TransitionProblem,
    projector: GroupProjector,
    lam_a: np.ndarray | None,
    lam_b: np.ndarray | None,
    tol: float,
    max_iter: int,
    warm_start: RidgeSolution | None,
) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    use_a, use_b = lam_a is not None, lam_b is not None
    n, m = problem.n_train, problem.shape[2]

    def normal_op(A, B):
        ga, gb = _normal_product(problem, projector, A, B)
        if use_a:
            ga += lam_a * A
        if use_b:
            gb += lam_b * B
        return ga, gb

    rhs_a, rhs_b = _apply_design_transpose(problem, projector.apply(problem.target), use_a, use_b)
    precond = _BlockJacobi(problem, lam_a, lam_b)
    if warm_start is not None:
        A = None if not use_a else warm_start.A.copy()
        B = None if not use_b else warm_start.B.copy()
    else:
        A = np.zeros((n, m)) if use_a else None
        B = np.zeros((n, m)) if use_b else None
    ha, hb = normal_op(A, B)
    ra = rhs_a - ha if use_a else None
    rb = rhs_b - hb if use_b else None
    rhs_norm = np.sqrt(_col_dot(rhs_a, rhs_a, rhs_b, rhs_b))
    rhs_norm[rhs_norm == 0] = 1.0
    za, zb = precond(ra, rb)
    pa = None if za is None else za.copy()
    pb = None if zb is None else zb.copy()
    rz = _col_dot(ra, za, rb, zb)
    for iteration in range(1, max_iter + 1):
        res = np.sqrt(_col_dot(ra, ra, rb, rb)) / rhs_norm
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
    worst = float(np.max(np.sqrt(_col_dot(ra, ra, rb, rb)) / rhs_norm))
    raise SolverError(
        f"conjugate gradients did not reach tolerance {tol:g} in {max_iter} iterations "
        f"(worst relative residual {worst:.3g}); raise the penalty or use solver='direct'"
    )


def _col_dot(xa, ya, xb, yb) -> np.ndarray:
    """Per-test-example inner product over the A and B blocks: ``float64[m]``."""
    total = 0.0
    if xa is not None:
        total = total + np.einsum("nm,nm->m", xa, ya)
    if xb is not None:
        total = total + np.einsum("nm,nm->m", xb, yb)
    return total


class _BlockJacobi:
    """Inverse of each training example's exact 2 x 2 (A_i, B_i) diagonal block of X^T X + L."""

    def __init__(self, problem: TransitionProblem, lam_a, lam_b) -> None:
        R, T, m = problem.shape
        sq_counts_t = problem.counts_t.multiply(problem.counts_t).tocsr()
        prev = problem.prev.reshape(R * T, m)
        self.use_a, self.use_b = lam_a is not None, lam_b is not None
        h_bb = np.asarray(sq_counts_t.sum(axis=1)).reshape(-1, 1) + (lam_b if self.use_b else 0.0)
        h_aa = sq_counts_t @ (prev * prev) + (lam_a if self.use_a else 0.0)
        h_ab = sq_counts_t @ prev
        if self.use_a and self.use_b:
            det = h_aa * h_bb - h_ab * h_ab
            self.inv_aa, self.inv_bb, self.inv_ab = h_bb / det, h_aa / det, -h_ab / det
        else:
            self.inv_aa, self.inv_bb = 1.0 / h_aa, 1.0 / h_bb

    def __call__(self, ra, rb):
        if self.use_a and self.use_b:
            return self.inv_aa * ra + self.inv_ab * rb, self.inv_ab * ra + self.inv_bb * rb
        if self.use_a:
            return self.inv_aa * ra, None
        return None, self.inv_bb * rb


def _solve_direct(
    problem: TransitionProblem,
    projector: GroupProjector,
    lam_a: np.ndarray | None,
    lam_b: np.ndarray | None,
    max_chunk_bytes: int = 256 * 2**20,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    R, T, m = problem.shape
    n = problem.n_train
    use_a, use_b = lam_a is not None, lam_b is not None
    blocks = int(use_a) + int(use_b)
    pairs_t = _pair_count_matrix(problem.batches, n).T.tocsr()  # [n*n, R*T]
    shared_bb = np.asarray(pairs_t.sum(axis=1)).reshape(n, n)
    group_counts = _group_count_matrix(problem) if problem.intercept != "none" else None
    prev = problem.prev.reshape(R * T, m)
    rhs_a, rhs_b = _apply_design_transpose(problem, projector.apply(problem.target), use_a, use_b)
    rhs = np.concatenate([r for r in (rhs_a, rhs_b) if r is not None], axis=0)  # [blocks*n, m]
    width = blocks * n
    chunk = max(1, min(m, max_chunk_bytes // (8 * (3 * width * width + 2 * n * n))))
    solution = np.empty((width, m))
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
        diag = np.arange(width)
        if use_a:
            gram[:, diag[:n], diag[:n]] += lam_a[cols, None]
        if use_b:
            gram[:, diag[width - n :], diag[width - n :]] += lam_b[cols, None]
        solution[:, cols] = np.linalg.solve(gram, rhs[:, cols].T[:, :, None])[:, :, 0].T
    A = solution[:n] if use_a else None
    B = solution[width - n :] if use_b else None
    return A, B


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
