"""The DuckDB warehouse: one file, one writer process at a time, versioned schema.

DuckDB allows one writer process per file, and while it writes other processes cannot even
open the file read-only. So every write goes through :meth:`Warehouse.writer`, which holds an
exclusive file lock (``warehouse.duckdb.lock``) for the duration of a short transaction, and
readers use :meth:`Warehouse.reader`, which opens the file read-only, retrying while a writer
holds it, and never takes the lock. Training runs never open the file: they write Parquet
shards that the single ingest process loads (see :mod:`storage.ingest`). A user's own SQL
runs through :meth:`Warehouse.query`: one read-only statement, in a locked-down instance that
reads no file outside the shard folder.

Layout under the home folder (``$SIMFLUENCE_HOME`` or ``./simfluence-data``)::

    warehouse.duckdb          the tables and views below
    shards/<experiment>/run-<id>/   Parquet loss shards and markers written by training runs
    registry/<experiment>/<version>/ content-addressed simulator bundles
"""

from __future__ import annotations

import fcntl
import re
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import duckdb
from simfluence_platform.errors import UserError

if TYPE_CHECKING:  # Polars loads only when a user's query returns rows: reads start faster without it
    import polars as pl

SCHEMA_VERSION = 3

# Each migration takes the schema from version i to i + 1; index 0 creates version 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE experiments (
        experiment   VARCHAR PRIMARY KEY,
        created_at   TIMESTAMP NOT NULL DEFAULT now(),
        config_hash  VARCHAR NOT NULL,
        config_json  VARCHAR NOT NULL,
        n_train      INTEGER NOT NULL,
        n_test       INTEGER NOT NULL,
        description  VARCHAR
    );
    CREATE TABLE examples (
        experiment   VARCHAR NOT NULL,
        split        VARCHAR NOT NULL CHECK (split IN ('train', 'test')),
        example_id   INTEGER NOT NULL,
        text         VARCHAR,
        label        VARCHAR,
        content_hash VARCHAR NOT NULL,
        PRIMARY KEY (experiment, split, example_id)
    );
    CREATE TABLE runs (
        experiment      VARCHAR NOT NULL,
        run_id          INTEGER NOT NULL,
        attempt         VARCHAR NOT NULL,
        status          VARCHAR NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
        reason          VARCHAR,
        seed            BIGINT,
        curriculum_kind VARCHAR,
        config_hash     VARCHAR,
        code_version    VARCHAR,
        n_steps         INTEGER NOT NULL,
        batch_size      INTEGER NOT NULL,
        started_at      TIMESTAMP,
        finished_at     TIMESTAMP,
        PRIMARY KEY (experiment, run_id)
    );
    CREATE TABLE batches (
        experiment  VARCHAR NOT NULL,
        run_id      INTEGER NOT NULL,
        step        INTEGER NOT NULL,
        position    INTEGER NOT NULL,
        example_id  INTEGER NOT NULL,
        PRIMARY KEY (experiment, run_id, step, position)
    );
    -- No index on losses: bulk loads would slow several-fold. Duplicates are impossible
    -- because every row arrives in exactly one shard, each shard is loaded once (the
    -- manifest, in the same transaction), and a restarted run's rows are replaced.
    CREATE TABLE losses (
        experiment  VARCHAR NOT NULL,
        run_id      INTEGER NOT NULL,
        step        INTEGER NOT NULL,
        test_id     INTEGER NOT NULL,
        loss        DOUBLE NOT NULL
    );
    CREATE TABLE checkpoints (
        experiment      VARCHAR NOT NULL,
        checkpoint_step INTEGER NOT NULL,
        batch_size      INTEGER NOT NULL,
        curvature       FLOAT[],          -- d x d, row-major; NULL: the empirical Fisher is used
        PRIMARY KEY (experiment, checkpoint_step)
    );
    CREATE TABLE step_learning_rates (
        experiment     VARCHAR NOT NULL,
        step           INTEGER NOT NULL,
        learning_rate  DOUBLE NOT NULL,
        PRIMARY KEY (experiment, step)
    );
    CREATE TABLE projected_gradients (
        experiment      VARCHAR NOT NULL,
        checkpoint_step INTEGER NOT NULL,
        split           VARCHAR NOT NULL CHECK (split IN ('train', 'test')),
        example_id      INTEGER NOT NULL,
        gradient        FLOAT[] NOT NULL,
        PRIMARY KEY (experiment, checkpoint_step, split, example_id)
    );
    CREATE TABLE simulators (
        experiment       VARCHAR NOT NULL,
        version          VARCHAR NOT NULL,
        method           VARCHAR NOT NULL,
        created_at       TIMESTAMP NOT NULL DEFAULT now(),
        path             VARCHAR NOT NULL,
        fit_run_ids      INTEGER[] NOT NULL,
        heldout_run_ids  INTEGER[] NOT NULL,
        hyperparameters  VARCHAR NOT NULL,
        data_hash        VARCHAR NOT NULL,
        config_hash      VARCHAR NOT NULL,
        code_version     VARCHAR NOT NULL,
        PRIMARY KEY (experiment, version)
    );
    CREATE TABLE aliases (
        experiment  VARCHAR NOT NULL,
        alias       VARCHAR NOT NULL,
        version     VARCHAR NOT NULL,
        updated_at  TIMESTAMP NOT NULL DEFAULT now(),
        PRIMARY KEY (experiment, alias)
    );
    CREATE TABLE evaluations (
        experiment    VARCHAR NOT NULL,
        version       VARCHAR NOT NULL,
        metric        VARCHAR NOT NULL,
        value         DOUBLE,
        ci_low        DOUBLE,
        ci_high       DOUBLE,
        heldout_hash  VARCHAR NOT NULL,
        n_heldout     INTEGER NOT NULL,
        evaluated_at  TIMESTAMP NOT NULL DEFAULT now(),
        PRIMARY KEY (experiment, version, metric, heldout_hash)
    );
    CREATE TABLE shard_manifest (
        path        VARCHAR PRIMARY KEY,
        experiment  VARCHAR NOT NULL,
        run_id      INTEGER NOT NULL,
        attempt     VARCHAR NOT NULL,
        kind        VARCHAR NOT NULL,
        n_rows      BIGINT NOT NULL,
        loaded_at   TIMESTAMP NOT NULL DEFAULT now()
    );
    CREATE VIEW loss_curves AS
        SELECT l.experiment, l.run_id, l.test_id, l.step, l.loss
        FROM losses l JOIN runs r USING (experiment, run_id)
        WHERE r.status = 'complete';
    CREATE VIEW final_losses AS
        SELECT l.experiment, l.run_id, r.curriculum_kind, l.test_id, l.loss
        FROM losses l JOIN runs r USING (experiment, run_id)
        WHERE r.status = 'complete' AND l.step = r.n_steps;
    CREATE VIEW example_coverage AS
        SELECT e.experiment, e.example_id,
               count(b.run_id) AS occurrences,
               count(DISTINCT b.run_id) AS runs_with
        FROM examples e
        LEFT JOIN (SELECT b.* FROM batches b JOIN runs r USING (experiment, run_id)
                   WHERE r.status = 'complete') b
          ON b.experiment = e.experiment AND b.example_id = e.example_id
        WHERE e.split = 'train'
        GROUP BY e.experiment, e.example_id;
    CREATE VIEW leaderboard AS
        SELECT s.experiment, s.version, s.method, s.created_at,
               max(CASE WHEN ev.metric = 'all_steps_mse' THEN ev.value END) AS all_steps_mse,
               max(CASE WHEN ev.metric = 'all_steps_mse' THEN ev.ci_low END) AS mse_ci_low,
               max(CASE WHEN ev.metric = 'all_steps_mse' THEN ev.ci_high END) AS mse_ci_high,
               max(CASE WHEN ev.metric = 'all_steps_mae' THEN ev.value END) AS all_steps_mae,
               max(CASE WHEN ev.metric = 'spearman_across_runs' THEN ev.value END) AS spearman_across_runs,
               max(CASE WHEN ev.metric = 'spearman_across_tests' THEN ev.value END) AS spearman_across_tests,
               max(ev.n_heldout) AS n_heldout
        FROM simulators s JOIN evaluations ev USING (experiment, version)
        GROUP BY s.experiment, s.version, s.method, s.created_at
        ORDER BY s.experiment, all_steps_mse;
    """,
    # 2: Adam-preconditioned training gradients (split 'train_preconditioned'); each run's
    # optimizer, read from its experiment's config (runs of one experiment share the config).
    """
    CREATE TABLE projected_gradients_v2 (
        experiment      VARCHAR NOT NULL,
        checkpoint_step INTEGER NOT NULL,
        split           VARCHAR NOT NULL CHECK (split IN ('train', 'test', 'train_preconditioned')),
        example_id      INTEGER NOT NULL,
        gradient        FLOAT[] NOT NULL,
        PRIMARY KEY (experiment, checkpoint_step, split, example_id)
    );
    INSERT INTO projected_gradients_v2 SELECT * FROM projected_gradients;
    DROP TABLE projected_gradients;
    ALTER TABLE projected_gradients_v2 RENAME TO projected_gradients;
    CREATE VIEW run_optimizers AS
        SELECT r.experiment, r.run_id,
               coalesce(json_extract_string(e.config_json, '$.training.optimizer'), 'adamw') AS optimizer,
               CAST(json_extract(e.config_json, '$.training.learning_rate') AS DOUBLE) AS learning_rate,
               coalesce(CAST(json_extract(e.config_json, '$.training.betas[0]') AS DOUBLE), 0.9) AS adam_beta1,
               coalesce(CAST(json_extract(e.config_json, '$.training.momentum') AS DOUBLE), 0.0) AS sgd_momentum
        FROM runs r JOIN experiments e USING (experiment);
    """,
    # 3: the effects table (expected leave-one-out effect of each training example on each test
    # example's final loss, with bootstrap intervals; test_id NULL: the mean over test examples)
    # and its views joined to the examples' text and label; example coverage counts sampled runs
    # only (not the verification runs that `simfluence optimize` trains).
    """
    CREATE OR REPLACE VIEW example_coverage AS
        SELECT e.experiment, e.example_id,
               count(b.run_id) AS occurrences,
               count(DISTINCT b.run_id) AS runs_with
        FROM examples e
        LEFT JOIN (SELECT b.* FROM batches b JOIN runs r USING (experiment, run_id)
                   WHERE r.status = 'complete'
                     AND coalesce(r.curriculum_kind, '') NOT IN ('optimize-proposed', 'optimize-random')) b
          ON b.experiment = e.experiment AND b.example_id = e.example_id
        WHERE e.split = 'train'
        GROUP BY e.experiment, e.example_id;
    CREATE TABLE effects (
        experiment     VARCHAR NOT NULL,
        version        VARCHAR NOT NULL,
        train_id       INTEGER NOT NULL,
        test_id        INTEGER,
        effect         DOUBLE NOT NULL,
        ci_low         DOUBLE,
        ci_high        DOUBLE,
        n_curricula    INTEGER NOT NULL,
        n_refits       INTEGER NOT NULL,
        base           VARCHAR NOT NULL,
        heldout_error  DOUBLE,
        below_error    BOOLEAN,
        computed_at    TIMESTAMP NOT NULL DEFAULT now()
    );
    CREATE VIEW effects_named AS
        SELECT f.experiment, f.version, f.train_id, tr.text AS train_text, tr.label AS train_label,
               f.test_id, te.text AS test_text, te.label AS test_label, f.effect, f.ci_low, f.ci_high,
               f.n_curricula, f.n_refits, f.base, f.heldout_error, f.below_error
        FROM effects f
        LEFT JOIN examples tr ON tr.experiment = f.experiment AND tr.split = 'train' AND tr.example_id = f.train_id
        LEFT JOIN examples te ON te.experiment = f.experiment AND te.split = 'test' AND te.example_id = f.test_id;
    CREATE VIEW most_helpful_examples AS
        SELECT row_number() OVER w AS rank, * FROM effects_named
        WINDOW w AS (PARTITION BY experiment, version, test_id ORDER BY effect, train_id)
        QUALIFY rank <= 5 ORDER BY experiment, version, test_id NULLS FIRST, rank;
    CREATE VIEW most_harmful_examples AS
        SELECT row_number() OVER w AS rank, * FROM effects_named
        WINDOW w AS (PARTITION BY experiment, version, test_id ORDER BY effect DESC, train_id)
        QUALIFY rank <= 5 ORDER BY experiment, version, test_id NULLS FIRST, rank;
    """,
]


class WarehouseError(UserError, RuntimeError):
    """Raised for an unusable warehouse file (newer schema, unreadable, locked too long)."""


class QueryError(WarehouseError, ValueError):
    """A user's query that :meth:`Warehouse.query` refused or that DuckDB could not run."""


# What an untrusted query may start with: DuckDB parses all of these as SELECT statements, and
# PRAGMA, CALL, SET, ATTACH, DETACH, COPY, EXPORT, LOAD/INSTALL and every statement that writes
# as statements of other types.
QUERY_KEYWORDS = ("SELECT", "WITH", "VALUES", "FROM", "SHOW", "DESCRIBE", "SUMMARIZE")

T = TypeVar("T")


def _one_line(error: duckdb.Error) -> str:
    """DuckDB's message without its context lines (LINE 1: ..., the caret)."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


def default_home() -> Path:
    """``$SIMFLUENCE_HOME`` or ``./simfluence-data``."""
    return Path(os.environ.get("SIMFLUENCE_HOME", "simfluence-data"))


class Warehouse:
    """A warehouse file and its shard and registry folders beside it.

    Args:
        path: the DuckDB file (default ``<home>/warehouse.duckdb``).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_home() / "warehouse.duckdb"
        self.home = self.path.parent
        self.shard_root = self.home / "shards"
        self.registry_root = self.home / "registry"
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # ---- writing -------------------------------------------------------------------------

    @contextmanager
    def writer(self, timeout: float = 600.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """Exclusive read-write connection: takes the file lock, creates or migrates the schema.

        Hold it briefly: while it is open no other process can read the file.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WarehouseError(f"{self.lock_path}: another writer held the lock for {timeout:.0f} s")
                    time.sleep(0.05)
            try:
                con = self._connect_for_writing(deadline)
                try:
                    migrate(con, self.path)
                    yield con
                finally:
                    con.close()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _connect_for_writing(self, deadline: float) -> duckdb.DuckDBPyConnection:
        """Open the file read-write, waiting with backoff (0.05 s doubling to 1 s) while readers
        in other processes hold it; past ``deadline`` (``time.monotonic()``) raise, naming the
        process DuckDB reports as the holder."""
        wait = 0.05
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.IOException as error:
                if time.monotonic() + wait > deadline:
                    holder = re.search(r"Conflicting lock is held in (.*?)(?: \(PID (\d+)\))", str(error))
                    who = f"{holder.group(1)} (pid {holder.group(2)})" if holder else "another process"
                    raise WarehouseError(f"{self.path}: {who} kept the file open for reading; gave up waiting to "
                                         f"write (close that connection and run the command again)") from None
                time.sleep(wait)
                wait = min(1.0, wait * 2)

    # ---- reading -------------------------------------------------------------------------

    @contextmanager
    def reader(self, timeout: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
        """Read-only connection for this package's own queries; retries while a writer holds the
        file. Never takes the lock.

        Its configuration is not locked: DuckDB shares settings between the connections a process
        has to one file, and these connections only run fixed, parameterised queries. SQL from a
        user goes through :meth:`query` instead. It has no ``live_losses`` view: listing and
        checking the shard files on every internal read would tax every command; :meth:`query`
        has it.
        """
        self._require_file()
        con = self._retry(lambda: duckdb.connect(str(self.path), read_only=True), timeout)
        try:
            self._check_schema(con)
            yield con
        finally:
            con.close()

    def query(self, sql: str, timeout: float = 30.0) -> pl.DataFrame:
        """Run one untrusted read-only statement and return its rows (see :meth:`query_relation`)."""
        with self.query_relation(sql, timeout) as relation:
            return to_frame(relation)

    @contextmanager
    def query_relation(self, sql: str, timeout: float = 30.0) -> Iterator[duckdb.DuckDBPyRelation]:
        """One untrusted read-only statement as a DuckDB relation, to fetch from inside the block
        (every fetch runs it again); errors while fetching there are reported as below.

        ``sql`` must be exactly one statement that only reads (SELECT, WITH, VALUES, FROM,
        SHOW, DESCRIBE, SUMMARIZE). It runs in a private in-memory DuckDB instance with this
        warehouse attached read-only, the ``live_losses`` view, no extensions, file access
        limited to the shard folder, and its configuration locked before the statement runs.

        Raises:
            QueryError: several statements or none, a statement that is not a query, a file
                outside the shard folder, or any error DuckDB reports (in one line).
        """
        with self._sandbox(timeout) as con:
            try:
                statements = con.extract_statements(sql)
            except duckdb.Error as error:
                raise QueryError(_one_line(error)) from None
            if len(statements) != 1:
                raise QueryError("no SQL statement given" if not statements else
                                 f"one statement per call, got {len(statements)}")
            statement = statements[0]
            if statement.type != duckdb.StatementType.SELECT:
                raise QueryError(f"only read-only queries are allowed ({', '.join(QUERY_KEYWORDS)}); "
                                 f"this is a {statement.type.name} statement")
            try:
                yield con.sql(statement)
            except duckdb.PermissionException as error:
                raise QueryError(f"only files under {self._shard_folder()} can be read: {_one_line(error)}") from None
            except duckdb.Error as error:
                raise QueryError(_one_line(error)) from None

    @contextmanager
    def _sandbox(self, timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
        """A private in-memory instance with the warehouse attached read-only as its default
        database, ``live_losses`` created, then its configuration locked.

        A private instance, because DuckDB's settings belong to the instance, which every
        connection a process opens to the same file shares: locking one would lock them all.
        """
        self._require_file()
        con = duckdb.connect(":memory:", config={"temp_directory": f"{self.path}.tmp"})
        try:
            self._retry(lambda: con.execute("ATTACH ? AS warehouse (READ_ONLY)", [str(self.path)]), timeout)
            con.execute("USE warehouse")
            self._check_schema(con)
            self._create_live_losses(con)
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("SET autoload_known_extensions = false")
            con.execute("SET allowed_directories = ?", [[self._shard_folder()]])
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            yield con
        finally:
            con.close()

    def _shard_folder(self) -> str:
        """The one folder untrusted queries may read files in: the resolved shard root, with a slash."""
        return self.shard_root.resolve().as_posix() + "/"

    def _require_file(self) -> None:
        if not self.path.exists():
            raise WarehouseError(f"{self.path}: no warehouse here yet (collect or ingest runs first)")

    def _retry(self, open_: Callable[[], T], timeout: float) -> T:
        """``open_()``, retried while another process writes the file (DuckDB refuses to open it then)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return open_()
            except duckdb.IOException as error:
                if time.monotonic() > deadline:
                    raise WarehouseError(f"{self.path}: still being written after {timeout:.0f} s ({error})") from None
                time.sleep(0.05)

    def _check_schema(self, con: duckdb.DuckDBPyConnection) -> None:
        version = schema_version(con)
        if version != SCHEMA_VERSION:
            raise WarehouseError(
                f"{self.path}: schema version {version}, this code reads {SCHEMA_VERSION}"
                + ("; open it with a writer to upgrade it" if version < SCHEMA_VERSION else "; upgrade simfluence")
            )

    def _create_live_losses(self, con: duckdb.DuckDBPyConnection) -> None:
        """TEMP VIEW ``live_losses``: loss rows in shard files not yet ingested (never locked).

        Only whole, readable loss shards are listed (a corrupt file is left out here and
        quarantined by the next ingest), by explicit path, so no folder name is read as a
        glob pattern."""
        loaded = {row[0] for row in con.execute("SELECT path FROM shard_manifest").fetchall()}
        root = self.shard_root
        unloaded = [path for path in sorted(root.glob("*/run-*/losses-*.parquet"))
                    if path.relative_to(root).as_posix() not in loaded]
        files = []
        if unloaded:  # the footer checks need PyArrow: loaded only when there is something to check
            from simfluence_platform.storage.shards import readable_loss_shards  # shards imports this module

            files = [p.resolve().as_posix() for p in readable_loss_shards(unloaded)]
        if not files:
            con.execute(
                "CREATE TEMP VIEW live_losses AS SELECT NULL::VARCHAR AS experiment, NULL::INTEGER AS run_id, "
                "NULL::INTEGER AS step, NULL::INTEGER AS test_id, NULL::DOUBLE AS loss, NULL::VARCHAR AS shard "
                "WHERE false"
            )
            return
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(f"""
            CREATE TEMP VIEW live_losses AS
            SELECT regexp_extract(filename, '([^/]+)/run-[0-9]+/[^/]+$', 1) AS experiment,
                   CAST(regexp_extract(filename, 'run-([0-9]+)/[^/]+$', 1) AS INTEGER) AS run_id,
                   step, test_id, loss, filename AS shard
            FROM read_parquet([{listed}], filename = true)
        """)


def to_frame(relation: duckdb.DuckDBPyRelation) -> pl.DataFrame:
    """Run ``relation`` into a Polars DataFrame through Arrow's C stream interface (PyArrow never
    loads).

    Raises:
        QueryError: an INTERVAL column (Polars has no such type), or an error DuckDB reports while
            the rows stream (in one line).
    """
    import polars as pl

    interval = [name for name, kind in zip(relation.columns, relation.types) if "INTERVAL" in str(kind)]
    if interval:  # Polars would panic
        raise QueryError(f"column {interval[0]!r} is an INTERVAL, which cannot be returned; cast it to VARCHAR or "
                         f"take its epoch()")
    try:
        return pl.DataFrame(relation)
    except pl.exceptions.PolarsError as error:  # DuckDB's errors while streaming the rows arrive as these
        raise QueryError(str(error).splitlines()[0].removeprefix("got external error: ")) from None


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version recorded in the file (0 for an empty file)."""
    # duckdb_tables(), not information_schema.tables: binding that view costs ~30 ms on each new connection
    exists = fetch_one(con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_version' "
                            "AND database_name = current_database()")[0]
    if not exists:
        return 0
    return int(fetch_one(con, "SELECT coalesce(max(version), 0) FROM schema_version")[0])


def migrate(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`, one migration per transaction; refuse a newer one."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise WarehouseError(
            f"{path}: schema version {current} was written by a newer simfluence (this one knows "
            f"{SCHEMA_VERSION}); refusing to touch it"
        )
    for version in range(current, SCHEMA_VERSION):
        with transaction(con):
            con.execute(MIGRATIONS[version])
            con.execute("INSERT INTO schema_version VALUES (?, now())", [version + 1])


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``BEGIN`` ... ``COMMIT``, or ``ROLLBACK`` when the block raises: the one way this package
    groups writes."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: no trailing newline


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is a safe identifier for folders and keys, else raise naming ``what``.

    Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 64
    characters: no separators, so no name can escape its folder.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise WarehouseError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' (no '..', at most 64 characters)"
        )
    return name


def fetch_one(con: duckdb.DuckDBPyConnection, query: str, params: list | None = None) -> tuple | None:
    """The first row of a query, or None; drains the result (DuckDB 2.0 refuses further work on a
    connection while a result is unfinished, which ``fetchone()`` leaves it)."""
    rows = con.execute(query, params or []).fetchall()
    return rows[0] if rows else None
