"""Training runs end to end on the tiny preset: real fine-tuning, real shards, real warehouse."""

import json

import numpy as np
import polars as pl
import pytest
import torch

import simfluence as sf
from simfluence_platform.storage.experiments import load_gradients, load_runset
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.collect import collect, train_run
from simfluence_platform.tasks.runs import curriculum_for_run
from simfluence_platform.tasks.config import ConfigError, PRESETS, _merge, from_dict, load_config, preset
from simfluence_platform.tasks.data import DataError, load_examples
from simfluence_platform.tasks.model import ModelError
from simfluence_platform.tasks.training import Trainer


@pytest.fixture(scope="module")
def tiny():
    config = preset("tiny")
    return config, load_examples(config.data, config.model.task)


@pytest.fixture(scope="module")
def trainer(tiny):
    return Trainer(*tiny)


def fresh_losses(trainer: Trainer) -> np.ndarray:
    """The test losses by a separate code path: one forward pass over all test examples."""
    data = trainer.test_data
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
        return -torch.log_softmax(logits.double(), -1).gather(1, data.labels[:, None])[:, 0].numpy()


def test_streamed_losses_match_a_separate_evaluation(tiny, trainer, tmp_path):
    config, _ = tiny
    wh = Warehouse(tmp_path / "warehouse.duckdb")
    summary = collect(config, 2, wh, gradients=False)
    assert summary.trained == [0, 1]
    runs = load_runset(wh, config.name)
    for r in range(2):
        np.testing.assert_array_equal(runs.batches[r], curriculum_for_run(config, r))  # exactly the curriculum
    trainer.reset()
    np.testing.assert_allclose(runs.losses[0, 0], fresh_losses(trainer), rtol=1e-5)
    outcome = trainer.run(curriculum_for_run(config, 1), seed=0)
    np.testing.assert_allclose(runs.losses[1, -1], fresh_losses(trainer), rtol=1e-5)
    np.testing.assert_allclose(runs.losses[1], outcome.losses, rtol=1e-6)
    assert not np.allclose(runs.losses[1, -1], runs.losses[1, 0])  # it really trained


def test_same_config_and_seed_give_the_same_losses(tiny, tmp_path):
    config, _ = tiny
    first, second = Warehouse(tmp_path / "a" / "w.duckdb"), Warehouse(tmp_path / "b" / "w.duckdb")
    collect(config, 2, first, gradients=False)
    collect(config, 2, second, gradients=False)
    np.testing.assert_allclose(load_runset(first, "tiny").losses, load_runset(second, "tiny").losses, rtol=1e-6)


def test_a_crashed_run_leaves_no_marker_and_collect_recovers(tiny, trainer, tmp_path):
    config, examples = tiny
    wh = Warehouse(tmp_path / "warehouse.duckdb")
    collect(config, 1, wh, gradients=False)

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt  # the process dies mid-run

    with pytest.raises(KeyboardInterrupt):
        train_run(config, trainer, wh, 1, on_step=crash)
    folder = wh.shard_root / "tiny" / "run-000001"
    assert list(folder.glob("losses-*.parquet")) and not (folder / "marker.json").exists()
    summary = collect(config, 2, wh, gradients=False)
    assert summary.trained == [1] and summary.skipped == [0]
    assert load_runset(wh, "tiny").n_runs == 2


def test_a_run_finished_but_not_ingested_counts_as_done(tiny, trainer, tmp_path):
    """A collection killed between a run's completion marker and its ingest: the next one
    ingests it first instead of refusing the run as already complete."""
    config, _ = tiny
    wh = Warehouse(tmp_path / "warehouse.duckdb")
    collect(config, 1, wh, gradients=False)
    train_run(config, trainer, wh, 1)  # shards and marker written; the ingest never happened
    assert (wh.shard_root / "tiny" / "run-000001" / "marker.json").exists()
    summary = collect(config, 2, wh, gradients=False)
    assert summary.trained == [] and summary.skipped == [0, 1]
    assert load_runset(wh, "tiny").n_runs == 2


def test_a_diverging_run_is_marked_failed(tiny, tmp_path):
    config = from_dict(_merge(PRESETS["tiny"], {"training": {"learning_rate": 1e30}}))
    wh = Warehouse(tmp_path / "warehouse.duckdb")
    summary = collect(config, 1, wh, gradients=False)
    assert summary.failed and "non-finite" in summary.failed[0]
    with wh.reader() as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("failed",)]


def test_gradient_checkpoints_feed_the_baselines(tiny, tmp_path):
    config, _ = tiny
    wh = Warehouse(tmp_path / "warehouse.duckdb")
    collect(config, 3, wh)
    grads = load_gradients(wh, "tiny")
    assert grads.train_grads.shape == (2, 16, 32) and grads.test_grads.shape == (2, 8, 32)
    assert grads.steps.tolist() == [0, 3] and grads.learning_rates.shape == (6,)
    eigenvalues = np.linalg.eigvalsh(grads.curvatures[0].astype(np.float64))
    assert eigenvalues.min() > -1e-6 * eigenvalues.max()  # a Gram matrix (float32 round-off aside)
    runs = load_runset(wh, "tiny")
    for simulator in (sf.TracInCP(grads, rescaled=True), sf.InfluenceFunction(grads, rescaled=True)):
        pred = simulator.fit(runs).simulate(runs.batches, runs.initial_loss)
        assert np.all(np.isfinite(pred))


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_parameter_efficient_methods_train_only_their_parameters(tiny, method):
    config = from_dict(_merge(PRESETS["tiny"], {"training": {"method": method}}))
    trainer = Trainer(config, tiny[1])
    total = sum(p.numel() for p in trainer.model.parameters())
    assert 0 < trainer.n_trainable < total / 5
    outcome = trainer.run(curriculum_for_run(config, 0), seed=0)
    assert outcome.status == "complete" and not np.allclose(outcome.losses[-1], outcome.losses[0])


def test_causal_lm_on_a_prompt_target_file(tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(20)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    config = from_dict(_merge(PRESETS["tiny"], {
        "model": {"task": "causal_lm", "max_length": 16},
        "data": {"source": str(path), "prompt_column": "question", "target_column": "answer", "n_train": 12, "n_test": 6},
    }))
    trainer = Trainer(config, load_examples(config.data, "causal_lm"))
    outcome = trainer.run(curriculum_for_run(config, 0), seed=0)
    assert outcome.status == "complete" and outcome.losses.shape == (7, 6)
    assert np.all(outcome.losses[0] > 5)  # per-token nats of an untrained model over a 30k vocabulary


def _file(tmp_path, name, frame):
    path = tmp_path / name
    frame.write_ndjson(path) if name.endswith(".jsonl") else frame.write_csv(path)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda t: _file(t, "a.jsonl", pl.DataFrame({"body": ["x"] * 30, "label": ["a", "b"] * 15})), "missing column 'text'"),
    (lambda t: _file(t, "b.csv", pl.DataFrame({"text": [], "label": []}, schema={"text": pl.Utf8, "label": pl.Utf8})),
     "no rows"),
    (lambda t: _file(t, "c.jsonl", pl.DataFrame({"text": ["x"] * 30, "label": ["a", "b", "zebra"] * 10})),
     "unknown label 'zebra'"),
    (lambda t: str(t / "missing.jsonl"), "does not exist"),
])
def test_bad_datasets_fail_clearly_and_write_nothing(tmp_path, make, message):
    source = make(tmp_path)
    config = from_dict(_merge(PRESETS["tiny"], {"data": {"source": source, "labels": ["a", "b"], "n_train": 8, "n_test": 4}}))
    wh = Warehouse(tmp_path / "home" / "warehouse.duckdb")
    with pytest.raises(DataError, match=message):
        collect(config, 1, wh)
    assert not wh.path.exists() and not wh.shard_root.exists()


def test_unknown_model_path_fails_clearly_and_writes_nothing(tmp_path):
    config = from_dict(_merge(PRESETS["tiny"], {"model": {"source": str(tmp_path / "no-such-model")}}))
    wh = Warehouse(tmp_path / "home" / "warehouse.duckdb")
    with pytest.raises(ModelError, match="no-such-model does not exist"):
        collect(config, 1, wh)
    assert not wh.path.exists()


def test_config_files_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\ntraining:\n  batch_size: 32\n")
    with pytest.raises(ConfigError, match=r"c.yaml: training.batch_size 32 is larger than the training set"):
        load_config(path)
    path.write_text("preset: tiny\ntraining:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError, match="training.learning_rate must be float"):
        load_config(path)
    path.write_text("preset: tiny\nmodel:\n  sauce: x\n")
    with pytest.raises(ConfigError, match="unknown field model.sauce"):
        load_config(path)
    path.write_text("preset: tiny\ncurriculum:\n  kind: subset_epochs\n  subset_size: 8\n  epochs: 2\n")
    assert load_config(path).steps == 4
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    path.write_text("preset: tiny\ntraining:\n  learning_rate: 1e-3\n  weight_decay: 5E-2\n")  # YAML 1.1: strings
    config = load_config(path)
    assert config.training.learning_rate == 1e-3 and config.training.weight_decay == 5e-2


def test_explicit_curricula_from_a_file(tmp_path):
    path = tmp_path / "curricula.json"
    path.write_text(json.dumps([[[0, 1], [2, 3]], [[4, 5], [6, 7]]]))
    config = from_dict(_merge(PRESETS["tiny"], {"training": {"batch_size": 2, "steps": 2}, "gradients": {"checkpoint_steps": [0]},
                                                 "curriculum": {"kind": "explicit", "path": str(path)}}))
    assert curriculum_for_run(config, 1).tolist() == [[4, 5], [6, 7]]
    with pytest.raises(sf.curricula.CurriculumError, match="holds 2 curricula; run 2 has none"):
        collect(config, 3, Warehouse(tmp_path / "w.duckdb"))


@pytest.mark.parametrize("overrides", [
    {"training": {"frozen_layers": 1}},                                        # tiny GPT-2
    {"model": {"source": "embedded", "num_layers": 2}, "training": {"freeze_embeddings": True}},
    {"model": {"source": "embedded", "num_layers": 2}, "training": {"frozen_layers": 1}},
])
def test_frozen_prefix_cache_gives_the_same_losses(tiny, overrides):
    config = from_dict(_merge(PRESETS["tiny"], overrides))
    cached, plain = Trainer(config, tiny[1]), Trainer(config, tiny[1], cache_frozen=False)
    assert cached.prefix is not None and plain.prefix is None
    curriculum = curriculum_for_run(config, 0)
    np.testing.assert_allclose(cached.run(curriculum, 0).losses, plain.run(curriculum, 0).losses, rtol=1e-5, atol=1e-6)


def test_tracin_first_order_prediction_matches_one_real_sgd_step(tiny):
    """One real SGD update of the tiny model changes each test loss by what TracIn predicts to
    first order, -(lr / b) sum_{i in batch} <g_i, g_j> (exact gradients, no projection)."""
    from simfluence_platform.tasks.gradients import CountSketch, projected_gradients

    config = from_dict(_merge(PRESETS["tiny"], {"training": {"optimizer": "sgd", "learning_rate": 1e-4},
                                                "gradients": {"projection_dim": 0}}))
    trainer = Trainer(config, tiny[1])
    trainer.reset()
    identity = CountSketch(trainer.n_trainable, 0, seed=0)
    train_grads = projected_gradients(trainer, trainer.train_data, identity)[0].astype(np.float64)
    test_grads = projected_gradients(trainer, trainer.test_data, identity)[0].astype(np.float64)
    batch = curriculum_for_run(config, 0)[:1]
    outcome = trainer.run(batch, seed=0)
    actual = outcome.losses[1] - outcome.losses[0]
    ids = batch[0][batch[0] >= 0]
    predicted = -config.training.learning_rate / len(ids) * (train_grads[ids] @ test_grads.T).sum(axis=0)
    assert np.abs(actual).max() > 1e-4  # the step moved the losses measurably
    np.testing.assert_allclose(actual, predicted, rtol=0.05, atol=0.02 * np.abs(actual).max())
    assert np.corrcoef(actual, predicted)[0, 1] > 0.99


def test_adam_preconditioned_gradients_are_stored_with_adamw(tiny, tmp_path):
    config, _ = tiny
    wh = Warehouse(tmp_path / "warehouse.duckdb")
    collect(config, 2, wh)
    grads = load_gradients(wh, "tiny")
    assert grads.train_grads_preconditioned is not None
    assert grads.train_grads_preconditioned.shape == grads.train_grads.shape
    assert not np.allclose(grads.dots(preconditioned=True), grads.dots())
    sgd = from_dict(_merge(PRESETS["tiny"], {"name": "tiny-sgd", "training": {"optimizer": "sgd", "momentum": 0.9}}))
    collect(sgd, 2, wh)
    assert load_gradients(wh, "tiny-sgd").train_grads_preconditioned is None


def test_config_hash_is_stable_when_a_field_with_a_default_is_added():
    """A config stored before the optimizer fields existed hashes as today's default does, so
    its experiment's runs stay usable; a changed value still changes the hash."""
    from simfluence_platform.storage.experiments import config_hash

    today = preset("demo")
    older = today.to_dict()
    for field_name in ("optimizer", "betas", "eps", "momentum"):
        older["training"].pop(field_name)  # as written before these fields were added
    assert config_hash(from_dict(older).identity()) == config_hash(today.identity())
    assert "optimizer" not in today.identity().get("training", {})
    changed = from_dict(_merge(PRESETS["demo"], {"training": {"optimizer": "sgd"}}))
    assert config_hash(changed.identity()) != config_hash(today.identity())
