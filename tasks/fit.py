"""Fitting simulators from the warehouse, in parallel on Dask, and publishing them.

The unit of parallel work is a shard of test examples: test examples are independent
problems, so the Simfluence variants are cross-validated and fitted shard by shard on a Dask
cluster (a LocalCluster by default, or a scheduler this process is allowed to use: see
:func:`dask_scheduler`). The fitting runs are scattered to the workers once. The penalty and
intercept stay global: a first pass computes every shard's validation errors, the choice is
made on all of them, and a second pass fits.

Held-out runs are chosen by run id (every ``heldout_every``-th run, ids ``k-1, 2k-1, ...``), so
the split is stable as runs are added: a later fit never trains on a run an earlier one was
judged on, and versions fitted at different times can be compared on the same held-out runs.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

import simfluence as sf
from simfluence.runset import RunSet
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import (
    ExperimentInfo,
    complete_run_ids,
    experiment_info,
    load_gradients,
    load_runset,
)
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError
from simfluence_platform.tasks.config import optimizer_spec
from simfluence_platform.errors import UserError
from simfluence_platform.tasks.steps import FIT

@dataclass(frozen=True)
class FitContext:
    """What a method may need beyond the runs: the experiment's gradient checkpoints (None
    when none are stored) and its training optimizer."""

    gradients: sf.GradientCheckpoints | None
    optimizer: sf.OptimizerSpec


@dataclass(frozen=True)
class Method:
    """One fittable method: its name (the bundle's alias is ``latest-<name with dashes>``), a
    label for tables, how to build it unfitted, and how it is fitted.

    ``sharded``: cross-validated and fitted in shards of test examples on Dask (the
    Simfluence-Linear family, whose test examples are independent problems). ``needs``:
    ``gradients`` (any checkpoints) or ``preconditioned`` (Adam-preconditioned ones)."""

    name: str
    label: str
    build: Callable[[FitContext], sf.Simulator]
    sharded: bool = False
    needs: str | None = None

    @property
    def alias(self) -> str:
        return f"latest-{self.name.replace('_', '-')}"


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("simfluence_momentum", "Simfluence-Momentum (gradient prior, CV by MSE)",
           lambda c: sf.SimfluenceMomentum(c.optimizer, c.gradients)),
    Method("simfluence_momentum_spearman", "Simfluence-Momentum (gradient prior, CV by ranking)",
           lambda c: sf.SimfluenceMomentum(c.optimizer, c.gradients, select="spearman")),
    Method("simfluence_linear", "Simfluence-Linear (paper model)",
           lambda c: sf.SimfluenceLinear(intercept="cv"), sharded=True),
    Method("simfluence_linear_paper", "Simfluence-Linear, paper parametrisation",
           lambda c: sf.SimfluenceLinear(parametrization="paper", intercept="cv"), sharded=True),
    Method("simfluence_additive", "Simfluence-Additive", lambda c: sf.SimfluenceAdditive(intercept="cv"), sharded=True),
    Method("simfluence_multiplicative", "Simfluence-Multiplicative",
           lambda c: sf.SimfluenceMultiplicative(intercept="cv"), sharded=True),
    Method("tracin_cp", "TracIn-CP (latest checkpoint)", lambda c: sf.TracInCP(c.gradients), needs="gradients"),
    Method("tracin_cp_rescaled", "TracIn-CP, rescaled", lambda c: sf.TracInCP(c.gradients, rescaled=True),
           needs="gradients"),
    Method("tracin_cp_sum_rescaled", "TracIn-CP, sum over checkpoints, rescaled",
           lambda c: sf.TracInCP(c.gradients, rescaled=True, form="sum"), needs="gradients"),
    Method("tracin_cp_adam_rescaled", "TracIn-CP, Adam-preconditioned, rescaled",
           lambda c: sf.TracInCP(c.gradients, rescaled=True, preconditioned=True), needs="preconditioned"),
    Method("influence_function_rescaled", "Influence functions, rescaled",
           lambda c: sf.InfluenceFunction(c.gradients, rescaled=True), needs="gradients"),
    Method("mean_trajectory", "Mean trajectory (curriculum-blind)", lambda c: sf.MeanTrajectory()),
    Method("constant", "Constant (no learning)", lambda c: sf.Constant()),
]}
ALL_METHODS = list(METHODS)
PRIMARY = "simfluence_momentum"


class FitError(UserError, ValueError):
    """A fit that cannot be done (unknown method, too few runs)."""


class DaskAddressError(FitError):
    """A Dask scheduler this process is not allowed to connect to."""


DASK_ADDRESS_ENV = "SIMFLUENCE_DASK_ADDRESS"
DASK_ALLOWED_ENV = "SIMFLUENCE_DASK_ALLOWED"


def allowed_dask_addresses() -> list[str]:
    """The schedulers this process may connect to: ``$SIMFLUENCE_DASK_ADDRESS`` and the
    comma-separated ``$SIMFLUENCE_DASK_ALLOWED`` (``tcp://host:8786,...``)."""
    named = [os.environ.get(DASK_ADDRESS_ENV, "")] + os.environ.get(DASK_ALLOWED_ENV, "").split(",")
    return [address.strip() for address in named if address.strip()]


def allow_dask_address(address: str) -> None:
    """Add ``address`` to this process's allow-list (the CLI does so for its own ``--dask-address``)."""
    listed = [a for a in os.environ.get(DASK_ALLOWED_ENV, "").split(",") if a.strip()]
    os.environ[DASK_ALLOWED_ENV] = ",".join([*listed, address])


def dask_scheduler(requested: str | None) -> str | None:
    """The Dask scheduler a fit connects to: ``requested`` when this process allows it (see
    :func:`allowed_dask_addresses`), else ``$SIMFLUENCE_DASK_ADDRESS``, else None (a LocalCluster).

    A Dask client and its scheduler exchange pickles, so whoever runs the scheduler can run code
    in the client: the address comes from the environment of the process that fits (a worker's,
    or the user's own command line), never from a run parameter alone."""
    if requested is None:
        return os.environ.get(DASK_ADDRESS_ENV, "").strip() or None
    if requested not in allowed_dask_addresses():
        raise DaskAddressError(
            f"dask address {requested!r} is not allowed here: a fit connects only to a scheduler named in "
            f"{DASK_ADDRESS_ENV} or {DASK_ALLOWED_ENV} (comma-separated) in the environment of the process that "
            f"fits (a deployment's worker); `simfluence fit --dask-address` allows the address it is given")
    return requested


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
    """A client of the scheduler at ``address`` (``tcp://host:8786``; vetted by
    :func:`dask_scheduler`), or of a LocalCluster of ``n_workers`` single-threaded in-process
    workers."""
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


def _linear(method: str) -> sf.SimfluenceLinear:
    simulator = METHODS[method].build(FitContext(None, sf.OptimizerSpec()))
    assert isinstance(simulator, sf.SimfluenceLinear)
    return simulator


def _shard_cv_errors(method: str, runs: RunSet, tests: np.ndarray) -> np.ndarray:
    simulator = _linear(method)
    simulator.threads = 1
    return simulator.cross_validation_errors(runs.select_tests(tests))


def _shard_fit(method: str, runs: RunSet, tests: np.ndarray, intercept: str, l2) -> sf.SimfluenceLinear:
    simulator = _linear(method)
    simulator.threads = 1
    penalty = l2 if np.ndim(l2) == 0 else np.asarray(l2)[tests]
    return simulator.fit_with(runs.select_tests(tests), intercept, penalty)


def fit_linear_on_dask(client, method: str, runs: RunSet, shard_size: int) -> sf.SimfluenceLinear:
    """Cross-validate and fit one Simfluence variant over shards of test examples."""
    shards = [np.arange(s, min(s + shard_size, runs.n_tests)) for s in range(0, runs.n_tests, shard_size)]
    scattered = client.scatter(runs, broadcast=True)
    errors = client.gather(client.map(_shard_cv_errors, [method] * len(shards), [scattered] * len(shards), shards,
                                      pure=False))
    chooser = _linear(method)
    intercept, l2 = chooser.choose(np.concatenate(errors, axis=2))
    parts = client.gather(client.map(_shard_fit, [method] * len(shards), [scattered] * len(shards), shards,
                                     [intercept] * len(shards), [l2] * len(shards), pure=False))
    whole = sf.SimfluenceLinear.concatenate(parts)
    whole.cv_scores = chooser.cv_scores
    return whole


@dataclass(frozen=True)
class FitJob:
    """Everything the methods of one fit share: the split, the fitting runs, the gradients and
    optimizer, and where the bundles go."""

    warehouse: Warehouse
    experiment: str
    methods: list[str]
    primary: str
    fitting: RunSet
    fit_ids: np.ndarray
    held_ids: np.ndarray
    context: FitContext
    data_hash: str
    config_hash: str
    dask_address: str | None
    n_workers: int
    shard_size: int


def check_fit_request(warehouse: Warehouse, experiment: str, methods: list[str] | None,
                      heldout_every: int) -> tuple[list[str], ExperimentInfo, tuple[np.ndarray, np.ndarray]]:
    """What can fail on bad input, checked before any work: the method names, the experiment,
    and enough complete runs for the split. Returns (methods, experiment info, (fit ids, held-out ids))."""
    methods = list(methods or ALL_METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise FitError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    info = experiment_info(warehouse, experiment)
    split = split_runs(np.array(sorted(complete_run_ids(warehouse, experiment)), dtype=np.int64), heldout_every)
    return methods, info, split


def plan_fit(
    warehouse: Warehouse,
    experiment: str,
    methods: list[str] | None = None,
    heldout_every: int = FIT.heldout_every,
    dask_address: str | None = None,
    n_workers: int = FIT.n_workers,
    shard_size: int = FIT.shard_size,
    log: Callable[[str], None] = print,
) -> FitJob:
    """Check the methods, split the complete runs (every ``heldout_every``-th run id held out)
    and read what the methods need. Methods whose gradients the experiment lacks are skipped
    with a message. ``latest`` goes to the primary method (Simfluence-Momentum) when it is
    fitted, else to the first Simfluence method, else to the first method. A ``dask_address``
    this process does not allow is refused here, before anything connects (:func:`dask_scheduler`)."""
    dask_address = dask_scheduler(dask_address)
    methods, info, (fit_ids, held_ids) = check_fit_request(warehouse, experiment, methods, heldout_every)
    fitting = load_runset(warehouse, experiment, run_ids=fit_ids)
    gradients = None
    if any(METHODS[m].needs or m.startswith("simfluence_momentum") for m in methods):
        try:
            gradients = load_gradients(warehouse, experiment)
        except WarehouseError as error:
            log(f"no gradient checkpoints, so no gradient baselines or gradient prior: {error}")
    available = {None, "gradients", "preconditioned"} if gradients is not None else {None}
    if gradients is not None and gradients.train_grads_preconditioned is None:
        available.discard("preconditioned")
    skipped = [m for m in methods if METHODS[m].needs not in available]
    if skipped:
        log(f"skipping {', '.join(skipped)}: the experiment has no {METHODS[skipped[0]].needs} gradients")
    methods = [m for m in methods if m not in skipped]
    if not methods:
        raise FitError(f"none of the methods can be fitted on experiment {experiment!r}")
    primary = PRIMARY if PRIMARY in methods else next((m for m in methods if m.startswith("simfluence")), methods[0])
    context = FitContext(gradients, optimizer_spec(info.config.get("training", {})))
    log(f"fitting {len(methods)} methods on {len(fit_ids)} runs ({len(held_ids)} held out) of {experiment!r}, "
        f"{fitting.n_tests} test examples")
    return FitJob(warehouse, experiment, methods, primary, fitting, fit_ids, held_ids, context, data_hash(fitting),
                  info.config_hash, dask_address, n_workers, shard_size)


def fit_method(job: FitJob, method: str, log: Callable[[str], None] = print) -> Published:
    """Fit one method of the job (the Simfluence-Linear family in shards of test examples on
    Dask) and publish its bundle."""
    start = time.perf_counter()
    if METHODS[method].sharded:
        with dask_client(job.dask_address, job.n_workers) as client:
            simulator = fit_linear_on_dask(client, method, job.fitting, job.shard_size)
    else:
        simulator = METHODS[method].build(job.context).fit(job.fitting)
    seconds = time.perf_counter() - start
    aliases = (METHODS[method].alias,) + (("latest",) if method == job.primary else ())
    bundle = registry.publish(job.warehouse, job.experiment, simulator, fit_run_ids=job.fit_ids,
                              heldout_run_ids=job.held_ids, data_hash=job.data_hash, config_hash=job.config_hash,
                              aliases=aliases, name=method)
    log(f"  {method}: version {bundle.version} in {seconds:.1f} s")
    return Published(method, bundle.version, seconds)


def fit_and_publish(warehouse: Warehouse, experiment: str, methods: list[str] | None = None,
                    heldout_every: int = FIT.heldout_every, dask_address: str | None = None,
                    n_workers: int = FIT.n_workers, shard_size: int = FIT.shard_size,
                    log: Callable[[str], None] = print) -> list[Published]:
    """:func:`plan_fit`, then :func:`fit_method` for each method (the fit-simulators flow does
    the same with one Prefect task per method)."""
    job = plan_fit(warehouse, experiment, methods, heldout_every, dask_address, n_workers, shard_size, log)
    return [fit_method(job, method, log) for method in job.methods]
