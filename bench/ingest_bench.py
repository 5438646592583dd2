"""Ingest benchmark: loss rows per second into DuckDB, and query latencies.

Writes 50 runs x 201 steps x 1,000 test examples (10.05 M loss rows) as Parquet shards with the
run-side writer, ingests them with the single-writer ingest (DuckDB's Parquet reader, one
transaction per run), and compares with an ``executemany`` insert of the same rows measured in
the same run (on a sample, scaled). Then times a loss-curve query and the leaderboard view on
the full table (median of repeated runs).

Then the cost of ingesting one more run when the warehouse already holds R runs (``--stored``,
default 50 and 500; small synthetic runs of 20 steps x 20 test examples): today's way, the
baseline, visits every run folder (reads its header and marker, lists it, one query each),
which makes a collection's ingest quadratic in its runs; the new ways are a general ``ingest``
(one directory listing per folder and one query of ``runs``) and ``ingest(run_ids=[r])`` as
``collect`` does after each run. Each is timed on its own fresh runs, median of ``--new-runs``.

Usage: ``python bench/ingest_bench.py [--runs 50] [--steps 200] [--tests 1000] [--stored 50 500]
[--new-runs 5] [--json PATH]``.
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


def write_run(wh: Warehouse, run_id: int, steps: int, tests: int, rng: np.random.Generator,
              flush_every: int = 50) -> None:
    """One complete synthetic run of ``steps`` updates (batch 8) and ``tests`` test examples as shards."""
    writer = LossShardWriter(wh.shard_root, RunHeader("bench", run_id, steps, 8, tests), flush_every=flush_every)
    writer.write_batches(rng.integers(0, 1000, (steps, 8)))
    losses = rng.uniform(0.1, 2.0, (steps + 1, tests))
    for t in range(steps + 1):
        writer.log(t, losses[t])
    writer.complete()


def ingest_per_run(stored: int, new_runs: int, rng: np.random.Generator) -> dict[str, float]:
    """Median seconds to ingest one new run into a warehouse holding ``stored`` complete runs:
    today's way (every folder visited), a general ingest, and an ingest naming the run."""
    steps, tests = 20, 20
    with tempfile.TemporaryDirectory() as home:
        wh = Warehouse(Path(home) / "warehouse.duckdb")
        frame = lambda k: pl.DataFrame({"example_id": range(k), "text": [""] * k, "label": [""] * k})  # noqa: E731
        register_experiment(wh, "bench", {"bench": True}, frame(1000), frame(tests))
        for r in range(stored):
            write_run(wh, r, steps, tests, rng)
        assert len(ingest(wh, "bench").completed_runs) == stored
        ways = {
            "every_folder": lambda r: ingest(wh, "bench", run_ids=range(r + 1)),
            "general": lambda r: ingest(wh, "bench"),
            "named": lambda r: ingest(wh, "bench", run_ids=[r]),
        }
        times: dict[str, list[float]] = {way: [] for way in ways}
        run_id = stored
        for _ in range(new_runs):
            for way, run in ways.items():
                write_run(wh, run_id, steps, tests, rng)
                start = time.perf_counter()
                report = run(run_id)
                times[way].append(time.perf_counter() - start)
                assert report.completed_runs == [("bench", run_id)], report.to_dict()
                run_id += 1
    return {way: statistics.median(seconds) for way, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tests", type=int, default=1000)
    parser.add_argument("--executemany-rows", type=int, default=20_000)
    parser.add_argument("--stored", type=int, nargs="*", default=[50, 500], help="runs already in the warehouse")
    parser.add_argument("--new-runs", type=int, default=5, help="runs ingested per way and size (median)")
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
            write_run(wh, r, T, m, rng)
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
    result["ingest_one_more_run_seconds"] = {}
    for stored in args.stored:
        per_run = ingest_per_run(stored, args.new_runs, rng)
        result["ingest_one_more_run_seconds"][str(stored)] = per_run
        old = per_run["every_folder"]
        print(f"one more run with {stored} stored: every folder visited (today's way) {old * 1e3:.0f} ms; general "
              f"ingest {per_run['general'] * 1e3:.0f} ms ({old / per_run['general']:.1f}x faster); run named "
              f"{per_run['named'] * 1e3:.0f} ms ({old / per_run['named']:.1f}x faster)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
