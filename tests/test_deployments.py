"""A deployment triggered by name through a real local Prefect server and a process worker."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

import simfluence as sf
from storage.experiments import register_experiment
from storage.shards import LossShardWriter, RunHeader
from storage.warehouse import Warehouse

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "SIMFLUENCE_PROJECT_DIR": str(ROOT)}
    process = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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
        yield env
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def prefect(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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

    assert prefect(server, "work-pool", "create", "cpu", "--type", "process").returncode == 0
    deployed = prefect(server, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                       "--name", "ingest-losses/default")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu"], env=server, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        run = prefect(server, "deployment", "run", "ingest-losses/default", "-p", f"warehouse={wh.path}", "--watch",
                      "--watch-timeout", "240")
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with wh.reader() as con:
        assert con.execute("SELECT status FROM runs WHERE experiment = 'deployed'").fetchall() == [("complete",)]
        assert con.execute("SELECT count(*) FROM losses").fetchall() == [(24,)]
    listed = prefect(server, "deployment", "ls")
    assert "ingest-losses/default" in listed.stdout
