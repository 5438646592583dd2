"""train-run: one fine-tuning run, deployable alone to a GPU worker.

It writes Parquet loss shards only (never the warehouse): the experiment must have been
registered by collect-runs, and ingest-losses (or collect-runs) loads the shards.
"""

from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger

from simfluence_platform.flows.common import experiment_config, warehouse as open_warehouse
from simfluence_platform.storage.experiments import config_hash
from simfluence_platform.tasks.collect import train_run as train_one
from simfluence_platform.tasks.data import load_examples


@flow(name="train-run", log_prints=True, flow_run_name="train-run-{run_id}", retries=1, retry_delay_seconds=10)
def train_run(run_id: int, preset: str | None = "demo", config_path: str | None = None,
              warehouse: str | None = None, experiment: str | None = None,
              curriculum: list[list[int]] | None = None, curriculum_kind: str | None = None) -> dict:
    """Train run ``run_id`` of the experiment and stream its losses as shards. A crashed run is
    retried once: the retry is a new attempt that replaces the earlier one's shards.

    The experiment is a preset, a config file, or (``experiment``, with ``preset`` None) a
    registered experiment whose config is read from the warehouse. The run trains on its
    sampled curriculum, or on ``curriculum`` (``[step][position]`` ids, -1 pads) recorded as
    ``curriculum_kind``: how ``optimize-curriculum`` trains its verification runs."""
    from simfluence_platform.tasks.training import Trainer

    config = experiment_config(preset, config_path, experiment, warehouse)
    trainer = Trainer(config, load_examples(config.data, config.model.task))
    batches = None if curriculum is None else np.asarray(curriculum, dtype=np.int64)
    outcome = train_one(config, trainer, open_warehouse(warehouse), run_id, batches=batches,
                        curriculum_kind=curriculum_kind)
    get_run_logger().info(f"run {run_id} of {config.name}: {outcome.status}"
                          + (f" ({outcome.reason})" if outcome.reason else ""))
    return {"run_id": run_id, "status": outcome.status, "reason": outcome.reason,
            "config_hash": config_hash(config.identity())}
