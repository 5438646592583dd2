"""Deployments triggered by name through a real local Prefect server and process workers.

One server for the module: the pools cpu and gpu are created and every deployment of
deployments/prefect.yaml is deployed, as deployments/local.sh does."""

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
from simfluence_platform.storage.experiments import register_experiment
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


def test_collection_dispatched_to_the_gpu_pool(server, tmp_path):
    """collect-runs on the cpu pool sends one train-run per run to the gpu pool, ingesting as they end."""
    warehouse = tmp_path / "home" / "warehouse.duckdb"
    workers = [subprocess.Popen([PREFECT, "worker", "start", "--pool", pool], env=server, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
               for pool in ("cpu", "gpu")]
    try:
        run = prefect(server, "deployment", "run", "collect-runs/gpu", "-p", "preset=tiny", "-p", "runs=2",
                      "-p", f"warehouse={warehouse}", "-p", "gradients=false", "-p", "poll_seconds=2", "--watch",
                      "--watch-timeout", "400", timeout=450)
    finally:
        for worker in workers:
            os.killpg(worker.pid, 15)
            worker.wait(timeout=30)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with Warehouse(warehouse).reader() as con:
        assert con.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall() == [(0, "complete"),
                                                                                          (1, "complete")]
    code = ("from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import FlowFilter, FlowFilterName\n"
            "with get_client(sync_client=True) as client:\n"
            "    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=['train-run'])))\n"
            "print(sorted((r.name, r.state.type.value) for r in runs))")
    listed = subprocess.run([sys.executable, "-c", code], env=server, capture_output=True, text=True, timeout=120)
    assert listed.stdout.strip() == "[('train-run-0', 'COMPLETED'), ('train-run-1', 'COMPLETED')]", listed.stderr
