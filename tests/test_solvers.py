"""The exact ridge solvers against a dense NumPy reference and known ground truth."""

import numpy as np
import pytest

from simfluence.solvers import (GroupProjector, SolverError, TransitionProblem, _CGSystem, _NormalOperator,
                                dense_reference_solve, solve_ridge, solve_ridge_path)
from simfluence.synthetic import linear_runs

VARIANTS = {"linear": (True, True), "additive": (False, True), "multiplicative": (True, False)}


@pytest.fixture(scope="module")
def noisy_runs():
    runs, _ = linear_runs(40, 6, 12, 15, 4, noise=0.01, step_intercept=True, seed=3)
    return runs


def _max_rel(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("intercept", ["none", "constant", "step"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_solver_path_matches_dense_reference(noisy_runs, solver, intercept, variant):
    use_a, use_b = VARIANTS[variant]
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, intercept)
    solution = solve_ridge(problem, 0.05, 0.02, use_a=use_a, use_b=use_b, solver=solver, tol=1e-12)
    for j in range(noisy_runs.n_tests):
        ref_a, ref_b = dense_reference_solve(problem, 0.05, 0.02, j, use_a, use_b)
        if use_a:
            assert _max_rel(solution.A[:, j], ref_a) < 1e-6
        if use_b:
            assert _max_rel(solution.B[:, j], ref_b) < 1e-6


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_noise_free_parameters_are_recovered_exactly(solver):
    runs, truth = linear_runs(30, 5, 40, 30, 4, noise=0.0, seed=1)
    problem = TransitionProblem.from_runs(runs, 1.0, "none")
    solution = solve_ridge(problem, 1e-11, 1e-11, solver=solver, tol=1e-14, max_iter=20000)
    assert _max_rel(solution.A, truth.A) < 1e-6
    assert _max_rel(solution.B, truth.B) < 1e-6


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_step_intercept_absorbs_the_mean_effect_exactly(solver):
    """With a per-step intercept and a fixed batch size b, (A_i + c, alpha0_t - b c) is the same
    model for any c: the penalty picks the centred A, the intercept takes b * mean(A)."""
    runs, truth = linear_runs(30, 5, 40, 30, 4, noise=0.0, step_intercept=True, seed=1)
    problem = TransitionProblem.from_runs(runs, 1.0, "step")
    # A penalty well above round-off (the shift direction's curvature is the penalty itself)
    # yet far below the data's curvature (hundreds), so it biases the identified part by ~1e-9.
    solution = solve_ridge(problem, 1e-6, 1e-6, solver=solver, tol=1e-14, max_iter=20000)
    b = runs.batch_size
    assert _max_rel(solution.A, truth.A - truth.A.mean(axis=0)) < 1e-6
    assert _max_rel(solution.B, truth.B - truth.B.mean(axis=0)) < 1e-6
    assert _max_rel(solution.alpha0, truth.alpha0 + b * truth.A.mean(axis=0)) < 1e-6
    assert _max_rel(solution.beta0, truth.beta0 + b * truth.B.mean(axis=0)) < 1e-6


def test_noisy_parameters_correlate_with_truth():
    runs, truth = linear_runs(50, 8, 200, 40, 4, noise=0.002, seed=2)
    problem = TransitionProblem.from_runs(runs, 1.0, "none")
    solution = solve_ridge(problem, 1e-3, 1e-3)
    assert np.corrcoef(solution.B.ravel(), truth.B.ravel())[0, 1] > 0.9
    assert np.corrcoef(solution.A.ravel(), truth.A.ravel())[0, 1] > 0.8


def test_warm_start_and_sharding_do_not_change_the_answer(noisy_runs):
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, "step")
    cold = solve_ridge(problem, 0.01, 0.01, solver="cg", tol=1e-12)
    start = solve_ridge(problem, 1.0, 1.0, solver="cg", tol=1e-12)
    warm = solve_ridge(problem, 0.01, 0.01, solver="cg", tol=1e-12, warm_start=start, shard_size=2, threads=2)
    assert _max_rel(warm.A, cold.A) < 1e-8 and _max_rel(warm.B, cold.B) < 1e-8


PATH = [10.0, 1.0, 0.1, 0.01]


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("intercept", ["none", "constant", "step"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_penalty_path_equals_separate_solves(noisy_runs, solver, intercept, variant):
    """One path (one build of the penalty-free structure; multi-shift CG on the CG path) gives
    the solution of a separate solve at each penalty, intercepts included."""
    use_a, use_b = VARIANTS[variant]
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, intercept)
    path = solve_ridge_path(problem, PATH, PATH, use_a=use_a, use_b=use_b, solver=solver, tol=1e-13)
    assert len(path) == len(PATH)
    for l2, solution in zip(PATH, path):
        alone = solve_ridge(problem, l2, l2, use_a=use_a, use_b=use_b, solver=solver, tol=1e-13)
        for name in ("A", "B", "alpha0", "beta0"):
            got, expected = getattr(solution, name), getattr(alone, name)
            assert (got is None) == (expected is None)
            if expected is not None:
                assert _max_rel(got, expected) < 1e-8, (l2, name)
    if solver == "cg" and intercept == "step" and variant == "linear":
        # the CG path against the direct path: two independent algorithms agree
        direct = solve_ridge_path(problem, PATH, PATH, solver="direct")
        for solution, reference in zip(path, direct):
            assert _max_rel(solution.A, reference.A) < 1e-8 and _max_rel(solution.B, reference.B) < 1e-8


@pytest.mark.parametrize("intercept", ["none", "constant", "step"])
@pytest.mark.parametrize("variant", ["linear", "additive", "multiplicative"])
def test_penalty_path_with_single_precision_products(noisy_runs, intercept, variant):
    """Multi-shift CG with float32 operator products (what cross-validation uses, at its loose
    tolerance) meets the tolerance in float64: every solution's relative residual of the normal
    equations, recomputed in float64, is within 10% of tol (CG stops on its recurrence's
    residual; measured: at most 9.92e-5 against the float64 path's 9.90e-5 at tol 1e-4); the
    solutions stay float64. A tolerance float32 products cannot reach is refused."""
    use_a, use_b = VARIANTS[variant]
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, intercept)
    projector = GroupProjector(problem.prev, intercept)
    system = _CGSystem(problem, projector, _NormalOperator(problem, projector), use_a, use_b)
    tol = 1e-4
    single = solve_ridge_path(problem, PATH, PATH, use_a=use_a, use_b=use_b, solver="cg", tol=tol,
                              shift_dtype=np.float32)
    double = solve_ridge_path(problem, PATH, PATH, use_a=use_a, use_b=use_b, solver="cg", tol=tol)
    for l2, solution, reference in zip(PATH, single, double):
        products = system.operator(solution.A, solution.B)
        squares = 0.0
        for rhs, product, x in ((system.rhs_a, products[0], solution.A), (system.rhs_b, products[1], solution.B)):
            if x is not None:
                assert x.dtype == np.float64
                squares = squares + np.sum((rhs - product - l2 * x) ** 2, axis=0)
        assert np.max(np.sqrt(squares) / system.rhs_norm) <= 1.1 * tol, l2
        assert not np.array_equal(solution.B if solution.A is None else solution.A,
                                  reference.B if reference.A is None else reference.A)  # float32 products
    with pytest.raises(SolverError, match="float32 operator products cannot reach tol=1e-08"):
        solve_ridge_path(problem, PATH, PATH, use_a=use_a, use_b=use_b, solver="cg", tol=1e-8,
                         shift_dtype=np.float32)


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_penalty_path_with_separate_b_penalties_and_per_test_penalties(noisy_runs, solver):
    """Paths whose A and B penalties differ (warm-started PCG along the path) or vary by test
    example equal separate solves too."""
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, "step")
    per_test = np.linspace(0.05, 2.0, noisy_runs.n_tests)
    l2_a = [1.0, 0.1, per_test]
    l2_b = [0.3, 0.3, per_test]
    path = solve_ridge_path(problem, l2_a, l2_b, solver=solver, tol=1e-13)
    for a, b, solution in zip(l2_a, l2_b, path):
        alone = solve_ridge(problem, a, b, solver=solver, tol=1e-13)
        assert _max_rel(solution.A, alone.A) < 1e-8 and _max_rel(solution.B, alone.B) < 1e-8


def test_penalty_path_is_checked(noisy_runs):
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, "none")
    with pytest.raises(SolverError, match="equally long"):
        solve_ridge_path(problem, [1.0, 0.1], [1.0])
    with pytest.raises(SolverError, match="l2_b must be positive"):
        solve_ridge_path(problem, [1.0, 0.1], [1.0, 0.0])


def test_per_test_penalties(noisy_runs):
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, "none")
    penalties = np.linspace(0.01, 1.0, noisy_runs.n_tests)
    together = solve_ridge(problem, penalties, penalties, solver="direct")
    for j in (0, noisy_runs.n_tests - 1):
        alone = solve_ridge(problem, penalties[j], penalties[j], solver="direct")
        np.testing.assert_allclose(together.A[:, j], alone.A[:, j], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("penalty", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_penalty_is_rejected(noisy_runs, penalty):
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, "none")
    with pytest.raises(SolverError, match="l2_a must be positive"):
        solve_ridge(problem, penalty, 1.0)


def test_cg_that_cannot_converge_says_so(noisy_runs):
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, "none")
    with pytest.raises(SolverError, match="did not reach tolerance"):
        solve_ridge(problem, 1e-6, 1e-6, solver="cg", max_iter=2, tol=1e-14)


def test_unknown_solver_and_intercept_are_rejected(noisy_runs):
    with pytest.raises(SolverError, match="intercept"):
        TransitionProblem.from_runs(noisy_runs, 1.0, "sometimes")
    problem = TransitionProblem.from_runs(noisy_runs, 1.0, "none")
    with pytest.raises(SolverError, match="solver"):
        solve_ridge(problem, 1.0, 1.0, solver="magic")
