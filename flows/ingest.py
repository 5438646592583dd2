"""ingest-losses: the single writer that loads new loss shards into the warehouse."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from simfluence_platform.flows.common import run_name, warehouse as open_warehouse
from simfluence_platform.storage.ingest import ingest


@task(name="ingest-shards", retries=2, retry_delay_seconds=5)
def ingest_shards(warehouse: str | None, experiment: str | None) -> dict:
    return ingest(open_warehouse(warehouse), experiment).to_dict()


@flow(name="ingest-losses", log_prints=True, flow_run_name=run_name("ingest"))
def ingest_losses(warehouse: str | None = None, experiment: str | None = None) -> dict:
    """Load new shards (all experiments, or one). Safe to run at any time and repeatedly: one
    writer at a time (a file lock; the deployment also has a concurrency limit of 1)."""
    report = ingest_shards(warehouse, experiment)
    logger = get_run_logger()
    logger.info(f"loaded {report['loaded_shards']} shards ({report['loaded_rows']} rows); "
                f"{len(report['completed_runs'])} runs completed, {len(report['failed_runs'])} failed")
    for rejected in report["rejected"]:
        logger.warning(f"rejected {rejected['path']}: {rejected['reason']}")
    return report
