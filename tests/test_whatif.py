"""What-if answers against simulators with known parameters."""

import numpy as np
import pytest

import simfluence as sf
from simfluence import whatif
from simfluence.curricula import CurriculumError


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    n, m, T = 12, 3, 10
    A = rng.normal(-0.01, 0.01, (n, m))
    B = rng.normal(-0.02, 0.02, (n, m))
    A[5] = B[5] = 0.0  # example 5 has no effect at all
    curriculum = sf.curricula.uniform(n, 1, T, 3, seed=1)[0]
    curriculum[2, 0] = 5
    return A, B, curriculum, np.array([2.0, 1.5, 1.0])


def test_an_unchanged_curriculum_is_the_plain_simulation(world):
    A, B, curriculum, initial = world
    simulator = sf.SimfluenceLinear.from_parameters(A, B)
    result = whatif.counterfactual(simulator, curriculum, curriculum.copy(), initial)
    np.testing.assert_array_equal(result.edited, simulator.simulate(curriculum[None], initial[None])[0])
    np.testing.assert_array_equal(result.effect, 0.0)
    with pytest.raises(CurriculumError, match="give at least one edit"):
        whatif.apply_edits(curriculum, [])


def test_edits_name_examples_that_exist(world):
    _, _, curriculum, _ = world
    absent = next(i for i in range(12) if not (curriculum == i).any())
    for bad, message in ((f"remove:{absent}", f"example {absent} does not occur"), ("remove:-1", "id -1 is outside"),
                         ("remove:12", "id 12 is outside 0..11"), ("swap:1", "expected 2 integers"),
                         ("move:5", "expected 1 integer"), ("repeat:5", "expected 1 integer")):
        with pytest.raises(CurriculumError, match=message):
            whatif.apply_edits(curriculum, [bad], n_train=12)


def test_tests_are_ids_not_positions(world):
    A, B, curriculum, initial = world
    simulator = sf.SimfluenceLinear.from_parameters(A, B)
    simulator.test_ids = np.array([10, 20, 30])
    np.testing.assert_array_equal(whatif.test_positions(simulator, initial, [30, 10]), [2, 0])
    with pytest.raises(sf.SimulatorError, match=r"test ids \[1\] are out of range: this simulator has test ids 10, 20, 30"):
        whatif.test_positions(simulator, initial, [1])


def test_removing_an_example_without_effect_changes_nothing(world):
    A, B, curriculum, initial = world
    simulator = sf.SimfluenceLinear.from_parameters(A, B)
    result = whatif.counterfactual(simulator, curriculum, whatif.apply_edit(curriculum, "remove:5"), initial)
    np.testing.assert_allclose(result.edited, result.base, atol=1e-15)
    table = whatif.influence(simulator, curriculum, initial)
    assert table.filter(table["example_id"] == 5)["effect"][0] == pytest.approx(0.0, abs=1e-15)


def test_influence_of_an_additive_simulator_is_its_parameters(world):
    A, B, curriculum, initial = world
    simulator = sf.SimfluenceLinear.from_parameters(np.zeros_like(A), B)
    table = whatif.influence(simulator, curriculum, initial, tests=[1])
    for row in table.iter_rows(named=True):
        assert row["effect"] == pytest.approx(row["occurrences"] * B[row["example_id"], 1], abs=1e-12)


def test_pair_interactions_vanish_only_for_additive_simulators(world):
    A, B, curriculum, initial = world
    present = sorted(set(curriculum[curriculum >= 0].tolist()) - {5})[:4]
    additive = sf.SimfluenceLinear.from_parameters(np.zeros_like(A), B)
    np.testing.assert_allclose(whatif.interactions(additive, curriculum, initial, present)["interaction"], 0.0,
                               atol=1e-12)
    linear = sf.SimfluenceLinear.from_parameters(A, B)
    assert np.abs(whatif.interactions(linear, curriculum, initial, present)["interaction"]).max() > 1e-6


def test_order_effects_need_a_multiplicative_part(world):
    A, B, curriculum, initial = world
    present = sorted(set(curriculum[curriculum >= 0].tolist()))[:4]
    additive = sf.SimfluenceLinear.from_parameters(np.zeros_like(A), B)
    np.testing.assert_allclose(whatif.order_effects(additive, curriculum, initial, present)["order_effect"], 0.0,
                               atol=1e-12)
    linear = sf.SimfluenceLinear.from_parameters(A, B)
    assert np.abs(whatif.order_effects(linear, curriculum, initial, present)["order_effect"]).max() > 1e-6


def test_edits_are_parsed_and_bad_ones_explained(world):
    _, _, curriculum, _ = world
    assert (whatif.apply_edit(curriculum, "repeat:5x3") == 5).sum() == 3
    assert (whatif.apply_edit(curriculum, "move:5@10")[9] == 5).any()
    np.testing.assert_array_equal(whatif.apply_edit(curriculum, "swap:1,2")[0], curriculum[1])
    assert whatif.apply_edit(curriculum, "replace:4=1,2,3,4").shape[1] == 4
    for bad, message in (("drop:5", "unknown edit"), ("remove:x", "expected integers"),
                         ("swap:1,99", "outside 1..10"), ("move:99@2", "does not occur in this curriculum")):
        with pytest.raises(CurriculumError, match=message):
            whatif.apply_edit(curriculum, bad)


def test_bad_test_ids_and_unknown_examples(world):
    A, B, curriculum, initial = world
    simulator = sf.SimfluenceLinear.from_parameters(A, B)
    with pytest.raises(sf.SimulatorError, match=r"test ids \[7\] are out of range"):
        whatif.influence(simulator, curriculum, initial, tests=[7])
    edited = whatif.apply_edit(curriculum, "replace:1=40")
    with pytest.raises(sf.SimulatorError, match="unknown training id 40"):
        whatif.counterfactual(simulator, curriculum, edited, initial)


def test_effects_equal_brute_force_leave_one_out_over_base_curricula(world):
    A, B, _, initial = world
    simulator = sf.SimfluenceLinear.from_parameters(A, B)
    base = sf.curricula.uniform(12, 4, 10, 3, seed=5)
    starts = np.repeat(initial[None], 4, axis=0)
    table = whatif.effects(simulator, base, starts)
    expected = np.zeros((12, 3))
    counts = np.zeros(12)
    for k, curriculum in enumerate(base):
        final = simulator.simulate(curriculum[None], starts[k][None])[0, -1]
        for i in np.unique(curriculum[curriculum >= 0]):
            without = simulator.simulate(sf.curricula.remove(curriculum, [i])[None], starts[k][None])[0, -1]
            expected[i] += final - without
            counts[i] += 1
    seen = counts > 0
    np.testing.assert_allclose(table.effect[seen], expected[seen] / counts[seen, None], rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(table.n_curricula, counts)
    assert np.all(np.isnan(table.effect[~seen]))
    np.testing.assert_allclose(table.effect[5][seen[5]] if seen[5] else 0.0, 0.0, atol=1e-14)  # no-effect example


def test_bootstrap_refits_give_intervals_around_the_effects():
    runs, gradients, _ = sf.synthetic.momentum_runs(16, 4, 30, 16, 4, noise=0.01, seed=2)
    fitting, heldout = runs.split(6, seed=0)
    simulator = sf.SimfluenceMomentum(sf.OptimizerSpec("adam", 0.9), gradients, l2_grid=(1e-3,)).fit(fitting)
    refits = whatif.bootstrap_refits(simulator, fitting, n=12, seed=1)
    assert len({id(r) for r in refits}) == 12 and all(type(r) is sf.SimfluenceMomentum for r in refits)
    table = whatif.effects(simulator, heldout.batches[:2], heldout.initial_loss[:2], refits)
    seen = table.n_curricula > 0
    assert np.all(table.ci_low[seen] <= table.ci_high[seen])
    assert np.mean((table.ci_low[seen] <= table.effect[seen]) & (table.effect[seen] <= table.ci_high[seen])) > 0.8
    assert np.any(table.ci_high[seen] - table.ci_low[seen] > 0)
    frame = table.table(simulator.test_ids)
    assert frame.columns == ["train_id", "test_id", "effect", "ci_low", "ci_high", "n_curricula"]
    assert frame.height == seen.sum() * (4 + 1)  # per test example, and the mean over them
    mean_rows = frame.filter(frame["test_id"].is_null())
    np.testing.assert_allclose(mean_rows["effect"].to_numpy(), table.effect[seen].mean(axis=1))
    assert table.n_refits == 12 and np.all(table.mean_ci_low[seen] <= table.mean_ci_high[seen])


def _coverage(seed: int, shift: float = 0.0) -> float:
    """Share of true leave-one-out effects (from the generating process) inside the bootstrap
    intervals of a simulator fitted on that process's runs; ``shift`` moves the truth."""
    runs, truth = sf.synthetic.linear_runs(12, 4, 40, 30, 3, noise=0.01, seed=seed)
    fitted = sf.SimfluenceLinear(intercept="none", l2=1e-6).fit(runs)
    refits = whatif.bootstrap_refits(fitted, runs, n=40, seed=seed)
    base = sf.curricula.uniform(12, 3, 30, 3, seed=99)
    starts = runs.losses[:3, 0]
    estimate = whatif.effects(fitted, base, starts, refits)
    true = whatif.effects(sf.SimfluenceLinear.from_parameters(truth.A, truth.B), base, starts).effect + shift
    seen = estimate.n_curricula > 0
    return float(np.mean((estimate.ci_low[seen] <= true[seen]) & (true[seen] <= estimate.ci_high[seen])))


def test_bootstrap_intervals_cover_the_true_effects_at_about_the_nominal_rate():
    coverage = np.mean([_coverage(seed) for seed in range(3)])
    assert 0.8 <= coverage <= 1.0, coverage  # 95% intervals; percentile bootstraps run a little short
    assert _coverage(0, shift=0.01) < 0.5  # a truth one interval-width away is not covered


def test_influence_and_changes_carry_intervals_from_refits():
    runs, gradients, _ = sf.synthetic.momentum_runs(16, 4, 30, 16, 4, noise=0.01, seed=2)
    simulator = sf.SimfluenceMomentum(sf.OptimizerSpec("adam", 0.9), gradients, l2_grid=(1e-3,)).fit(runs)
    refits = whatif.bootstrap_refits(simulator, runs, n=8, seed=0)
    curriculum, initial = runs.batches[0], runs.initial_loss[0]
    ranking = whatif.influence(simulator, curriculum, initial, refits=refits)
    assert ranking.columns == ["example_id", "occurrences", "effect", "ci_low", "ci_high", "final_without"]
    assert (ranking["ci_low"] <= ranking["ci_high"]).all()
    plain = whatif.influence(simulator, curriculum, initial)
    np.testing.assert_allclose(plain["effect"].to_numpy(), ranking["effect"].to_numpy())
    assert plain["ci_low"].is_nan().all()
    edited = whatif.apply_edit(curriculum, f"remove:{ranking['example_id'][0]}")
    result, draws = whatif.change_draws(simulator, curriculum, edited, initial, refits)
    low, high = whatif.interval(draws)
    assert draws.shape == (8, 4) and np.all(low <= high) and np.any(high > low)
    assert np.isnan(whatif.interval(whatif.change_draws(simulator, curriculum, edited, initial, [])[1])[0]).all()
    np.testing.assert_allclose(result.effect, whatif.counterfactual(simulator, curriculum, edited, initial).effect)


def test_coinciding_curves_are_drawn_once_under_both_names():
    from simfluence.plots import merge_identical

    a, b = np.linspace(1, 2, 5), np.linspace(2, 1, 5)
    merged = merge_identical({"x": a, "y": b, "z": a.copy(), "w": a + 1e-3})
    assert list(merged) == ["y", "x = z", "w"]
    np.testing.assert_array_equal(merged["x = z"], a)
