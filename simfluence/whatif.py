"""What-if answers from a fitted simulator: counterfactual curricula, influence, interactions.

Everything here simulates many curricula at once (one batched :meth:`Simulator.simulate` call
per question), so ranking every training example by leave-one-out costs one simulation of
``occurring examples`` curricula, not a loop. Curricula are one run's ``int[T, b]`` (-1 pads);
losses are in nats; an *effect* is the change of the final loss (edited minus base), so a
negative effect means the example lowered the test loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl

from simfluence import curricula
from simfluence.curricula import CurriculumError
from simfluence.edit_syntax import EDIT_HELP
from simfluence.optimize import final_loss
from simfluence.runset import PAD, RunSet
from simfluence.simulators import Simulator, SimulatorError

_EDIT = re.compile(r"^(remove|repeat|move|swap|reorder|replace|insert):(.+)$")


def _ints(text: str, edit: str, count: int | None = None) -> list[int]:
    """The comma-separated integers of ``text``; exactly ``count`` of them when given."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CurriculumError(f"edit {edit!r}: expected integers, got {text!r}") from None
    if not values or (count is not None and len(values) != count):
        want = f"{count} integer{'s' if count != 1 else ''}" if count else "at least one integer"
        raise CurriculumError(f"edit {edit!r}: expected {want}, got {text!r}; edits are {EDIT_HELP}")
    return values


def _examples(curriculum: np.ndarray, ids: list[int], edit: str, n_train: int | None, present: bool) -> list[int]:
    """Check training example ids: in ``0..n_train-1`` and, when ``present``, in the curriculum."""
    for example_id in ids:
        if example_id < 0 or (n_train is not None and example_id >= n_train):
            top = f"0..{n_train - 1}" if n_train is not None else "0 or more"
            raise CurriculumError(f"edit {edit!r}: training example id {example_id} is outside {top}")
        if present and not (curriculum == example_id).any():
            raise CurriculumError(f"edit {edit!r}: training example {example_id} does not occur in this curriculum")
    return ids


def apply_edit(curriculum: np.ndarray, edit: str, seed: int = 0, n_train: int | None = None) -> np.ndarray:
    """Apply one edit written as in :data:`EDIT_HELP` to ``int[T, b]``; returns a new array.
    Example ids are checked against ``0..n_train-1`` when ``n_train`` is given; ``remove`` and
    ``move`` need ids that occur in the curriculum."""
    match = _EDIT.match(edit.strip())
    if not match:
        raise CurriculumError(f"unknown edit {edit!r}; edits are {EDIT_HELP}")
    kind, arg = match.groups()
    if kind == "remove":
        return curricula.remove(curriculum, _examples(curriculum, _ints(arg, edit), edit, n_train, present=True))
    if kind == "repeat":
        example, _, times = arg.partition("x")
        (example_id,) = _examples(curriculum, _ints(example, edit, 1), edit, n_train, present=False)
        return curricula.repeat(curriculum, example_id, _ints(times, edit, 1)[0], seed=seed)
    if kind in ("move", "insert"):
        example, _, step = arg.partition("@")
        (example_id,) = _examples(curriculum, _ints(example, edit, 1), edit, n_train, present=kind == "move")
        (to_step,) = _ints(step, edit, 1)
        return (curricula.move if kind == "move" else curricula.insert)(curriculum, example_id, to_step)
    if kind == "swap":
        a, b = _ints(arg, edit, 2)
        return curricula.swap(curriculum, a, b)
    if kind == "reorder":
        return curricula.reorder(curriculum, _ints(arg, edit))
    step, _, ids = arg.partition("=")
    return curricula.replace_batch(curriculum, _ints(step, edit, 1)[0],
                                   _examples(curriculum, _ints(ids, edit), edit, n_train, present=False))


def apply_edits(curriculum: np.ndarray, edits: list[str], seed: int = 0, n_train: int | None = None) -> np.ndarray:
    """Apply edits in order (at least one; see :func:`apply_edit`)."""
    if not edits:
        raise CurriculumError(f"give at least one edit ({EDIT_HELP})")
    for edit in edits:
        curriculum = apply_edit(curriculum, edit, seed, n_train)
    return curriculum


def stack(many: list[np.ndarray]) -> np.ndarray:
    """Curricula of one length but different batch widths as ``int[K, T, b_max]``."""
    steps = {c.shape[0] for c in many}
    if len(steps) != 1:
        raise CurriculumError(f"curricula of different lengths cannot be stacked: {sorted(steps)} steps")
    width = max(c.shape[1] for c in many)
    out = np.full((len(many), steps.pop(), width), PAD, dtype=np.int64)
    for k, c in enumerate(many):
        out[k, :, : c.shape[1]] = c
    return out


def test_positions(simulator: Simulator, initial_loss: np.ndarray, tests: list[int] | None) -> np.ndarray:
    """``int64[k]`` positions in ``simulator.test_ids`` of the test example ids ``tests``
    (default all), after checking them and the initial losses against the simulator; raises
    :class:`SimulatorError` naming what is wrong."""
    if simulator.test_ids is None:
        raise SimulatorError("the simulator is not fitted")
    ids = np.asarray(simulator.test_ids, dtype=np.int64)
    m = len(ids)
    if np.shape(initial_loss) != (m,):
        raise SimulatorError(f"initial_loss must hold the {m} test examples' losses, got shape {np.shape(initial_loss)}")
    if tests is None:
        return np.arange(m)
    position = {int(test_id): k for k, test_id in enumerate(ids)}
    bad = [t for t in tests if int(t) not in position]
    if bad or not len(tests):
        known = f"{ids.min()}..{ids.max()}" if np.array_equal(ids, np.arange(ids.min(), ids.max() + 1)) else \
            ", ".join(map(str, ids[:10])) + (", ..." if m > 10 else "")
        raise SimulatorError(f"test ids {bad} are out of range: this simulator has test ids {known}")
    return np.array([position[int(t)] for t in tests], dtype=np.int64)


@dataclass(frozen=True)
class WhatIf:
    """``base``, ``edited``: ``float[T+1, m]`` simulated trajectories; ``effect``: ``float[m]``
    final-loss change (edited minus base)."""

    base: np.ndarray
    edited: np.ndarray

    @property
    def effect(self) -> np.ndarray:
        return self.edited[-1] - self.base[-1]


def counterfactual(simulator: Simulator, base: np.ndarray, edited: np.ndarray, initial_loss: np.ndarray) -> WhatIf:
    """Simulate a curriculum and its edited version from the same initial losses."""
    test_positions(simulator, initial_loss, None)
    if base.shape[0] == edited.shape[0]:
        both = simulator.simulate(stack([base, edited]), np.stack([initial_loss, initial_loss]))
        return WhatIf(both[0], both[1])
    return WhatIf(simulator.simulate(base[None], initial_loss[None])[0],
                  simulator.simulate(edited[None], initial_loss[None])[0])


def _final(simulator: Simulator, many: list[np.ndarray], initial_loss: np.ndarray, tests: np.ndarray,
           chunk: int = 256) -> np.ndarray:
    """``float[K]``: the mean final loss over ``tests`` of each curriculum
    (:func:`simfluence.optimize.final_loss`, in chunks of ``chunk`` curricula)."""
    return np.concatenate([final_loss(simulator, stack(many[start : start + chunk]), initial_loss, tests)
                           for start in range(0, len(many), chunk)])


def strongest(ranking: pl.DataFrame, k: int) -> list[int]:
    """The ``k`` example ids of an :func:`influence` ranking with the largest ``|effect|``."""
    return ranking.sort(pl.col("effect").abs(), descending=True)["example_id"].head(k).to_list()


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis of ``draws: float[B, ...]`` (one answer per
    bootstrap refit): ``(low, high)``, each ``float[...]``; NaN where the draws are NaN or
    there are none (B = 0)."""
    if not 0 < level < 1:
        raise SimulatorError(f"level must lie in (0, 1), got {level!r}")
    draws = np.asarray(draws, dtype=np.float64)
    if draws.shape[0] == 0:
        nan = np.full(draws.shape[1:], np.nan)
        return nan, nan.copy()
    alpha = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        return np.quantile(draws, alpha, axis=0), np.quantile(draws, 1 - alpha, axis=0)


def change_draws(simulator: Simulator, base: np.ndarray, edited: np.ndarray, initial_loss: np.ndarray,
                 refits: list[Simulator]) -> tuple[WhatIf, np.ndarray]:
    """:func:`counterfactual`, and its ``effect`` under each refit: ``float[B, m]`` (B = 0
    without refits; :func:`interval` turns it into an interval)."""
    result = counterfactual(simulator, base, edited, initial_loss)
    draws = [counterfactual(r, base, edited, initial_loss).effect for r in refits]
    return result, np.stack(draws) if draws else np.empty((0, len(result.effect)))


def influence(simulator: Simulator, curriculum: np.ndarray, initial_loss: np.ndarray,
              tests: list[int] | None = None, refits: list[Simulator] | None = None,
              level: float = 0.95) -> pl.DataFrame:
    """Leave-one-out effect of every training example in the curriculum on the final loss of
    ``tests`` (their mean; default all), most loss-lowering first.

    Columns: ``example_id``, ``occurrences``, ``effect`` (final loss with the example minus
    without it, nats: negative means it helped), ``ci_low``, ``ci_high`` (percentile interval
    over ``refits``, see :func:`bootstrap_refits`; NaN without them), ``final_without``.
    """
    positions = test_positions(simulator, initial_loss, tests)
    ids, counts = np.unique(curriculum[curriculum != PAD], return_counts=True)
    many = [curriculum] + [curricula.remove(curriculum, [i]) for i in ids]

    def loo(model: Simulator) -> tuple[np.ndarray, np.ndarray]:
        finals = _final(model, many, initial_loss, positions)
        return finals[0] - finals[1:], finals[1:]

    effect, without = loo(simulator)
    low, high = interval(np.array([loo(r)[0] for r in refits or []]).reshape(-1, len(effect)), level)
    return pl.DataFrame({"example_id": ids, "occurrences": counts, "effect": effect, "ci_low": low,
                         "ci_high": high, "final_without": without}).sort("effect")


def interactions(simulator: Simulator, curriculum: np.ndarray, initial_loss: np.ndarray, candidates: list[int],
                 tests: list[int] | None = None) -> pl.DataFrame:
    """For every pair of ``candidates``: the effect of removing both against the sum of removing
    each alone. ``interaction`` = joint - (single_i + single_j); zero for an additive simulator,
    positive for redundant pairs (together they do less than the sum of their parts).
    Sorted by ``|interaction|``, largest first."""
    positions = test_positions(simulator, initial_loss, tests)
    candidates = list(dict.fromkeys(int(c) for c in candidates))
    base = _final(simulator, [curriculum], initial_loss, positions)[0]
    single = dict(zip(candidates, base - _final(simulator, [curricula.remove(curriculum, [c]) for c in candidates],
                                                initial_loss, positions)))
    pairs = [(a, b) for k, a in enumerate(candidates) for b in candidates[k + 1:]]
    if not pairs:
        return pl.DataFrame(schema={"example_a": pl.Int64, "example_b": pl.Int64, "joint": pl.Float64,
                                    "sum_of_singles": pl.Float64, "interaction": pl.Float64})
    joint = base - _final(simulator, [curricula.remove(curriculum, [a, b]) for a, b in pairs], initial_loss, positions)
    singles = np.array([single[a] + single[b] for a, b in pairs])
    frame = pl.DataFrame({"example_a": [a for a, _ in pairs], "example_b": [b for _, b in pairs], "joint": joint,
                          "sum_of_singles": singles, "interaction": joint - singles})
    return frame.sort(pl.col("interaction").abs(), descending=True)


def order_effects(simulator: Simulator, curriculum: np.ndarray, initial_loss: np.ndarray, candidates: list[int],
                  tests: list[int] | None = None) -> pl.DataFrame:
    """For each candidate: the final loss with all its occurrences moved to the first step
    against the last step. ``order_effect`` = late - early (positive: seeing it early helps
    more). Sorted by ``|order_effect|``, largest first."""
    positions = test_positions(simulator, initial_loss, tests)
    T = curriculum.shape[0]
    present = [int(c) for c in candidates if (curriculum == c).any()]
    early = _final(simulator, [curricula.move(curriculum, c, 1) for c in present], initial_loss, positions)
    late = _final(simulator, [curricula.move(curriculum, c, T) for c in present], initial_loss, positions)
    return pl.DataFrame({"example_id": present, "final_if_early": early, "final_if_late": late,
                         "order_effect": late - early}).sort(pl.col("order_effect").abs(), descending=True)


def bootstrap_refits(simulator: Simulator, runs: RunSet, n: int = 30, seed: int = 0) -> list[Simulator]:
    """``n`` refits of ``simulator`` (its choices held fixed, see :meth:`Simulator.refit`) on
    bootstrap resamples of whole fitting runs: the spread of any answer across them is the
    answer's uncertainty from the finite number of runs."""
    if n < 2:
        raise SimulatorError(f"bootstrap needs at least 2 refits, got {n}")
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(n):
        index = rng.integers(0, runs.n_runs, runs.n_runs)
        refits.append(simulator.refit(RunSet(runs.batches[index], runs.losses[index], runs.n_train,
                                             test_ids=runs.test_ids)))  # repeated runs get fresh run ids
    return refits


@dataclass(frozen=True)
class Effects:
    """Expected leave-one-out effects on the final loss, averaged over base curricula.

    ``effect``: ``float[n, m]`` (final loss with the example minus without it, nats: negative
    means it helped), NaN for examples in no base curriculum; ``ci_low``, ``ci_high``:
    ``float[n, m]`` percentile intervals over bootstrap refits (NaN without refits);
    ``mean_effect``, ``mean_ci_low``, ``mean_ci_high``: ``float[n]``, the same for the mean
    final loss over the test examples (its interval from the refits' means, not a mean of
    intervals); ``n_curricula``: ``int[n]`` how many base curricula held each example;
    ``n_refits``: the number of bootstrap refits behind the intervals."""

    effect: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    mean_effect: np.ndarray
    mean_ci_low: np.ndarray
    mean_ci_high: np.ndarray
    n_curricula: np.ndarray
    n_refits: int
    level: float

    def table(self, test_ids: np.ndarray) -> pl.DataFrame:
        """Long form of the examples seen in some base curriculum: ``train_id, test_id, effect,
        ci_low, ci_high, n_curricula``; one row per (example, test example), then one row per
        example with ``test_id`` null for the mean over the test examples."""
        m = self.effect.shape[1]
        seen = np.flatnonzero(self.n_curricula > 0)
        per_test = pl.DataFrame({
            "train_id": np.repeat(seen, m), "test_id": np.tile(np.asarray(test_ids, dtype=np.int64), len(seen)),
            "effect": self.effect[seen].reshape(-1), "ci_low": self.ci_low[seen].reshape(-1),
            "ci_high": self.ci_high[seen].reshape(-1), "n_curricula": np.repeat(self.n_curricula[seen], m),
        })
        mean = pl.DataFrame({
            "train_id": seen, "test_id": pl.Series([None] * len(seen), dtype=pl.Int64),
            "effect": self.mean_effect[seen], "ci_low": self.mean_ci_low[seen], "ci_high": self.mean_ci_high[seen],
            "n_curricula": self.n_curricula[seen],
        })
        return pl.concat([per_test, mean]).with_columns(pl.col("ci_low", "ci_high").fill_nan(None))


def _loo_effects(simulator: Simulator, base: np.ndarray, initial_loss: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``float[n, m]`` sum over base curricula of (final with i - final without i), per example."""
    n = simulator.n_train
    total = np.zeros((n, len(simulator.test_ids)))
    for k, curriculum in enumerate(base):
        ids = np.unique(curriculum[curriculum != PAD])
        many = [curriculum] + [curricula.remove(curriculum, [i]) for i in ids]
        finals = []
        for start in range(0, len(many), chunk):
            part = stack(many[start:start + chunk])
            finals.append(simulator.simulate(part, np.repeat(initial_loss[k][None], len(part), axis=0))[:, -1])
        finals = np.concatenate(finals)
        total[ids] += finals[0][None] - finals[1:]
    return total


def effects(simulator: Simulator, base: np.ndarray, initial_loss: np.ndarray,
            refits: list[Simulator] | None = None, level: float = 0.95) -> Effects:
    """The expected leave-one-out effect of every training example on every test example's
    final loss, averaged over the base curricula that hold it (``base: int[K, T, b]``, from
    ``initial_loss: float[K, m]``), with a percentile interval over ``refits`` (see
    :func:`bootstrap_refits`). Costs one batched simulation of every (curriculum, removed
    example) per simulator."""
    base = np.asarray(base)
    initial_loss = np.asarray(initial_loss, dtype=np.float64)
    if base.ndim != 3 or initial_loss.shape != (base.shape[0], len(simulator.test_ids)):
        raise SimulatorError(f"effects need base curricula [K, T, b] and initial losses [K, m]; got {base.shape} "
                             f"and {initial_loss.shape}")
    counts = np.zeros(simulator.n_train, dtype=np.int64)
    for curriculum in base:
        counts[np.unique(curriculum[curriculum != PAD])] += 1
    unseen = counts == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = _loo_effects(simulator, base, initial_loss) / counts[:, None]
        mean[unseen] = np.nan
        draws = np.array([_loo_effects(r, base, initial_loss) / counts[:, None] for r in refits or []])
        draws = draws.reshape(-1, *mean.shape)
        draws[:, unseen] = np.nan
        low, high = interval(draws, level)
        mean_low, mean_high = interval(draws.mean(axis=2), level)
        return Effects(mean, low, high, mean.mean(axis=1), mean_low, mean_high, counts, len(refits or []), level)
