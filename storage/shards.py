"""Parquet loss shards: how a training run streams its losses without touching the warehouse.

One folder per run, ``<shard_root>/<experiment>/run-<run_id>/``:

- ``run.json``: the run header (experiment, run id, attempt, seed, curriculum kind, hashes,
  sizes, start time), written first;
- ``batches-<attempt>.parquet``: the curriculum the run trained on (step, position, example_id);
- ``losses-<attempt>-<first>-<last>.parquet``: the losses of steps first..last (step, test_id,
  loss), one shard every ``flush_every`` steps;
- ``marker.json``: ``complete`` or ``failed`` with its reason, written last (ingest rewrites a
  ``complete`` marker as ``failed`` when the shards it vouches for turn out incomplete);
- ``gradients.npz`` (the experiment's reference run only, when a ``train-run`` took its gradient
  checkpoints while it trained): the :class:`~simfluence.gradients.GradientCheckpoints`, for
  collect-runs to store in the warehouse. Written after the marker, and only for a complete run;
  ingest never reads it.

One attempt at a run at a time: the writer holds an exclusive lock on
``<experiment>/run-<run_id>.lock`` (beside the folder) from its start to its end; the
operating system releases it when the process dies, so a killed attempt never blocks a new one.

Every file is written under a temporary name (``.tmp-*``) and renamed into place, so readers only
ever see whole files; a run killed at any moment leaves whole shards and no marker. Starting
a run again (a new attempt) clears the folder of the earlier attempt's files first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from simfluence.gradients import GradientCheckpoints
from simfluence_platform.errors import UserError

LOSS_SCHEMA = pa.schema([("step", pa.int32()), ("test_id", pa.int32()), ("loss", pa.float64())])
BATCH_SCHEMA = pa.schema([("step", pa.int32()), ("position", pa.int32()), ("example_id", pa.int32())])
HEADER_NAME = "run.json"
MARKER_NAME = "marker.json"
GRADIENTS_NAME = "gradients.npz"


class ShardError(UserError, RuntimeError):
    """Raised when a run cannot be written (already complete, bad arguments)."""


class RunBusyError(ShardError):
    """Raised when another live process is writing the same run."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass(frozen=True)
class RunHeader:
    """What the warehouse records about a run. Steps are updates 1..n_steps; step 0 is before
    training. ``attempt`` distinguishes a re-run of the same run id."""

    experiment: str
    run_id: int
    n_steps: int
    batch_size: int
    n_tests: int
    seed: int = 0
    curriculum_kind: str = "explicit"
    config_hash: str = ""
    code_version: str = ""
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: str = field(default_factory=utc_now)

    @classmethod
    def from_json(cls, text: str) -> RunHeader:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


def run_dir(shard_root: str | Path, experiment: str, run_id: int) -> Path:
    return Path(shard_root) / experiment / f"run-{run_id:06d}"


def write_atomic(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the result to ``path`` (same folder, atomic)."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_marker(folder: Path) -> dict[str, Any] | None:
    path = folder / MARKER_NAME
    return json.loads(path.read_text()) if path.exists() else None


def write_marker(folder: Path, marker: dict[str, Any]) -> None:
    write_atomic(folder / MARKER_NAME, lambda p: p.write_text(json.dumps(marker)))


def read_footer(path: Path) -> pq.FileMetaData | None:
    """The Parquet footer of a shard, or None when the file is not a whole Parquet file."""
    try:
        return pq.read_metadata(path)
    except Exception:  # noqa: BLE001 - truncated, empty or not Parquet at all: all mean unreadable
        return None


def write_gradients(shard_root: str | Path, experiment: str, run_id: int, gradients: GradientCheckpoints) -> Path:
    """Write the gradient checkpoints taken while run ``run_id`` trained into its folder, as
    ``gradients.npz`` (the format of :meth:`GradientCheckpoints.save`; K checkpoints of n
    training and m test examples in d projected dimensions: ``float[K, n, d]``, ``float[K, m, d]``
    and so on), atomically: a reader finds the whole file or none. Returns its path."""
    path = run_dir(shard_root, experiment, run_id) / GRADIENTS_NAME
    write_atomic(path, gradients.save)
    return path


def read_gradients(shard_root: str | Path, experiment: str, run_id: int) -> GradientCheckpoints | None:
    """The gradient checkpoints :func:`write_gradients` wrote for run ``run_id``; None when its
    folder has none. A file that cannot be read whole (truncated, corrupt, malformed) raises
    :class:`~simfluence.gradients.GradientError` naming it: nothing of it is returned."""
    path = run_dir(shard_root, experiment, run_id) / GRADIENTS_NAME
    if not path.exists():
        return None
    return GradientCheckpoints.load(path)


def finished_runs(shard_root: str | Path, experiment: str, runs: int) -> tuple[int, int]:
    """(complete, failed) among runs ``0..runs-1`` of ``experiment``, from their markers alone:
    cheap enough to poll while a collection runs, and it never opens the warehouse."""
    complete = failed = 0
    for run_id in range(runs):
        try:
            marker = read_marker(run_dir(shard_root, experiment, run_id))
        except (OSError, ValueError):  # a marker being replaced right now: counted next time
            continue
        status = (marker or {}).get("status")
        complete += status == "complete"
        failed += status == "failed"
    return complete, failed


def readable_loss_shards(paths: list[Path]) -> list[Path]:
    """The whole, readable Parquet files among ``paths`` with the loss schema, in their order."""
    readable = []
    for path in paths:
        footer = read_footer(path)
        if footer is not None and footer.schema.to_arrow_schema().equals(LOSS_SCHEMA, check_metadata=False):
            readable.append(path)
    return readable


class LossShardWriter:
    """Streams one run's losses to Parquet shards.

    Args:
        shard_root: the shards folder of the warehouse.
        header: the run's header.
        flush_every: steps buffered before a shard is written.

    Use ``log(step, losses)`` for steps 0..n_steps in order, then ``complete()`` or
    ``fail(reason)``.
    """

    def __init__(self, shard_root: str | Path, header: RunHeader, flush_every: int = 10) -> None:
        if flush_every < 1:
            raise ShardError(f"flush_every must be at least 1, got {flush_every}")
        self.header = header
        self.flush_every = flush_every
        self.folder = run_dir(shard_root, header.experiment, header.run_id)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder.with_name(self.folder.name + ".lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RunBusyError(f"run {header.run_id} of {header.experiment} is being written by another "
                               f"live process ({self.folder})") from None
        marker = read_marker(self.folder) if self.folder.exists() else None
        if marker is not None and marker.get("status") == "complete":
            self.close()
            raise ShardError(f"run {header.run_id} of {header.experiment} is already complete in {self.folder}")
        if self.folder.exists():
            shutil.rmtree(self.folder)  # an earlier attempt: unfinished, failed, or found incomplete at ingest
        self.folder.mkdir(parents=True)
        write_atomic(self.folder / HEADER_NAME, lambda p: p.write_text(json.dumps(asdict(header), indent=2)))
        self._steps: list[int] = []
        self._losses: list[np.ndarray] = []
        self._next_step = 0
        self.shards_written = 0

    def write_batches(self, batches: np.ndarray) -> None:
        """Record the curriculum ``int[n_steps, b]`` (-1 pads) the run trains on."""
        batches = np.asarray(batches)
        if batches.shape[0] != self.header.n_steps:
            raise ShardError(f"batches has {batches.shape[0]} steps, the run has {self.header.n_steps}")
        steps, positions = np.nonzero(batches >= 0)
        table = pa.table(
            [pa.array(steps + 1, pa.int32()), pa.array(positions, pa.int32()),
             pa.array(batches[steps, positions], pa.int32())],
            schema=BATCH_SCHEMA,
        )
        write_atomic(self.folder / f"batches-{self.header.attempt}.parquet", lambda p: pq.write_table(table, p))

    def log(self, step: int, losses: np.ndarray) -> None:
        """Buffer the losses ``float[m]`` of all test examples after update ``step``."""
        if step != self._next_step:
            raise ShardError(f"expected step {self._next_step}, got {step}")
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape != (self.header.n_tests,):
            raise ShardError(f"losses must have shape ({self.header.n_tests},), got {losses.shape}")
        self._steps.append(step)
        self._losses.append(losses)
        self._next_step += 1
        if len(self._steps) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write the buffered steps as one shard (nothing if the buffer is empty)."""
        if not self._steps:
            return
        m = self.header.n_tests
        first, last = self._steps[0], self._steps[-1]
        table = pa.table(
            [pa.array(np.repeat(np.array(self._steps, dtype=np.int32), m)),
             pa.array(np.tile(np.arange(m, dtype=np.int32), len(self._steps))),
             pa.array(np.concatenate(self._losses))],
            schema=LOSS_SCHEMA,
        )
        name = f"losses-{self.header.attempt}-{first:06d}-{last:06d}.parquet"
        write_atomic(self.folder / name, lambda p: pq.write_table(table, p))
        self.shards_written += 1
        self._steps, self._losses = [], []

    def complete(self) -> None:
        """Flush and write the completion marker (last)."""
        if self._next_step != self.header.n_steps + 1:
            raise ShardError(f"run logged steps 0..{self._next_step - 1}, needs 0..{self.header.n_steps}")
        self._finish({"status": "complete", "reason": None})

    def fail(self, reason: str) -> None:
        """Flush what was logged and mark the run failed (kept out of fitting)."""
        self._finish({"status": "failed", "reason": reason})

    def _finish(self, marker: dict[str, Any]) -> None:
        self.flush()
        marker.update(attempt=self.header.attempt, finished_at=utc_now())
        write_marker(self.folder, marker)
        self.close()

    def close(self) -> None:
        """Release the run's lock (done by ``complete`` and ``fail``; call it when a run is
        abandoned by an exception). Idempotent."""
        if not self._lock.closed:
            self._lock.close()
