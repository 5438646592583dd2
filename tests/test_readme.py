"""The README's examples work: every SQL query returns rows, the Python API example and the config example run."""

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import simfluence as sf
from simfluence_platform.storage import registry
from simfluence_platform.storage.effects import store_effects
from simfluence_platform.storage.experiments import register_experiment
from simfluence_platform.storage.ingest import ingest
from simfluence_platform.storage.shards import LossShardWriter, RunHeader
from simfluence_platform.storage.warehouse import Warehouse

README = Path(__file__).resolve().parent.parent / "README.md"
QUERIES = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def demo_warehouse(tmp_path_factory) -> Warehouse:
    wh = Warehouse(tmp_path_factory.mktemp("home") / "warehouse.duckdb")
    frame = lambda k: pl.DataFrame({"example_id": range(k), "text": ["x"] * k, "label": ["a"] * k})  # noqa: E731
    register_experiment(wh, "demo", {"preset": "test"}, frame(30), frame(5))
    runs, _ = sf.synthetic.linear_runs(30, 5, 4, 12, 3, seed=0)
    for r in range(4):
        writer = LossShardWriter(wh.shard_root, RunHeader("demo", r, 12, 3, 5, curriculum_kind=["uniform", "subset"][r % 2]))
        writer.write_batches(runs.batches[r])
        for t in range(13 if r < 3 else 5):
            writer.log(t, runs.losses[r, t])
        if r == 2:
            writer.fail("loss became NaN at step 13")
        elif r < 2:
            writer.complete()
    ingest(wh)
    writer = LossShardWriter(wh.shard_root, RunHeader("demo", 4, 12, 3, 5))
    writer.log(0, runs.losses[0, 0])
    writer.flush()  # streaming, not yet ingested
    simulator = sf.MeanTrajectory().fit(runs)
    info = registry.publish(wh, "demo", simulator, fit_run_ids=[0], heldout_run_ids=[1], data_hash="d", config_hash="c")
    scores = sf.metrics.score({"mean": simulator}, runs.select_runs([1]), n_boot=10).to_dicts()
    registry.record_evaluations(wh, "demo", [(info.version, scores, [1])])
    effect = np.linspace(-0.05, 0.05, 30 * 6)  # train x (5 tests + the mean), some intervals off zero
    store_effects(wh, "demo", info.version, pl.DataFrame({
        "train_id": np.repeat(np.arange(30), 6), "test_id": pl.Series([0, 1, 2, 3, 4, None] * 30, dtype=pl.Int64),
        "effect": effect, "ci_low": effect - 0.01, "ci_high": effect + 0.01, "n_curricula": np.ones(180, dtype=int),
        "heldout_error": np.full(180, 0.02), "below_error": np.abs(effect) < 0.02}), "heldout", 20)
    return wh


def test_the_readme_has_the_promised_queries():
    assert len(QUERIES) >= 6


@pytest.mark.parametrize("query", QUERIES, ids=[q.splitlines()[0][3:40] for q in QUERIES])
def test_readme_query_runs_and_returns_rows(demo_warehouse, query):
    assert demo_warehouse.query(query).height, query  # what `simfluence sql` runs: locked down, read-only


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    example = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "my-simulator" / "parameters.safetensors").exists()


def test_readme_config_example_is_valid(tmp_path):
    from simfluence_platform.tasks.config import load_config

    example = re.search(r"```yaml\n(.*?)```", README.read_text(), flags=re.S).group(1)
    (tmp_path / "c.yaml").write_text(example)
    config = load_config(tmp_path / "c.yaml")
    assert config.name == "support-tickets" and config.data.labels == ["billing", "bug", "other"]
