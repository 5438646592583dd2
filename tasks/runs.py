"""Which curriculum and seed each run of an experiment has: run ``r`` always gets the same
ones (seeded by the config's seed and ``r``), which makes collection resumable and idempotent."""

from __future__ import annotations

import numpy as np

from simfluence import curricula
from simfluence_platform.tasks.config import ExperimentConfig


def run_seed(config: ExperimentConfig, run_id: int) -> int:
    """The seed of run ``run_id``: distinct per run, fixed per (config seed, run id)."""
    return int(np.random.SeedSequence([config.seed, run_id]).generate_state(1)[0])


def curriculum_for_run(config: ExperimentConfig, run_id: int) -> np.ndarray:
    """``int64[T, b]`` batches of run ``run_id``."""
    c, t, n = config.curriculum, config.training, config.data.n_train
    seed = run_seed(config, run_id)
    if c.kind == "uniform":
        return curricula.uniform(n, 1, t.steps, t.batch_size, seed=seed)[0]
    if c.kind == "subset_epochs":
        return curricula.subset_epochs(n, 1, c.subset_size, c.epochs, t.batch_size, seed=seed)[0]
    explicit = curricula.load(c.path, n)
    if run_id >= len(explicit):
        raise curricula.CurriculumError(f"{c.path} holds {len(explicit)} curricula; run {run_id} has none")
    return explicit[run_id]
