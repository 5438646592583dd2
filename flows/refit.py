"""refit: scheduled re-fitting that acts only when new complete runs exist.

It fits and evaluates every method when complete runs were added since the ``latest`` version
was fitted (``latest`` moves with the fit); the evaluation moves ``best`` to the new version with
the lowest held-out MSE among the curriculum-aware methods only when it beats the current
``best`` on the same held-out runs (``tasks.evaluate.promote_best``). Otherwise it is a no-op
that says so.
"""

from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger

from simfluence_platform.flows.common import warehouse as open_warehouse
from simfluence_platform.flows.evaluate import evaluate_simulators
from simfluence_platform.flows.fit import fit_simulators
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import complete_run_ids
from simfluence_platform.tasks.fit import FitError, split_runs
from simfluence_platform.tasks.steps import FIT, EVALUATE


@flow(name="refit", log_prints=True, flow_run_name="refit-{experiment}")
def refit(experiment: str = "demo", methods: list[str] | None = None, heldout_every: int = FIT.heldout_every,
          dask_address: str | None = None, n_boot: int = EVALUATE.n_boot, warehouse: str | None = None) -> dict:
    logger = get_run_logger()
    wh = open_warehouse(warehouse)
    complete = complete_run_ids(wh, experiment)
    if not complete:  # also before the warehouse exists: a schedule may fire before the first collection
        logger.info(f"experiment {experiment!r} has no complete runs yet; nothing to refit")
        return {"refit": False, "latest": None, "best": None}
    try:
        latest = registry.resolve(wh, experiment, "latest")
        seen = set(latest.manifest["fit_run_ids"]) | set(latest.manifest["heldout_run_ids"])
    except registry.RegistryError:
        latest, seen = None, set()
    if latest is not None and complete <= seen:
        logger.info(f"no new complete runs since version {latest.version} ({len(complete)} runs); nothing to refit")
        return {"refit": False, "latest": latest.version, "best": registry.alias_version(wh, experiment, "best")}
    try:
        split_runs(np.array(sorted(complete), dtype=np.int64), heldout_every)
    except FitError as error:
        logger.info(f"not enough complete runs to fit yet: {error}")
        return {"refit": False, "latest": None if latest is None else latest.version, "best": None}
    logger.info(f"{len(complete - seen)} new complete runs; refitting")
    fit_simulators(experiment, methods, heldout_every, dask_address, warehouse=warehouse)
    evaluation = evaluate_simulators(experiment, None, n_boot, warehouse)  # every method: the standing report
    return {"refit": True, "latest": registry.alias_version(wh, experiment, "latest"), "best": evaluation["best"],
            "moved_best": evaluation["moved_best"]}
