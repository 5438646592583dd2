"""Collection that nothing but the user stops: readers, killed processes, corrupt shards and
foreign runs against the real warehouse, shards and ingest, in real processes."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simfluence_platform.storage.experiments import complete_run_ids, load_runset, register_experiment
from simfluence_platform.storage.ingest import ingest
from simfluence_platform.storage.shards import BATCH_SCHEMA, LossShardWriter, RunBusyError, RunHeader, read_marker
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError

sys.path.insert(0, str(Path(__file__).parent))
from shard_writer_process import synthetic_run  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parent
ENV = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}"}
STEPS, N_TESTS, N_TRAIN = 6, 5, 20


def examples(k: int) -> pl.DataFrame:
    return pl.DataFrame({"example_id": range(k), "text": [f"text {i}" for i in range(k)], "label": ["a"] * k})


@pytest.fixture
def wh(tmp_path) -> Warehouse:
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    register_experiment(warehouse, "exp", {"seed": 1}, examples(N_TRAIN), examples(N_TESTS))
    return warehouse


def write_run(wh: Warehouse, run_id: int, steps: int = STEPS, config_hash: str = "") -> LossShardWriter:
    batches, losses = synthetic_run(run_id, steps, N_TESTS, N_TRAIN)
    writer = LossShardWriter(wh.shard_root, RunHeader("exp", run_id, steps, 2, N_TESTS, seed=run_id,
                                                      config_hash=config_hash), flush_every=2)
    writer.write_batches(batches)
    for step in range(steps + 1):
        writer.log(step, losses[step])
    writer.complete()
    return writer


def hold_reader(wh: Warehouse, seconds: float) -> subprocess.Popen:
    """A reader in another process that holds the file; returns once it has it open."""
    process = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from simfluence_platform.storage.warehouse import Warehouse\n"
        "with Warehouse(sys.argv[1]).reader() as con:\n"
        "    print('open', flush=True); time.sleep(float(sys.argv[2]))\n"), str(wh.path), str(seconds)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "open"
    return process


def query(wh: Warehouse, sql: str):
    with wh.reader() as con:
        return con.execute(sql).fetchall()


def test_ingest_waits_for_a_reader_and_then_loads(wh):
    write_run(wh, 0)
    reader = hold_reader(wh, 2.0)
    report = ingest(wh)  # today's writer fails at once with an IOException
    reader.wait()
    assert report.completed_runs == [("exp", 0)]


def test_a_reader_that_does_not_let_go_gives_a_bounded_error_naming_it(wh):
    write_run(wh, 0)
    reader = hold_reader(wh, 30.0)
    try:
        with pytest.raises(WarehouseError, match=rf"pid {reader.pid}\).*gave up waiting"):
            ingest(wh, timeout=1.0)
    finally:
        reader.kill()
        reader.wait()
    assert ingest(wh).completed_runs == [("exp", 0)]  # nothing was half-done


def test_readers_get_in_during_a_long_ingest_backlog(wh):
    for run_id in range(40):
        write_run(wh, run_id)
    probe = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from simfluence_platform.storage.warehouse import Warehouse\n"
        "time.sleep(0.3)\n"
        "with Warehouse(sys.argv[1]).reader() as con:\n"
        "    print(con.execute('SELECT count(*) FROM runs').fetchall()[0][0], flush=True)\n"), str(wh.path)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    report = ingest(wh, hold_seconds=0.0)
    seen = int(probe.communicate(timeout=120)[0])
    assert len(report.completed_runs) == 40
    assert seen < 40  # the reader got in while the backlog was being loaded, not only after it


def test_one_attempt_per_run_at_a_time_and_a_dead_one_does_not_block(wh):
    process = subprocess.Popen([sys.executable, str(HERE / "shard_writer_process.py"), str(wh.shard_root), "exp",
                                "3", "200", str(N_TESTS), str(N_TRAIN), "0.05"], env=ENV)
    folder = wh.shard_root / "exp" / "run-000003"
    deadline = time.monotonic() + 60
    while not list(folder.glob("losses-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RunBusyError, match="run 3 of exp is being written by another live process"):
        LossShardWriter(wh.shard_root, RunHeader("exp", 3, STEPS, 2, N_TESTS))
    process.send_signal(signal.SIGKILL)
    process.wait()
    ingest(wh)
    assert query(wh, "SELECT status FROM runs WHERE run_id = 3") == [("running",)]
    write_run(wh, 3)  # the dead attempt's lock went with its process; the new attempt replaces it
    ingest(wh)
    assert query(wh, "SELECT status, count(*) FROM runs JOIN losses USING (experiment, run_id) "
                     "WHERE run_id = 3 GROUP BY status") == [("complete", (STEPS + 1) * N_TESTS)]


def test_a_corrupt_shard_is_quarantined_and_never_breaks_reads(wh):
    write_run(wh, 0)
    ingest(wh)
    write_run(wh, 1)
    loaded = sorted((wh.shard_root / "exp" / "run-000000").glob("losses-*.parquet"))[0]
    pending = sorted((wh.shard_root / "exp" / "run-000001").glob("losses-*.parquet"))[0]
    for path in (loaded, pending):
        path.write_bytes(path.read_bytes()[:40])  # truncated
    assert wh.query("SELECT count(*) FROM live_losses").rows() == [((STEPS + 1) * N_TESTS - 2 * N_TESTS,)]
    assert load_runset(wh, "exp").n_runs == 1
    report = ingest(wh)
    [(path, reason)] = report.rejected
    assert path == str(pending) and "unreadable Parquet file" in reason and "quarantine" in reason
    assert not pending.exists() and (wh.home / "quarantine" / "exp" / "run-000001" / pending.name).exists()
    assert query(wh, "SELECT status, reason FROM runs WHERE run_id = 1")[0][0] == "failed"
    assert read_marker(pending.parent)["status"] == "failed"  # and so the run is trained again
    write_run(wh, 1)
    assert ingest(wh).completed_runs == [("exp", 1)]
    assert wh.query("SELECT count(*) FROM live_losses").rows() == [(0,)]


def test_a_run_of_another_config_is_refused(wh):
    with wh.reader() as con:
        digest = con.execute("SELECT config_hash FROM experiments").fetchall()[0][0]
    write_run(wh, 0, config_hash=digest)
    write_run(wh, 1, config_hash="0123456789abcdef")
    report = ingest(wh)
    assert report.completed_runs == [("exp", 0)]
    [(path, reason)] = report.rejected
    assert path.endswith("run-000001") and "config hash 0123456789abcdef" in reason
    assert complete_run_ids(wh, "exp") == {0}


def test_example_ids_out_of_range_are_refused(wh):
    write_run(wh, 0)
    batches = wh.shard_root / "exp" / "run-000000" / next(
        p.name for p in (wh.shard_root / "exp" / "run-000000").glob("batches-*.parquet"))
    table = pq.read_table(batches)
    ids = table["example_id"].to_numpy().copy()
    ids[0] = N_TRAIN  # one past the last training example
    pq.write_table(pa.table([table["step"], table["position"], pa.array(ids, pa.int32())], schema=BATCH_SCHEMA),
                   batches)
    report = ingest(wh)
    assert any("example_id" in reason and f"outside 0..{N_TRAIN - 1}" in reason for _, reason in report.rejected)
    assert complete_run_ids(wh, "exp") == set()


def test_chaos_kills_never_lose_or_duplicate_a_row(wh):
    """Collectors, ingests and training-run writers killed at random moments, while readers
    hold the file, 20 times; then one clean collection. Every run is complete exactly once with
    exactly its own losses."""
    runs, steps = 8, 8
    rng = random.Random(0)
    script = str(HERE / "chaos_process.py")
    deadline = time.monotonic() + 180
    kills = 0
    while kills < 20 and time.monotonic() < deadline:
        reader = subprocess.Popen([sys.executable, script, "reader", str(wh.path), str(rng.uniform(0.2, 1.5))],
                                  env=ENV)
        victims = [subprocess.Popen([sys.executable, script, "collector", str(wh.path), str(runs), str(steps)],
                                    env=ENV),
                   subprocess.Popen([sys.executable, script, "ingest", str(wh.path)], env=ENV),
                   subprocess.Popen([sys.executable, str(HERE / "shard_writer_process.py"), str(wh.shard_root),
                                     "exp", str(rng.randrange(runs)), str(steps), str(N_TESTS), str(N_TRAIN),
                                     "0.01"], env=ENV)]
        time.sleep(rng.uniform(0.3, 1.5))
        victim = rng.choice(victims)
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            kills += 1
        for process in victims + [reader]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert kills >= 20
    final = subprocess.run([sys.executable, script, "collector", str(wh.path), str(runs), str(steps)], env=ENV,
                           timeout=300)
    assert final.returncode == 0  # and its ingests alone (pending first, then each run's own) left nothing behind
    assert complete_run_ids(wh, "exp") == set(range(runs))
    assert query(wh, "SELECT count(*), count(DISTINCT (run_id, step, test_id)) FROM losses") == \
        [(runs * (steps + 1) * N_TESTS,) * 2]
    assert query(wh, "SELECT count(*) FROM runs") == [(runs,)]
    loaded = load_runset(wh, "exp")
    for k, run_id in enumerate(loaded.run_ids):
        batches, losses = synthetic_run(int(run_id), steps, N_TESTS, N_TRAIN)
        np.testing.assert_array_equal(loaded.losses[k], losses)
        np.testing.assert_array_equal(loaded.batches[k], batches)


def test_a_home_folder_with_glob_characters_reads_normally(tmp_path):
    wh = Warehouse(tmp_path / "runs [2026]" / "warehouse.duckdb")
    register_experiment(wh, "exp", {"seed": 1}, examples(N_TRAIN), examples(N_TESTS))
    write_run(wh, 0)
    assert wh.query("SELECT count(*) FROM live_losses").rows() == [((STEPS + 1) * N_TESTS,)]
    ingest(wh)
    assert load_runset(wh, "exp").n_runs == 1 and wh.query("SELECT count(*) AS n FROM loss_curves")["n"][0] == 35


def test_abandoned_staging_folders_are_removed_at_the_next_publish(wh):
    import simfluence as sf
    from simfluence_platform.storage import registry

    root = wh.registry_root / "exp"
    dead, mine = root / ".staging-999999999-feed", root / f".staging-{os.getpid()}-beef"
    for folder in (dead, mine):
        folder.mkdir(parents=True)
    runs, _ = sf.synthetic.linear_runs(N_TRAIN, N_TESTS, 3, STEPS, 2, seed=0)
    registry.publish(wh, "exp", sf.MeanTrajectory().fit(runs), fit_run_ids=[0, 1, 2], heldout_run_ids=[],
                     data_hash="d", config_hash="c")
    assert not dead.exists() and mine.exists()  # a publish under way in this process is left alone
