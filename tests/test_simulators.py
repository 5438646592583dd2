"""Simulators against known ground truth, their persistence, and their bad inputs."""

import json

import numpy as np
import pytest

import simfluence as sf
from simfluence.simulators import LinearParameters
from simfluence.solvers import count_matrix
from simfluence.synthetic import linear_runs, redundancy_runs


@pytest.fixture(scope="module")
def redundancy():
    runs, related = redundancy_runs(100, 30, 60, 50, 4, seed=1)
    return runs.split(12, seed=0)


def test_true_parameters_reproduce_noise_free_data_exactly():
    runs, truth = linear_runs(30, 6, 10, 25, 4, noise=0.0, step_intercept=True, seed=5)
    simulator = sf.SimfluenceLinear.from_parameters(truth.A, truth.B, truth.alpha0, truth.beta0)
    pred = simulator.simulate(runs.batches, runs.initial_loss)
    np.testing.assert_allclose(pred, runs.losses, rtol=1e-12, atol=1e-12)


def test_paper_and_residual_forms_agree_without_penalty_at_fixed_batch_size():
    runs, _ = linear_runs(20, 5, 40, 30, 4, noise=0.01, seed=6)
    fitting, heldout = runs.split(8)
    residual = sf.SimfluenceLinear(parametrization="residual", intercept="none", l2=1e-9).fit(fitting)
    paper = sf.SimfluenceLinear(parametrization="paper", intercept="none", l2=1e-9).fit(fitting)
    np.testing.assert_allclose(
        paper.simulate(heldout.batches, heldout.initial_loss),
        residual.simulate(heldout.batches, heldout.initial_loss),
        rtol=1e-5,
    )
    # Same function class: A_paper = A_residual + 1/b.
    np.testing.assert_allclose(paper.A, residual.A + 1 / runs.batch_size, atol=1e-5)


def test_linear_beats_additive_on_redundancy(redundancy):
    fitting, heldout = redundancy
    sims = {"linear": sf.SimfluenceLinear(), "additive": sf.SimfluenceAdditive()}
    for simulator in sims.values():
        simulator.fit(fitting)
    scores = sf.metrics.leaderboard(sf.metrics.score(sims, heldout, n_boot=50))
    mse = dict(zip(scores["method"], scores["all_steps_mse"]))
    rho = dict(zip(scores["method"], scores["spearman_across_runs"]))
    assert mse["linear"] < 0.2 * mse["additive"]
    assert rho["linear"] > 0.6


def test_cross_validation_picks_from_the_grid_and_records_scores(redundancy):
    fitting, _ = redundancy
    simulator = sf.SimfluenceLinear(intercept="cv", l2_grid=(1e-6, 1e-4, 1e-2), cv_folds=3).fit(fitting)
    assert simulator.fitted_intercept in ("none", "constant", "step")
    assert simulator.fitted_l2[0] in (1e-6, 1e-4, 1e-2)
    assert set(simulator.cv_scores) == {"none", "constant", "step"}
    best = min(min(v) for v in simulator.cv_scores.values())
    assert min(simulator.cv_scores[simulator.fitted_intercept]) == best
    per_test = sf.SimfluenceLinear(l2_grid=(1e-6, 1e-4, 1e-2), cv_folds=3, per_test_l2=True).fit(fitting)
    assert set(np.unique(per_test.fitted_l2)) <= {1e-6, 1e-4, 1e-2}


def test_baselines():
    runs, _ = linear_runs(20, 4, 6, 10, 4, noise=0.0, seed=2)
    constant = sf.Constant().fit(runs).simulate(runs.batches, runs.initial_loss)
    assert np.all(constant == runs.initial_loss[:, None, :])
    mean = sf.MeanTrajectory().fit(runs)
    pred = mean.simulate(runs.batches, runs.initial_loss)
    expected = runs.initial_loss[:, None, :] + runs.losses.mean(0) - runs.losses.mean(0)[0]
    np.testing.assert_allclose(pred, expected)
    longer = mean.simulate(np.concatenate([runs.batches, runs.batches], axis=1), runs.initial_loss)
    np.testing.assert_allclose(longer[:, -1], pred[:, -1])  # flat beyond the fitted horizon


def test_simulate_chunked_and_float32_match():
    runs, truth = linear_runs(30, 6, 20, 25, 4, noise=0.0, seed=5)
    simulator = sf.SimfluenceLinear.from_parameters(truth.A, truth.B)
    full = simulator.simulate(runs.batches, runs.initial_loss)
    chunked = simulator.simulate(runs.batches, runs.initial_loss, max_chunk_bytes=1)
    np.testing.assert_array_equal(full, chunked)
    single = simulator.simulate(runs.batches, runs.initial_loss, dtype=np.float32)
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, full, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path, redundancy):
    fitting, heldout = redundancy
    for simulator in (sf.SimfluenceLinear(l2=0.1), sf.SimfluenceMultiplicative(l2=0.1), sf.MeanTrajectory()):
        simulator.fit(fitting)
        folder = simulator.save(tmp_path / simulator.method)
        loaded = sf.load_simulator(folder)
        assert type(loaded) is type(simulator)
        np.testing.assert_array_equal(
            loaded.simulate(heldout.batches, heldout.initial_loss),
            simulator.simulate(heldout.batches, heldout.initial_loss),
        )
        assert not list(folder.glob("*.pkl"))


def test_bad_bundles_are_refused(tmp_path):
    with pytest.raises(sf.SimulatorError, match="is not a saved simulator"):
        sf.load_simulator(tmp_path)
    runs, _ = linear_runs(10, 2, 4, 5, 2, seed=1)
    folder = sf.Constant().fit(runs).save(tmp_path / "c")
    meta = json.loads((folder / "simulator.json").read_text())
    (folder / "simulator.json").write_text(json.dumps({**meta, "method": "oracle"}))
    with pytest.raises(sf.SimulatorError, match="unknown method 'oracle'"):
        sf.load_simulator(folder)
    (folder / "simulator.json").write_text("{not json")
    with pytest.raises(sf.SimulatorError, match="not valid JSON"):
        sf.load_simulator(folder)


def test_simulate_rejects_bad_input():
    runs, truth = linear_runs(10, 3, 4, 5, 2, seed=1)
    with pytest.raises(sf.SimulatorError, match="call fit"):
        sf.SimfluenceLinear().simulate(runs.batches, runs.initial_loss)
    simulator = sf.SimfluenceLinear.from_parameters(truth.A, truth.B)
    bad = runs.batches.copy()
    bad[1, 2, 0] = 10
    with pytest.raises(sf.SimulatorError, match=r"unknown training id 10 at \(run, step index, position\) \(1, 2, 0\)"):
        simulator.simulate(bad, runs.initial_loss)
    with pytest.raises(sf.SimulatorError, match="initial_loss must have shape"):
        simulator.simulate(runs.batches, runs.initial_loss[:, :2])
    with pytest.raises(sf.SimulatorError, match="NaN"):
        simulator.simulate(runs.batches, np.full_like(runs.initial_loss, np.nan))


@pytest.mark.parametrize("kwargs, message", [
    ({"l2": 0.0}, "l2 must be a positive"),
    ({"l2": -1.0}, "l2 must be a positive"),
    ({"l2_grid": (0.1, 0.0)}, "l2_grid"),
    ({"parametrization": "sideways"}, "parametrization"),
    ({"intercept": "sometimes"}, "intercept"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(sf.SimulatorError, match=message):
        sf.SimfluenceLinear(**kwargs)


def _gradient_world(seed=0, n=20, m=4, d=6, runs=30, steps=12, b=4, scale=1.0):
    """Runs whose one-step change is exactly -scale * lr/b * <g_i, g_j> at the latest checkpoint."""
    rng = np.random.default_rng(seed)
    checkpoints = np.array([0, 6])
    train = rng.normal(size=(2, n, d))
    test = rng.normal(size=(2, m, d))
    lrs = np.linspace(0.1, 0.05, steps)
    grads = sf.GradientCheckpoints(checkpoints, lrs, train, test, batch_size=b)
    batches = sf.curricula.uniform(n, runs, steps, b, seed=seed)
    losses = np.empty((runs, steps + 1, m))
    losses[:, 0] = 2.0
    for t in range(steps):
        k = 0 if t < 6 else 1
        dots = train[k] @ test[k].T
        losses[:, t + 1] = losses[:, t] - scale * lrs[t] / b * dots[batches[:, t]].sum(axis=1)
    return sf.RunSet(batches, losses, n_train=n), grads


def test_tracin_reproduces_its_own_process_and_rescales():
    runs, grads = _gradient_world()
    pred = sf.TracInCP(grads).fit(runs).simulate(runs.batches, runs.initial_loss)
    np.testing.assert_allclose(pred, runs.losses, atol=1e-10)
    runs3, grads3 = _gradient_world(scale=3.0)
    rescaled = sf.TracInCP(grads3, rescaled=True).fit(runs3)
    assert rescaled.scale == pytest.approx(3.0, rel=1e-10)
    np.testing.assert_allclose(rescaled.simulate(runs3.batches, runs3.initial_loss), runs3.losses, atol=1e-10)


def test_influence_function_effects_and_persistence(tmp_path):
    runs, grads = _gradient_world()
    simulator = sf.InfluenceFunction(grads, rescaled=True, damping=0.1).fit(runs)
    train, test = grads.train_grads[-1], grads.test_grads[-1]
    fisher = train.T @ train / train.shape[0]
    damped = fisher + 0.1 * np.trace(fisher) / fisher.shape[0] * np.eye(fisher.shape[0])
    np.testing.assert_allclose(simulator.effects[0], train @ np.linalg.inv(damped) @ test.T, rtol=1e-8)
    loaded = sf.load_simulator(simulator.save(tmp_path / "if"))
    np.testing.assert_allclose(loaded.simulate(runs.batches, runs.initial_loss),
                               simulator.simulate(runs.batches, runs.initial_loss))


def test_gradient_checkpoints_validate_and_round_trip(tmp_path):
    runs, grads = _gradient_world()
    grads.save(tmp_path / "g.npz")
    again = sf.GradientCheckpoints.load(tmp_path / "g.npz")
    np.testing.assert_array_equal(again.train_grads, grads.train_grads)
    with pytest.raises(ValueError, match="strictly increasing"):
        sf.GradientCheckpoints(np.array([3, 1]), grads.learning_rates, grads.train_grads, grads.test_grads, 4)
    other = sf.RunSet(runs.batches, runs.losses[:, :, :2], n_train=runs.n_train)
    with pytest.raises(ValueError, match="m=4 test examples"):
        sf.TracInCP(grads).fit(other)


def test_sharded_fit_equals_the_whole_fit(redundancy):
    fitting, heldout = redundancy
    whole = sf.SimfluenceLinear(intercept="cv", l2_grid=(1e-6, 1e-4, 1e-2), cv_folds=3).fit(fitting)
    shards = [np.arange(0, 12), np.arange(12, 30)]
    chooser = sf.SimfluenceLinear(intercept="cv", l2_grid=(1e-6, 1e-4, 1e-2), cv_folds=3)
    errors = np.concatenate([chooser.cross_validation_errors(fitting.select_tests(s)) for s in shards], axis=2)
    intercept, l2 = chooser.choose(errors)
    assert (intercept, l2) == (whole.fitted_intercept, whole.fitted_l2[0])
    parts = [sf.SimfluenceLinear(intercept="cv", l2_grid=(1e-6, 1e-4, 1e-2), cv_folds=3, threads=1)
             .fit_with(fitting.select_tests(s), intercept, l2) for s in shards]
    joined = sf.SimfluenceLinear.concatenate(parts)
    np.testing.assert_allclose(joined.simulate(heldout.batches, heldout.initial_loss),
                               whole.simulate(heldout.batches, heldout.initial_loss), rtol=1e-6, atol=1e-9)
    assert joined.test_ids.tolist() == list(range(30))


def _additive_runs(n: int, m: int, runs: int, steps: int, b: int, scale: float, noise: float, seed: int) -> sf.RunSet:
    """Runs of L_t = L_{t-1} + sum_{i in c_t} B_i + noise * N(0, 1) with B ~ N(0, scale^2)."""
    rng = np.random.default_rng(seed)
    B = rng.normal(0.0, scale, (n, m))
    batches = sf.curricula.uniform(n, runs, steps, b, seed=seed + 1)
    counts = count_matrix(batches, n)
    losses = np.empty((runs, steps + 1, m))
    losses[:, 0] = rng.uniform(1.0, 3.0, (runs, m))
    for t in range(steps):
        losses[:, t + 1] = losses[:, t] + counts[np.arange(runs) * steps + t] @ B + noise * rng.standard_normal((runs, m))
    return sf.RunSet(batches, losses, n_train=n)


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_validation_picks_the_known_best_penalty(seed):
    """With B ~ N(0, s^2) and noise sigma, the posterior mean (the best predictor of every loss,
    each linear in B) is ridge with penalty sigma^2 / s^2 on the summed squared errors: on a fold
    of R_fold x T transitions, sigma^2 / (s^2 R_fold T) per transition. Cross-validation must
    pick it from a grid of decades around it (few appearances per example, so it matters)."""
    runs = _additive_runs(200, 50, 30, 10, 4, scale=0.01, noise=0.01, seed=seed)
    best = (0.01 / 0.01) ** 2 / (20 * 10)  # 3 folds: 20 fitting runs of 10 transitions
    grid = tuple(best * 10.0**k for k in range(-2, 3))
    simulator = sf.SimfluenceAdditive(intercept="none", l2="cv", l2_grid=grid, cv_folds=3).fit(runs)
    assert simulator.fitted_l2[0] == pytest.approx(best, rel=1e-12)
    scores = simulator.cv_scores["none"]  # large to small penalties
    assert scores[2] < 0.8 * min(scores[1], scores[3])


def test_penalty_is_per_transition(redundancy):
    """The same per-transition penalty on twice the runs is twice the penalty on the summed
    squared errors: fitting the runs duplicated gives the same parameters."""
    fitting, _ = redundancy
    once = sf.SimfluenceLinear(intercept="step", l2=1e-3, solver="direct").fit(fitting)
    doubled = sf.RunSet(np.concatenate([fitting.batches] * 2), np.concatenate([fitting.losses] * 2),
                        n_train=fitting.n_train)
    twice = sf.SimfluenceLinear(intercept="step", l2=1e-3, solver="direct").fit(doubled)
    np.testing.assert_allclose(twice.A, once.A, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(twice.B, once.B, rtol=1e-8, atol=1e-12)


def test_cross_validation_warns_at_the_edge_of_the_grid(redundancy):
    fitting, _ = redundancy
    with pytest.warns(UserWarning, match="at the edge of l2_grid"):
        sf.SimfluenceLinear(intercept="step", l2_grid=(1.0, 10.0), cv_folds=3).fit(fitting)


def test_fitted_parameters_are_a_value_with_explicit_blocks(tmp_path):
    """What a fit produces is a LinearParameters value: the blocks a model lacks are None (not
    zeros), through a bundle and through joining shards of test examples, which keeps the class."""
    runs, _ = sf.synthetic.linear_runs(12, 6, 10, 8, 2, seed=3)
    for cls, has_a, has_b in ((sf.SimfluenceLinear, True, True), (sf.SimfluenceAdditive, False, True),
                              (sf.SimfluenceMultiplicative, True, False)):
        fitted = cls(intercept="constant", l2=1.0).fit(runs)
        assert (fitted.params.A is not None, fitted.params.B is not None) == (has_a, has_b)
        loaded = sf.load_simulator(fitted.save(tmp_path / cls.method))
        assert type(loaded) is cls and (loaded.params.A is not None, loaded.params.B is not None) == (has_a, has_b)
        shards = [cls(intercept="constant", l2=1.0).fit(runs.select_tests(part)) for part in ([0, 1, 2], [3, 4, 5])]
        joined = cls.concatenate(shards)
        assert type(joined) is cls
        np.testing.assert_allclose(joined.simulate(runs.batches, runs.initial_loss),
                                   fitted.simulate(runs.batches, runs.initial_loss), rtol=1e-8, atol=1e-10)
    with pytest.raises(sf.SimulatorError, match="only shards of one model"):
        LinearParameters.join([sf.SimfluenceAdditive(l2=1.0).fit(runs).params, sf.SimfluenceLinear(l2=1.0).fit(runs).params])


def test_refit_of_a_bundle_saved_with_penalties_on_summed_errors_converts_them():
    """Bundles saved before penalties were per transition held the fitted penalty on the summed
    errors; refitting one must use the same penalty, not a heavier one."""
    runs, _ = sf.synthetic.linear_runs(10, 3, 12, 15, 2, noise=0.01, seed=4)
    fitted = sf.SimfluenceLinear(intercept="none", l2=1e-2).fit(runs)
    legacy_hp = {k: v for k, v in fitted.hyperparameters().items() if k != "penalty_unit"}
    legacy = sf.SimfluenceLinear.from_hyperparameters(legacy_hp)
    legacy.n_train, legacy.test_ids, legacy.params = fitted.n_train, fitted.test_ids, fitted.params
    legacy.fitted_l2 = fitted.fitted_l2 * runs.n_runs * runs.n_steps  # what the old bundle stored
    assert legacy.penalty_unit == "sum"
    np.testing.assert_allclose(legacy.refit(runs).params.A, fitted.refit(runs).params.A, rtol=1e-8)
    assert fitted.refit(runs).hyperparameters()["penalty_unit"] == "transition"
    loose = sf.SimfluenceLinear.from_parameters(fitted.params.A, fitted.params.B)
    assert np.all(np.isfinite(loose.refit(runs).fitted_l2))  # no fitted penalty: cross-validated


@pytest.mark.parametrize("method", [sf.SimfluenceLinear, sf.SimfluenceAdditive, sf.SimfluenceMultiplicative])
def test_validation_errors_of_a_path_simulated_side_by_side_equal_one_simulation_each(redundancy, method):
    """Cross-validation simulates a path's solutions side by side (joined as test columns, in
    groups bounded by memory); each one's validation error equals simulating it alone."""
    fitting, heldout = redundancy
    chooser = method(intercept="step", l2="cv")
    path = chooser._solve(fitting, "step", [1e-5, 1e-3, 1e-1])
    expected = []
    for solution in path:
        single = method.from_hyperparameters(chooser.hyperparameters())
        single.n_train, single.test_ids = fitting.n_train, fitting.test_ids
        single._set_solution(solution)
        pred = single.simulate(heldout.batches, heldout.initial_loss)
        expected.append(((pred[:, 1:] - heldout.losses[:, 1:]) ** 2).sum(axis=(0, 1)))
    one_group = chooser._validation_sse(path, heldout)
    in_pairs = chooser._validation_sse(path, heldout, max_bytes=2 * 8 * heldout.losses.size)
    np.testing.assert_allclose(one_group, np.array(expected), rtol=1e-12)
    np.testing.assert_allclose(in_pairs, np.array(expected), rtol=1e-12)


def test_cross_validation_at_its_tolerance_scores_as_exact_solves(monkeypatch):
    """The CV paths are solved to CV_TOLERANCE with float32 operator products: each test
    example's validation errors stay within 5e-3 relative of float64 1e-10 solves and their
    mean over test examples (what the penalty is chosen by) within 1e-3 (measured: 2e-3 and
    3e-4 at most over three seeds), below the sampling noise of a validation error; the choices
    are the same."""
    import simfluence.simulators as simulators

    runs, _ = linear_runs(60, 12, 20, 30, 4, noise=0.01, step_intercept=True, seed=3)
    grid = (1e-6, 1e-4, 1e-2)
    loose = sf.SimfluenceLinear(intercept="cv", l2_grid=grid, cv_folds=4, solver="cg")
    loose_errors = loose.cross_validation_errors(runs)
    assert simulators.CV_SHIFT_DTYPE == np.float32
    monkeypatch.setattr(simulators, "CV_TOLERANCE", 1e-10)
    monkeypatch.setattr(simulators, "CV_SHIFT_DTYPE", np.float64)
    exact = sf.SimfluenceLinear(intercept="cv", l2_grid=grid, cv_folds=4, solver="cg")
    exact_errors = exact.cross_validation_errors(runs)
    assert not np.array_equal(loose_errors, exact_errors)  # the tolerance is in effect
    np.testing.assert_allclose(loose_errors, exact_errors, rtol=5e-3)
    np.testing.assert_allclose(loose_errors.mean(axis=2), exact_errors.mean(axis=2), rtol=1e-3)
    assert loose.choose(loose_errors) == exact.choose(exact_errors)


def test_a_gradient_file_missing_an_array_it_lists_is_refused(tmp_path):
    """The file lists its optional arrays: one that went missing (a damaged zip index drops an
    entry without a CRC error) is refused, not read as absent."""
    runs, grads = _gradient_world()
    d = grads.train_grads.shape[2]
    with_curvature = sf.GradientCheckpoints(grads.steps, grads.learning_rates, grads.train_grads, grads.test_grads,
                                            grads.batch_size, curvatures=np.stack([np.eye(d)] * len(grads.steps)))
    with_curvature.save(tmp_path / "g.npz")
    np.testing.assert_array_equal(sf.GradientCheckpoints.load(tmp_path / "g.npz").curvatures,
                                  with_curvature.curvatures)
    with np.load(tmp_path / "g.npz") as data:
        kept = {name: data[name] for name in data.files if name != "curvatures"}
    np.savez(tmp_path / "damaged.npz", **kept)
    with pytest.raises(sf.gradients.GradientError, match=r"damaged.npz.*\['curvatures'\] are listed but absent"):
        sf.GradientCheckpoints.load(tmp_path / "damaged.npz")
