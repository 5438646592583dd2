"""The pipeline through real Prefect flows (test harness: a temporary server) on the tiny preset."""

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402

import simfluence as sf  # noqa: E402
from simfluence_platform.storage import registry  # noqa: E402
from simfluence_platform.storage.warehouse import Warehouse  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def prefect_server(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from prefect.logging.configuration import setup_logging

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    # Prefect's console handler keeps the sys.stderr of the moment logging was configured; an
    # earlier test's captured (now closed) stream would break every flow run here.
    setup_logging(incremental=False)
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("simfluence-home")


def _cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from simfluence_platform.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_collect_fit_evaluate_refit_and_the_cli(home):
    import json

    from simfluence_platform.flows.collect import collect_runs
    from simfluence_platform.flows.evaluate import evaluate_simulators
    from simfluence_platform.flows.fit import fit_simulators
    from simfluence_platform.flows.refit import refit

    warehouse = str(home / "warehouse.duckdb")
    collected = collect_runs(preset="tiny", runs=10, warehouse=warehouse)
    assert collected["complete"] == list(range(10)) and not collected["failed"]
    again = collect_runs(preset="tiny", runs=10, warehouse=warehouse)
    assert again["trained"] == []  # idempotent: nothing re-trained, nothing duplicated

    published = fit_simulators(experiment="tiny", warehouse=warehouse)
    methods = {p["method"] for p in published}
    assert {"simfluence_linear", "tracin_cp", "influence_function_rescaled", "mean_trajectory"} <= methods
    result = evaluate_simulators(experiment="tiny", n_boot=50, warehouse=warehouse)
    assert {row["method"] for row in result["leaderboard"]} == methods
    assert all(os.path.exists(f) for f in result["files"])
    assert all(" [" in row["all_steps_mse"] for row in result["leaderboard"])  # value [interval], rounded
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # one artifact per plot, none hiding another
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["plot-metrics-tiny", "plot-trajectories-tiny"])))}
    assert keys == {"plot-metrics-tiny", "plot-trajectories-tiny"}
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:  # flow runs named after what they work on
        names = {r.name for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(
            any_=["collect-tiny-10-runs", "fit-tiny", "evaluate-tiny"])))}
    assert names == {"collect-tiny-10-runs", "fit-tiny", "evaluate-tiny"}
    wh = Warehouse(warehouse)
    with wh.reader() as con:
        assert con.execute("SELECT count(DISTINCT method) FROM leaderboard WHERE experiment = 'tiny'").fetchall() == [
            (len(methods),)]
    latest = registry.resolve(wh, "tiny", "latest")
    assert latest.manifest["heldout_run_ids"] == [4, 9]  # every fifth run id, stable across refits

    first = refit(experiment="tiny", n_boot=50, warehouse=warehouse)
    assert first["refit"] is False and first["latest"] == latest.version

    collect_runs(preset="tiny", runs=15, warehouse=warehouse, gradients=False)
    second = refit(experiment="tiny", methods=["simfluence_linear", "mean_trajectory"], n_boot=50, warehouse=warehouse)
    assert second["refit"] is True and second["latest"] != latest.version
    assert registry.resolve(wh, "tiny", "latest").version == second["latest"]
    assert registry.resolve(wh, "tiny", "best").version == second["best"]
    assert registry.resolve(wh, "tiny", "latest").manifest["heldout_run_ids"] == [4, 9, 14]
    assert refit(experiment="tiny", n_boot=50, warehouse=warehouse)["refit"] is False

    # The CLI pipeline commands run the same flows on the same warehouse.
    code, out, _ = _cli("--json", "evaluate", "--experiment", "tiny", "--alias", "best", "--bootstrap", "20",
                        "--warehouse", warehouse)
    assert code == 0
    best_method = registry.resolve(wh, "tiny", "best").manifest["method"]
    assert [row["method"] for row in json.loads(out)["leaderboard"]] == [best_method]  # that one version only
    code, out, _ = _cli("refit", "--experiment", "tiny", "--warehouse", warehouse)
    assert code == 0 and "nothing new to refit" in out
    code, _, err = _cli("fit", "--experiment", "tiny", "--methods", "oracle", "--warehouse", warehouse)
    assert code == 2 and "unknown methods ['oracle']" in err



def test_fit_on_a_dask_scheduler_address(home, monkeypatch):
    """Only on an allowed scheduler: refused as a bare parameter, fitted once the process's
    environment allows it; the command line allows its own --dask-address."""
    from distributed import LocalCluster

    from simfluence_platform.flows.collect import collect_runs
    from simfluence_platform.flows.fit import fit_simulators
    from simfluence_platform.tasks.fit import DaskAddressError

    monkeypatch.setenv("SIMFLUENCE_DASK_ADDRESS", "")
    monkeypatch.setenv("SIMFLUENCE_DASK_ALLOWED", "")
    warehouse = str(home / "dask" / "warehouse.duckdb")
    collect_runs(preset="tiny", runs=10, warehouse=warehouse, gradients=False)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                      dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        with pytest.raises(DaskAddressError, match="is not allowed here"):
            fit_simulators(experiment="tiny", dask_address=cluster.scheduler_address, warehouse=warehouse)
        monkeypatch.setenv("SIMFLUENCE_DASK_ALLOWED", cluster.scheduler_address)
        published = fit_simulators(experiment="tiny", methods=["simfluence_linear", "simfluence_additive"],
                                   shard_size=3, dask_address=cluster.scheduler_address, warehouse=warehouse)
        monkeypatch.setenv("SIMFLUENCE_DASK_ALLOWED", "")
        code, _, err = _cli("fit", "--experiment", "tiny", "--methods", "simfluence_linear", "--shard-size", "3",
                            "--dask-address", cluster.scheduler_address, "--warehouse", warehouse)
        assert code == 0, err
    simulator, info = registry.load(Warehouse(warehouse), "tiny", published[0]["version"])
    assert info.manifest["name"] == "simfluence_linear" and len(simulator.test_ids) == 8
    additive, info = registry.load(Warehouse(warehouse), "tiny", published[1]["version"])
    assert type(additive) is sf.SimfluenceAdditive and info.manifest["name"] == "simfluence_additive"
    assert np.all(additive.A == 0)  # joined from shards of test examples, still the Additive model


def test_bad_input_fails_the_flow_before_writing(home):
    from simfluence_platform.flows.collect import collect_runs
    from simfluence_platform.flows.fit import fit_simulators

    with pytest.raises(ValueError, match="exactly one of preset and config_path"):
        collect_runs(preset=None, runs=2, warehouse=str(home / "x" / "w.duckdb"))
    assert not (home / "x").exists()
    empty = Warehouse(home / "empty" / "warehouse.duckdb")
    with empty.writer():
        pass
    with pytest.raises(Exception, match="unknown experiment 'nope'"):
        fit_simulators(experiment="nope", warehouse=str(empty.path))


def test_a_refit_before_any_collection_is_a_no_op(tmp_path):
    """The refit schedule fires as soon as it is deployed, before the first collection."""
    from simfluence_platform.flows.refit import refit

    assert refit(experiment="demo", warehouse=str(tmp_path / "warehouse.duckdb")) == \
        {"refit": False, "latest": None, "best": None}
    assert not (tmp_path / "warehouse.duckdb").exists()


def test_optimize_trains_the_proposal_beside_random_curricula(tmp_path):
    """optimize proposes a curriculum under constraints, trains it and two random ones for real
    as verification runs (never fitted on), and reports predicted against actual loss."""
    import json

    from simfluence import curricula
    from simfluence_platform.flows.collect import collect_runs
    from simfluence_platform.flows.evaluate import evaluate_simulators
    from simfluence_platform.flows.fit import fit_simulators
    from simfluence_platform.flows.refit import refit
    from simfluence_platform.storage.experiments import VERIFICATION_RUN_BASE, complete_run_ids

    warehouse = str(tmp_path / "warehouse.duckdb")
    collect_runs(preset="tiny", runs=10, warehouse=warehouse, gradients=False)
    fit_simulators(experiment="tiny", methods=["simfluence_additive", "mean_trajectory"], warehouse=warehouse)
    evaluate_simulators(experiment="tiny", n_boot=20, warehouse=warehouse)
    out = tmp_path / "proposal.json"
    args = ["--experiment", "tiny", "--warehouse", warehouse]
    code, text, err = _cli("--json", "optimize", *args, "--random", "2", "--include", "3", "--exclude", "5",
                           "--max-repeats", "2", "--iterations", "40", "--out", str(out))
    assert code == 0, err
    result = json.loads(text)
    runs = result["runs"]
    assert [r["role"] for r in runs] == ["proposed", "random", "random"]
    assert [r["run_id"] for r in runs] == [VERIFICATION_RUN_BASE, VERIFICATION_RUN_BASE + 1, VERIFICATION_RUN_BASE + 2]
    proposal = np.array(result["curriculum"])
    assert proposal.shape == (6, 4)
    counts = np.bincount(proposal.ravel(), minlength=16)
    assert counts[3] >= 1 and counts[5] == 0 and counts.max() <= 2
    np.testing.assert_array_equal(curricula.load(out, 16)[0], proposal)
    wh = Warehouse(warehouse)
    with wh.reader() as con:  # what the warehouse holds is what was reported and what was proposed
        stored = dict(con.execute(
            "SELECT run_id, avg(loss) FROM final_losses WHERE experiment = 'tiny' AND run_id >= ? GROUP BY run_id",
            [VERIFICATION_RUN_BASE]).fetchall())
        kinds = dict(con.execute("SELECT run_id, curriculum_kind FROM runs WHERE run_id >= ?",
                                 [VERIFICATION_RUN_BASE]).fetchall())
        batches = con.execute("SELECT step, position, example_id FROM batches WHERE run_id = ?",
                              [VERIFICATION_RUN_BASE]).fetchall()
    for row in runs:
        assert row["actual"] == pytest.approx(stored[row["run_id"]], abs=1e-12)
        assert np.isfinite(row["predicted"])
    assert kinds == {VERIFICATION_RUN_BASE: "optimize-proposed", VERIFICATION_RUN_BASE + 1: "optimize-random",
                     VERIFICATION_RUN_BASE + 2: "optimize-random"}
    assert all(proposal[step - 1, position] == example for step, position, example in batches)
    assert complete_run_ids(wh, "tiny") == set(range(10))  # the verification runs are never fitted on
    assert refit(experiment="tiny", n_boot=20, warehouse=warehouse)["refit"] is False
    code, text, err = _cli("simulate", *args, "--curriculum", str(out))
    assert code == 0 and "simulated final loss" in text, err

    code, text, _ = _cli("optimize", *args, "--random", "1", "--iterations", "5")  # the human table; new run ids
    assert code == 0 and "proposed   " in text and str(VERIFICATION_RUN_BASE + 3) in text and "held-out RMSE" in text
    for bad, message in ((["--include", "16"], "include: unknown training example id 16; ids lie in 0..15"),
                         (["--exclude", "x"], "--exclude takes comma-separated training example ids, got 'x'"),
                         (["--max-repeats", "1"], "cannot fill the 24 slots"),
                         (["--tests", "99"], "test ids [99] are out of range"),
                         (["--ref", "nope"], "nope"),
                         (["--out", "p.txt"], "write the curriculum as .json or .npy")):
        code, _, err = _cli("optimize", *args, *bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_train_run_flow_trains_a_group_of_runs_each_with_its_own_shards(home, tmp_path):
    """train-run takes a batch of run ids, trains them training.parallel_runs at a time, and
    leaves each run complete on its own; run again, it skips the complete runs."""
    from simfluence_platform.flows.train_run import train_run
    from simfluence_platform.storage.experiments import complete_run_ids
    from simfluence_platform.storage.ingest import ingest
    from simfluence_platform.tasks.collect import prepare, register
    from simfluence_platform.tasks.config import load_config

    path = tmp_path / "batched.yaml"
    path.write_text("preset: tiny\nname: tiny-batched\ntraining: {parallel_runs: 2}\n")
    config, warehouse = load_config(path), str(home / "batched" / "warehouse.duckdb")
    register(config, Warehouse(warehouse), prepare(config, 3))
    first = train_run(run_ids=[0, 1, 2], preset=None, config_path=str(path), warehouse=warehouse)
    assert {r: run["status"] for r, run in first["runs"].items()} == {0: "complete", 1: "complete", 2: "complete"}
    again = train_run(run_ids=[1, 2], preset=None, config_path=str(path), warehouse=warehouse)
    assert {r: run["status"] for r, run in again["runs"].items()} == {1: "skipped", 2: "skipped"}
    ingest(Warehouse(warehouse), "tiny-batched")
    assert complete_run_ids(Warehouse(warehouse), "tiny-batched") == {0, 1, 2}
    assert not list(Warehouse(warehouse).shard_root.rglob("gradients.npz"))  # not asked for: none taken


def test_collecting_on_workers_trains_the_reference_run_once(tmp_path, monkeypatch):
    """The worker path: the train-run flow (what a gpu worker runs) takes the reference run's
    gradient checkpoints while it trains and writes them beside its shards; collect-runs
    (on_workers, once the shards are ingested) stores them, and every run is trained exactly
    once. With the file truncated, collect-runs trains the reference run again instead (the
    two-run way) and stores nothing of the file: the two agree to 1e-4 of their scale."""
    from simfluence_platform.flows.collect import collect_runs
    from simfluence_platform.flows.train_run import train_run
    from simfluence_platform.storage.experiments import load_gradients
    from simfluence_platform.storage.ingest import ingest
    from simfluence_platform.storage.shards import GRADIENTS_NAME, run_dir
    from simfluence_platform.tasks.collect import prepare, register
    from simfluence_platform.tasks.config import preset
    from simfluence_platform.tasks.runs import run_seed
    from simfluence_platform.tasks.training import Trainer

    config = preset("tiny")
    trained: list[int] = []  # the run id of every run any Trainer trains, in order
    seeds = {run_seed(config, r): r for r in range(2)}
    real_run = Trainer.run

    def counted_run(self, curriculum, seed, *args, **kwargs):
        trained.append(seeds[seed])
        return real_run(self, curriculum, seed, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run", counted_run)

    def worker_collection(name: str, run_ids: list[int], truncate: bool) -> Warehouse:
        wh = Warehouse(tmp_path / name / "warehouse.duckdb")
        register(config, wh, prepare(config, len(run_ids)))
        train_run(run_ids=run_ids, preset="tiny", warehouse=str(wh.path), gradients=True)
        path = run_dir(wh.shard_root, "tiny", config.gradients.reference_run) / GRADIENTS_NAME
        assert list(wh.shard_root.rglob("*.npz")) == [path]
        if truncate:
            path.write_bytes(path.read_bytes()[:-100])
        ingest(wh, "tiny")  # as collect-runs does while its workers train
        collected = collect_runs(preset="tiny", runs=len(run_ids), warehouse=str(wh.path), on_workers=True)
        assert collected["complete"] == run_ids and not collected["failed"]
        return wh

    recorded = load_gradients(worker_collection("workers", [0, 1], truncate=False), "tiny")
    assert trained == [0, 1]  # the reference run 0 once: its checkpoints came from its file
    trained.clear()
    retrained = load_gradients(worker_collection("truncated", [0], truncate=True), "tiny")
    assert trained == [0, 0]  # the file unreadable: run 0 trained again for its checkpoints
    np.testing.assert_array_equal(recorded.steps, retrained.steps)
    np.testing.assert_array_equal(recorded.learning_rates, retrained.learning_rates)
    for name in ("train_grads", "test_grads", "curvatures", "train_grads_preconditioned"):
        expected = getattr(retrained, name)
        np.testing.assert_allclose(getattr(recorded, name), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
