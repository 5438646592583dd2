"""Ingest benchmark: loss rows per second into DuckDB, and query latencies.

Writes 50 runs x 201 steps x 1,000 test examples (10.05 M loss rows) as Parquet shards with the
run-side writer, ingests them with the single-writer ingest (DuckDB's Parquet reader, one
transaction per run), and compares with an ``executemany`` insert of the same rows measured in
the same run (on a sample, scaled). Then times a loss-curve query and the leaderboard view on
the full table (median of repeated runs).

Usage: ``python bench/ingest_bench.py [--runs 50] [--steps 200] [--tests 1000] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from simfluence_platform.storage.experiments import register_experiment
from simfluence_platform.storage.ingest import ingest
from simfluence_platform.storage.shards import LossShardWriter, RunHeader
from simfluence_platform.storage.warehouse import Warehouse


def median_seconds(fn, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--executemany-rows", type=int, default=20_000)
    parser.add_argument("--json", type=Path, default=Path("bench/results/ingest_bench.json"))
    args = parser.parse_args()
    R, T, m = args.runs, args.steps, args.tests
    rows = R * (T + 1) * m
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as home:
        wh = Warehouse(Path(home) / "warehouse.duckdb")
        frame = lambda k: pl.DataFrame({"example_id": range(k), "text": [""] * k, "label": [""] * k})  # noqa: E731
        register_experiment(wh, "bench", {"bench": True}, frame(1000), frame(m))
        start = time.perf_counter()
        for r in range(R):
            writer = LossShardWriter(wh.shard_root, RunHeader("bench", r, T, 8, m), flush_every=50)
            writer.write_batches(rng.integers(0, 1000, (T, 8)))
            losses = rng.uniform(0.1, 2.0, (T + 1, m))
            for t in range(T + 1):
                writer.log(t, losses[t])
            writer.complete()
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        report = ingest(wh)
        ingest_s = time.perf_counter() - start
        assert len(report.completed_runs) == R, report.to_dict()
        ingest_rate = report.loaded_rows / ingest_s

        sample = args.executemany_rows
        con = duckdb.connect(str(Path(home) / "executemany.duckdb"))
        con.execute("CREATE TABLE losses (experiment VARCHAR, run_id INTEGER, step INTEGER, test_id INTEGER, "
                    "loss DOUBLE)")
        values = [("bench", 0, i // m, i % m, float(v)) for i, v in enumerate(rng.uniform(0, 2, sample))]
        start = time.perf_counter()
        con.executemany("INSERT INTO losses VALUES (?, ?, ?, ?, ?)", values)
        executemany_rate = sample / (time.perf_counter() - start)
        con.close()

        with wh.reader() as con:
            curve_s = median_seconds(lambda: con.execute(
                "SELECT step, loss FROM loss_curves WHERE experiment = ? AND run_id = ? AND test_id = ? "
                "ORDER BY step", ["bench", 17, 321]).fetchall())
        with wh.writer() as con:
            for v in range(10):
                con.execute("INSERT INTO simulators (experiment, version, method, path, fit_run_ids, heldout_run_ids, "
                            "hyperparameters, data_hash, config_hash, code_version) VALUES "
                            "('bench', ?, 'm', 'p', [1], [2], '{}', 'd', 'c', 'v')", [f"v{v}"])
                for metric in ("all_steps_mse", "all_steps_mae", "spearman_across_runs", "spearman_across_tests"):
                    con.execute("INSERT INTO evaluations (experiment, version, metric, value, ci_low, ci_high, "
                                "heldout_hash, n_heldout) VALUES ('bench', ?, ?, random(), 0, 1, 'h', 5)",
                                [f"v{v}", metric])
        with wh.reader() as con:
            board_s = median_seconds(lambda: con.execute("SELECT * FROM leaderboard").fetchall())
            final_s = median_seconds(lambda: con.execute(
                "SELECT curriculum_kind, avg(loss) FROM final_losses GROUP BY ALL").fetchall(), repeats=5)
        size_mb = wh.path.stat().st_size / 1e6
    result = {
        "loss_rows": rows, "shard_write_seconds": write_s, "ingest_seconds": ingest_s,
        "ingest_rows_per_second": ingest_rate, "executemany_rows_per_second": executemany_rate,
        "speedup_vs_executemany": ingest_rate / executemany_rate, "loss_curve_query_seconds": curve_s,
        "leaderboard_view_seconds": board_s, "final_losses_by_kind_seconds": final_s, "warehouse_mb": size_mb,
    }
    print(f"wrote {rows / 1e6:.2f} M loss rows as shards in {write_s:.1f} s ({rows / write_s / 1e6:.1f} M rows/s)")
    print(f"ingest: {ingest_s:.2f} s = {ingest_rate / 1e6:.2f} M rows/s; executemany baseline "
          f"{executemany_rate:,.0f} rows/s on {sample:,} rows; ratio {ingest_rate / executemany_rate:,.0f}x")
    print(f"loss curve of one (run, test) over {T + 1} steps: {curve_s * 1e3:.1f} ms (median); leaderboard view "
          f"{board_s * 1e3:.1f} ms; final-loss distribution per curriculum kind {final_s * 1e3:.0f} ms; "
          f"warehouse {size_mb:.0f} MB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
