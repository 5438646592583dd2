"""train-run: a group of fine-tuning runs trained together, deployable alone to a GPU worker.

It writes Parquet loss shards only (never the warehouse), each run its own shards and
completion marker: the experiment must have been registered by collect-runs, and
ingest-losses (or collect-runs) loads the shards. A killed group loses nothing that was
complete, and running it again trains only its runs that are not complete.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from simfluence_platform.flows.common import experiment_config, warehouse as open_warehouse
from simfluence_platform.storage.experiments import config_hash
from simfluence_platform.tasks.collect import groups, train_group
from simfluence_platform.tasks.data import load_examples


def _name() -> str:
    """``train-run-0``, or ``train-run-0-1-2-3`` for a group."""
    return "train-run-" + "-".join(map(str, flow_run.parameters["run_ids"]))


@flow(name="train-run", log_prints=True, flow_run_name=_name, retries=1, retry_delay_seconds=10)
def train_run(run_ids: list[int], preset: str | None = "demo", config_path: str | None = None,
              warehouse: str | None = None) -> dict:
    """Train runs ``run_ids`` of the experiment, ``training.parallel_runs`` at a time, and stream
    their losses as shards. A crashed group is retried once: the retry is a new attempt of each
    run not complete yet, which replaces the earlier one's shards."""
    from simfluence_platform.tasks.training import Trainer

    config = experiment_config(preset, config_path)
    trainer = Trainer(config, load_examples(config.data, config.model.task))
    wh, logger = open_warehouse(warehouse), get_run_logger()
    runs = {}
    for group in groups(config, list(run_ids)):
        result = train_group(config, trainer, wh, group, log=logger.info)
        runs.update({r: {"status": "skipped", "reason": reason} for r, reason in result.skipped.items()})
        runs.update({r: {"status": o.status, "reason": o.reason} for r, o in result.outcomes.items()})
    for run_id, run in runs.items():
        reason = f" ({run['reason']})" if run["reason"] else ""
        logger.info(f"run {run_id} of {config.name}: {run['status']}{reason}")
    return {"runs": runs, "config_hash": config_hash(config.identity())}
