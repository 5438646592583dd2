"""optimize-curriculum: propose the curriculum a published simulator rates best, train it for
real beside random curricula of the same shape, and report predicted against actual loss.

Training goes the way collection's does: in this process by default (the model loads once),
or, with ``on_workers``, one ``train-run`` deployment run per curriculum on the work pool,
ingesting while they train. The runs are verification runs (``optimize-proposed``,
``optimize-random``): stored and queryable, never fitted on (see :mod:`tasks.optimize`).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from simfluence.optimize import Constraints
from simfluence_platform.flows.collect import artifact_key, train_on_workers
from simfluence_platform.flows.common import run_name, warehouse as open_warehouse
from simfluence_platform.flows.ingest import ingest_shards
from simfluence_platform.tasks.config import stored_config
from simfluence_platform.storage.experiments import next_verification_run_ids
from simfluence_platform.tasks.optimize import Plan, SearchSettings, compare, propose, train_in_process


@task(name="propose-curriculum", cache_policy=NO_CACHE)
def propose_task(experiment: str, ref: str, tests: list[int] | None, constraints: Constraints, random: int,
                 settings: SearchSettings, trust_region: bool, warehouse: str | None) -> Plan:
    return propose(open_warehouse(warehouse), experiment, ref, tests, constraints, random, settings, trust_region)


@task(name="train-verification-runs", cache_policy=NO_CACHE)
def train_task(plan: Plan, run_ids: list[int], warehouse: str | None) -> dict[int, str]:
    wh = open_warehouse(warehouse)
    return train_in_process(stored_config(wh, plan.experiment), wh, plan, run_ids, log=get_run_logger().info)


@task(name="compare-predicted-actual", cache_policy=NO_CACHE)
def compare_task(plan: Plan, run_ids: list[int], warehouse: str | None) -> dict:
    return compare(open_warehouse(warehouse), plan, run_ids)


@flow(name="optimize-curriculum", log_prints=True, flow_run_name=run_name("optimize"))
def optimize_curriculum(experiment: str = "demo", ref: str = "best", tests: list[int] | None = None,
                        include: list[int] | None = None, exclude: list[int] | None = None,
                        max_repeats: int | None = None, random: int = 3, seed: int = 0, starts: int = 256,
                        iterations: int = 300, temperature: float = 0.0, trust_region: bool = True,
                        warehouse: str | None = None,
                        on_workers: bool = False, train_deployment: str = "train-run/default",
                        poll_seconds: float = 5.0, run_retries: int = 1) -> dict:
    """Propose, train (the proposal and ``random`` random curricula) and compare; see the module
    docstring. Returns :func:`tasks.optimize.compare`'s report plus the proposed ``curriculum``."""
    constraints = Constraints(tuple(include or ()), tuple(exclude or ()), max_repeats)
    settings = SearchSettings(starts=starts, iterations=iterations, temperature=temperature, seed=seed)
    plan = propose_task(experiment, ref, tests, constraints, random, settings, trust_region, warehouse)
    run_ids = next_verification_run_ids(open_warehouse(warehouse), experiment, len(plan.curricula))
    get_run_logger().info(f"{experiment}: proposed curriculum predicted {plan.predicted[0]:.4f} nats "
                          f"(best random start {plan.search_start:.4f}); training runs {run_ids}")
    if on_workers:
        progress = create_progress_artifact(progress=0.0, key=artifact_key("optimize", experiment),
                                            description=f"optimize-curriculum {experiment}: runs trained")
        parameters = {(run_id,): {"run_ids": [run_id], "preset": None, "experiment": experiment,
                                  "warehouse": warehouse, "curriculum": curriculum.tolist(), "curriculum_kind": kind}
                      for run_id, curriculum, kind in zip(run_ids, plan.curricula, plan.kinds)}
        train_on_workers(experiment, warehouse, parameters, train_deployment, poll_seconds, progress, run_retries)
    else:
        train_task(plan, run_ids, warehouse)
    ingest_shards(warehouse, experiment)
    report = compare_task(plan, run_ids, warehouse)
    create_table_artifact(key=artifact_key("optimize-runs", experiment), table=report["runs"],
                          description=f"{experiment}: proposed and random curricula, predicted against actual mean "
                                      f"final loss (nats); simulator held-out RMSE {plan.heldout_rmse:.4f}")
    return {**report, "curriculum": plan.curricula[0].tolist()}
