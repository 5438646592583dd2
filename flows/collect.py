"""collect-runs: sample curricula, run the fine-tuning runs, stream and ingest their losses.

In process by default (the model loads once for all runs), or, with ``on_workers``, one
``train-run`` deployment run per training run on the work pool (GPU workers), ingesting new
shards every ``poll_seconds`` while they train. Run ``r`` always has the same curriculum, so a
retried or repeated collection never duplicates a run.
"""

from __future__ import annotations

import re
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import experiment_config, warehouse as open_warehouse
from flows.ingest import ingest_shards
from flows.train_run import trainer_for
from storage.experiments import store_gradients
from tasks.collect import complete_runs, curriculum_for_run, has_gradients, register, train_run as train_one
from tasks.config import ExperimentConfig
from tasks.data import load_examples
from tasks.gradients import gradient_checkpoints

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def artifact_key(prefix: str, experiment: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]", "-", f"{prefix}-{experiment}".lower())


@task(name="train-one-run", task_run_name="train-run-{run_id}", cache_policy=NO_CACHE)
def train_in_process(config: ExperimentConfig, run_id: int, warehouse: str | None) -> dict:
    outcome = train_one(config, trainer_for(config), open_warehouse(warehouse), run_id)
    return {"run_id": run_id, "status": outcome.status, "reason": outcome.reason}


@task(name="gradient-checkpoints", cache_policy=NO_CACHE)
def store_gradient_checkpoints(config: ExperimentConfig, warehouse: str | None) -> None:
    store_gradients(open_warehouse(warehouse), config.name, gradient_checkpoints(config, trainer_for(config)))


@flow(name="collect-runs", log_prints=True)
def collect_runs(preset: str | None = "demo", config_path: str | None = None, runs: int = 8,
                 warehouse: str | None = None, on_workers: bool = False,
                 train_deployment: str = "train-run/default", gradients: bool = True, run_retries: int = 1,
                 poll_seconds: float = 5.0) -> dict:
    """Make runs 0..runs-1 of the experiment complete; see the module docstring."""
    logger = get_run_logger()
    config = experiment_config(preset, config_path)
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    wh = open_warehouse(warehouse)
    examples = load_examples(config.data, config.model.task)  # bad data fails before anything is written
    for run_id in range(runs):
        curriculum_for_run(config, run_id)
    done = complete_runs(wh, config.name)
    todo = [r for r in range(runs) if r not in done]
    need_gradients = gradients and not has_gradients(wh, config.name)
    logger.info(f"{config.name}: {len(done & set(range(runs)))} of {runs} runs already complete; training {len(todo)}")
    if not on_workers and (todo or need_gradients):
        trainer_for(config)  # a bad model fails before anything is written
    register(config, wh, examples)
    progress = create_progress_artifact(progress=0.0, key=artifact_key("collect", config.name),
                                        description=f"collect-runs {config.name}: runs trained")
    results: dict[int, dict] = {}
    if on_workers:
        results = _train_on_workers(config, preset, config_path, warehouse, todo, train_deployment, poll_seconds,
                                    progress)
    else:
        for count, run_id in enumerate(todo, 1):
            results[run_id] = train_in_process.with_options(retries=run_retries)(config, run_id, warehouse)
            report = ingest_shards(warehouse, config.name)
            update_progress_artifact(progress, 100.0 * count / len(todo))
            logger.info(f"run {run_id}: {results[run_id]['status']} ({count}/{len(todo)}); "
                        f"ingested {report['loaded_rows']} rows")
    if need_gradients:
        store_gradient_checkpoints(config, warehouse)
    ingest_shards(warehouse, config.name)
    update_progress_artifact(progress, 100.0)
    complete = complete_runs(wh, config.name)
    rows = [{"run_id": r, "status": results.get(r, {}).get("status", "complete" if r in complete else "missing"),
             "reason": results.get(r, {}).get("reason") or ""} for r in range(runs)]
    create_table_artifact(key=artifact_key("runs", config.name), table=rows,
                          description=f"{config.name}: {len(complete)} complete runs in the warehouse")
    failed = {r["run_id"]: r["reason"] for r in rows if r["status"] != "complete"}
    return {"experiment": config.name, "trained": sorted(results), "complete": sorted(complete), "failed": failed}


def _train_on_workers(config, preset, config_path, warehouse, todo, deployment, poll_seconds, progress) -> dict:
    """One deployment run per training run; ingest while they train; wait for all."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    launched = {run_id: run_deployment(deployment, timeout=0, as_subflow=False,
                                       parameters={"run_id": run_id, "preset": preset, "config_path": config_path,
                                                   "warehouse": warehouse}).id
                for run_id in todo}
    logger.info(f"dispatched {len(launched)} runs to {deployment}")
    states: dict[int, str] = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(launched):
            time.sleep(poll_seconds)
            ingest_shards(warehouse, config.name)
            for run_id, flow_run_id in launched.items():
                state = client.read_flow_run(flow_run_id).state
                if state is not None and state.type.value in FINAL:
                    states[run_id] = state.type.value
            update_progress_artifact(progress, 100.0 * len(states) / max(1, len(launched)))
    return {r: {"run_id": r, "status": "complete" if s == "COMPLETED" else "failed", "reason": "" if s == "COMPLETED"
                else f"flow run {s.lower()}"} for r, s in states.items()}
