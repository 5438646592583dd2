"""Experiments and their examples in the warehouse, and reading runs back for fitting."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from simfluence.gradients import GradientCheckpoints
from simfluence.runset import PAD, RunSet
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError, check_name, fetch_one, transaction

EXAMPLE_COLUMNS = ("example_id", "text", "label")


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def register_experiment(
    warehouse: Warehouse,
    name: str,
    config: dict[str, Any],
    train: pl.DataFrame,
    test: pl.DataFrame,
    description: str = "",
    digest: str | None = None,
) -> bool:
    """Record an experiment and its examples (``example_id``, ``text``, ``label`` columns).

    Idempotent: registering the same name with the same config does nothing and returns False;
    a different config under an existing name is refused. ``digest`` is the config's identity
    hash (default: the hash of ``config`` as given).
    """
    check_name(name, "experiment name")
    for split, frame in (("train", train), ("test", test)):
        missing = set(EXAMPLE_COLUMNS) - set(frame.columns)
        if missing:
            raise WarehouseError(f"{split} examples lack columns {sorted(missing)}")
        if frame.height == 0:
            raise WarehouseError(f"the {split} split of experiment {name!r} is empty")
        if frame["example_id"].to_list() != list(range(frame.height)):
            raise WarehouseError(f"{split} example ids must be 0..{frame.height - 1} in order")
    digest = digest or config_hash(config)
    with warehouse.writer() as con:
        existing = fetch_one(con, "SELECT config_hash FROM experiments WHERE experiment = ?", [name])
        if existing is not None:
            if existing[0] != digest:
                raise WarehouseError(f"experiment {name!r} exists with another config (hash {existing[0][:12]})")
            return False
        frames = []
        for split, frame in (("train", train), ("test", test)):
            text = frame["text"].cast(pl.Utf8).fill_null("")
            label = frame["label"].cast(pl.Utf8).fill_null("")
            hashes = [hashlib.sha256(f"{t}\x00{lab}".encode()).hexdigest() for t, lab in zip(text, label)]
            frames.append(pl.DataFrame({
                "experiment": name, "split": split, "example_id": frame["example_id"].cast(pl.Int32),
                "text": text, "label": label, "content_hash": hashes,
            }))
        new_examples = pl.concat(frames).to_arrow()
        con.register("new_examples", new_examples)
        with transaction(con):
            con.execute(
                "INSERT INTO experiments (experiment, config_hash, config_json, n_train, n_test, description) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [name, digest, json.dumps(config, sort_keys=True, default=str), train.height, test.height,
                 description],
            )
            con.execute("INSERT INTO examples SELECT experiment, split, example_id, text, label, content_hash "
                        "FROM new_examples")
        con.unregister("new_examples")
    return True


def load_runset(
    warehouse: Warehouse,
    experiment: str,
    run_ids: list[int] | np.ndarray | None = None,
    test_ids: list[int] | np.ndarray | None = None,
) -> RunSet:
    """The complete runs of an experiment as a :class:`RunSet`, through Arrow.

    Args:
        run_ids: which complete runs (default all); an id that is unknown or not complete is an error.
        test_ids: which test examples (default all), in this order.

    Only the requested runs and test examples are read; rows are placed with vectorised
    indexing, never a Python loop over rows.
    """
    with warehouse.reader() as con:
        row = fetch_one(con, "SELECT n_train, n_test FROM experiments WHERE experiment = ?", [experiment])
        if row is None:
            raise WarehouseError(f"unknown experiment {experiment!r}")
        n_train, n_test = row
        runs = con.execute(
            "SELECT run_id, n_steps, batch_size FROM runs WHERE experiment = ? AND status = 'complete' ORDER BY run_id",
            [experiment]).fetchnumpy()
        available = runs["run_id"].astype(np.int64)
        if run_ids is None:
            chosen = available
        else:
            chosen = np.asarray(run_ids, dtype=np.int64)
            missing = np.setdiff1d(chosen, available)
            if missing.size:
                raise WarehouseError(f"runs {missing[:10].tolist()} of {experiment!r} are unknown or not complete")
        if chosen.size == 0:
            raise WarehouseError(f"experiment {experiment!r} has no complete runs to load")
        steps = np.unique(runs["n_steps"][np.isin(available, chosen)])
        if steps.size != 1:
            raise WarehouseError(f"the chosen runs of {experiment!r} differ in length: {steps.tolist()} steps")
        T = int(steps[0])
        width = int(runs["batch_size"][np.isin(available, chosen)].max())
        tests = np.arange(n_test, dtype=np.int64) if test_ids is None else np.asarray(test_ids, dtype=np.int64)
        if tests.size == 0 or tests.min() < 0 or tests.max() >= n_test:
            raise WarehouseError(f"test ids must lie in 0..{n_test - 1} for experiment {experiment!r}")
        run_list, test_list = chosen.tolist(), tests.tolist()
        batch_rows = con.execute(
            "SELECT run_id, step, position, example_id FROM batches "
            "WHERE experiment = ? AND list_contains(?::INTEGER[], run_id)", [experiment, run_list]).fetchnumpy()
        loss_rows = con.execute(
            "SELECT run_id, step, test_id, loss FROM losses WHERE experiment = ? "
            "AND list_contains(?::INTEGER[], run_id) AND list_contains(?::INTEGER[], test_id)",
            [experiment, run_list, test_list]).fetchnumpy()
    order = np.argsort(chosen)
    run_index = lambda ids: order[np.searchsorted(chosen[order], ids)]  # noqa: E731
    batches = np.full((chosen.size, T, width), PAD, dtype=np.int64)
    batches[run_index(batch_rows["run_id"]), batch_rows["step"] - 1, batch_rows["position"]] = batch_rows["example_id"]
    test_position = np.full(n_test, -1, dtype=np.int64)
    test_position[tests] = np.arange(tests.size)
    losses = np.full((chosen.size, T + 1, tests.size), np.nan)
    losses[run_index(loss_rows["run_id"]), loss_rows["step"], test_position[loss_rows["test_id"]]] = loss_rows["loss"]
    if np.isnan(losses).any():
        r, t, j = np.argwhere(np.isnan(losses))[0]
        raise WarehouseError(f"run {chosen[r]} of {experiment!r} has no loss for test {tests[j]} at step {t}")
    return RunSet(batches, losses, n_train=n_train, run_ids=chosen, test_ids=tests)


def store_gradients(warehouse: Warehouse, experiment: str, gradients: GradientCheckpoints) -> None:
    """Store the gradient-baseline inputs of an experiment (replacing earlier ones), in bulk."""
    K, n, d = gradients.train_grads.shape
    m = gradients.test_grads.shape[1]

    def gradient_rows(split: str, grads: np.ndarray) -> pa.Table:
        count = grads.shape[1]
        flat = pa.array(np.ascontiguousarray(grads, dtype=np.float32).reshape(-1))
        return pa.table({
            "experiment": pa.array([experiment] * (K * count)),
            "checkpoint_step": pa.array(np.repeat(gradients.steps, count).astype(np.int32)),
            "split": pa.array([split] * (K * count)),
            "example_id": pa.array(np.tile(np.arange(count, dtype=np.int32), K)),
            "gradient": pa.ListArray.from_arrays(pa.array(np.arange(0, K * count * d + 1, d, dtype=np.int32)), flat),
        })

    splits = {"train": gradients.train_grads, "test": gradients.test_grads,
              "train_preconditioned": gradients.train_grads_preconditioned}
    rows = pa.concat_tables([gradient_rows(split, grads) for split, grads in splits.items() if grads is not None])
    curvature = [None] * K if gradients.curvatures is None else [
        np.asarray(c, dtype=np.float32).reshape(-1).tolist() for c in gradients.curvatures]
    with warehouse.writer() as con:
        row = fetch_one(con, "SELECT n_train, n_test FROM experiments WHERE experiment = ?", [experiment])
        if row is None:
            raise WarehouseError(f"unknown experiment {experiment!r}")
        if row != (n, m):
            raise WarehouseError(f"gradients are for n={n}, m={m}; experiment {experiment!r} has n={row[0]}, m={row[1]}")
        con.register("new_gradients", rows)
        with transaction(con):
            for table in ("checkpoints", "step_learning_rates", "projected_gradients"):
                con.execute(f"DELETE FROM {table} WHERE experiment = ?", [experiment])
            for step, curv in zip(gradients.steps.tolist(), curvature):
                con.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?)",
                            [experiment, step, gradients.batch_size, curv])
            con.execute("INSERT INTO step_learning_rates SELECT ?, unnest(range(1, ?)), unnest(?::DOUBLE[])",
                        [experiment, len(gradients.learning_rates) + 1, gradients.learning_rates.tolist()])
            con.execute("INSERT INTO projected_gradients SELECT * FROM new_gradients")
        con.unregister("new_gradients")


def load_gradients(warehouse: Warehouse, experiment: str) -> GradientCheckpoints:
    """The gradient-baseline inputs of an experiment as :class:`GradientCheckpoints`."""
    with warehouse.reader() as con:
        checkpoints = con.execute(
            "SELECT checkpoint_step, batch_size, curvature FROM checkpoints WHERE experiment = ? "
            "ORDER BY checkpoint_step", [experiment]).fetchall()
        if not checkpoints:
            raise WarehouseError(f"experiment {experiment!r} has no gradient checkpoints stored")
        rates = con.execute("SELECT learning_rate FROM step_learning_rates WHERE experiment = ? ORDER BY step",
                            [experiment]).fetchnumpy()["learning_rate"]
        grads: dict[str, np.ndarray | None] = {}
        for split in ("train", "test", "train_preconditioned"):
            table = con.sql(
                "SELECT gradient FROM projected_gradients WHERE experiment = ? AND split = ? "
                "ORDER BY checkpoint_step, example_id", params=[experiment, split]).to_arrow_table()
            flat = pc.list_flatten(table["gradient"]).to_numpy()
            if not table.num_rows:
                grads[split] = None
                continue
            grads[split] = flat.reshape(len(checkpoints), -1, len(table["gradient"][0]))
    steps = np.array([c[0] for c in checkpoints])
    curvatures = None
    if checkpoints[0][2] is not None:
        d = grads["train"].shape[2]
        curvatures = np.array([np.asarray(c[2], dtype=np.float32).reshape(d, d) for c in checkpoints])
    return GradientCheckpoints(steps, rates, grads["train"], grads["test"], int(checkpoints[0][1]), curvatures,
                               grads["train_preconditioned"])


@dataclass(frozen=True)
class ExperimentInfo:
    """An experiment's row: its config (as stored), sizes and description."""

    experiment: str
    config_hash: str
    config: dict[str, Any]
    n_train: int
    n_test: int
    description: str
    created_at: Any


def experiment_info(warehouse: Warehouse, experiment: str) -> ExperimentInfo:
    """The experiment's row; :class:`WarehouseError` naming it when it does not exist."""
    with warehouse.reader() as con:
        row = fetch_one(con, "SELECT config_hash, config_json, n_train, n_test, description, created_at "
                             "FROM experiments WHERE experiment = ?", [experiment])
    if row is None:
        raise WarehouseError(f"unknown experiment {experiment!r}")
    return ExperimentInfo(experiment, row[0], json.loads(row[1]), row[2], row[3], row[4] or "", row[5])


# Runs trained to check a proposed curriculum (``simfluence optimize``): the proposal and the
# random curricula beside it. They are not samples of the experiment's curriculum distribution
# (the proposal is chosen by a simulator), so fitting, held-out evaluation and refit never
# count them; their ids start at VERIFICATION_RUN_BASE, clear of the sampled runs 0, 1, 2, ...
VERIFICATION_KINDS = ("optimize-proposed", "optimize-random")  # also spelled out in migration 3's example_coverage
VERIFICATION_RUN_BASE = 1_000_000


def complete_run_ids(warehouse: Warehouse, experiment: str, verification: bool = False) -> set[int]:
    """Ids of the experiment's complete sampled runs (empty before the warehouse exists); with
    ``verification``, those of its complete verification runs (:data:`VERIFICATION_KINDS`) instead."""
    if not warehouse.path.exists():
        return set()
    with warehouse.reader() as con:
        rows = con.execute("SELECT run_id FROM runs WHERE experiment = ? AND status = 'complete' "
                           "AND coalesce(list_contains(?::VARCHAR[], curriculum_kind), false) = ?",
                           [experiment, list(VERIFICATION_KINDS), verification]).fetchall()
    return {r[0] for r in rows}


def max_repeats_in_runs(warehouse: Warehouse, experiment: str, run_ids: list[int]) -> int:
    """The most times one training example appears within one of the runs ``run_ids`` (0 when
    they record no batches)."""
    with warehouse.reader() as con:
        row = fetch_one(con, "SELECT max(k) FROM (SELECT count(*) AS k FROM batches WHERE experiment = ? "
                             "AND list_contains(?::INTEGER[], run_id) GROUP BY run_id, example_id)",
                        [experiment, [int(r) for r in run_ids]])
    return int(row[0] or 0)


def next_verification_run_ids(warehouse: Warehouse, experiment: str, count: int) -> list[int]:
    """``count`` unused run ids for verification runs: above every id at or over
    :data:`VERIFICATION_RUN_BASE` that the warehouse records or the shard folder holds (a run
    trained but not yet ingested)."""
    used = [VERIFICATION_RUN_BASE - 1]
    if warehouse.path.exists():
        with warehouse.reader() as con:
            row = fetch_one(con, "SELECT max(run_id) FROM runs WHERE experiment = ? AND run_id >= ?",
                            [experiment, VERIFICATION_RUN_BASE])
        used.append(row[0] if row and row[0] is not None else used[0])
    folder = warehouse.shard_root / experiment
    if folder.is_dir():
        used += [int(p.name[4:]) for p in folder.glob("run-*") if p.is_dir() and p.name[4:].isdigit()]
    first = max(used) + 1
    return list(range(first, first + count))


def has_gradients(warehouse: Warehouse, experiment: str) -> bool:
    """Whether gradient checkpoints are stored for the experiment."""
    if not warehouse.path.exists():
        return False
    with warehouse.reader() as con:
        return bool(con.execute("SELECT count(*) FROM checkpoints WHERE experiment = ?", [experiment]).fetchall()[0][0])


def run_summary(warehouse: Warehouse, experiment: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(runs per status with their steps and one example reason; coverage of each training
    example, least covered first)."""
    with warehouse.reader() as con:
        runs = con.sql("SELECT status, count(*) AS runs, min(n_steps) AS steps, any_value(reason) AS example_reason "
                       "FROM runs WHERE experiment = ? GROUP BY status ORDER BY status", params=[experiment]).pl()
        coverage = con.sql("SELECT example_id, occurrences, runs_with FROM example_coverage WHERE experiment = ? "
                           "ORDER BY occurrences, example_id", params=[experiment]).pl()
    return runs, coverage
