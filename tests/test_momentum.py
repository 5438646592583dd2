"""The momentum-aware, gradient-featured Simfluence against known ground truth."""

from __future__ import annotations

import numpy as np
import pytest

import simfluence as sf
from simfluence.momentum import Candidate, _fit_path
from simfluence.solvers import count_matrix
from simfluence.synthetic import momentum_runs

ADAM = sf.OptimizerSpec("adam", 0.9)


@pytest.fixture(scope="module")
def process():
    runs, gradients, truth = momentum_runs(24, 6, 50, 24, 4, seed=3)
    fitting, heldout = runs.split(12, seed=1)
    return fitting, heldout, gradients, truth


def _mse(simulator, heldout) -> float:
    return sf.metrics.all_steps_mse(simulator.simulate(heldout.batches, heldout.initial_loss), heldout.losses)


def test_kernel_matches_the_optimizers_own_momentum():
    """k(t, u) is what torch's Adam (bias-corrected) and SGD (heavy ball) apply to a gradient."""
    import torch

    for spec, make in ((sf.OptimizerSpec("adam", 0.9), lambda p: torch.optim.Adam([p], lr=1.0, betas=(0.9, 0.0))),
                       (sf.OptimizerSpec("sgd", 0.8), lambda p: torch.optim.SGD([p], lr=1.0, momentum=0.8))):
        T = 6
        grads = np.random.default_rng(0).normal(size=T)
        if spec.kind == "adam":  # with beta2 = 0 Adam divides by |g_t|: compare the first moment only
            expected = spec.kernel(T) @ grads
            buffer, out = 0.0, []
            for t, g in enumerate(grads):
                buffer = 0.9 * buffer + 0.1 * g
                out.append(buffer / (1 - 0.9 ** (t + 1)))
            np.testing.assert_allclose(out, expected, rtol=1e-12)
            continue
        p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimizer = make(p)
        moves = []
        for g in grads:
            before = p.detach().clone()
            p.grad = torch.tensor([g], dtype=torch.float64)
            optimizer.step()
            moves.append(float(before - p.detach()))
        np.testing.assert_allclose(moves, spec.kernel(T) @ grads, rtol=1e-12)
        np.testing.assert_allclose(spec.filter(grads[None, :, None])[0, :, 0], spec.kernel(T) @ grads, rtol=1e-12)


def test_momentum_process_is_recovered_by_the_momentum_aware_fit_only(process):
    fitting, heldout, gradients, truth = process
    aware = sf.SimfluenceMomentum(ADAM, gradients).fit(fitting)
    blind = sf.SimfluenceMomentum(sf.OptimizerSpec("sgd", 0.0), gradients).fit(fitting)
    linear = sf.SimfluenceLinear(intercept="cv").fit(fitting)
    mean = sf.MeanTrajectory().fit(fitting)
    aware_mse = _mse(aware, heldout)
    assert aware_mse < 0.1 * _mse(blind, heldout)
    assert aware_mse < 0.1 * _mse(linear, heldout)
    assert aware_mse < 0.05 * _mse(mean, heldout)
    assert aware.chosen.prior != "none"
    scale = aware.params["scale"]
    np.testing.assert_allclose(np.mean(scale), truth.scale, rtol=0.15)


def test_bare_prior_is_tracin_cp_without_momentum():
    """s = 1, no intercepts, no residual, no momentum: TracIn-CP (checkpoints at every step, so
    interpolation between them is exact)."""
    rng = np.random.default_rng(0)
    T, n, m, d = 8, 10, 4, 5
    gradients = sf.GradientCheckpoints(np.arange(T), rng.uniform(0.01, 0.1, T), rng.normal(size=(T, n, d)),
                                       rng.normal(size=(T, m, d)), batch_size=3)
    runs, _ = sf.synthetic.linear_runs(n, m, 6, T, 3, seed=1)
    tracin = sf.TracInCP(gradients).fit(runs)
    prior = sf.SimfluenceMomentum.from_prior(gradients, sf.OptimizerSpec("sgd", 0.0), scale=1.0)
    np.testing.assert_allclose(prior.simulate(runs.batches, runs.initial_loss),
                               tracin.simulate(runs.batches, runs.initial_loss), rtol=1e-10, atol=1e-12)


def test_shrinkage_never_changes_the_ranking_of_curricula(process):
    fitting, heldout, gradients, _ = process
    runs, gradients, _ = momentum_runs(24, 6, 50, 24, 4, noise=0.05, seed=4)  # noisy: shrinkage engages
    fitting, heldout = runs.split(12, seed=1)
    shrunk = sf.SimfluenceMomentum(ADAM, gradients, prior="test", intercept="step", l2=1e-3).fit(fitting)
    plain = sf.SimfluenceMomentum(ADAM, gradients, prior="test", intercept="step", l2=1e-3, shrink=False).fit(fitting)
    assert 0 < shrunk.shrink_factor < 1
    a = shrunk.simulate(heldout.batches, heldout.initial_loss)
    b = plain.simulate(heldout.batches, heldout.initial_loss)
    assert not np.allclose(a, b)
    assert sf.metrics.final_step_spearman(a, heldout.losses) == pytest.approx(
        sf.metrics.final_step_spearman(b, heldout.losses), abs=1e-12)


def test_exact_solve_matches_a_dense_reference(process):
    """Per-test scale, step intercepts and ridge residual against one dense least-squares
    problem per test example (penalty rows on A and B only)."""
    fitting, _, gradients, _ = process
    small = fitting.select_runs(np.arange(10))
    simulator = sf.SimfluenceMomentum(ADAM, gradients)
    simulator._prepare(small)
    Z, G = simulator._features(small.batches)
    l2 = 1e-3
    (_, params), = _fit_path(small, Z, G, [Candidate("test", "step", l2)])
    R, T, m = small.n_runs, small.n_steps, small.n_tests
    n, N = small.n_train, R * T
    prev, change = small.losses[:, :-1], small.losses[:, 1:] - small.losses[:, :-1]
    onehot = np.tile(np.eye(T), (R, 1))  # [N, T]
    for j in range(m):
        d = prev[:, :, j].reshape(N)
        z = Z.reshape(N, n)
        design = np.hstack([onehot * d[:, None], onehot, G[:, :, j].reshape(N, 1), z * d[:, None], z])
        penalty = np.zeros((2 * n, design.shape[1]))
        penalty[:, 2 * T + 1:] = np.sqrt(l2 * N) * np.eye(2 * n)
        theta = np.linalg.lstsq(np.vstack([design, penalty]), np.concatenate([change[:, :, j].reshape(N),
                                                                              np.zeros(2 * n)]), rcond=None)[0]
        np.testing.assert_allclose(params["A"][:, j], theta[2 * T + 1:2 * T + 1 + n], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(params["B"][:, j], theta[2 * T + 1 + n:], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(params["scale"][j], theta[2 * T], rtol=1e-6)
        fitted = (params["alpha0"][:, j][np.tile(np.arange(T), R)] * d + params["beta0"][:, j][np.tile(np.arange(T), R)])
        np.testing.assert_allclose(fitted, design[:, :2 * T] @ theta[:2 * T], rtol=1e-6, atol=1e-9)


def test_shared_scale_is_the_closed_form_least_squares(process):
    """Global scale with step intercepts and no residual: one exact least-squares problem over
    all test examples (intercepts per test, scale shared)."""
    fitting, _, gradients, _ = process
    small = fitting.select_runs(np.arange(8))
    simulator = sf.SimfluenceMomentum(ADAM, gradients)
    simulator._prepare(small)
    Z, G = simulator._features(small.batches)
    (_, params), = _fit_path(small, Z, G, [Candidate("global", "step", None)])
    R, T, m = small.n_runs, small.n_steps, small.n_tests
    N = R * T
    prev, change = small.losses[:, :-1], small.losses[:, 1:] - small.losses[:, :-1]
    onehot = np.tile(np.eye(T), (R, 1))
    blocks, ys = [], []
    for j in range(m):
        d = prev[:, :, j].reshape(N)
        row = np.zeros((N, 2 * T * m + 1))
        row[:, 2 * T * j:2 * T * j + T] = onehot * d[:, None]
        row[:, 2 * T * j + T:2 * T * (j + 1)] = onehot
        row[:, -1] = G[:, :, j].reshape(N)
        blocks.append(row)
        ys.append(change[:, :, j].reshape(N))
    theta = np.linalg.lstsq(np.vstack(blocks), np.concatenate(ys), rcond=None)[0]
    np.testing.assert_allclose(params["scale"][0], theta[-1], rtol=1e-8)


def test_save_and_load_give_the_same_predictions(process, tmp_path):
    fitting, heldout, gradients, _ = process
    simulator = sf.SimfluenceMomentum(ADAM, gradients, l2_grid=(1e-3, 1e-2)).fit(fitting)
    loaded = sf.load_simulator(simulator.save(tmp_path / "bundle"))
    assert isinstance(loaded, sf.SimfluenceMomentum) and loaded.chosen == simulator.chosen
    np.testing.assert_array_equal(loaded.simulate(heldout.batches, heldout.initial_loss),
                                  simulator.simulate(heldout.batches, heldout.initial_loss))


def test_examples_never_seen_in_a_fitting_run_are_simulated_from_the_prior():
    """Fit on runs that never contain 4 of the training examples; score on runs that do."""
    hidden = np.arange(4)
    allowed = np.setdiff1d(np.arange(24), hidden)
    local = sf.curricula.uniform(len(allowed), 40, 24, 4, seed=9)
    fitting, gradients, _ = momentum_runs(24, 6, 40, 24, 4, residual=0.0, seed=5, batches=allowed[local])
    runs, _, _ = momentum_runs(24, 6, 20, 24, 4, residual=0.0, seed=5)  # the same process, every example
    heldout = runs.select_runs(np.flatnonzero(np.isin(runs.batches, hidden).any(axis=(1, 2))))
    assert not np.isin(fitting.batches, hidden).any() and heldout.n_runs >= 10
    aware = sf.SimfluenceMomentum(ADAM, gradients).fit(fitting)
    linear = sf.SimfluenceLinear(intercept="cv").fit(fitting)
    mean = sf.MeanTrajectory().fit(fitting)
    assert _mse(aware, heldout) < 0.2 * _mse(linear, heldout)
    assert _mse(aware, heldout) < 0.2 * _mse(mean, heldout)


def test_bad_arguments_are_named():
    with pytest.raises(sf.SimulatorError, match="prior"):
        sf.SimfluenceMomentum(prior="sometimes")
    with pytest.raises(sf.SimulatorError, match="needs gradient checkpoints"):
        sf.SimfluenceMomentum(prior="test")
    with pytest.raises(sf.SimulatorError, match="momentum"):
        sf.OptimizerSpec("adam", 1.0)
    with pytest.raises(sf.SimulatorError, match="select"):
        sf.SimfluenceMomentum(select="best")


def test_count_features_are_filtered_counts():
    batches = np.array([[[0, 1], [1, -1], [2, 2]]])
    spec = sf.OptimizerSpec("sgd", 0.5)
    counts = count_matrix(batches, 3).toarray().reshape(1, 3, 3)
    np.testing.assert_allclose(spec.filter(counts)[0], spec.kernel(3) @ counts[0])
