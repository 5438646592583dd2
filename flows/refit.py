"""refit: scheduled re-fitting that acts only when new complete runs exist.

It fits and evaluates every method when complete runs were added since the ``latest`` version
was fitted (``latest`` moves with the fit), and moves ``best`` to the new version with the
lowest held-out MSE among the curriculum-aware methods only when it beats the current ``best``
on the same held-out runs. Otherwise it is a no-op that says so.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from prefect import flow, get_run_logger

from simfluence_platform.flows.common import warehouse as open_warehouse
from simfluence_platform.flows.evaluate import evaluate_simulators
from simfluence_platform.flows.fit import fit_simulators
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import complete_run_ids
from simfluence_platform.tasks.evaluate import best_version, evaluate
from simfluence_platform.tasks.fit import FitError, split_runs
from simfluence_platform.tasks.steps import FIT, EVALUATE


@flow(name="refit", log_prints=True)
def refit(experiment: str = "demo", methods: list[str] | None = None, heldout_every: int = FIT.heldout_every,
          dask_address: str | None = None, n_boot: int = EVALUATE.n_boot, warehouse: str | None = None) -> dict:
    logger = get_run_logger()
    wh = open_warehouse(warehouse)
    complete = complete_run_ids(wh, experiment)
    try:
        latest = registry.resolve(wh, experiment, "latest")
        seen = set(latest.manifest["fit_run_ids"]) | set(latest.manifest["heldout_run_ids"])
    except registry.RegistryError:
        latest, seen = None, set()
    if latest is not None and complete <= seen:
        logger.info(f"no new complete runs since version {latest.version} ({len(complete)} runs); nothing to refit")
        return {"refit": False, "latest": latest.version, "best": _alias(wh, experiment, "best")}
    try:
        split_runs(np.array(sorted(complete), dtype=np.int64), heldout_every)
    except FitError as error:
        logger.info(f"not enough complete runs to fit yet: {error}")
        return {"refit": False, "latest": None if latest is None else latest.version, "best": None}
    logger.info(f"{len(complete - seen)} new complete runs; refitting")
    published = fit_simulators(experiment, methods, heldout_every, dask_address, warehouse=warehouse)
    evaluation = evaluate_simulators(experiment, [f"latest-{p['method'].replace('_', '-')}" for p in published],
                                     n_boot, warehouse)
    scores = pl.DataFrame(evaluation["scores"])
    new = best_version(scores)
    latest_version = _alias(wh, experiment, "latest")
    if new is None:
        logger.info("no curriculum-aware method was fitted; best stays where it is")
        return {"refit": True, "latest": latest_version, "best": _alias(wh, experiment, "best"), "moved_best": False}
    new_mse = scores.filter((pl.col("version") == new) & (pl.col("metric") == "all_steps_mse"))["value"][0]
    best = _alias(wh, experiment, "best")
    moved = best is None
    if best is not None and best != new:
        held = registry.resolve(wh, experiment, new).manifest["heldout_run_ids"]
        best_scores = evaluate(wh, experiment, [best], n_boot=n_boot, heldout_run_ids=held)
        best_mse = best_scores.filter(best_scores["metric"] == "all_steps_mse")["value"][0]
        moved = new_mse < best_mse
        logger.info(f"held-out MSE on the same runs: new {new_mse:.4g}, best {best_mse:.4g}")
    if moved:
        registry.set_alias(wh, experiment, "best", new)
        logger.info(f"best -> {new}")
    return {"refit": True, "latest": latest_version, "best": new if moved else best, "moved_best": moved}


def _alias(wh, experiment: str, alias: str) -> str | None:
    try:
        return registry.resolve(wh, experiment, alias).version
    except registry.RegistryError:
        return None
