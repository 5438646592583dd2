"""Batched training runs (training.parallel_runs) and gradients captured in the run: each
batched run's losses equal a separate run's, and the in-run, vectorised gradient checkpoints
equal the two-run, one-backward-pass-per-example way. Real models (tiny GPT-2, MiniLM)."""

import json

import numpy as np
import pytest

from simfluence_platform.storage.experiments import config_hash, load_gradients, load_runset
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.batched import BatchedTrainer
from simfluence_platform.tasks.collect import collect, train_group
from simfluence_platform.tasks.config import PRESETS, ConfigError, _merge, from_dict
from simfluence_platform.tasks.data import load_examples
from simfluence_platform.tasks.gradients import CountSketch, gradient_checkpoints, projected_gradients
from simfluence_platform.tasks.runs import curriculum_for_run, run_seed
from simfluence_platform.tasks.training import Trainer

# Batched and separate runs differ only by the order of float32 operations inside the batched
# kernels (about 1e-7 relative per step); over a few updates that stays far below 1e-5.
LOSS_TOLERANCE = 1e-5

SETUPS = {
    "full": {},
    "full-padded-sgd": {"training": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.1},
                        "curriculum": {"kind": "subset_epochs", "subset_size": 10, "epochs": 1}},  # last batch padded
    "lora": {"training": {"method": "lora"}},
    "frozen-layers": {"training": {"frozen_layers": 1, "weight_decay": 0.01}},
    "minilm-frozen-embeddings": {"model": {"source": "embedded", "num_layers": 2},
                                 "training": {"freeze_embeddings": True, "learning_rate": 1e-4}},
}


def config_for(overrides: dict, parallel_runs: int = 1):
    return from_dict(_merge(PRESETS["tiny"], _merge(overrides, {"training": {"parallel_runs": parallel_runs}})))


@pytest.mark.parametrize("setup", SETUPS)
def test_batched_runs_give_each_separate_runs_losses(setup):
    config = config_for(SETUPS[setup])
    trainer = Trainer(config, load_examples(config.data, config.model.task))
    curricula = [curriculum_for_run(config, r) for r in range(3)]
    separate = [trainer.run(c, run_seed(config, r)).losses for r, c in enumerate(curricula)]
    batched = BatchedTrainer(trainer).run(curricula)
    for r, outcome in enumerate(batched):
        assert outcome.status == "complete"
        assert outcome.losses.shape == separate[r].shape
        np.testing.assert_allclose(outcome.losses, separate[r], rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)
        assert np.abs(outcome.losses[-1] - outcome.losses[0]).max() > 1e-3  # it really trained
    assert np.abs(separate[0][-1] - separate[1][-1]).max() > 1e-4  # the runs differ: no run was mixed up


def test_the_demo_model_batched_gives_separate_losses():
    """The demo preset (MiniLM, 3 layers, frozen embeddings), shortened to 6 updates."""
    config = from_dict(_merge(PRESETS["demo"], {"training": {"steps": 6, "parallel_runs": 2},
                                             "gradients": {"checkpoint_steps": [0]}}))
    trainer = Trainer(config, load_examples(config.data, config.model.task))
    curricula = [curriculum_for_run(config, r) for r in range(2)]
    batched = BatchedTrainer(trainer).run(curricula)
    for r, outcome in enumerate(batched):
        separate = trainer.run(curricula[r], run_seed(config, r)).losses
        np.testing.assert_allclose(outcome.losses, separate, rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)


def test_parallel_runs_is_validated_and_not_hashed():
    assert config_for({}).training.parallel_runs == 1
    assert config_hash(config_for({}, 4).identity()) == config_hash(config_for({}).identity())
    for overrides, message in [({}, "must be a positive integer, got 0"),
                               ({"training": {"dropout": True}}, "needs training.dropout off"),
                               ({"training": {"method": "prompt_tuning"}}, "not available with training.method")]:
        with pytest.raises(ConfigError, match=f"training.parallel_runs {message}" if not overrides else message):
            config_for(overrides, 0 if not overrides else 2)
    with pytest.raises(ConfigError, match="training.parallel_runs must be int"):
        from_dict(_merge(PRESETS["tiny"], {"training": {"parallel_runs": 1.5}}))


def test_batched_collection_equals_one_at_a_time_and_takes_gradients_in_run(tmp_path):
    """Runs 0..4 in groups of 3 (and a group of 2): the same losses and gradient checkpoints as
    one run at a time; the reference run's checkpoints taken in-run equal the two-run way
    (training it again, one backward pass per example)."""
    one, three = config_for({}), config_for({}, 3)
    a, b = Warehouse(tmp_path / "a" / "w.duckdb"), Warehouse(tmp_path / "b" / "w.duckdb")
    collect(one, 5, a)
    summary = collect(three, 5, b)
    assert summary.trained == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(load_runset(b, "tiny").losses, load_runset(a, "tiny").losses,
                               rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)
    trainer = Trainer(one, load_examples(one.data, one.model.task))
    untouched = trainer.run(curriculum_for_run(one, 0), run_seed(one, 0)).losses  # no checkpoints taken
    np.testing.assert_allclose(load_runset(b, "tiny").losses[0], untouched, rtol=LOSS_TOLERANCE, atol=LOSS_TOLERANCE)
    np.testing.assert_array_equal(load_runset(a, "tiny").losses[0], untouched)  # the hook leaves the run as it was
    two_run = gradient_checkpoints(one, trainer, loop=True)
    for wh in (a, b):
        in_run = load_gradients(wh, "tiny")
        for name in ("train_grads", "test_grads", "train_grads_preconditioned", "curvatures"):
            expected = getattr(two_run, name)
            assert_close_to_scale(getattr(in_run, name), expected)
        np.testing.assert_array_equal(in_run.steps, two_run.steps)


def assert_close_to_scale(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-4) -> None:
    """Equal up to ``tolerance`` times the largest magnitude: float32 gradients summed in
    another order differ by about 1e-7 of their scale per operation, and the Adam-preconditioned
    ones divide by sqrt(v_hat) + eps, which magnifies the smallest gradients' rounding."""
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * np.abs(expected).max())


@pytest.mark.parametrize("setup", ["full", "lora", "frozen-layers", "minilm-frozen-embeddings"])
def test_vectorised_per_example_gradients_equal_the_loop(setup):
    config = config_for(SETUPS[setup])
    trainer = Trainer(config, load_examples(config.data, config.model.task))
    trainer.run(curriculum_for_run(config, 0)[:2], seed=0)  # away from the initial weights (a LoRA B of 0)
    exact = CountSketch(trainer.n_trainable, 0, seed=0)
    sketch = CountSketch(trainer.n_trainable, 32, seed=0)
    for data in (trainer.train_data, trainer.test_data):
        loop = projected_gradients(trainer, data, exact, loop=True)[0]
        assert np.abs(loop[0] - loop[1]).max() > 1e-3 * np.abs(loop).max()  # per example, not one shared gradient
        assert_close_to_scale(projected_gradients(trainer, data, exact)[0], loop, 1e-5)
        assert_close_to_scale(projected_gradients(trainer, data, sketch)[0],
                              projected_gradients(trainer, data, sketch, loop=True)[0], 1e-5)


def test_a_killed_batch_loses_nothing_and_collection_resumes(tmp_path):
    """A process killed mid-batch leaves no run of the batch marked complete; the next
    collection trains exactly those runs again, and every run ends complete exactly once."""
    config = config_for({}, 3)
    wh = Warehouse(tmp_path / "w.duckdb")
    collect(config, 1, wh, gradients=False)
    trainer = Trainer(config, load_examples(config.data, config.model.task))

    def crash(step):
        if step == 3:
            raise KeyboardInterrupt  # the process dies mid-batch

    with pytest.raises(KeyboardInterrupt):
        train_group(config, trainer, wh, [1, 2, 3], on_step=crash)
    for run_id in (1, 2, 3):
        folder = wh.shard_root / "tiny" / f"run-{run_id:06d}"
        assert list(folder.glob("losses-*.parquet")) and not (folder / "marker.json").exists()
    result = train_group(config, trainer, wh, [0, 1])  # run 0 is complete: left out, run 1 trained alone
    assert list(result.skipped) == [0] and list(result.outcomes) == [1]
    summary = collect(config, 4, wh, gradients=False)
    assert summary.trained == [2, 3] and summary.skipped == [0, 1]
    runs = load_runset(wh, "tiny")
    assert sorted(runs.run_ids.tolist()) == [0, 1, 2, 3]
    with wh.reader() as con:
        assert con.execute("SELECT count(*), count(DISTINCT (run_id, step, test_id)) FROM losses").fetchall() == \
            [(4 * 7 * 8,) * 2]
    assert json.loads((wh.shard_root / "tiny" / "run-000002" / "marker.json").read_text())["status"] == "complete"


def test_a_diverging_batch_marks_every_run_failed(tmp_path):
    config = from_dict(_merge(PRESETS["tiny"], {"training": {"learning_rate": 1e30, "parallel_runs": 2}}))
    wh = Warehouse(tmp_path / "w.duckdb")
    summary = collect(config, 2, wh, gradients=False)
    assert sorted(summary.failed) == [0, 1] and all("non-finite" in r for r in summary.failed.values())
    with wh.reader() as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("failed",), ("failed",)]
