"""Fitting simulators from the warehouse, in parallel on Dask, and publishing them.

The unit of parallel work is a shard of test examples: test examples are independent
problems, so the Simfluence variants are cross-validated and fitted shard by shard on a Dask
cluster (a LocalCluster by default, or the scheduler at ``dask_address``). The fitting runs are
scattered to the workers once. The penalty and intercept stay global: a first pass computes
every shard's validation errors, the choice is made on all of them, and a second pass fits.

Held-out runs are chosen by run id (every ``heldout_every``-th run, ids ``k-1, 2k-1, ...``), so
the split is stable as runs are added: a later fit never trains on a run an earlier one was
judged on, and versions fitted at different times can be compared on the same held-out runs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

import simfluence as sf
from simfluence.runset import RunSet
from storage import registry
from storage.experiments import load_gradients, load_runset
from storage.warehouse import Warehouse, WarehouseError, fetch_one
from tasks.collect import complete_runs

LINEAR_FAMILY: dict[str, Callable[[], sf.SimfluenceLinear]] = {
    "simfluence_linear": lambda: sf.SimfluenceLinear(intercept="cv"),
    "simfluence_linear_paper": lambda: sf.SimfluenceLinear(parametrization="paper", intercept="cv"),
    "simfluence_additive": lambda: sf.SimfluenceAdditive(intercept="cv"),
    "simfluence_multiplicative": lambda: sf.SimfluenceMultiplicative(intercept="cv"),
}
GRADIENT_METHODS: dict[str, Callable[[sf.GradientCheckpoints], sf.Simulator]] = {
    "tracin_cp": lambda g: sf.TracInCP(g),
    "tracin_cp_rescaled": lambda g: sf.TracInCP(g, rescaled=True),
    "influence_function_rescaled": lambda g: sf.InfluenceFunction(g, rescaled=True),
}
BASELINES: dict[str, Callable[[], sf.Simulator]] = {
    "mean_trajectory": sf.MeanTrajectory,
    "constant": sf.Constant,
}
ALL_METHODS = [*LINEAR_FAMILY, *GRADIENT_METHODS, *BASELINES]
PRIMARY = "simfluence_linear"


class FitError(ValueError):
    """A fit that cannot be done (unknown method, too few runs)."""


@dataclass(frozen=True)
class Published:
    method: str
    version: str
    seconds: float


def split_runs(run_ids: np.ndarray, heldout_every: int) -> tuple[np.ndarray, np.ndarray]:
    """(fitting ids, held-out ids): run ``r`` is held out when ``r % heldout_every == heldout_every - 1``."""
    if heldout_every < 2:
        raise FitError(f"heldout_every must be at least 2, got {heldout_every}")
    held = run_ids % heldout_every == heldout_every - 1
    if held.sum() < 2 or (~held).sum() < 2:
        raise FitError(f"{len(run_ids)} complete runs give {int(held.sum())} held-out and {int((~held).sum())} "
                       f"fitting runs with heldout_every={heldout_every}; collect more runs (need 2 of each)")
    return run_ids[~held], run_ids[held]


def data_hash(runs: RunSet) -> str:
    """sha256 of the fitting data (run ids, curricula, losses)."""
    digest = hashlib.sha256()
    for array in (runs.run_ids, runs.test_ids, runs.batches, runs.losses):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@contextmanager
def dask_client(address: str | None, n_workers: int = 2) -> Iterator:
    """A client of the scheduler at ``address`` (``tcp://host:8786``), or of a LocalCluster of
    ``n_workers`` single-threaded in-process workers."""
    from distributed import Client, LocalCluster

    if address:
        if not address.startswith(("tcp://", "tls://", "inproc://")) and "://" in address:
            raise FitError(f"dask address {address!r}: use tcp://host:8786")
        with Client(address, timeout="30s") as client:
            yield client
    else:
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=False, dashboard_address=None) as c, \
                Client(c) as client:
            yield client


def _shard_cv_errors(method: str, runs: RunSet, tests: np.ndarray) -> np.ndarray:
    simulator = LINEAR_FAMILY[method]()
    simulator.threads = 1
    return simulator.cross_validation_errors(runs.select_tests(tests))


def _shard_fit(method: str, runs: RunSet, tests: np.ndarray, intercept: str, l2) -> sf.SimfluenceLinear:
    simulator = LINEAR_FAMILY[method]()
    simulator.threads = 1
    penalty = l2 if np.ndim(l2) == 0 else np.asarray(l2)[tests]
    return simulator.fit_with(runs.select_tests(tests), intercept, penalty)


def fit_linear_on_dask(client, method: str, runs: RunSet, shard_size: int) -> sf.SimfluenceLinear:
    """Cross-validate and fit one Simfluence variant over shards of test examples."""
    shards = [np.arange(s, min(s + shard_size, runs.n_tests)) for s in range(0, runs.n_tests, shard_size)]
    scattered = client.scatter(runs, broadcast=True)
    errors = client.gather(client.map(_shard_cv_errors, [method] * len(shards), [scattered] * len(shards), shards,
                                      pure=False))
    chooser = LINEAR_FAMILY[method]()
    intercept, l2 = chooser.choose(np.concatenate(errors, axis=2))
    parts = client.gather(client.map(_shard_fit, [method] * len(shards), [scattered] * len(shards), shards,
                                     [intercept] * len(shards), [l2] * len(shards), pure=False))
    whole = sf.SimfluenceLinear.concatenate(parts)
    whole.cv_scores = chooser.cv_scores
    return whole


def fit_and_publish(
    warehouse: Warehouse,
    experiment: str,
    methods: list[str] | None = None,
    heldout_every: int = 5,
    dask_address: str | None = None,
    n_workers: int = 2,
    shard_size: int = 64,
    log: Callable[[str], None] = print,
) -> list[Published]:
    """Fit each method on the fitting runs of the experiment and publish it to the registry.

    Every version gets the alias ``latest-<method>``; the primary method also ``latest``.
    """
    methods = list(methods or ALL_METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise FitError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    with warehouse.reader() as con:
        row = fetch_one(con, "SELECT config_hash FROM experiments WHERE experiment = ?", [experiment])
    if row is None:
        raise WarehouseError(f"unknown experiment {experiment!r}")
    config_hash = row[0]
    fit_ids, held_ids = split_runs(np.array(sorted(complete_runs(warehouse, experiment)), dtype=np.int64),
                                   heldout_every)
    fitting = load_runset(warehouse, experiment, run_ids=fit_ids)
    gradients = None
    if any(m in GRADIENT_METHODS for m in methods):
        try:
            gradients = load_gradients(warehouse, experiment)
        except WarehouseError as error:
            log(f"skipping the gradient baselines: {error}")
            methods = [m for m in methods if m not in GRADIENT_METHODS]
    digest = data_hash(fitting)
    published = []
    with dask_client(dask_address, n_workers) as client:
        log(f"fitting {len(methods)} methods on {len(fit_ids)} runs ({len(held_ids)} held out) of {experiment!r}, "
            f"{fitting.n_tests} test examples, Dask {client.scheduler.address}")
        for method in methods:
            start = time.perf_counter()
            if method in LINEAR_FAMILY:
                simulator = fit_linear_on_dask(client, method, fitting, shard_size)
            elif method in GRADIENT_METHODS:
                simulator = GRADIENT_METHODS[method](gradients).fit(fitting)
            else:
                simulator = BASELINES[method]().fit(fitting)
            seconds = time.perf_counter() - start
            aliases = (f"latest-{method.replace('_', '-')}",) + (("latest",) if method == PRIMARY else ())
            info = registry.publish(warehouse, experiment, simulator, fit_run_ids=fit_ids, heldout_run_ids=held_ids,
                                    data_hash=digest, config_hash=config_hash, aliases=aliases, name=method)
            log(f"  {method}: version {info.version} in {seconds:.1f} s")
            published.append(Published(method, info.version, seconds))
    return published
