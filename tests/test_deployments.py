"""Deployments triggered by name, or by their schedules, through a real local Prefect server and
process workers.

One server for the module: the pools cpu and gpu are created and every deployment of
deployments/prefect.yaml is deployed, as deployments/local.sh does. Flow runs write under a
temporary SIMFLUENCE_HOME, never into the checkout's simfluence-data."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
import yaml

import simfluence as sf
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import register_experiment
from simfluence_platform.storage.ingest import ingest
from simfluence_platform.storage.shards import LossShardWriter, RunHeader
from simfluence_platform.storage.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "SIMFLUENCE_PROJECT_DIR": str(ROOT),
           "SIMFLUENCE_HOME": str(tmp_path / "home")}
    with server_log(env).open("w") as log:
        process = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("the Prefect server did not start")
                time.sleep(1)
        for pool in ("cpu", "gpu"):
            created = subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=env,
                                     capture_output=True, text=True, timeout=120)
            assert created.returncode == 0, created.stdout + created.stderr
        deployed = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file",
                                   "deployments/prefect.yaml"], env=env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        yield env
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def server_log(env) -> Path:
    return Path(env["PREFECT_HOME"]).parent / "server.log"


def prefect(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def api(env, path: str, body: dict | None = None):
    """One call of the server's REST API: GET, or POST with a JSON body."""
    request = urllib.request.Request(env["PREFECT_API_URL"] + path, method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def deployment_runs(env, name: str) -> list[dict]:
    """The flow runs of deployment ``name`` (``flow/deployment``), earliest expected start first."""
    deployment = api(env, f"/deployments/name/{name}")
    return api(env, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}},
                                          "sort": "EXPECTED_START_TIME_ASC"})


def wait_for(condition, timeout: float, what: str, detail=lambda: "", every: float = 2.0):
    """The first truthy result of ``condition()``, polled every ``every`` s; after ``timeout`` s
    the test fails, with ``detail()``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{detail()}")
        time.sleep(every)
    return result


def scheduler_errors(env) -> list[str]:
    """The errors the server's schedulers (``schedule_deployments``, ``schedule_recent_deployments``)
    logged, each as its log line and exception messages. SQLite's transient "database is locked"
    is not counted: the next pass retries it."""
    entries = re.split(r"\n(?=\d\d:\d\d:\d\d\.\d+ \| )", server_log(env).read_text())
    return ["\n".join(line for line in entry.splitlines() if line == entry.splitlines()[0] or "Error:" in line)
            for entry in entries
            if "| ERROR" in entry.split("\n", 1)[0] and "schedul" in entry.split("\n", 1)[0]
            and "database is locked" not in entry]


def stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL: a Prefect 3.8 worker does not exit on SIGTERM alone. The flow runs
    it started (sessions of their own) go too."""
    listed = subprocess.run(["pgrep", "-P", str(worker.pid)], capture_output=True, text=True).stdout.split()
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    for pid in map(int, listed):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ingest_deployment_runs_on_a_process_worker(server, tmp_path):
    wh = Warehouse(tmp_path / "home" / "warehouse.duckdb")
    frame = pl.DataFrame({"example_id": range(4), "text": ["x"] * 4, "label": ["a"] * 4})
    register_experiment(wh, "deployed", {}, frame, frame)
    runs, _ = sf.synthetic.linear_runs(4, 4, 1, 5, 2, seed=0)
    writer = LossShardWriter(wh.shard_root, RunHeader("deployed", 0, 5, 2, 4))
    writer.write_batches(runs.batches[0])
    for t in range(6):
        writer.log(t, runs.losses[0, t])
    writer.complete()

    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu"], env=server, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run = prefect(server, "deployment", "run", "ingest-losses/default", "-p", f"warehouse={wh.path}", "--watch",
                      "--watch-timeout", "240")
    finally:
        stop_worker(worker)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with wh.reader() as con:
        assert con.execute("SELECT status FROM runs WHERE experiment = 'deployed'").fetchall() == [("complete",)]
        assert con.execute("SELECT count(*) FROM losses").fetchall() == [(24,)]
    listed = prefect(server, "deployment", "ls")
    assert "ingest-losses/default" in listed.stdout


def test_collection_dispatched_to_the_gpu_pool(server, tmp_path):
    """collect-runs on the cpu pool sends one train-run per run to the gpu pool, ingesting as they
    end; the reference run's train-run takes its gradient checkpoints, which collect-runs stores
    without training that run again (no gradient-checkpoints task)."""
    warehouse = tmp_path / "home" / "warehouse.duckdb"
    workers = [subprocess.Popen([PREFECT, "worker", "start", "--pool", pool], env=server, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for pool in ("cpu", "gpu")]
    try:
        run = prefect(server, "deployment", "run", "collect-runs/gpu", "-p", "preset=tiny", "-p", "runs=2",
                      "-p", f"warehouse={warehouse}", "-p", "poll_seconds=2", "--watch",
                      "--watch-timeout", "400", timeout=450)
    finally:
        for worker in workers:
            stop_worker(worker)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with Warehouse(warehouse).reader() as con:
        assert con.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall() == [(0, "complete"),
                                                                                          (1, "complete")]
        assert con.execute("SELECT checkpoint_step FROM checkpoints ORDER BY 1").fetchall() == [(0,), (3,)]
    runs = [r for r in api(server, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["train-run-0", "train-run-1"]}}})
            if r["parameters"].get("warehouse") == str(warehouse)]  # this test's runs only
    assert sorted((r["name"], r["state"]["type"], r["parameters"]["gradients"]) for r in runs) == [
        ("train-run-0", "COMPLETED", True), ("train-run-1", "COMPLETED", False)]
    collection = [r for r in api(server, "/flow_runs/filter",
                                 {"flow_runs": {"name": {"any_": ["collect-tiny-2-runs"]}}})
                  if r["parameters"].get("warehouse") == str(warehouse)]
    tasks = api(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [collection[0]["id"]]}}})
    names = {t["name"].rsplit("-", 1)[0] for t in tasks}
    assert "recorded-gradients" in names and "gradient-checkpoints" not in names, names


def lock_holders(lock: Path) -> list[int]:
    """The processes that have ``lock`` open (a run's lock file: its training process)."""
    holders = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(lock) for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return holders


def test_a_killed_train_run_is_dispatched_again_and_the_collection_completes(server, tmp_path):
    """SIGKILL the worker process training run 1 (CRASHED, which Prefect's own retries do not
    cover): collect-runs dispatches it again, the new attempt replaces the partial one, and
    both runs end complete exactly once."""
    warehouse = tmp_path / "home" / "warehouse.duckdb"
    lock = tmp_path / "home" / "shards" / "tiny" / "run-000001.lock"
    config = tmp_path / "long.yaml"  # the tiny preset, trained long enough to be caught mid-run
    config.write_text("preset: tiny\ntraining: {steps: 300}\nflush_every: 50\n")
    workers = [subprocess.Popen([PREFECT, "worker", "start", "--pool", pool], env=server, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for pool in ("cpu", "gpu")]
    try:
        run = subprocess.Popen([PREFECT, "deployment", "run", "collect-runs/gpu", "-p", f"config_path={config}",
                                "-p", "preset=null", "-p", "runs=2",
                                "-p", f"warehouse={warehouse}", "-p", "gradients=false", "-p", "poll_seconds=1",
                                "--watch", "--watch-timeout", "500"], env=server, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        victim = wait_for(lambda: lock.exists() and lock_holders(lock), 400, "run 1 to start training",
                          detail=lambda: "collect-runs/gpu " + ("still running" if run.poll() is None else
                                                                f"ended: {run.communicate()[0][-3000:]}"),
                          every=0.02)
        os.kill(victim[0], signal.SIGKILL)
        output, _ = run.communicate(timeout=550)
    finally:
        for worker in workers:
            stop_worker(worker)
    assert run.returncode == 0, output[-3000:]
    with Warehouse(warehouse).reader() as con:
        assert con.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall() == [(0, "complete"),
                                                                                          (1, "complete")]
        assert con.execute("SELECT count(*), count(DISTINCT (run_id, step, test_id)) FROM losses").fetchall() == \
            [(2 * 301 * 8,) * 2]
    states = sorted(r["state"]["type"] for r in api(server, "/flow_runs/filter", {
        "flow_runs": {"name": {"any_": ["train-run-1"]}}}) if r["parameters"].get("warehouse") == str(warehouse))
    assert states == ["COMPLETED", "CRASHED"], states


def test_the_refit_schedule_creates_runs_and_the_scheduler_logs_no_error(server):
    """The scheduler creates refit/demo's runs ahead of time, 900 s apart, and logs no error
    (with SQLAlchemy 2.1 it failed on every pass: "Can't evaluate bulk DML statement")."""
    runs = wait_for(lambda: deployment_runs(server, "refit/demo"), 60, "the scheduler to create refit/demo runs",
                    detail=lambda: "\n".join(scheduler_errors(server)[-6:]))
    scheduled = [run for run in runs if run["state_type"] == "SCHEDULED"]
    assert len(scheduled) >= 3 and all(run["auto_scheduled"] for run in scheduled), runs
    starts = [datetime.fromisoformat(run["expected_start_time"]) for run in scheduled]
    assert {(b - a).total_seconds() for a, b in zip(starts, starts[1:])} == {900.0}
    assert scheduler_errors(server) == []


def test_a_scheduled_refit_runs_on_a_worker_and_moves_latest_and_best(server, tmp_path):
    """A copy of the refit deployment on a 15 s interval, on a pool of its own: its first
    scheduled run refits the experiment on the worker, setting latest and, on that first
    evaluation, best."""
    wh = Warehouse(tmp_path / "home" / "warehouse.duckdb")
    frame = lambda k: pl.DataFrame({"example_id": range(k), "text": ["x"] * k, "label": ["a"] * k})  # noqa: E731
    register_experiment(wh, "scheduled", {}, frame(12), frame(4))
    runs, _ = sf.synthetic.linear_runs(12, 4, 10, 8, 2, seed=0)
    for r in range(10):  # run ids 4 and 9 held out, 8 fitting runs
        writer = LossShardWriter(wh.shard_root, RunHeader("scheduled", r, 8, 2, 4))
        writer.write_batches(runs.batches[r])
        for t in range(9):
            writer.log(t, runs.losses[r, t])
        writer.complete()
    ingest(wh)

    project = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    refit = next(d for d in project["deployments"] if d["entrypoint"] == "flows/refit.py:refit")
    refit.update(name="every-15s", schedules=[{"interval": 15}], work_pool={"name": "schedule-test"},
                 parameters={"experiment": "scheduled", "warehouse": str(wh.path), "n_boot": 20,
                             "methods": ["simfluence_linear", "mean_trajectory"]})
    project["deployments"] = [refit]
    copy = tmp_path / "prefect.yaml"
    copy.write_text(yaml.safe_dump(project))
    created = prefect(server, "work-pool", "create", "schedule-test", "--type", "process", timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect(server, "--no-prompt", "deploy", "--all", "--prefect-file", str(copy))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "schedule-test"],
                              env={**server, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def finished() -> list[dict]:
            return [run for run in deployment_runs(server, "refit/every-15s")
                    if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]

        first = wait_for(finished, 150, "a scheduled refit to finish",
                         detail=lambda: json.dumps(deployment_runs(server, "refit/every-15s"), indent=1)[-3000:])[0]
    finally:
        stop_worker(worker)
    assert first["state_type"] == "COMPLETED" and first["auto_scheduled"], first
    latest = registry.alias_version(wh, "scheduled", "latest")
    best = registry.alias_version(wh, "scheduled", "best")
    assert latest is not None and best == registry.alias_version(wh, "scheduled", "latest-simfluence-linear")
    assert scheduler_errors(server) == []


def test_optimize_dispatches_its_curricula_to_the_gpu_pool(server, tmp_path):
    """optimize-curriculum/gpu on the cpu pool sends one train-run per curriculum (the proposal
    and a random one, on the experiment's stored config) to the gpu pool and compares."""
    from simfluence_platform.storage.experiments import VERIFICATION_RUN_BASE, load_runset
    from simfluence_platform.tasks.collect import collect
    from simfluence_platform.tasks.config import preset

    wh = Warehouse(tmp_path / "home" / "warehouse.duckdb")
    collect(preset("tiny"), 5, wh, gradients=False)
    runs = load_runset(wh, "tiny")
    simulator = sf.SimfluenceAdditive(intercept="constant", l2=1.0).fit(runs.select_runs([0, 1, 2, 3]))
    registry.publish(wh, "tiny", simulator, fit_run_ids=[0, 1, 2, 3], heldout_run_ids=[4], data_hash="test",
                     config_hash="test", aliases=("best",))
    workers = [subprocess.Popen([PREFECT, "worker", "start", "--pool", pool], env=server, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for pool in ("cpu", "gpu")]
    try:
        run = prefect(server, "deployment", "run", "optimize-curriculum/gpu", "-p", "experiment=tiny",
                      "-p", f"warehouse={wh.path}", "-p", "random=1", "-p", "iterations=5", "-p", "poll_seconds=2",
                      "--watch", "--watch-timeout", "400", timeout=450)
    finally:
        for worker in workers:
            stop_worker(worker)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with wh.reader() as con:
        assert con.execute("SELECT run_id, status, curriculum_kind FROM runs WHERE run_id >= ? ORDER BY run_id",
                           [VERIFICATION_RUN_BASE]).fetchall() == [
            (VERIFICATION_RUN_BASE, "complete", "optimize-proposed"),
            (VERIFICATION_RUN_BASE + 1, "complete", "optimize-random")]
    names = [f"train-run-{VERIFICATION_RUN_BASE}", f"train-run-{VERIFICATION_RUN_BASE + 1}"]
    trained = [r for r in api(server, "/flow_runs/filter", {"flow_runs": {"name": {"any_": names}}})
               if r["parameters"].get("warehouse") == str(wh.path)]
    assert sorted((r["name"], r["state"]["type"]) for r in trained) == [(name, "COMPLETED") for name in names]
