"""Collecting training runs: sample curricula, fine-tune, stream losses, ingest.

Run ``r`` of an experiment always trains on the same curriculum (seeded by the config's seed
and ``r``), so collecting is resumable and idempotent: ``collect(config, runs=R)`` makes runs
``0..R-1`` complete, training only those that are not complete yet (a killed run is simply
trained again as a new attempt). These are plain functions; the Prefect flows wrap them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simfluence import curricula
from simfluence_platform.storage.experiments import (
    complete_run_ids,
    config_hash,
    has_gradients,
    register_experiment,
    store_gradients,
)
from simfluence_platform.storage.ingest import IngestReport, ingest
from simfluence_platform.storage.registry import code_version
from simfluence_platform.storage.shards import LossShardWriter, RunHeader, ShardError
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError
from simfluence_platform.tasks.config import ExperimentConfig
from simfluence_platform.tasks.data import Examples, load_examples
from simfluence_platform.tasks.runs import curriculum_for_run, run_seed


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


def train_run(config: ExperimentConfig, trainer, warehouse: Warehouse, run_id: int, on_step=None,
              batches: np.ndarray | None = None, curriculum_kind: str | None = None):
    """Train run ``run_id`` and stream its shards (does not ingest). Raises ``RunBusyError`` when
    another live process is training the same run and ``ShardError`` when it is already complete.

    The run trains on its sampled curriculum, or on ``batches: int[T, b]`` recorded as
    ``curriculum_kind`` (default ``explicit``; the verification runs of ``simfluence optimize``)."""
    if batches is None:
        batches, curriculum_kind = curriculum_for_run(config, run_id), config.curriculum.kind
    elif batches.ndim != 2:
        raise curricula.CurriculumError(f"run {run_id}: a curriculum is [steps, batch size], got shape {batches.shape}")
    curricula.check_ids(batches, config.data.n_train)
    header = RunHeader(config.name, run_id, batches.shape[0], batches.shape[1], len(trainer.test_data),
                       seed=run_seed(config, run_id), curriculum_kind=curriculum_kind or "explicit",
                       config_hash=config_hash(config.identity()), code_version=code_version())
    writer = LossShardWriter(warehouse.shard_root, header, flush_every=config.flush_every)
    try:
        writer.write_batches(batches)
        return trainer.run(batches, header.seed, writer, on_step=on_step)
    finally:
        writer.close()  # a crashed run frees the run for its retry


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


def collect_run(collection: Collection, run_id: int, log: Callable[[str], None] = lambda message: None) -> str:
    """Train one run of the collection, ingest it, and record the outcome; returns its status:
    ``complete``, ``failed``, or ``busy`` when another live process is training it (or has just
    finished it), in which case this collection leaves it to that process."""
    try:
        outcome = train_run(collection.config, collection.trainer, collection.warehouse, run_id)
    except ShardError as error:  # RunBusyError, or completed meanwhile by another collection
        log(f"run {run_id}: skipped ({error})")
        collection.summary.skipped.append(run_id)
        return "busy"
    if outcome.status == "complete":
        collection.summary.trained.append(run_id)
    else:
        collection.summary.failed[run_id] = outcome.reason or "failed"
    report = ingest_pending(collection.warehouse, collection.config.name, log,
                            None if collection.backlog else [run_id])  # its own run: work that does not grow with R
    collection.backlog = report is None
    log(f"run {run_id}: {outcome.status}" + (f"; ingested {report.loaded_rows} rows" if report else ""))
    return outcome.status


def finish_collection(collection: Collection) -> CollectSummary:
    """Store the gradient checkpoints if the experiment has none yet."""
    if collection.need_gradients:
        store_reference_gradients(collection.config, collection.warehouse, collection.trainer)
    return collection.summary


def collect(config: ExperimentConfig, runs: int, warehouse: Warehouse, gradients: bool = True, retries: int = 0,
            progress: Callable[[int, int], None] | None = None,
            log: Callable[[str], None] = lambda message: None) -> CollectSummary:
    """Make runs ``0..runs-1`` of the experiment complete in this process, ingesting after each,
    then store the gradient checkpoints if they are not stored yet (the collect-runs flow does
    the same with one Prefect task per run).

    A run that raises is retried up to ``retries`` times (as a new attempt, which replaces the
    old one: never a duplicate). ``progress(done, total)`` follows every run.
    """
    collection = start_collection(config, runs, warehouse, gradients, log)
    for count, run_id in enumerate(collection.todo, 1):
        for attempt in range(retries + 1):
            try:
                collect_run(collection, run_id, log)
                break
            except Exception as error:  # noqa: BLE001 - a crashed run is retried, then reported
                if attempt == retries:
                    raise
                log(f"run {run_id} raised {error!r}; retrying ({attempt + 1}/{retries})")
        if progress is not None:
            progress(count, len(collection.todo))
    return finish_collection(collection)
