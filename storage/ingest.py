"""Single-writer ingest: load new Parquet loss shards into the warehouse, idempotently.

One ingest at a time holds the warehouse's writer lock. For each run folder it loads the shards
not yet in the manifest in one transaction, recording each in the manifest in the same
transaction, so a killed ingest loses nothing and a repeated one adds nothing. A run becomes
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

import shutil
import time
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


def ingest(warehouse: Warehouse, experiment: str | None = None, hold_seconds: float = 1.0,
           timeout: float = 600.0) -> IngestReport:
    """Load every new shard under the warehouse's shard folder (of one experiment if given).

    The writer connection is released after about ``hold_seconds`` (between two runs) and
    taken again after a short pause, so readers get in during a long backlog. Each time it
    waits at most ``timeout`` seconds for other writers and readers (``WarehouseError`` after)."""
    report = IngestReport()
    root = warehouse.shard_root
    if not root.exists():
        return report
    pending = sorted(p for p in root.glob("*/run-*") if p.is_dir()
                     and (experiment is None or p.parent.name == experiment))
    while pending:
        with warehouse.writer(timeout) as con:
            known = {name: _Experiment(n_train, n_test, digest) for name, n_train, n_test, digest in
                     con.execute("SELECT experiment, n_train, n_test, config_hash FROM experiments").fetchall()}
            loaded = {row[0] for row in con.execute("SELECT path FROM shard_manifest").fetchall()}
            started = time.monotonic()
            _ingest_run(con, warehouse, pending.pop(0), known, loaded, report)
            while pending and time.monotonic() - started < hold_seconds:
                _ingest_run(con, warehouse, pending.pop(0), known, loaded, report)
        if pending:
            time.sleep(0.25)  # readers poll every 0.05 s
    return report


def _ingest_run(con: duckdb.DuckDBPyConnection, warehouse: Warehouse, folder: Path, known: dict[str, _Experiment],
                loaded: set[str], report: IngestReport) -> None:
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
    loaded.update(_relative(root, p) for p, _, _ in good)
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
