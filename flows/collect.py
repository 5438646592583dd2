"""collect-runs: sample curricula, run the fine-tuning runs, stream and ingest their losses.

In process by default (the model loads once for all runs), or, with ``on_workers``, one
``train-run`` deployment run per group of ``training.parallel_runs`` training runs on the work
pool (GPU workers), ingesting new shards every ``poll_seconds`` while they train. Run ``r``
always has the same curriculum, so a retried or repeated collection never duplicates a run.
The reference run's gradient checkpoints are taken while it trains: in process, or on its
worker, which writes them beside the run's shards; once the workers are done and their shards
ingested, the ``recorded-gradients`` task stores them. Only when they were not taken (the
reference run was collected earlier without them) or their file is missing or unreadable does
the ``gradient-checkpoints`` task train the reference run again for them.
"""

from __future__ import annotations

import re
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from simfluence_platform.flows.common import experiment_config, group_name, run_name, warehouse as open_warehouse
from simfluence_platform.flows.ingest import ingest_shards
from simfluence_platform.storage.experiments import complete_run_ids, has_gradients
from simfluence_platform.tasks.collect import (
    Collection,
    collect_group,
    finish_collection,
    groups,
    prepare,
    register,
    start_collection,
    store_recorded_gradients,
    store_reference_gradients,
)
from simfluence_platform.tasks.config import ExperimentConfig

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def artifact_key(prefix: str, experiment: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]", "-", f"{prefix}-{experiment}".lower())


@task(name="start-collection", cache_policy=NO_CACHE)
def start_task(config: ExperimentConfig, runs: int, warehouse: str | None, gradients: bool) -> Collection:
    return start_collection(config, runs, open_warehouse(warehouse), gradients, log=get_run_logger().info)


@task(name="train-run", cache_policy=NO_CACHE)
def train_run_task(collection: Collection, run_ids: list[int]) -> dict[int, str]:
    """One group of training runs of an in-process collection (trained together), ingested:
    retried on its own."""
    return collect_group(collection, run_ids, log=get_run_logger().info)


@task(name="reference-gradients", cache_policy=NO_CACHE)
def finish_task(collection: Collection) -> None:
    finish_collection(collection)


def collect_in_process(config: ExperimentConfig, runs: int, warehouse: str | None, gradients: bool,
                       retries: int, progress_id) -> dict:
    """One Prefect task per group of ``training.parallel_runs`` training runs (each visible and
    retried on its own), in this process with the model loaded once."""
    collection = start_task(config, runs, warehouse, gradients)
    results, done = {}, 0
    for group in groups(config, collection.todo):
        try:
            statuses = train_run_task.with_options(task_run_name=f"train-run-{config.name}-{group_name(group)}",
                                                   retries=retries)(collection, group)
            for run_id, status in statuses.items():
                reason = ("being trained by another process" if status == "busy"
                          else collection.summary.failed.get(run_id, ""))
                results[run_id] = {"status": status, "reason": reason}
        except Exception as error:  # noqa: BLE001 - a group lost after its retries is reported, the rest go on
            for run_id in group:
                results[run_id] = {"status": "failed", "reason": f"crashed: {error!r}"[:300]}
        done += len(group)
        update_progress_artifact(progress_id, 100.0 * done / max(1, len(collection.todo)))
    finish_task(collection)
    return results


@task(name="recorded-gradients", cache_policy=NO_CACHE)
def recorded_gradients_task(config: ExperimentConfig, warehouse: str | None) -> bool:
    """Store the checkpoints the reference run's worker took; whether there were any to store."""
    logger = get_run_logger()
    return store_recorded_gradients(config, open_warehouse(warehouse), log=logger.info, warn=logger.warning)


@task(name="gradient-checkpoints", cache_policy=NO_CACHE)
def gradient_task(config: ExperimentConfig, warehouse: str | None) -> None:
    """Train the reference run again and store its gradient checkpoints."""
    get_run_logger().info(f"training run {config.gradients.reference_run} of {config.name} again "
                          f"for its gradient checkpoints")
    store_reference_gradients(config, open_warehouse(warehouse))


@flow(name="collect-runs", log_prints=True, flow_run_name=run_name("collect"))
def collect_runs(preset: str | None = "demo", config_path: str | None = None, runs: int = 8,
                 warehouse: str | None = None, on_workers: bool = False,
                 train_deployment: str = "train-run/default", gradients: bool = True, run_retries: int = 1,
                 poll_seconds: float = 5.0) -> dict:
    """Make runs 0..runs-1 of the experiment complete; see the module docstring."""
    config = experiment_config(preset, config_path)
    wh = open_warehouse(warehouse)
    progress = create_progress_artifact(progress=0.0, key=artifact_key("collect", config.name),
                                        description=f"collect-runs {config.name}: runs trained")
    if on_workers:
        register(config, wh, prepare(config, runs))
        todo = [r for r in range(runs) if r not in complete_run_ids(wh, config.name)]
        need_gradients = gradients and not has_gradients(wh, config.name)
        reference = config.gradients.reference_run
        parameters = {tuple(group): {"run_ids": group, "preset": preset, "config_path": config_path,
                                     "warehouse": warehouse, "gradients": need_gradients and reference in group}
                      for group in groups(config, todo)}
        results = train_on_workers(config.name, warehouse, parameters, train_deployment, poll_seconds, progress,
                                   run_retries)
        ingest_shards(warehouse, config.name)
        if need_gradients and not recorded_gradients_task(config, warehouse):
            gradient_task(config, warehouse)
    else:
        results = collect_in_process(config, runs, warehouse, gradients, run_retries, progress)
        ingest_shards(warehouse, config.name)
    update_progress_artifact(progress, 100.0)
    complete = complete_run_ids(wh, config.name)
    rows = [{"run_id": r, "status": results.get(r, {}).get("status", "complete" if r in complete else "missing"),
             "reason": results.get(r, {}).get("reason", "")} for r in range(runs)]
    create_table_artifact(key=artifact_key("runs", config.name), table=rows,
                          description=f"{config.name}: {len(complete)} complete runs in the warehouse")
    failed = {r["run_id"]: r["reason"] for r in rows if r["status"] != "complete"}
    lost = sorted(r for r, result in results.items() if result["reason"].startswith("crashed"))
    if lost:
        raise RuntimeError(f"{config.name}: runs {lost} crashed on every attempt ({run_retries} retries); "
                           f"the other runs are complete and ingested; run the collection again to retry them")
    return {"experiment": config.name, "trained": sorted(results), "complete": sorted(complete), "failed": failed}


def train_on_workers(experiment: str, warehouse: str | None, parameters: dict[tuple[int, ...], dict],
                     deployment: str, poll_seconds: float, progress, retries: int) -> dict:
    """One deployment run per group of training runs (``parameters``: each group's train-run
    parameters; a group is trained together, ``training.parallel_runs`` at a time); ingest while
    they train; wait for all. A group whose flow run failed or crashed (a killed worker process
    is CRASHED, which Prefect's own retries do not cover) is dispatched again, up to ``retries``
    times; its runs' new attempts replace the partial ones (its runs that did complete are
    skipped). A group lost after that is reported ``crashed``, run by run."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()

    def dispatch(group: tuple[int, ...]):
        return run_deployment(deployment, timeout=0, as_subflow=False, parameters=parameters[group]).id

    launched = {group: dispatch(group) for group in parameters}
    attempts = dict.fromkeys(launched, 0)
    logger.info(f"dispatched {sum(map(len, launched))} runs in {len(launched)} flow runs to {deployment}")
    states: dict[tuple[int, ...], str] = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(launched):
            time.sleep(poll_seconds)
            ingest_shards(warehouse, experiment)
            for group, flow_run_id in launched.items():
                if group in states:
                    continue
                state = client.read_flow_run(flow_run_id).state
                if state is None or state.type.value not in FINAL:
                    continue
                if state.type.value != "COMPLETED" and attempts[group] < retries:
                    attempts[group] += 1
                    logger.warning(f"runs {group_name(list(group))}: flow run {state.type.value.lower()}; "
                                   f"dispatching it again ({attempts[group]}/{retries})")
                    launched[group] = dispatch(group)
                    continue
                states[group] = state.type.value
            update_progress_artifact(progress, 100.0 * len(states) / max(1, len(launched)))
    return {r: {"status": "complete" if s == "COMPLETED" else "failed",
                "reason": "" if s == "COMPLETED" else f"crashed: flow run {s.lower()} on every attempt"}
            for group, s in states.items() for r in group}
