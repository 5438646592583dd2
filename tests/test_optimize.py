"""Curriculum optimisation against processes whose best curriculum is known."""

import numpy as np
import pytest

import simfluence as sf
from simfluence import optimize, synthetic
from simfluence.optimize import Constraints, OptimizeError

N, M, T, B = 30, 6, 12, 3


@pytest.fixture(scope="module")
def world():
    """An additive simulator fitted on runs of a process where three examples help every test."""
    runs, helpful, truth_b = synthetic.helpful_runs(N, M, 60, T, B, seed=3)
    fitted = sf.SimfluenceAdditive(intercept="constant", l2=1e-2).fit(runs)
    truth = sf.SimfluenceAdditive.from_parameters(np.zeros_like(truth_b), truth_b)
    return fitted, truth, helpful, truth_b, runs.initial_loss[0]


def full(steps: int = T, width: int = B) -> np.ndarray:
    return np.ones((steps, width), dtype=bool)


def best_possible(truth_b: np.ndarray, cap: int, size: int, allowed: np.ndarray, initial: np.ndarray) -> float:
    """The true optimum of an additive process: the ``size`` cheapest appearances, each allowed
    example at most ``cap`` times (any arrangement of them is feasible)."""
    cost = truth_b.mean(axis=1)[allowed]
    return float(initial.mean() + np.sort(np.repeat(cost, cap))[:size].sum())


def test_finds_the_helpful_examples_and_beats_every_random_curriculum(world):
    fitted, truth, helpful, truth_b, initial = world
    proposal = optimize.optimize(fitted, initial, full(), Constraints(max_repeats=4), starts=128, seed=0)
    counts = np.bincount(proposal.curriculum.ravel(), minlength=N)
    assert (counts[helpful] == 4).all()
    assert proposal.predicted < proposal.random.min()
    true_loss = optimize.final_loss(truth, proposal.curriculum[None], initial)[0]
    optimum = best_possible(truth_b, 4, T * B, np.arange(N), initial)
    random_true = optimize.final_loss(truth, optimize.random_curricula(
        optimize.search_space(N, full(), Constraints(max_repeats=4)), 64, np.random.default_rng(1)), initial)
    # the true loss of the proposal is within 2% of the distance from a random curriculum to the optimum
    assert true_loss - optimum < 0.02 * (random_true.mean() - optimum)
    assert np.all(np.diff(proposal.history) <= 0)  # greedy never goes up


def test_a_seed_gives_the_same_curriculum(world):
    fitted, _, _, _, initial = world
    one = optimize.optimize(fitted, initial, full(), seed=5, starts=16, iterations=20)
    two = optimize.optimize(fitted, initial, full(), seed=5, starts=16, iterations=20)
    other = optimize.optimize(fitted, initial, full(), seed=6, starts=16, iterations=20)
    np.testing.assert_array_equal(one.curriculum, two.curriculum)
    assert not np.array_equal(one.curriculum, other.curriculum)


def test_annealing_keeps_the_best_curriculum_it_visited(world):
    fitted, _, helpful, _, initial = world
    proposal = optimize.optimize(fitted, initial, full(), Constraints(max_repeats=3), temperature=0.05,
                                 iterations=150, seed=2)
    assert proposal.predicted <= proposal.history.min() + 1e-12
    assert proposal.predicted < proposal.random.min()
    assert set(helpful.tolist()) <= set(proposal.curriculum.ravel().tolist())


def test_constraints_hold_in_every_curriculum_it_visits(world):
    fitted, _, helpful, _, initial = world
    rules = Constraints(include=(0, 1), exclude=tuple(int(h) for h in helpful[:2]), max_repeats=2)
    space = optimize.search_space(N, full(), rules)
    rng = np.random.default_rng(0)
    for curriculum in optimize.random_curricula(space, 50, rng):
        optimize.check_feasible(curriculum, space)
    start = optimize.random_curricula(space, 1, rng)[0]
    for neighbour in optimize.neighbours(start, space, 200, rng):
        optimize.check_feasible(neighbour, space)
    proposal = optimize.optimize(fitted, initial, full(), rules, seed=0)
    optimize.check_feasible(proposal.curriculum, space)
    counts = np.bincount(proposal.curriculum.ravel(), minlength=N)
    assert counts[list(helpful[:2])].sum() == 0 and counts[0] >= 1 and counts[1] >= 1 and counts.max() <= 2
    assert counts[helpful[2]] == 2  # the helpful example still allowed is used as often as allowed


def test_a_tight_cap_and_pads_are_respected():
    # 8 examples at most 3 times each fill 24 slots; the last step has one pad, leaving 23
    slots = full(8, 3)
    slots[-1, -1] = False
    space = optimize.search_space(8, slots, Constraints(max_repeats=3))
    for curriculum in optimize.random_curricula(space, 30, np.random.default_rng(0)):
        optimize.check_feasible(curriculum, space)
        assert curriculum[-1, -1] == -1
    with pytest.raises(OptimizeError, match="repeats an example"):
        bad = optimize.random_curricula(space, 1, np.random.default_rng(0))[0]
        bad[0, 1] = bad[0, 0]
        optimize.check_feasible(bad, space)


@pytest.mark.parametrize("rules, message", [
    (Constraints(include=(30,)), "include: unknown training example id 30; ids lie in 0..29"),
    (Constraints(exclude=(-1,)), "exclude: unknown training example id -1"),
    (Constraints(include=(4,), exclude=(4,)), "include and exclude both name training example 4"),
    (Constraints(max_repeats=0), "max_repeats must be at least 1, got 0"),
    (Constraints(max_repeats=1), "max_repeats 1: 30 allowed examples appearing at most 1 times each cannot fill "
                                 "the 36 slots"),
    (Constraints(exclude=tuple(range(28))), "exclude leaves 2 training examples; a batch needs 3 distinct ones"),
])
def test_impossible_constraints_are_named(rules, message):
    with pytest.raises(OptimizeError, match=message.replace("(", r"\(")):
        optimize.search_space(N, full(), rules)


def test_too_many_included_examples_are_named():
    with pytest.raises(OptimizeError, match="include names 8 examples; a curriculum has only 6 slots"):
        optimize.search_space(N, full(2, 3), Constraints(include=tuple(range(8))))


def test_the_trust_region_keeps_every_simulated_loss_within_bounds(world):
    fitted, truth, helpful, truth_b, initial = world
    free = optimize.optimize(truth, initial, full(), seed=0, starts=64, iterations=60)
    floor = free.predicted + 0.5 * (free.start - free.predicted)  # halfway between the best start and the optimum
    bounds = np.stack([np.full(M, floor), np.full(M, 10.0)])
    bounded = optimize.optimize(truth, initial, full(), seed=0, starts=64, iterations=60, bounds=bounds)
    trajectory = truth.simulate(bounded.curriculum[None], initial[None])[0]
    assert trajectory.min() >= floor and bounded.predicted < bounded.start
    assert truth.simulate(free.curriculum[None], initial[None])[0].min() < floor  # it would have left them
    with pytest.raises(OptimizeError, match="none of the 8 random curricula keeps its simulated losses within"):
        optimize.optimize(truth, initial, full(), starts=8, bounds=np.stack([initial + 1, initial + 2]))
