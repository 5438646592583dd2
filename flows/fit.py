"""fit-simulators: fit every requested method on Dask and publish each to the registry."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from simfluence_platform.flows.collect import artifact_key
from simfluence_platform.flows.common import warehouse as open_warehouse
from simfluence_platform.tasks.fit import FitJob, fit_method, plan_fit
from simfluence_platform.tasks.steps import FIT


@task(name="plan-fit", cache_policy=NO_CACHE)
def plan_task(warehouse: str | None, experiment: str, methods: list[str] | None, heldout_every: int,
              dask_address: str | None, n_workers: int, shard_size: int) -> FitJob:
    return plan_fit(open_warehouse(warehouse), experiment, methods, heldout_every, dask_address, n_workers,
                    shard_size, log=get_run_logger().info)


@task(name="fit-method", cache_policy=NO_CACHE)
def fit_method_task(job: FitJob, method: str) -> dict:
    """One method: fitted (on Dask for the sharded family), published; retried on its own."""
    published = fit_method(job, method, log=get_run_logger().info)
    return {"method": published.method, "version": published.version, "fit_seconds": round(published.seconds, 3)}


@flow(name="fit-simulators", log_prints=True, flow_run_name="fit-{experiment}")
def fit_simulators(experiment: str = "demo", methods: list[str] | None = None, heldout_every: int = FIT.heldout_every,
                   dask_address: str | None = None, n_workers: int = FIT.n_workers, shard_size: int = FIT.shard_size,
                   warehouse: str | None = None) -> list[dict]:
    """Split the complete runs (every ``heldout_every``-th run id held out), fit each method
    (Simfluence variants in shards of test examples on Dask: a LocalCluster, or a scheduler the
    worker's environment allows, see ``tasks.fit.dask_scheduler``: ``dask_address`` must be one of
    them), and publish a bundle per method (aliases ``latest-<method>``, ``latest``)."""
    job = plan_task(warehouse, experiment, methods, heldout_every, dask_address, n_workers, shard_size)
    rows = [fit_method_task.with_options(task_run_name=f"fit-{experiment}-{method}")(job, method)
            for method in job.methods]
    create_table_artifact(key=artifact_key("fit", experiment), table=rows,
                          description=f"simulators fitted for {experiment}")
    return rows
