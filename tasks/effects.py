"""The effects table of a simulator version: computed, flagged against its held-out error, stored.

The expected leave-one-out effect of each training example on each test example's final loss
(and on the mean over test examples), averaged over a set of base curricula, with percentile
intervals from refits on bootstrap resamples of whole fitting runs. This is the train x test
score matrix attribution tools produce, in nats of final loss; the simulator's across-runs
Spearman on held-out runs is its curriculum-level counterpart of the linear datamodeling score.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from simfluence import whatif
from simfluence.simulators import Simulator
from simfluence_platform.storage.effects import named_effects, store_effects
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.whatif import (HeldoutError, Question, ask, base_curricula, flag_within_error,
                                              heldout_error, heldout_runs, refits)


@dataclass(frozen=True)
class EffectsAnswer:
    """A stored effects table: ``table`` is ``effects_named`` for this version (text and labels
    joined); ``base`` says which curricula it averages over; ``error`` the held-out scale."""

    version: str
    name: str
    base: str
    n_curricula: int
    n_refits: int
    level: float
    error: HeldoutError
    table: pl.DataFrame

    def ranking(self, test_id: int | None = None) -> pl.DataFrame:
        """Examples by effect on one test example (``None``: the mean over test examples),
        most loss-lowering first."""
        rows = self.table.filter(pl.col("test_id").is_null() if test_id is None else pl.col("test_id") == test_id)
        return rows.sort("effect")

    def resolved(self) -> dict[str, int]:
        """How many per-test effects have an interval that excludes zero, and how many of those
        are also larger than the simulator's held-out error (the ones worth acting on)."""
        per_test = self.table.filter(pl.col("test_id").is_not_null())
        excludes_zero = (pl.col("ci_low") > 0) | (pl.col("ci_high") < 0)
        return {"effects": per_test.height,
                "interval_excludes_zero": per_test.filter(excludes_zero).height,
                "excludes_zero_and_above_error": per_test.filter(excludes_zero & ~pl.col("below_error")).height}


def compute_effects(warehouse: Warehouse, experiment: str, ref: str = "best", curricula: str = "heldout",
                    n_refits: int = 20, seed: int = 0, level: float = 0.95) -> EffectsAnswer:
    """Compute the effects of the simulator ``ref`` over the base ``curricula`` (``heldout`` or
    a count to sample), with ``n_refits`` bootstrap refits, store them (replacing this version's
    previous table) and return them with text and labels."""
    question = ask(warehouse, experiment, ref)
    return effects_for(warehouse, experiment, question, refits(warehouse, experiment, question, n_refits, seed),
                       curricula, level)


def effects_for(warehouse: Warehouse, experiment: str, question: Question, refitted: list[Simulator],
                curricula: str = "heldout", level: float = 0.95) -> EffectsAnswer:
    """:func:`compute_effects` for a loaded question and its bootstrap refits (shared with the report)."""
    held = heldout_runs(warehouse, experiment, question)  # read once: the base curricula and the error scale
    label, base, starts = base_curricula(warehouse, experiment, held, curricula)
    result = whatif.effects(question.simulator, base, starts, refitted, level)
    error = heldout_error(question, held)
    frame = flag_within_error(result.table(question.simulator.test_ids), error, question.simulator.test_ids)
    store_effects(warehouse, experiment, question.version, frame, label, len(refitted))
    return EffectsAnswer(question.version, question.name, label, len(base), len(refitted), level, error,
                         named_effects(warehouse, experiment, question.version))
