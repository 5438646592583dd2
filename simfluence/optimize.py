"""Curriculum optimisation: the curriculum of a given shape with the lowest simulated final loss.

The search space is every curriculum ``int64[T, b]`` with the slots of a template (``-1`` pads
stay where they are), distinct ids within a batch, and the user's constraints: examples that
must appear, examples that must not, and how often one example may appear over the run.

The search simulates many random curricula of that space at once (one batched call of
:meth:`Simulator.simulate`), starts from the best of them, and improves it by local search:
every iteration proposes ``candidates`` neighbours (an example in one slot replaced by another,
or the examples of two slots in different steps exchanged, each respecting the constraints),
simulates them in one batched call, and moves to the best one when it lowers the loss (greedy)
or, with a positive ``temperature``, with the simulated-annealing probability. Everything is
drawn from one seeded generator, so a seed gives the same curriculum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runset import PAD
from simfluence.simulators import Simulator


class OptimizeError(SimfluenceError):
    """An impossible or malformed optimisation request; the message names the value."""


@dataclass(frozen=True)
class Constraints:
    """``include``: ids that must appear at least once; ``exclude``: ids that must not appear;
    ``max_repeats``: the most times any one example may appear over the run (None: once per
    step at most, the only limit distinct ids within a batch leave)."""

    include: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()
    max_repeats: int | None = None


@dataclass(frozen=True)
class Space:
    """The feasible curricula: ``slots: bool[T, b]`` (True where an example goes), ``allowed:
    int64[k]`` ids that may appear, ``cap``: the most appearances of one id, ``include:
    int64[j]`` ids that must appear, ``n_train`` the training set size."""

    slots: np.ndarray
    allowed: np.ndarray
    cap: int
    include: np.ndarray
    n_train: int

    @property
    def size(self) -> int:
        """Examples one curriculum holds (the number of slots)."""
        return int(self.slots.sum())


def search_space(n_train: int, slots: np.ndarray, constraints: Constraints = Constraints()) -> Space:
    """Check ``constraints`` against a training set of ``n_train`` examples and a slot mask
    ``bool[T, b]``; raise :class:`OptimizeError` naming the first impossible value."""
    slots = np.asarray(slots, dtype=bool)
    if slots.ndim != 2 or not slots.any():
        raise OptimizeError(f"the curriculum shape must be [steps, batch size] with at least one slot, "
                            f"got {slots.shape}")
    for field in ("include", "exclude"):
        ids = getattr(constraints, field)
        bad = [int(i) for i in ids if not 0 <= int(i) < n_train]
        if bad:
            raise OptimizeError(f"{field}: unknown training example id {bad[0]}; ids lie in 0..{n_train - 1}")
    include = np.unique(np.asarray(constraints.include, dtype=np.int64))
    exclude = np.unique(np.asarray(constraints.exclude, dtype=np.int64))
    both = np.intersect1d(include, exclude)
    if both.size:
        raise OptimizeError(f"include and exclude both name training example {int(both[0])}")
    allowed = np.setdiff1d(np.arange(n_train, dtype=np.int64), exclude)
    widest = int(slots.sum(axis=1).max())
    if allowed.size < widest:
        raise OptimizeError(f"exclude leaves {allowed.size} training examples; a batch needs {widest} distinct ones")
    # Column-major filling (random_curricula) keeps ids distinct within a step when no id
    # appears more often than the shortest column of slots is long.
    shortest_column = int(slots.sum(axis=0)[slots.any(axis=0)].min())
    if constraints.max_repeats is not None and constraints.max_repeats < 1:
        raise OptimizeError(f"max_repeats must be at least 1, got {constraints.max_repeats}")
    cap = shortest_column if constraints.max_repeats is None else min(int(constraints.max_repeats), shortest_column)
    size = int(slots.sum())
    if include.size > size:
        raise OptimizeError(f"include names {include.size} examples; a curriculum has only {size} slots")
    if cap * allowed.size < size:
        raise OptimizeError(f"max_repeats {constraints.max_repeats}: {allowed.size} allowed examples appearing at "
                            f"most {cap} times each cannot fill the {size} slots of the curriculum")
    return Space(slots, allowed, cap, include, n_train)


def random_curricula(space: Space, count: int, rng: np.random.Generator) -> np.ndarray:
    """``int64[count, T, b]`` random feasible curricula: every included id once plus ids drawn
    without replacement from a pool holding each allowed id ``cap`` times, arranged so that a
    batch never repeats an id, then the steps (of the same slot pattern) shuffled."""
    T, b = space.slots.shape
    order = np.argwhere(space.slots.T)  # slots column by column: (position, step)
    pool = np.repeat(space.allowed, space.cap)
    # one copy of each included id is reserved for it
    reserved = np.searchsorted(pool, space.include)
    pool = np.delete(pool, reserved)
    patterns = [np.flatnonzero((space.slots == row).all(axis=1)) for row in np.unique(space.slots, axis=0)]
    out = np.full((count, T, b), PAD, dtype=np.int64)
    for k in range(count):
        ids = np.concatenate([space.include, rng.choice(pool, space.size - space.include.size, replace=False)])
        rank = rng.permutation(space.n_train)  # a random order of the groups of equal ids
        ids = ids[np.argsort(rank[ids], kind="stable")]
        curriculum = np.full((T, b), PAD, dtype=np.int64)
        curriculum[order[:, 1], order[:, 0]] = ids
        for rows in patterns:
            curriculum[rows] = curriculum[rng.permutation(rows)]
        out[k] = curriculum
    return out


def final_loss(simulator: Simulator, batches: np.ndarray, initial_loss: np.ndarray,
               tests: np.ndarray | None = None) -> np.ndarray:
    """``float64[K]``: the simulated mean final loss (nats) over the test positions ``tests``
    (default all) of each curriculum ``batches: int[K, T, b]``, all started from
    ``initial_loss: float[m]``."""
    return objective(simulator, batches, initial_loss, tests, None)


def objective(simulator: Simulator, batches: np.ndarray, initial_loss: np.ndarray, tests: np.ndarray | None,
              bounds: np.ndarray | None) -> np.ndarray:
    """``float64[K]``: :func:`final_loss` of each curriculum, or infinity where any simulated loss
    (any step, any test example) leaves ``bounds: float[2, m]`` (low, high per test example)."""
    predicted = simulator.simulate(batches, np.repeat(np.asarray(initial_loss)[None], len(batches), axis=0))
    final = predicted[:, -1]
    value = (final if tests is None else final[:, tests]).mean(axis=1)
    if bounds is not None:
        outside = ((predicted < bounds[0]) | (predicted > bounds[1])).any(axis=(1, 2))
        value[outside] = np.inf
    return value


@dataclass(frozen=True)
class Proposal:
    """The search's outcome. ``curriculum: int64[T, b]``; ``predicted``: its simulated mean final
    loss (nats); ``start``: that of the best random curriculum it started from; ``random:
    float64[starts]`` those of every random curriculum; ``history: float64[iterations + 1]`` the
    current loss after each iteration; ``evaluations``: curricula simulated in all."""

    curriculum: np.ndarray
    predicted: float
    start: float
    random: np.ndarray
    history: np.ndarray
    evaluations: int


def neighbours(curriculum: np.ndarray, space: Space, count: int, rng: np.random.Generator) -> np.ndarray:
    """``int64[count, T, b]`` feasible neighbours of a feasible ``curriculum``: half (on average)
    replace the example of one slot by an allowed example below its cap that is not in that
    batch (never the last appearance of an included one), the rest exchange the examples of
    two slots in different steps (when neither is already in the other's batch)."""
    filled = np.argwhere(space.slots)
    counts = np.bincount(curriculum[space.slots], minlength=space.n_train)
    is_included = np.zeros(space.n_train, dtype=bool)
    is_included[space.include] = True
    below_cap = space.allowed[counts[space.allowed] < space.cap]  # fixed for this curriculum
    out = np.repeat(curriculum[None], count, axis=0)
    for k in range(count):
        for _ in range(20):  # rejection: a drawn move may be impossible; then draw again
            if rng.random() < 0.5:
                t, p = filled[rng.integers(len(filled))]
                old = curriculum[t, p]
                if is_included[old] and counts[old] == 1:
                    continue
                free = below_cap[~np.isin(below_cap, curriculum[t])]
                if free.size == 0:
                    continue
                out[k, t, p] = free[rng.integers(free.size)]
                break
            (t1, p1), (t2, p2) = filled[rng.integers(len(filled), size=2)]
            a, c = curriculum[t1, p1], curriculum[t2, p2]
            if t1 == t2 or a == c or a in curriculum[t2] or c in curriculum[t1]:
                continue
            out[k, t1, p1], out[k, t2, p2] = c, a
            break
    return out


def optimize(
    simulator: Simulator,
    initial_loss: np.ndarray,
    slots: np.ndarray,
    constraints: Constraints = Constraints(),
    *,
    tests: np.ndarray | None = None,
    starts: int = 256,
    iterations: int = 300,
    candidates: int = 64,
    temperature: float = 0.0,
    patience: int = 30,
    bounds: np.ndarray | None = None,
    seed: int = 0,
) -> Proposal:
    """Search the curricula with the slots ``bool[T, b]`` and ``constraints`` for the lowest
    simulated mean final loss over the test positions ``tests`` (default all), started from
    ``initial_loss: float[m]``.

    ``starts`` random curricula are simulated; the best is improved for at most ``iterations``
    iterations of ``candidates`` neighbours each. ``temperature`` (nats; 0: greedy) is the
    simulated-annealing temperature of the first iteration, cooled geometrically to 1% of it by
    the last; the greedy search stops after ``patience`` iterations without improvement. The
    best curriculum ever visited is returned. Deterministic for a seed.

    ``bounds: float[2, m]`` (nats; low and high per test example) is a trust region: a
    curriculum whose simulated losses leave it at any step is never chosen. A fitted simulator
    extrapolates outside the losses it was fitted on, and an unbounded search finds exactly the
    curricula where it extrapolates worst.
    """
    if starts < 1 or candidates < 1 or iterations < 0:
        raise OptimizeError(f"starts and candidates must be at least 1 and iterations at least 0, got "
                            f"{starts}, {candidates}, {iterations}")
    if not temperature >= 0:
        raise OptimizeError(f"temperature must be a non-negative number of nats, got {temperature}")
    if simulator.n_train is None:
        raise OptimizeError("the simulator is not fitted")
    space = search_space(simulator.n_train, slots, constraints)
    rng = np.random.default_rng(seed)
    random = random_curricula(space, starts, rng)
    random_loss = objective(simulator, random, initial_loss, tests, bounds)
    best_index = int(np.argmin(random_loss))
    if not np.isfinite(random_loss[best_index]):
        raise OptimizeError(f"none of the {starts} random curricula keeps its simulated losses within the bounds")
    current, current_loss = random[best_index], float(random_loss[best_index])
    best, best_loss = current, current_loss
    history = [current_loss]
    evaluations, stale = starts, 0
    cooling = 0.01 ** (1.0 / max(1, iterations - 1))
    for iteration in range(iterations):
        proposals = neighbours(current, space, candidates, rng)
        losses = objective(simulator, proposals, initial_loss, tests, bounds)
        evaluations += candidates
        k = int(np.argmin(losses))
        delta = float(losses[k]) - current_loss
        heat = temperature * cooling**iteration
        if delta < 0 or (heat > 0 and np.isfinite(delta) and rng.random() < np.exp(-delta / heat)):
            current, current_loss = proposals[k], float(losses[k])
        if current_loss < best_loss:
            best, best_loss, stale = current, current_loss, 0
        else:
            stale += 1
        history.append(current_loss)
        if temperature == 0 and stale >= patience:
            break
    return Proposal(best.copy(), best_loss, float(random_loss[best_index]), random_loss, np.array(history),
                    evaluations)


def check_feasible(curriculum: np.ndarray, space: Space) -> None:
    """Raise :class:`OptimizeError` naming the first way ``curriculum: int[T, b]`` leaves the space."""
    curriculum = np.asarray(curriculum)
    if curriculum.shape != space.slots.shape or not np.array_equal(curriculum >= 0, space.slots):
        raise OptimizeError(f"the curriculum's slots differ from the experiment's shape {space.slots.shape}")
    for t, row in enumerate(curriculum):
        present = row[row >= 0]
        if np.unique(present).size != present.size:
            raise OptimizeError(f"step {t + 1} repeats an example")
    ids = curriculum[space.slots]
    outside = np.setdiff1d(ids, space.allowed)
    if outside.size:
        raise OptimizeError(f"example {int(outside[0])} is excluded")
    counts = np.bincount(ids, minlength=space.n_train)
    if counts.max() > space.cap:
        raise OptimizeError(f"example {int(counts.argmax())} appears {int(counts.max())} times; the cap is {space.cap}")
    missing = space.include[counts[space.include] == 0]
    if missing.size:
        raise OptimizeError(f"included example {int(missing[0])} does not appear")
