"""Roles for the chaos test, each in its own process so that it can be killed at any moment.

Usage: python chaos_process.py ROLE WAREHOUSE [ARGS]
  collector RUNS STEPS   make runs 0..RUNS-1 of experiment ``exp`` complete the way a collection
                         does: pending shards ingested first, then for each run not complete a
                         training-run stand-in (synthetic losses, streamed slowly) and an ingest
                         of that run alone (of every run after one was postponed) that gives up
                         quickly and goes on when readers keep the file
  ingest                 one ingest of everything pending
  reader SECONDS         open the warehouse read-only and hold it
"""

import sys
import time
from pathlib import Path

from shard_writer_process import synthetic_run

from simfluence_platform.storage.experiments import complete_run_ids
from simfluence_platform.storage.ingest import ingest
from simfluence_platform.storage.shards import LossShardWriter, RunHeader, ShardError
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError

N_TESTS, N_TRAIN = 5, 20


def collector(wh: Warehouse, runs: int, steps: int) -> None:
    try:
        ingest(wh, "exp", timeout=2.0)
    except WarehouseError:
        pass
    backlog = False
    for run_id in sorted(set(range(runs)) - complete_run_ids(wh, "exp")):
        batches, losses = synthetic_run(run_id, steps, N_TESTS, N_TRAIN)
        try:
            writer = LossShardWriter(wh.shard_root, RunHeader("exp", run_id, steps, 2, N_TESTS, seed=run_id),
                                     flush_every=2)
        except ShardError:  # being written by a live process, or finished but not ingested yet
            continue
        writer.write_batches(batches)
        for step in range(steps + 1):
            writer.log(step, losses[step])
            time.sleep(0.005)
        writer.complete()
        try:
            ingest(wh, "exp", None if backlog else [run_id], timeout=2.0)
            backlog = False
        except WarehouseError:
            backlog = True


def main() -> None:
    role, wh = sys.argv[1], Warehouse(Path(sys.argv[2]))
    if role == "collector":
        collector(wh, int(sys.argv[3]), int(sys.argv[4]))
    elif role == "ingest":
        ingest(wh)
    elif role == "reader":
        with wh.reader() as con:
            con.execute("SELECT count(*) FROM losses").fetchall()
            time.sleep(float(sys.argv[3]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
