"""The warehouse, loss shards, ingest and the registry, on real DuckDB files and processes."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import simfluence as sf
from simfluence_platform.storage import registry, warehouse as warehouse_module
from simfluence_platform.storage.experiments import load_runset, register_experiment
from simfluence_platform.storage.ingest import ingest
from simfluence_platform.storage.shards import LossShardWriter, RunHeader, ShardError
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError

sys.path.insert(0, str(Path(__file__).parent))
from shard_writer_process import synthetic_run  # noqa: E402

WRITER = Path(__file__).parent / "shard_writer_process.py"
ROOT = Path(__file__).resolve().parent.parent


def examples(k: int) -> pl.DataFrame:
    return pl.DataFrame({"example_id": range(k), "text": [f"text {i}" for i in range(k)], "label": ["a"] * k})


@pytest.fixture
def wh(tmp_path) -> Warehouse:
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    register_experiment(warehouse, "exp", {"seed": 1}, examples(20), examples(5))
    return warehouse


def write_run(wh: Warehouse, runs: sf.RunSet, r: int, run_id: int | None = None, flush_every: int = 3) -> None:
    header = RunHeader("exp", r if run_id is None else run_id, runs.n_steps, runs.batch_size, runs.n_tests,
                       curriculum_kind="uniform")
    writer = LossShardWriter(wh.shard_root, header, flush_every=flush_every)
    writer.write_batches(runs.batches[r])
    for t in range(runs.n_steps + 1):
        writer.log(t, runs.losses[r, t])
    writer.complete()


def run_writer_process(wh: Warehouse, run_id: int, steps: int = 6, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(WRITER), str(wh.shard_root), "exp", str(run_id), str(steps), "5",
                             "20", str(sleep)], env=env)


def query(wh: Warehouse, sql: str, params=None):
    with wh.reader() as con:
        return con.execute(sql, params or []).fetchall()


def test_schema_is_created_with_its_version_and_views(wh):
    assert query(wh, "SELECT max(version) FROM schema_version") == [(warehouse_module.SCHEMA_VERSION,)]
    views = {r[0] for r in query(wh, "SELECT view_name FROM duckdb_views() WHERE NOT internal")}
    assert {"loss_curves", "final_losses", "example_coverage", "leaderboard"} <= views
    assert wh.query("SELECT count(*) AS n FROM live_losses").rows() == [(0,)]  # the query surface has it


def test_newer_schema_is_refused(wh):
    with wh.writer() as con:
        con.execute("INSERT INTO schema_version VALUES (99, now())")
    with pytest.raises(WarehouseError, match="newer simfluence"):
        with wh.writer():
            pass
    with pytest.raises(WarehouseError, match="schema version 99"):
        with wh.reader():
            pass


def test_older_file_is_upgraded_in_place(wh, monkeypatch):
    runs, _ = sf.synthetic.linear_runs(20, 5, 2, 4, 2, seed=0)
    write_run(wh, runs, 0)
    ingest(wh)
    monkeypatch.setattr(warehouse_module, "MIGRATIONS",
                        warehouse_module.MIGRATIONS + ["ALTER TABLE runs ADD COLUMN note VARCHAR"])
    newest = len(warehouse_module.MIGRATIONS)
    monkeypatch.setattr(warehouse_module, "SCHEMA_VERSION", newest)
    with pytest.raises(WarehouseError, match="open it with a writer to upgrade"):
        with wh.reader():
            pass
    with wh.writer():
        pass
    assert query(wh, "SELECT max(version) FROM schema_version") == [(newest,)]
    assert query(wh, "SELECT count(*), count(note) FROM runs") == [(1, 0)]
    assert query(wh, "SELECT count(*) FROM losses") == [(5 * 5,)]


def test_round_trip_is_exact_and_ingest_is_idempotent(wh):
    runs, _ = sf.synthetic.linear_runs(20, 5, 4, 6, 2, seed=0)
    for r in range(4):
        write_run(wh, runs, r)
    first = ingest(wh)
    assert len(first.completed_runs) == 4 and first.loaded_rows == 4 * 7 * 5 + 4 * 6 * 2
    again = ingest(wh)
    assert again.loaded_shards == 0 and again.loaded_rows == 0
    assert query(wh, "SELECT count(*), count(DISTINCT (run_id, step, test_id)) FROM losses") == [(140, 140)]
    back = load_runset(wh, "exp")
    np.testing.assert_array_equal(back.batches, runs.batches)
    np.testing.assert_array_equal(back.losses, runs.losses)
    part = load_runset(wh, "exp", run_ids=[2, 0], test_ids=[4, 1])
    np.testing.assert_array_equal(part.losses, runs.losses[[2, 0]][:, :, [4, 1]])
    assert query(wh, "SELECT status, curriculum_kind FROM runs WHERE run_id = 0") == [("complete", "uniform")]


def test_ingest_visits_only_runs_with_something_new(wh):
    """Named runs are the only ones loaded; a general ingest skips a finished run's folder
    without opening it (its header, made unreadable here, is never read) but still finds a
    new attempt of a failed run, even one that has written only its header."""
    runs, _ = sf.synthetic.linear_runs(20, 5, 2, 6, 2, seed=0)
    write_run(wh, runs, 0)
    write_run(wh, runs, 1)
    report = ingest(wh, "exp", run_ids=[1])
    assert report.completed_runs == [("exp", 1)]
    assert query(wh, "SELECT run_id, count(*) FROM losses GROUP BY run_id") == [(1, 35)]
    assert ingest(wh).completed_runs == [("exp", 0)]
    (wh.shard_root / "exp" / "run-000000" / "run.json").write_text("not json")
    again = ingest(wh)
    assert again.rejected == [] and again.loaded_shards == 0

    header = RunHeader("exp", 2, runs.n_steps, runs.batch_size, runs.n_tests)
    writer = LossShardWriter(wh.shard_root, header)
    writer.write_batches(runs.batches[0])
    writer.fail("stopped")
    assert ingest(wh).failed_runs == [(("exp", 2), "stopped")]
    retry = LossShardWriter(wh.shard_root, RunHeader("exp", 2, runs.n_steps, runs.batch_size, runs.n_tests))
    ingest(wh)
    assert query(wh, "SELECT attempt, status FROM runs WHERE run_id = 2") == [(retry.header.attempt, "running")]
    retry.close()
    with pytest.raises(ValueError, match="run_ids needs the experiment"):
        ingest(wh, run_ids=[0])


def test_failed_and_diverged_runs_are_recorded_and_never_loaded(wh):
    runs, _ = sf.synthetic.linear_runs(20, 5, 3, 6, 2, seed=0)
    write_run(wh, runs, 0)
    header = RunHeader("exp", 1, 6, 2, 5)
    writer = LossShardWriter(wh.shard_root, header)
    writer.write_batches(runs.batches[1])
    writer.log(0, runs.losses[1, 0])
    writer.fail("loss became NaN at step 1")
    diverged = runs.losses[2].copy()
    diverged[4, 3] = np.inf
    writer = LossShardWriter(wh.shard_root, RunHeader("exp", 2, 6, 2, 5))
    writer.write_batches(runs.batches[2])
    for t in range(7):
        writer.log(t, diverged[t])
    writer.complete()
    report = ingest(wh)
    reasons = dict((run[1], why) for run, why in report.failed_runs)
    assert reasons == {1: "loss became NaN at step 1", 2: "1 non-finite losses (diverged)"}
    assert load_runset(wh, "exp").run_ids.tolist() == [0]
    with pytest.raises(WarehouseError, match=r"runs \[1\] of 'exp' are unknown or not complete"):
        load_runset(wh, "exp", run_ids=[0, 1])


def test_bad_shards_are_rejected_and_left_in_place(wh, tmp_path):
    runs, _ = sf.synthetic.linear_runs(20, 5, 2, 6, 2, seed=0)
    write_run(wh, runs, 0)
    stray = wh.shard_root / "exp" / "run-000009"
    stray.mkdir()
    pl.DataFrame({"step": [0], "test_id": [0], "loss": [1.0]}).write_parquet(stray / "losses-x-0-0.parquet")
    unknown = wh.shard_root / "nobody" / "run-000000"
    write_run(wh, runs, 1)
    os.rename(wh.shard_root / "exp" / "run-000001", tmp_path / "moved")
    unknown.parent.mkdir()
    os.rename(tmp_path / "moved", unknown)
    header = json.loads((unknown / "run.json").read_text())
    (unknown / "run.json").write_text(json.dumps({**header, "experiment": "nobody", "run_id": 0}))
    attempt = json.loads((wh.shard_root / "exp" / "run-000000" / "run.json").read_text())["attempt"]
    wrong = wh.shard_root / "exp" / "run-000000" / f"losses-{attempt}-000100-000100.parquet"
    pl.DataFrame({"step": [1.5], "test": [0]}).write_parquet(wrong)
    report = ingest(wh)
    reasons = {Path(path).name if Path(path).suffix else path: why for path, why in report.rejected}
    assert "run.json is missing" in reasons["losses-x-0-0.parquet"]
    assert any("experiment 'nobody' is not registered" in why for why in reasons.values())
    assert "wrong schema" in reasons[wrong.name]
    assert wrong.exists() and (stray / "losses-x-0-0.parquet").exists()
    assert report.completed_runs == [("exp", 0)]


def test_a_killed_writer_leaves_no_complete_run_and_a_rerun_recovers(wh):
    process = run_writer_process(wh, 7, steps=40, sleep=0.05)
    folder = wh.shard_root / "exp" / "run-000007"
    deadline = time.monotonic() + 60
    while len(list(folder.glob("losses-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (folder / "marker.json").exists()
    report = ingest(wh)
    assert report.completed_runs == [] and report.loaded_shards >= 2
    manifest = [row[0] for row in query(wh, "SELECT path FROM shard_manifest")]
    assert manifest and not any(".tmp-" in path for path in manifest)  # a half-written file is never loaded
    assert query(wh, "SELECT status FROM runs WHERE run_id = 7") == [("running",)]
    assert query(wh, "SELECT count(*) FROM loss_curves") == [(0,)]
    with pytest.raises(WarehouseError, match="no complete runs"):
        load_runset(wh, "exp")
    assert run_writer_process(wh, 7, steps=40).wait() == 0
    report = ingest(wh)
    assert report.completed_runs == [("exp", 7)]
    assert query(wh, "SELECT count(*), count(DISTINCT (step, test_id)) FROM losses WHERE run_id = 7") == [(205, 205)]
    batches, losses = synthetic_run(7, 40, 5, 20)
    np.testing.assert_array_equal(load_runset(wh, "exp").losses[0], losses)


def test_eight_writers_while_ingest_runs_lose_nothing(wh):
    processes = [run_writer_process(wh, run_id, steps=12, sleep=0.01) for run_id in range(8)]
    loads = 0
    while any(p.poll() is None for p in processes):
        loads += ingest(wh).loaded_shards
        time.sleep(0.05)
    assert all(p.returncode == 0 for p in processes)
    ingest(wh)
    assert query(wh, "SELECT count(*) FROM runs WHERE status = 'complete'") == [(8,)]
    assert query(wh, "SELECT count(*), count(DISTINCT (run_id, step, test_id)) FROM losses") == [(8 * 13 * 5,) * 2]
    assert loads > 0  # ingest really ran while the writers wrote


def test_writer_refuses_to_overwrite_a_complete_run(wh):
    runs, _ = sf.synthetic.linear_runs(20, 5, 1, 6, 2, seed=0)
    write_run(wh, runs, 0)
    with pytest.raises(ShardError, match="already complete"):
        LossShardWriter(wh.shard_root, RunHeader("exp", 0, 6, 2, 5))


def test_live_losses_show_what_is_not_yet_ingested(wh):
    runs, _ = sf.synthetic.linear_runs(20, 5, 2, 6, 2, seed=0)
    assert wh.query("SELECT count(*) FROM live_losses").rows() == [(0,)]
    write_run(wh, runs, 0)
    assert wh.query("SELECT count(*), min(experiment), min(run_id) FROM live_losses").rows() == [(35, "exp", 0)]
    ingest(wh)
    assert wh.query("SELECT count(*) FROM live_losses").rows() == [(0,)]


def test_registry_publish_load_alias_and_refusals(wh):
    runs, _ = sf.synthetic.linear_runs(20, 5, 6, 6, 2, seed=0)
    simulator = sf.SimfluenceLinear(l2=0.1).fit(runs)
    info = registry.publish(wh, "exp", simulator, fit_run_ids=range(6), heldout_run_ids=[], data_hash="d",
                            config_hash="c", metrics={"all_steps_mse": 0.1})
    assert registry.publish(wh, "exp", simulator, fit_run_ids=range(6), heldout_run_ids=[], data_hash="d",
                            config_hash="c").version == info.version  # content-addressed
    assert not list(info.path.parent.glob(".staging-*"))
    loaded, _ = registry.load(wh, "exp", "latest")
    np.testing.assert_array_equal(loaded.A, simulator.A)
    registry.set_alias(wh, "exp", "best", info.version)
    assert registry.list_versions(wh, "exp")[0]["aliases"] == ["best", "latest"]
    assert registry.compare(wh, "exp", ["best"])[0]["metrics"] == {"all_steps_mse": 0.1}
    with pytest.raises(registry.RegistryError, match="no simulator version or alias 'nope'"):
        registry.load(wh, "exp", "nope")
    with pytest.raises(WarehouseError, match="invalid version or alias '../../etc'"):
        registry.load(wh, "exp", "../../etc")
    with pytest.raises(WarehouseError, match="invalid alias"):
        registry.set_alias(wh, "exp", "a/b", info.version)
    params = info.path / "parameters.safetensors"
    data = bytearray(params.read_bytes())
    data[-1] ^= 1
    params.write_bytes(bytes(data))
    with pytest.raises(registry.RegistryError, match="does not match the hash"):
        registry.load(wh, "exp", info.version)


def test_hostile_strings_are_inert(wh):
    hostile = "exp'; DROP TABLE losses; --"
    with pytest.raises(WarehouseError, match="unknown experiment"):
        load_runset(wh, hostile)
    with pytest.raises(WarehouseError, match="invalid experiment name"):
        register_experiment(wh, hostile, {}, examples(2), examples(2))
    assert query(wh, "SELECT count(*) FROM losses") == [(0,)]


def test_bad_experiments_are_refused(wh):
    with pytest.raises(WarehouseError, match="exists with another config"):
        register_experiment(wh, "exp", {"seed": 2}, examples(20), examples(5))
    with pytest.raises(WarehouseError, match="test split of experiment 'e2' is empty"):
        register_experiment(wh, "e2", {}, examples(3), examples(0))
    with pytest.raises(WarehouseError, match="lack columns"):
        register_experiment(wh, "e2", {}, examples(3).drop("label"), examples(1))


def test_sql_command_reads_while_the_writer_lock_is_held(wh, capsys):
    from simfluence_platform.cli import main

    runs, _ = sf.synthetic.linear_runs(20, 5, 2, 6, 2, seed=0)
    write_run(wh, runs, 0)
    ingest(wh)
    args = ["--warehouse", str(wh.path)]
    with open(wh.lock_path) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # an ingest between transactions holds only the lock
        assert main(["sql", "SELECT run_id, count(*) AS n FROM losses GROUP BY run_id", *args, "--format", "csv"]) == 0
        assert capsys.readouterr().out == "run_id,n\n0,35\n"
        assert main(["--json", "sql", "SELECT count(*) AS n FROM final_losses", *args]) == 0
        assert json.loads(capsys.readouterr().out) == {"columns": ["n"], "rows": [[5]]}
        assert main(["sql", "DELETE FROM losses", *args]) == 2
        assert "read-only" in capsys.readouterr().err
    assert main(["sql", "SELECT 1", "--warehouse", str(wh.path.parent / "none.duckdb")]) == 2
    assert "no warehouse here yet" in capsys.readouterr().err


def test_a_read_only_command_loads_only_what_it_prints_with(wh):
    """``simfluence sql`` loads neither NumPy nor PyArrow (PyArrow only when a streaming shard's
    footer must be checked for ``live_losses``), and Polars only for a table it does not lay out
    itself (here a float column)."""
    runs, _ = sf.synthetic.linear_runs(20, 5, 2, 6, 2, seed=0)
    write_run(wh, runs, 0)
    ingest(wh)
    code = ("import sys\nfrom simfluence_platform.cli import main\n"
            "main(['sql', sys.argv[2], '--warehouse', sys.argv[1]])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'pyarrow', 'polars', 'duckdb'}))")
    for sql, cell, loaded in (("SELECT count(*) AS n FROM losses", "│ 35  │", "['duckdb']"),
                              ("SELECT sum(loss) > 0 AS positive, avg(step)::DOUBLE AS step FROM losses", "3.0",
                               "['duckdb', 'polars']")):
        out = subprocess.run([sys.executable, "-c", code, str(wh.path), sql], capture_output=True, text=True,
                             check=True)
        assert out.stdout.splitlines()[-1] == loaded and cell in out.stdout, out.stdout


def test_errors_while_rows_stream_are_one_line(wh, capsys):
    """A DuckDB error raised after the first rows were sent, and an INTERVAL column (Polars has
    none), are one-line errors with exit status 2."""
    from simfluence_platform.cli import main

    late = "SELECT CASE WHEN range > 300000 THEN error('late failure') END FROM range(400000)"
    for sql, message in ((late, "late failure"), ("SELECT INTERVAL 1 DAY AS d", "column 'd' is an INTERVAL")):
        assert main(["sql", sql, "--warehouse", str(wh.path)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_science_imports_nothing_of_the_platform(tmp_path):
    """``import simfluence`` (and every module of it) loads neither Prefect, DuckDB, Dask nor
    torch, and nothing in it imports the platform."""
    modules = [p.stem for p in (ROOT / "simfluence").glob("*.py") if p.stem != "__init__"]
    code = ("import sys, importlib, simfluence\n"
            f"for name in {modules!r}: importlib.import_module('simfluence.' + name)\n"
            "heavy = ('duckdb', 'prefect', 'dask', 'distributed', 'torch', 'transformers', 'simfluence_platform')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == "[]"


def test_a_users_own_tasks_and_flows_do_not_collide(tmp_path):
    """From a folder holding its own ``tasks.py`` and ``flows/``, the installed platform and
    the CLI still work, and no generic import name is installed."""
    (tmp_path / "tasks.py").write_text("raise RuntimeError('the user tasks.py was imported')\n")
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "__init__.py").write_text("raise RuntimeError('the user flows/ was imported')\n")
    (tmp_path / "storage.py").write_text("raise RuntimeError('the user storage.py was imported')\n")
    code = ("import importlib.util, sys\n"
            "user = sys.path.pop(0)  # the user's folder: nothing installed may answer to these names\n"
            "print([importlib.util.find_spec(n) for n in ('tasks', 'flows', 'storage')])\n"
            "sys.path.insert(0, user)  # and with it back first on the path, the platform still works\n"
            "import simfluence_platform.tasks.fit, simfluence_platform.flows.fit, simfluence as sf\n"
            "print(sf.RunSet.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.split() == ["[None,", "None,", "None]", "RunSet"]
    cli = Path(sys.executable).parent / "simfluence"
    sql = subprocess.run([str(cli), "--json", "sql", "SELECT 42 AS answer", "--warehouse", str(tmp_path / "w.duckdb")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert sql.returncode == 2 and "no warehouse here yet" in sql.stderr and "the user" not in sql.stderr


@pytest.mark.parametrize("with_curvature", [False, True])
def test_gradient_inputs_round_trip(wh, with_curvature):
    from simfluence_platform.storage.experiments import load_gradients, store_gradients

    rng = np.random.default_rng(0)
    curvatures = rng.normal(size=(2, 4, 4)).astype(np.float32) if with_curvature else None
    grads = sf.GradientCheckpoints(np.array([0, 5]), np.linspace(1e-3, 1e-4, 6),
                                   rng.normal(size=(2, 20, 4)).astype(np.float32),
                                   rng.normal(size=(2, 5, 4)).astype(np.float32), batch_size=2, curvatures=curvatures)
    store_gradients(wh, "exp", grads)
    store_gradients(wh, "exp", grads)  # replaces, never duplicates
    back = load_gradients(wh, "exp")
    np.testing.assert_array_equal(back.train_grads, grads.train_grads)
    np.testing.assert_array_equal(back.test_grads, grads.test_grads)
    np.testing.assert_array_equal(back.steps, grads.steps)
    np.testing.assert_allclose(back.learning_rates, grads.learning_rates)
    assert back.batch_size == 2
    if with_curvature:
        np.testing.assert_array_equal(back.curvatures, curvatures)
    else:
        assert back.curvatures is None
    wrong = sf.GradientCheckpoints(np.array([0]), np.ones(6), np.ones((1, 3, 4)), np.ones((1, 5, 4)), batch_size=2)
    with pytest.raises(WarehouseError, match="gradients are for n=3"):
        store_gradients(wh, "exp", wrong)


def test_a_runs_gradients_file_round_trips_and_a_bad_one_is_never_read_half(wh):
    """The gradient checkpoints a train-run writes beside its reference run's shards read back
    exactly, ingest ignores the file, and a truncated or changed file is an error naming it."""
    from simfluence.gradients import GradientError
    from simfluence_platform.storage.shards import read_gradients, write_gradients

    runs, _ = sf.synthetic.linear_runs(20, 5, 1, 6, 2, seed=0)
    write_run(wh, runs, 0)
    assert read_gradients(wh.shard_root, "exp", 0) is None
    rng = np.random.default_rng(0)
    grads = sf.GradientCheckpoints(np.array([0, 3]), np.linspace(1e-3, 1e-4, 6),
                                   rng.normal(size=(2, 20, 4)).astype(np.float32),
                                   rng.normal(size=(2, 5, 4)).astype(np.float32), batch_size=2,
                                   curvatures=rng.normal(size=(2, 4, 4)).astype(np.float32),
                                   train_grads_preconditioned=rng.normal(size=(2, 20, 4)).astype(np.float32))
    path = write_gradients(wh.shard_root, "exp", 0, grads)
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".parquet")) == [
        "gradients.npz", "marker.json", "run.json"]  # no temporary file left behind
    back = read_gradients(wh.shard_root, "exp", 0)
    for name in ("steps", "learning_rates", "train_grads", "test_grads", "curvatures", "train_grads_preconditioned"):
        np.testing.assert_array_equal(getattr(back, name), getattr(grads, name))
    assert back.batch_size == 2
    report = ingest(wh)
    assert report.completed_runs == [("exp", 0)] and not report.rejected  # ingest ignores the file
    whole = path.read_bytes()
    changed = bytearray(whole)
    changed[whole.index(grads.train_grads.tobytes()[:16]) + 3] ^= 1  # one bit of one gradient
    for bad in (whole[: len(whole) // 2], whole[:-1], b"", bytes(changed)):
        path.write_bytes(bad)
        with pytest.raises(GradientError) as error:
            read_gradients(wh.shard_root, "exp", 0)
        assert str(path) in str(error.value)


def test_every_simulator_loads_in_a_fresh_process(tmp_path):
    """A bundle of each method loads with nothing imported before (the package loads its names
    lazily; the loader must still know every simulator)."""
    runs, gradients, _ = sf.synthetic.momentum_runs(n=12, m=4, runs=12, steps=6, batch_size=2, seed=0)
    sf.SimfluenceMomentum(sf.OptimizerSpec("adam", 0.9), gradients).fit(runs).save(tmp_path / "momentum")
    code = "import sys, simfluence; print(type(simfluence.load_simulator(sys.argv[1])).__name__)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "momentum")], capture_output=True, text=True)
    assert out.stdout.strip() == "SimfluenceMomentum", out.stderr


def test_verification_runs_are_kept_apart_from_sampled_runs(wh):
    """Runs of the optimize-* kinds are not sampled runs (never fitted on); fresh verification
    ids start above every verification id recorded or still waiting as shards."""
    from simfluence_platform.storage.experiments import (
        VERIFICATION_RUN_BASE,
        complete_run_ids,
        max_repeats_in_runs,
        next_verification_run_ids,
    )

    runs, _ = sf.synthetic.linear_runs(20, 5, 3, 4, 2, seed=0)
    assert next_verification_run_ids(wh, "exp", 2) == [VERIFICATION_RUN_BASE, VERIFICATION_RUN_BASE + 1]
    write_run(wh, runs, 0)
    for r, kind in ((1, "optimize-proposed"), (2, "optimize-random")):
        writer = LossShardWriter(wh.shard_root, RunHeader("exp", VERIFICATION_RUN_BASE + r, 4, 2, 5,
                                                          curriculum_kind=kind))
        writer.write_batches(runs.batches[r])
        for t in range(5):
            writer.log(t, runs.losses[r, t])
        writer.complete()
    ingest(wh)
    assert complete_run_ids(wh, "exp") == {0}
    assert complete_run_ids(wh, "exp", verification=True) == {VERIFICATION_RUN_BASE + 1, VERIFICATION_RUN_BASE + 2}
    assert next_verification_run_ids(wh, "exp", 1) == [VERIFICATION_RUN_BASE + 3]
    assert max_repeats_in_runs(wh, "exp", [0]) == np.bincount(runs.batches[0].ravel()).max()
    with wh.reader() as con:  # coverage counts the sampled run only
        occurrences = con.execute("SELECT sum(occurrences) FROM example_coverage WHERE experiment = 'exp'").fetchall()
    assert occurrences == [(int((runs.batches[0] >= 0).sum()),)]
    LossShardWriter(wh.shard_root, RunHeader("exp", VERIFICATION_RUN_BASE + 7, 4, 2, 5)).close()  # not ingested
    assert next_verification_run_ids(wh, "exp", 1) == [VERIFICATION_RUN_BASE + 8]
