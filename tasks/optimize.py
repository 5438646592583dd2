"""Curriculum optimisation, verified: propose a curriculum with a published simulator, train it
for real beside random curricula of the same shape, and compare predicted with actual losses.

The verification runs are stored like any run (shards, ingest) with ``curriculum_kind``
``optimize-proposed`` or ``optimize-random`` and run ids from ``VERIFICATION_RUN_BASE`` up, so
fitting, evaluation and refit never take them for sampled runs (see
:mod:`simfluence_platform.storage.experiments`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from simfluence import optimize
from simfluence.optimize import Constraints
from simfluence.whatif import test_positions
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import (
    VERIFICATION_KINDS,
    complete_run_ids,
    load_runset,
    max_repeats_in_runs,
)
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.config import ExperimentConfig
from simfluence_platform.tasks.whatif import Question, ask, heldout_error, heldout_runs

PROPOSED, RANDOM = VERIFICATION_KINDS


@dataclass(frozen=True)
class SearchSettings:
    """How hard :func:`simfluence.optimize.optimize` searches (see there) and its seed."""

    starts: int = 256
    iterations: int = 300
    candidates: int = 64
    temperature: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Plan:
    """A proposed curriculum and the random ones to train beside it.

    ``curricula: int64[1 + N, T, b]`` (the proposal first); ``predicted: float64[1 + N]`` their
    simulated mean final loss (nats) over ``tests`` (at ``positions`` of the simulator's test
    examples) from the base run's initial losses;
    ``heldout_rmse``: the simulator's root-mean-square error (nats) of that quantity on its
    held-out runs, and ``heldout_spread`` the standard deviation of the observed quantity across
    them (how much curricula move it at all); ``constraints`` those in force and
    ``fitted_max_repeats`` the most repeats of one example in a fitting run; ``trust_region``
    whether the search kept to the fitting runs' range (:func:`check_request`)."""

    experiment: str
    version: str
    method: str
    base_run: int
    test_ids: list[int]
    positions: np.ndarray
    curricula: np.ndarray
    predicted: np.ndarray
    search_start: float
    evaluations: int
    heldout_rmse: float
    heldout_spread: float
    n_heldout: int
    constraints: Constraints
    fitted_max_repeats: int
    trust_region: bool

    @property
    def kinds(self) -> list[str]:
        return [PROPOSED] + [RANDOM] * (len(self.curricula) - 1)


@dataclass(frozen=True)
class Request:
    """A checked optimisation request: the simulator and base run (``question``), the test
    positions, the slots ``bool[T, b]`` of the experiment's runs, the constraints in force and the
    feasible search space they make, and the most repeats of one example within one of the
    simulator's fitting runs."""

    question: Question
    positions: np.ndarray
    slots: np.ndarray
    constraints: Constraints
    space: optimize.Space
    fitted_max_repeats: int


def check_request(warehouse: Warehouse, experiment: str, ref: str = "best", tests: list[int] | None = None,
                  constraints: Constraints = Constraints(), trust_region: bool = True) -> Request:
    """Check a request (unknown ref, test or example ids, impossible constraints raise, naming
    the value) and, with ``trust_region``, keep the search where the simulator has data: without
    ``max_repeats``, no example may appear more often than one ever did in a run the simulator
    was fitted on, and no simulated loss may leave the range (per test example, over every step)
    of the losses observed in those runs. Outside them the simulator extrapolates, and a search
    finds the curricula where it extrapolates worst (see the README's measurements)."""
    question = ask(warehouse, experiment, ref)
    simulator = question.simulator
    positions = test_positions(simulator, question.initial_loss, tests)
    fitted = max_repeats_in_runs(warehouse, experiment, question.fit_run_ids)
    if trust_region and constraints.max_repeats is None and fitted:
        constraints = replace(constraints, max_repeats=fitted)
    slots = question.curriculum >= 0
    space = optimize.search_space(simulator.n_train, slots, constraints)  # raises on impossible constraints
    return Request(question, positions, slots, constraints, space, fitted)


def loss_range(warehouse: Warehouse, experiment: str, question: Question) -> np.ndarray:
    """``float[2, m]``: the lowest and highest loss (per test example, over every step) in the
    runs the simulator was fitted on: the trust region of :func:`check_request`."""
    seen = load_runset(warehouse, experiment, run_ids=question.fit_run_ids, test_ids=question.simulator.test_ids)
    return np.stack([seen.losses.min(axis=(0, 1)), seen.losses.max(axis=(0, 1))])


def propose(warehouse: Warehouse, experiment: str, ref: str = "best", tests: list[int] | None = None,
            constraints: Constraints = Constraints(), random: int = 3,
            settings: SearchSettings = SearchSettings(), trust_region: bool = True) -> Plan:
    """Search curricula shaped like the experiment's runs (the slots of its first held-out run)
    under the constraints of :func:`check_request` for the lowest simulated mean final loss over
    ``tests`` (ids; default all) from that run's initial losses, and draw ``random`` feasible
    random curricula to train beside the proposal."""
    request = check_request(warehouse, experiment, ref, tests, constraints, trust_region)
    question, positions = request.question, request.positions
    simulator = question.simulator
    bounds = loss_range(warehouse, experiment, question) if trust_region else None  # read only to search
    proposal = optimize.optimize(simulator, question.initial_loss, request.slots, request.constraints,
                                 tests=positions, starts=settings.starts, iterations=settings.iterations,
                                 candidates=settings.candidates, temperature=settings.temperature,
                                 bounds=bounds, seed=settings.seed)
    others = optimize.random_curricula(request.space, random, np.random.default_rng([settings.seed, 1]))
    chosen = np.concatenate([proposal.curriculum[None], others])
    predicted = optimize.final_loss(simulator, chosen, question.initial_loss, positions)
    error = heldout_error(question, heldout_runs(warehouse, experiment, question), positions)
    return Plan(experiment, question.version, question.name, int(question.run_id),
                [int(t) for t in simulator.test_ids[positions]], positions, chosen, predicted, proposal.start,
                proposal.evaluations, error.mean, error.spread, len(question.heldout_run_ids), request.constraints,
                request.fitted_max_repeats, trust_region)


def train_in_process(config: ExperimentConfig, warehouse: Warehouse, plan: Plan, run_ids: list[int],
                     log: Callable[[str], None] = lambda message: None) -> dict[int, str]:
    """Train the plan's curricula as the runs ``run_ids`` in this process (the model loaded once);
    returns each run's status. The caller ingests them."""
    from simfluence_platform.tasks.collect import train_run
    from simfluence_platform.tasks.data import load_examples
    from simfluence_platform.tasks.training import Trainer

    trainer = Trainer(config, load_examples(config.data, config.model.task))
    status = {}
    for run_id, curriculum, kind in zip(run_ids, plan.curricula, plan.kinds):
        outcome = train_run(config, trainer, warehouse, run_id, batches=curriculum, curriculum_kind=kind)
        status[run_id] = outcome.status
        log(f"run {run_id} ({kind}): {outcome.status}" + (f" ({outcome.reason})" if outcome.reason else ""))
    return status


def compare(warehouse: Warehouse, plan: Plan, run_ids: list[int]) -> dict:
    """Predicted against actual mean final loss (nats, over the plan's tests) of each trained
    run; the prediction here starts from the run's own initial losses, as held-out evaluation
    does. A run that did not complete has ``actual`` None."""
    simulator, _ = registry.load(warehouse, plan.experiment, plan.version)
    positions = plan.positions
    done = complete_run_ids(warehouse, plan.experiment, verification=True)
    trained = [r for r in run_ids if r in done]
    predicted: dict[int, float] = {}
    actual: dict[int, float] = {}
    if trained:
        runs = load_runset(warehouse, plan.experiment, run_ids=trained, test_ids=simulator.test_ids)
        simulated = simulator.simulate(runs.batches, runs.initial_loss)[:, -1, positions].mean(axis=1)
        actual = dict(zip(trained, runs.losses[:, -1, positions].mean(axis=1).tolist()))
        predicted = dict(zip(trained, simulated.tolist()))
    rows = [{"role": "proposed" if kind == PROPOSED else "random", "run_id": run_id,
             "predicted_at_search": float(searched), "predicted": predicted.get(run_id), "actual": actual.get(run_id)}
            for run_id, kind, searched in zip(run_ids, plan.kinds, plan.predicted)]
    proposed, randoms = rows[0], [r for r in rows[1:] if r["actual"] is not None]
    summary = {"proposed_actual": proposed["actual"],
               "random_actual_mean": float(np.mean([r["actual"] for r in randoms])) if randoms else None,
               "random_actual_min": min((r["actual"] for r in randoms), default=None)}
    if proposed["actual"] is not None and randoms:
        summary["actual_improvement"] = summary["random_actual_mean"] - proposed["actual"]
        summary["predicted_improvement"] = float(np.mean([r["predicted"] for r in randoms]) - proposed["predicted"])
        summary["proposed_beats_every_random"] = proposed["actual"] < summary["random_actual_min"]
    return {"experiment": plan.experiment, "version": plan.version, "method": plan.method,
            "base_run": plan.base_run, "tests": plan.test_ids, "runs": rows, "summary": summary,
            "heldout_rmse": plan.heldout_rmse, "heldout_spread": plan.heldout_spread, "n_heldout": plan.n_heldout,
            "search": {"start": plan.search_start, "proposal": float(plan.predicted[0]),
                       "evaluations": plan.evaluations},
            "constraints": {"include": list(plan.constraints.include), "exclude": list(plan.constraints.exclude),
                            "max_repeats": plan.constraints.max_repeats,
                            "fitted_max_repeats": plan.fitted_max_repeats, "trust_region": plan.trust_region}}
