"""train-run: a group of fine-tuning runs trained together, deployable alone to a GPU worker.

It writes files only (never the warehouse), each run its own Parquet loss shards and
completion marker: the experiment must have been registered by collect-runs, and
ingest-losses (or collect-runs) loads the shards. With ``gradients``, the experiment's
reference run (when among its runs) takes its gradient checkpoints while it trains, and they
are written beside its shards for collect-runs to store: the reference run is trained once. A
killed group loses nothing that was complete, and running it again trains only its runs that
are not complete.
"""

from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from simfluence_platform.flows.common import experiment_config, group_name, warehouse as open_warehouse
from simfluence_platform.storage.experiments import config_hash
from simfluence_platform.storage.shards import write_gradients
from simfluence_platform.tasks.collect import groups, train_group
from simfluence_platform.tasks.data import load_examples


def _name() -> str:
    """``train-run-0``, or ``train-run-0-1-2-3`` for a group."""
    return "train-run-" + group_name(flow_run.parameters["run_ids"])


@flow(name="train-run", log_prints=True, flow_run_name=_name, retries=1, retry_delay_seconds=10)
def train_run(run_ids: list[int], preset: str | None = "demo", config_path: str | None = None,
              warehouse: str | None = None, experiment: str | None = None,
              curriculum: list[list[int]] | None = None, curriculum_kind: str | None = None,
              gradients: bool = False) -> dict:
    """Train runs ``run_ids`` of the experiment, ``training.parallel_runs`` at a time, and stream
    their losses as shards. A crashed group is retried once: the retry is a new attempt of each
    run not complete yet, which replaces the earlier one's shards.

    With ``gradients`` (collect-runs sets it for the group holding the reference run while the
    experiment has no gradient checkpoints), the reference run ``gradients.reference_run``, when
    among ``run_ids`` and trained to completion here, takes its checkpoints as it trains, and
    they are written to its run folder (:func:`~storage.shards.write_gradients`).

    The experiment is a preset, a config file, or (``experiment``, with ``preset`` None) a
    registered experiment whose config is read from the warehouse. Runs train on their sampled
    curricula, or one run on ``curriculum`` (``[step][position]`` ids, -1 pads) recorded as
    ``curriculum_kind``: how ``optimize-curriculum`` trains its verification runs."""
    from simfluence_platform.tasks.training import Trainer

    if curriculum is not None and len(run_ids) != 1:
        raise ValueError(f"a given curriculum trains exactly one run, got run_ids {run_ids}")
    if curriculum is not None and gradients:
        raise ValueError("gradient checkpoints are taken on the reference run's own curriculum, not a given one")
    config = experiment_config(preset, config_path, experiment, warehouse)
    trainer = Trainer(config, load_examples(config.data, config.model.task))
    wh, logger = open_warehouse(warehouse), get_run_logger()
    given = None if curriculum is None else {run_ids[0]: np.asarray(curriculum, dtype=np.int64)}
    runs = {}
    for group in groups(config, list(run_ids)):
        result = train_group(config, trainer, wh, group, gradients, log=logger.info, curricula=given,
                             curriculum_kind=curriculum_kind)
        if result.gradients is not None:
            path = write_gradients(wh.shard_root, config.name, config.gradients.reference_run, result.gradients)
            logger.info(f"run {config.gradients.reference_run} of {config.name}: gradient checkpoints "
                        f"taken while it trained, written to {path}")
        runs.update({r: {"status": "skipped", "reason": reason} for r, reason in result.skipped.items()})
        runs.update({r: {"status": o.status, "reason": o.reason} for r, o in result.outcomes.items()})
    for run_id, run in runs.items():
        reason = f" ({run['reason']})" if run["reason"] else ""
        logger.info(f"run {run_id} of {config.name}: {run['status']}{reason}")
    return {"runs": runs, "config_hash": config_hash(config.identity())}
