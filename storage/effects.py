"""The ``effects`` table: expected leave-one-out effects of a simulator version, with intervals.

One set of rows per (experiment, version): storing again replaces it in one transaction, so a
reader sees the old set or the new one, never a mix. Rows with ``test_id`` NULL hold the effect
on the mean final loss over the test examples.
"""

from __future__ import annotations

import polars as pl

from simfluence_platform.storage.warehouse import Warehouse, WarehouseError, transaction

COLUMNS = ["train_id", "test_id", "effect", "ci_low", "ci_high", "n_curricula", "heldout_error", "below_error"]


def store_effects(warehouse: Warehouse, experiment: str, version: str, frame: pl.DataFrame, base: str,
                  n_refits: int) -> int:
    """Replace the effects of ``version`` with ``frame`` (columns :data:`COLUMNS`); returns the row count."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise WarehouseError(f"effects frame lacks columns {missing}")
    rows = frame.select(COLUMNS).with_columns(pl.lit(experiment).alias("experiment"), pl.lit(version).alias("version"),
                                              pl.lit(n_refits).alias("n_refits"), pl.lit(base).alias("base"))
    with warehouse.writer() as con, transaction(con):
        con.execute("DELETE FROM effects WHERE experiment = ? AND version = ?", [experiment, version])
        con.register("new_effects", rows.to_arrow())
        try:
            con.execute("INSERT INTO effects (experiment, version, train_id, test_id, effect, ci_low, ci_high, "
                        "n_curricula, n_refits, base, heldout_error, below_error) SELECT experiment, version, "
                        "train_id, test_id, effect, ci_low, ci_high, n_curricula, n_refits, base, heldout_error, "
                        "below_error FROM new_effects")
        finally:
            con.unregister("new_effects")
    return rows.height


def named_effects(warehouse: Warehouse, experiment: str, version: str) -> pl.DataFrame:
    """The stored effects of ``version`` joined to the examples' text and label (view ``effects_named``)."""
    with warehouse.reader() as con:
        return con.sql("SELECT * EXCLUDE (experiment, version) FROM effects_named WHERE experiment = ? AND version = ? "
                       "ORDER BY test_id NULLS FIRST, effect", params=[experiment, version]).pl()


def example_labels(warehouse: Warehouse, experiment: str, split: str) -> pl.DataFrame:
    """``example_id, text, label`` of one split of the experiment."""
    with warehouse.reader() as con:
        return con.sql("SELECT example_id, text, label FROM examples WHERE experiment = ? AND split = ? "
                       "ORDER BY example_id", params=[experiment, split]).pl()

