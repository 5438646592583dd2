"""The defaults of the pipeline's steps, in one place: the CLI, the flows and the tasks read
them from here (a fit is replayable from its bundle's manifest: method, hyperparameters,
fitting and held-out run ids)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FitStep:
    """``heldout_every``: run ``r`` is held out when ``r % k == k - 1`` (stable as runs are
    added); ``shard_size``: test examples per Dask task; ``n_workers``: LocalCluster workers."""

    heldout_every: int = 5
    shard_size: int = 64
    n_workers: int = 2


@dataclass(frozen=True)
class EvaluateStep:
    """``n_boot``: bootstrap resamples of held-out runs for every interval."""

    n_boot: int = 1000


@dataclass(frozen=True)
class AnswerStep:
    """``n_refits``: refits on bootstrap resamples of the fitting runs behind the intervals of
    whatif, influence, effects and the report; ``level``: their coverage; ``curricula``: the
    base curricula of the effects table (``heldout`` or a number to sample)."""

    n_refits: int = 20
    level: float = 0.95
    curricula: str = "heldout"


FIT = FitStep()
EVALUATE = EvaluateStep()
ANSWER = AnswerStep()
