"""Single-writer ingest: load new Parquet loss shards into the warehouse, idempotently.

One ingest at a time holds the warehouse's writer lock. For each run folder with something new
it loads the shards not yet in the manifest in one transaction, recording each in the manifest
in the same transaction, so a killed ingest loses nothing and a repeated one adds nothing. Its
work grows with what is new, not with what is stored: a caller that knows which runs finished
names them, and otherwise a folder whose files all belong to a finished, recorded attempt is
skipped from a directory listing and one query, without opening it. A run becomes
``complete`` only when its marker says so, every step 0..T of every test example is present,
its curriculum is recorded and no loss is NaN or infinite; ``failed`` runs keep their reason and
are never fitted on (a ``complete`` marker over incomplete shards is rewritten as ``failed``, so
the run is trained again). A new attempt at a run that is not complete replaces the earlier
attempt's rows. Shards of unknown runs or experiments, of another config (hash), with the wrong
schema or ids out of range are rejected with a message and left in place; unreadable
(truncated) files are moved to ``<home>/quarantine/``. Rows move by DuckDB's own Parquet reader:
no Python loop over rows.

Readers are let in between runs: the file is held for at most about ``hold_seconds`` at a time,
and the writer waits with backoff while a reader has it open (see ``Warehouse.writer``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from simfluence_platform.storage.shards import (
    BATCH_SCHEMA,
    HEADER_NAME,
    LOSS_SCHEMA,
    RunHeader,
    read_footer,
    read_marker,
    run_dir,
    write_marker,
)
from simfluence_platform.storage.warehouse import Warehouse, fetch_one, transaction


@dataclass
class IngestReport:
    """What one ingest did. ``rejected`` and ``failed_runs`` hold (what, why) pairs."""

    loaded_shards: int = 0
    loaded_rows: int = 0
    completed_runs: list[tuple[str, int]] = field(default_factory=list)
    failed_runs: list[tuple[tuple[str, int], str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "loaded_shards": self.loaded_shards,
            "loaded_rows": self.loaded_rows,
            "completed_runs": [list(r) for r in self.completed_runs],
            "failed_runs": [{"experiment": r[0], "run_id": r[1], "reason": why} for r, why in self.failed_runs],
            "rejected": [{"path": p, "reason": why} for p, why in self.rejected],
        }


@dataclass(frozen=True)
class _Experiment:
    """What ingest checks a run against: sizes and the config hash."""

    n_train: int
    n_test: int
    config_hash: str


def ingest(warehouse: Warehouse, experiment: str | None = None, run_ids: Iterable[int] | None = None,
           hold_seconds: float = 1.0, timeout: float = 600.0) -> IngestReport:
    """Load every new shard under the warehouse's shard folder (of one experiment if given).

    ``run_ids`` (with ``experiment``) restricts it to those runs' folders: what a collection
    does after each run, so its ingest work does not grow with the runs already collected.
    Without it, the folders to visit are found from one directory listing per experiment and
    per run folder and one query of the ``runs`` table: a folder whose shard files all belong to
    an attempt the warehouse records as finished is skipped without reading anything in it.

    The writer connection is released after about ``hold_seconds`` (between two runs) and
    taken again after a short pause, so readers get in during a long backlog. Each time it
    waits at most ``timeout`` seconds for other writers and readers (``WarehouseError`` after)."""
    if run_ids is not None and experiment is None:
        raise ValueError("run_ids needs the experiment they belong to")
    report = IngestReport()
    root = warehouse.shard_root
    if not root.exists():
        return report
    if run_ids is not None:
        pending = [folder for folder in (run_dir(root, experiment, r) for r in sorted(set(run_ids))) if folder.is_dir()]
        listed = None
    else:
        listed = _list_run_folders(root, experiment)
        pending = sorted(listed)
    while pending:
        with warehouse.writer(timeout) as con:
            if listed is not None:  # once, under the lock: which listed folders hold anything new
                pending, listed = _unfinished(con, listed, experiment), None
                if not pending:
                    break
            known = {name: _Experiment(n_train, n_test, digest) for name, n_train, n_test, digest in
                     con.execute("SELECT experiment, n_train, n_test, config_hash FROM experiments").fetchall()}
            started = time.monotonic()
            _ingest_run(con, warehouse, pending.pop(0), known, report)
            while pending and time.monotonic() - started < hold_seconds:
                _ingest_run(con, warehouse, pending.pop(0), known, report)
        if pending:
            time.sleep(0.25)  # readers poll every 0.05 s
    return report


def _list_run_folders(root: Path, experiment: str | None) -> dict[Path, list[str]]:
    """Every run folder under ``root`` (of ``experiment`` if given) and the names of the files
    in it: one directory listing per experiment and per run folder, nothing opened."""
    folders: dict[Path, list[str]] = {}
    for group in os.scandir(root):
        if not group.is_dir() or (experiment is not None and group.name != experiment):
            continue
        for entry in os.scandir(group.path):
            if entry.name.startswith("run-") and entry.is_dir():
                try:
                    folders[Path(entry.path)] = os.listdir(entry.path)
                except FileNotFoundError:  # a new attempt is clearing it: the next ingest sees that one
                    continue
    return folders


def _unfinished(con: duckdb.DuckDBPyConnection, listed: dict[Path, list[str]], experiment: str | None) -> list[Path]:
    """The listed folders that may hold something to load, in path order: all but those whose
    shard files all carry the attempt that the ``runs`` table records as finished (one query).

    A finished run's folder changes only when a new attempt starts, and every file of a new
    attempt carries the new attempt in its name; a folder with no shard at all (a new attempt
    that has only written its header) is visited too."""
    finished = {(name, run_id): attempt for name, run_id, attempt in con.execute(
        "SELECT experiment, run_id, attempt FROM runs WHERE status != 'running' AND (? IS NULL OR experiment = ?)",
        [experiment, experiment]).fetchall()}
    pending = []
    for folder, names in sorted(listed.items()):
        number = folder.name.removeprefix("run-")
        attempt = finished.get((folder.parent.name, int(number))) if number.isdigit() else None
        if attempt is None or not _all_of_attempt(names, attempt):
            pending.append(folder)
    return pending


def _all_of_attempt(names: list[str], attempt: str) -> bool:
    """Whether the file ``names`` of a run folder include shards and every shard is ``attempt``'s."""
    shards = [name for name in names if name.endswith(".parquet") and name.startswith(("losses-", "batches-"))]
    return bool(shards) and all(name == f"batches-{attempt}.parquet" or name.startswith(f"losses-{attempt}-")
                                for name in shards)


def _ingest_run(con: duckdb.DuckDBPyConnection, warehouse: Warehouse, folder: Path, known: dict[str, _Experiment],
                report: IngestReport) -> None:
    """Load the new shards of one run folder in one transaction, and finish the run when its
    marker says so. Reads the folder's header and marker, and queries only this run's rows."""
    root = warehouse.shard_root
    # The marker first: it is written last, so every shard it vouches for is listed below.
    marker = read_marker(folder)
    parquet = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".tmp-"))
    try:
        header = RunHeader.from_json((folder / HEADER_NAME).read_text())
    except (OSError, ValueError, TypeError) as error:
        for path in parquet:
            report.rejected.append((str(path), f"unknown run: {folder / HEADER_NAME} is missing or invalid ({error})"))
        return
    key = (header.experiment, header.run_id)
    if header.experiment != folder.parent.name or folder.name != f"run-{header.run_id:06d}":
        report.rejected.append((str(folder), f"{HEADER_NAME} names {key}, which does not match its folder"))
        return
    if header.experiment not in known:
        for path in parquet:
            report.rejected.append((str(path), f"experiment {header.experiment!r} is not registered in the warehouse"))
        return
    expected = known[header.experiment]
    if header.n_tests != expected.n_test:
        report.rejected.append((str(folder), f"run has {header.n_tests} test examples, the experiment "
                                             f"{expected.n_test}"))
        return
    if header.config_hash and header.config_hash != expected.config_hash:
        report.rejected.append((str(folder), f"run {header.run_id} was trained with config hash "
                                             f"{header.config_hash}, experiment {header.experiment!r} has "
                                             f"{expected.config_hash} (another config under the same name)"))
        return
    existing = fetch_one(con, "SELECT attempt, status FROM runs WHERE experiment = ? AND run_id = ?", list(key))
    if existing is not None and existing[1] != "running" and existing[0] == header.attempt:
        return  # finished and recorded
    if existing is not None and existing[1] == "complete":
        report.rejected.append((str(folder), f"run {header.run_id} of {header.experiment} is already complete; "
                                             f"a new attempt cannot replace it"))
        return
    loaded = {row[0] for row in con.execute("SELECT path FROM shard_manifest WHERE experiment = ? AND run_id = ?",
                                            list(key)).fetchall()}
    new = [p for p in parquet if header.attempt in p.name and _relative(root, p) not in loaded]
    good: list[tuple[Path, str, int]] = []
    for path in new:
        problem, kind, rows = _check_shard(path, header, expected.n_train)
        if problem is None:
            good.append((path, kind, rows))
        elif problem.startswith(UNREADABLE):
            report.rejected.append((str(path), f"{problem}; moved to {_quarantine(warehouse, path)}"))
        else:
            report.rejected.append((str(path), problem))
    with transaction(con):
        if existing is None or existing[0] != header.attempt:
            _reset_run(con, header, replace=existing is not None)
        for kind, schema_cols, table in (("losses", "step, test_id, loss", "losses"),
                                         ("batches", "step, position, example_id", "batches")):
            files = [str(p) for p, k, _ in good if k == kind]
            if files:
                con.execute(
                    f"INSERT INTO {table} SELECT ?, ?, {schema_cols} FROM read_parquet(?)",
                    [header.experiment, header.run_id, files],
                )
        for path, kind, rows in good:
            con.execute("INSERT INTO shard_manifest (path, experiment, run_id, attempt, kind, n_rows) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        [_relative(root, path), header.experiment, header.run_id, header.attempt, kind, rows])
        if marker is not None and marker.get("attempt") == header.attempt:
            _finish_run(con, folder, header, marker, report)
    report.loaded_shards += len(good)
    report.loaded_rows += sum(rows for _, _, rows in good)


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


UNREADABLE = "unreadable Parquet file"


def _quarantine(warehouse: Warehouse, path: Path) -> Path:
    """Move an unreadable shard to ``<home>/quarantine/<experiment>/<run folder>/`` (so that no
    reader or later ingest trips over it); returns where it went."""
    target = warehouse.home / "quarantine" / path.relative_to(warehouse.shard_root)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    return target


def _check_shard(path: Path, header: RunHeader, n_train: int) -> tuple[str | None, str, int]:
    """(problem or None, kind, rows), from the Parquet footer alone: schema and id ranges."""
    kind = "losses" if path.name.startswith("losses-") else "batches" if path.name.startswith("batches-") else ""
    if not kind:
        return "unknown shard kind (expected losses-*.parquet or batches-*.parquet)", kind, 0
    metadata = read_footer(path)
    if metadata is None:
        return f"{UNREADABLE} (truncated or not Parquet)", kind, 0
    schema = metadata.schema.to_arrow_schema()
    expected = LOSS_SCHEMA if kind == "losses" else BATCH_SCHEMA
    if not schema.equals(expected, check_metadata=False):
        found = ", ".join(f"{f.name}: {f.type}" for f in schema)
        return f"wrong schema ({found}); expected ({', '.join(f'{f.name}: {f.type}' for f in expected)})", kind, 0
    if kind == "losses":
        limits = {"step": (0, header.n_steps), "test_id": (0, header.n_tests - 1)}
    else:
        limits = {"step": (1, header.n_steps), "position": (0, header.batch_size - 1), "example_id": (0, n_train - 1)}
    for name, (low, high) in limits.items():
        column = expected.get_field_index(name)
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max:
                return f"no statistics for column {name} (write shards with LossShardWriter)", kind, 0
            if stats.min < low or stats.max > high:
                return f"{name} {stats.min}..{stats.max} outside {low}..{high}", kind, 0
    return None, kind, metadata.num_rows


def _reset_run(con: duckdb.DuckDBPyConnection, header: RunHeader, replace: bool) -> None:
    key = [header.experiment, header.run_id]
    if replace:
        for table in ("losses", "batches", "shard_manifest", "runs"):
            con.execute(f"DELETE FROM {table} WHERE experiment = ? AND run_id = ?", key)
    con.execute(
        "INSERT INTO runs (experiment, run_id, attempt, status, seed, curriculum_kind, config_hash, code_version, "
        "n_steps, batch_size, started_at) VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?::TIMESTAMPTZ)",
        key + [header.attempt, header.seed, header.curriculum_kind, header.config_hash, header.code_version,
               header.n_steps, header.batch_size, header.started_at],
    )


def _finish_run(con: duckdb.DuckDBPyConnection, folder: Path, header: RunHeader, marker: dict,
                report: IngestReport) -> None:
    key = [header.experiment, header.run_id]
    status, reason = marker.get("status"), marker.get("reason")
    if status == "complete":
        steps, rows, bad = fetch_one(
            con, "SELECT count(DISTINCT step), count(*), count(*) FILTER (WHERE NOT isfinite(loss)) "
            "FROM losses WHERE experiment = ? AND run_id = ?", key)
        batch_steps = fetch_one(
            con, "SELECT count(DISTINCT step) FROM batches WHERE experiment = ? AND run_id = ?", key)[0]
        expected = (header.n_steps + 1) * header.n_tests
        if bad:
            status, reason = "failed", f"{bad} non-finite losses (diverged)"
        elif steps != header.n_steps + 1 or rows != expected:
            status, reason = "failed", f"incomplete: {steps} of {header.n_steps + 1} steps, {rows} of {expected} losses"
        elif batch_steps != header.n_steps:
            status, reason = "failed", f"curriculum recorded for {batch_steps} of {header.n_steps} steps"
        if status == "failed":  # the run folder tells the truth: the run is trained again, not skipped
            write_marker(folder, {**marker, "status": "failed", "reason": reason})
    elif status != "failed":
        status, reason = "failed", f"unknown marker status {status!r}"
    con.execute(
        "UPDATE runs SET status = ?, reason = ?, finished_at = ?::TIMESTAMPTZ WHERE experiment = ? AND run_id = ?",
        [status, reason, marker.get("finished_at")] + key,
    )
    if status == "complete":
        report.completed_runs.append(tuple(key))
    else:
        report.failed_runs.append((tuple(key), reason or "failed"))
