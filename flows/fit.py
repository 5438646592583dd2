"""fit-simulators: fit every requested method on Dask and publish each to the registry."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from simfluence_platform.flows.collect import artifact_key
from simfluence_platform.flows.common import warehouse as open_warehouse
from simfluence_platform.tasks.fit import fit_and_publish
from simfluence_platform.tasks.steps import FIT


@task(name="fit-and-publish", cache_policy=NO_CACHE)
def fit_task(warehouse: str | None, experiment: str, methods: list[str] | None, heldout_every: int,
             dask_address: str | None, n_workers: int, shard_size: int) -> list[dict]:
    published = fit_and_publish(open_warehouse(warehouse), experiment, methods, heldout_every, dask_address,
                                n_workers, shard_size)
    return [{"method": p.method, "version": p.version, "fit_seconds": round(p.seconds, 3)} for p in published]


@flow(name="fit-simulators", log_prints=True)
def fit_simulators(experiment: str = "demo", methods: list[str] | None = None, heldout_every: int = FIT.heldout_every,
                   dask_address: str | None = None, n_workers: int = FIT.n_workers, shard_size: int = FIT.shard_size,
                   warehouse: str | None = None) -> list[dict]:
    """Split the complete runs (every ``heldout_every``-th run id held out), fit each method
    (Simfluence variants in shards of test examples on Dask: a LocalCluster, or the scheduler at
    ``dask_address``), and publish a bundle per method (aliases ``latest-<method>``, ``latest``)."""
    rows = fit_task(warehouse, experiment, methods, heldout_every, dask_address, n_workers, shard_size)
    create_table_artifact(key=artifact_key("fit", experiment), table=rows,
                          description=f"simulators fitted for {experiment}")
    return rows
