"""Collecting training runs: sample curricula, fine-tune, stream losses, ingest.

Run ``r`` of an experiment always trains on the same curriculum (seeded by the config's seed
and ``r``), so collecting is resumable and idempotent: ``collect(config, runs=R)`` makes runs
``0..R-1`` complete, training only those that are not complete yet (a killed run is simply
trained again as a new attempt). These are plain functions; the Prefect flows wrap them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from simfluence import curricula
from simfluence.gradients import GradientError
from simfluence_platform.storage.experiments import (
    complete_run_ids,
    config_hash,
    has_gradients,
    register_experiment,
    store_gradients,
)
from simfluence_platform.storage.ingest import IngestReport, ingest
from simfluence_platform.storage.registry import code_version
from simfluence_platform.storage.shards import LossShardWriter, RunHeader, ShardError, read_gradients
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError
from simfluence_platform.tasks.config import ExperimentConfig
from simfluence_platform.tasks.data import Examples, load_examples
from simfluence_platform.tasks.runs import curriculum_for_run, run_seed

if TYPE_CHECKING:  # torch loads only when training
    from simfluence.gradients import GradientCheckpoints
    from simfluence_platform.tasks.training import RunOutcome


@dataclass
class CollectSummary:
    experiment: str
    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def register(config: ExperimentConfig, warehouse: Warehouse, examples: Examples) -> None:
    """Register the experiment and its examples (idempotent)."""
    register_experiment(warehouse, config.name, config.to_dict(), examples.train, examples.test,
                        description=f"{config.model.source} on {config.data.source}",
                        digest=config_hash(config.identity()))


def open_run(config: ExperimentConfig, warehouse: Warehouse, run_id: int, n_tests: int,
             batches: np.ndarray | None = None, curriculum_kind: str | None = None
             ) -> tuple[np.ndarray, LossShardWriter]:
    """Run ``run_id``'s curriculum ``int[T, b]`` and a shard writer that holds the run (its
    batches written). Raises ``RunBusyError`` when another live process is training the run and
    ``ShardError`` when it is already complete.

    The run trains on its sampled curriculum, or on ``batches: int[T, b]`` recorded as
    ``curriculum_kind`` (default ``explicit``; the verification runs of ``simfluence optimize``)."""
    if batches is None:
        batches, curriculum_kind = curriculum_for_run(config, run_id), config.curriculum.kind
    elif batches.ndim != 2:
        raise curricula.CurriculumError(f"run {run_id}: a curriculum is [steps, batch size], got shape {batches.shape}")
    curricula.check_ids(batches, config.data.n_train)
    header = RunHeader(config.name, run_id, batches.shape[0], batches.shape[1], n_tests,
                       seed=run_seed(config, run_id), curriculum_kind=curriculum_kind or "explicit",
                       config_hash=config_hash(config.identity()), code_version=code_version())
    writer = LossShardWriter(warehouse.shard_root, header, flush_every=config.flush_every)
    try:
        writer.write_batches(batches)
    except BaseException:
        writer.close()
        raise
    return batches, writer


def train_run(config: ExperimentConfig, trainer, warehouse: Warehouse, run_id: int, on_step=None,
              batches: np.ndarray | None = None, curriculum_kind: str | None = None):
    """Train run ``run_id`` (on ``batches`` when given, see :func:`open_run`) and stream its
    shards (does not ingest); raises as :func:`open_run`."""
    batches, writer = open_run(config, warehouse, run_id, len(trainer.test_data), batches, curriculum_kind)
    try:
        return trainer.run(batches, run_seed(config, run_id), writer, on_step=on_step)
    finally:
        writer.close()  # a crashed run frees the run for its retry


@dataclass
class GroupResult:
    """What :func:`train_group` did: each trained run's outcome, the runs it left (run id:
    why), and the reference run's gradient checkpoints when it took them."""

    outcomes: dict[int, RunOutcome] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    gradients: GradientCheckpoints | None = None


def train_group(config: ExperimentConfig, trainer, warehouse: Warehouse, run_ids: list[int],
                gradients: bool = False, log: Callable[[str], None] = lambda message: None,
                on_step: Callable[[int], None] | None = None, curricula: dict[int, np.ndarray] | None = None,
                curriculum_kind: str | None = None) -> GroupResult:
    """Train runs ``run_ids`` (at most ``training.parallel_runs``) together in this process and
    stream each one's own shards and completion marker (does not ingest): one at a time alone,
    else on a :class:`~simfluence_platform.tasks.batched.BatchedTrainer`. A run that another
    live process holds, or that is already complete, is left out. With ``gradients``, the
    reference run's checkpoints are taken while it trains (when it is among them).
    ``on_step(t)`` follows the group's steps as in :meth:`Trainer.run`. ``curricula`` gives some
    runs their curriculum (``int[T, b]``) instead of the sampled one, recorded as
    ``curriculum_kind`` (see :func:`open_run`)."""
    from simfluence_platform.tasks.gradients import GradientRecorder

    result = GroupResult()
    writers: dict[int, LossShardWriter] = {}
    batches: dict[int, np.ndarray] = {}
    try:
        for run_id in run_ids:
            try:
                batches[run_id], writers[run_id] = open_run(config, warehouse, run_id, len(trainer.test_data),
                                                            (curricula or {}).get(run_id), curriculum_kind)
            except ShardError as error:  # RunBusyError, or completed meanwhile by another collection
                log(f"run {run_id}: skipped ({error})")
                result.skipped[run_id] = str(error)
        ids = list(writers)
        if not ids:
            return result
        batched = trainer.batched if len(ids) > 1 else None
        reference = config.gradients.reference_run
        recorder = (GradientRecorder(config, trainer, batches[reference][0], batched, ids.index(reference))
                    if gradients and reference in ids else None)
        hooks = [hook for hook in (recorder, on_step) if hook is not None]

        def step_hook(step: int) -> None:
            for hook in hooks:
                hook(step)

        if batched is None:
            outcomes = [trainer.run(batches[ids[0]], run_seed(config, ids[0]), writers[ids[0]], on_step=step_hook)]
        else:
            outcomes = batched.run([batches[r] for r in ids], [writers[r] for r in ids], on_step=step_hook)
        result.outcomes = dict(zip(ids, outcomes))
        if recorder is not None and result.outcomes[reference].status == "complete":
            result.gradients = recorder.result(result.outcomes[reference])
        return result
    finally:
        for writer in writers.values():
            writer.close()  # a crashed batch frees its runs for their retry


def groups(config: ExperimentConfig, run_ids: list[int]) -> list[list[int]]:
    """``run_ids`` in groups of ``training.parallel_runs`` (the last may be smaller)."""
    k = config.training.parallel_runs
    return [run_ids[i:i + k] for i in range(0, len(run_ids), k)]


INGEST_WAIT_SECONDS = 15.0


def ingest_pending(warehouse: Warehouse, experiment: str, log: Callable[[str], None],
                   run_ids: list[int] | None = None) -> IngestReport | None:
    """Ingest what is waiting (only runs ``run_ids`` when given); when readers keep the warehouse
    busy for ``INGEST_WAIT_SECONDS``, say so and go on (the shards stay on disk for the next
    ingest): training never waits long for the warehouse."""
    try:
        return ingest(warehouse, experiment, run_ids, timeout=INGEST_WAIT_SECONDS)
    except WarehouseError as error:
        log(f"ingest postponed: {error}")
        return None


def prepare(config: ExperimentConfig, runs: int) -> Examples:
    """Check everything that can fail on bad input (data, run count, curricula) before any write."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    examples = load_examples(config.data, config.model.task)
    for run_id in range(runs):
        curriculum_for_run(config, run_id)  # an explicit curriculum file must cover every run
    return examples


def store_reference_gradients(config: ExperimentConfig, warehouse: Warehouse, trainer=None) -> None:
    """Compute and store the gradient checkpoints of the experiment's reference run."""
    from simfluence_platform.tasks.gradients import gradient_checkpoints  # torch: only when needed
    from simfluence_platform.tasks.training import Trainer

    trainer = trainer or Trainer(config, load_examples(config.data, config.model.task))
    store_gradients(warehouse, config.name, gradient_checkpoints(config, trainer))


def store_recorded_gradients(config: ExperimentConfig, warehouse: Warehouse,
                             log: Callable[[str], None] = lambda message: None,
                             warn: Callable[[str], None] = lambda message: None) -> bool:
    """Store the gradient checkpoints that the reference run's ``train-run`` took while it
    trained and wrote beside its shards (:func:`~storage.shards.write_gradients`); returns
    whether it did. False when there is no such file (the run was trained without them: by an
    older version, or before they were wanted) or it cannot be read whole (``warn``, naming
    it): then the reference run has to be trained again for them."""
    reference = config.gradients.reference_run
    try:
        gradients = read_gradients(warehouse.shard_root, config.name, reference)
    except GradientError as error:
        warn(f"run {reference} of {config.name}: unreadable gradient checkpoints, not stored ({error})")
        return False
    if gradients is None:
        log(f"run {reference} of {config.name} was trained without taking its gradient checkpoints")
        return False
    store_gradients(warehouse, config.name, gradients)
    log(f"run {reference} of {config.name}: stored the gradient checkpoints taken while it trained "
        f"({len(gradients.steps)} checkpoints); it is not trained again")
    return True


@dataclass
class Collection:
    """A collection under way: the runs still to train and the trainer that trains them (the
    model loaded once for all of them)."""

    config: ExperimentConfig
    warehouse: Warehouse
    todo: list[int]
    need_gradients: bool
    summary: CollectSummary
    trainer: object | None = None
    backlog: bool = False  # an ingest was postponed: the next one looks at every run, not just its own


def start_collection(config: ExperimentConfig, runs: int, warehouse: Warehouse, gradients: bool = True,
                     log: Callable[[str], None] = lambda message: None) -> Collection:
    """Check everything that can fail on bad input (data, config, model) before anything is
    written, register the experiment, and load the trainer when there is work to do."""
    from simfluence_platform.tasks.training import Trainer  # torch and transformers load only when training

    summary = CollectSummary(config.name)
    examples = prepare(config, runs)
    if warehouse.path.exists():
        ingest(warehouse, config.name)  # runs finished but not ingested by a killed collection count as done
    done = complete_run_ids(warehouse, config.name)
    todo = [r for r in range(runs) if r not in done]
    summary.skipped = sorted(done & set(range(runs)))
    need_gradients = gradients and not has_gradients(warehouse, config.name)
    log(f"{config.name}: {len(summary.skipped)} of {runs} runs already complete; training {len(todo)}")
    collection = Collection(config, warehouse, todo, need_gradients, summary)
    if todo or need_gradients:
        collection.trainer = Trainer(config, examples)
        register(config, warehouse, examples)
    return collection


def collect_group(collection: Collection, run_ids: list[int], log: Callable[[str], None] = lambda message: None
                  ) -> dict[int, str]:
    """Train a group of runs of the collection together (see :func:`train_group`), ingest them,
    store the reference run's gradient checkpoints when they were taken, and record the
    outcomes; returns each run's status: ``complete``, ``failed``, or ``busy`` when another
    live process is training it (or has just finished it), which this collection leaves to it."""
    summary = collection.summary
    result = train_group(collection.config, collection.trainer, collection.warehouse, run_ids,
                         collection.need_gradients, log)
    statuses = dict.fromkeys(result.skipped, "busy")
    summary.skipped.extend(result.skipped)
    for run_id, outcome in result.outcomes.items():
        statuses[run_id] = outcome.status
        if outcome.status == "complete":
            summary.trained.append(run_id)
        else:
            summary.failed[run_id] = outcome.reason or "failed"
    if result.gradients is not None:
        store_gradients(collection.warehouse, collection.config.name, result.gradients)
        collection.need_gradients = False
    report = ingest_pending(collection.warehouse, collection.config.name, log,  # its own runs: work that does not
                            None if collection.backlog else list(result.outcomes))  # grow with R
    collection.backlog = report is None
    trained = ", ".join(f"run {run_id}: {outcome.status}" for run_id, outcome in result.outcomes.items())
    if trained:
        log(trained + (f"; ingested {report.loaded_rows} rows" if report else ""))
    return statuses


def finish_collection(collection: Collection) -> CollectSummary:
    """Store the gradient checkpoints if the experiment still has none (its reference run was
    collected earlier, or not in this collection): the reference run is trained again for them."""
    if collection.need_gradients:
        store_reference_gradients(collection.config, collection.warehouse, collection.trainer)
    return collection.summary


def collect(config: ExperimentConfig, runs: int, warehouse: Warehouse, gradients: bool = True, retries: int = 0,
            progress: Callable[[int, int], None] | None = None,
            log: Callable[[str], None] = lambda message: None) -> CollectSummary:
    """Make runs ``0..runs-1`` of the experiment complete in this process, ``training.parallel_runs``
    at a time, ingesting after each group; the reference run's gradient checkpoints are taken
    while it trains, or afterwards if they are still missing (the collect-runs flow does the
    same with one Prefect task per group).

    A group that raises is retried up to ``retries`` times (as new attempts, which replace the
    old ones: never a duplicate). ``progress(done, total)`` follows every group (counting runs).
    """
    collection = start_collection(config, runs, warehouse, gradients, log)
    done = 0
    for group in groups(config, collection.todo):
        for attempt in range(retries + 1):
            try:
                collect_group(collection, group, log)
                break
            except Exception as error:  # noqa: BLE001 - a crashed group is retried, then reported
                if attempt == retries:
                    raise
                log(f"runs {group} raised {error!r}; retrying ({attempt + 1}/{retries})")
        done += len(group)
        if progress is not None:
            progress(done, len(collection.todo))
    return finish_collection(collection)
