"""Collection benchmark: runs per hour, and where a training step's time goes.

For the ``demo`` and ``paper`` presets on this machine: one run with the optimised trainer
(model loaded and examples tokenised once per process, weights reset from an in-memory copy,
frozen embeddings and lower layers computed once, test losses evaluated in batches of
``eval_batch_size``) split into training, evaluation and
logging (the shard writer) per step; the logging overhead in percent of the forward passes it
needs; and, measured in the same run, a naive loop that reloads the model from disk and
re-tokenises for every run, recomputes the frozen layers and evaluates one test example at a
time; and the frozen-prefix cache alone, on the demo preset with two of its three layers frozen.

``paper`` runs are long (96 steps x 250 test examples), so they are timed on their first
``--paper-steps`` steps and scaled; the per-step costs do not depend on the step.

Usage: ``python bench/collect_bench.py [--paper-steps 12] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from simfluence_platform.storage.shards import LossShardWriter, RunHeader
from simfluence_platform.tasks.runs import curriculum_for_run, run_seed
from simfluence_platform.tasks.config import PRESETS, _merge, from_dict, preset
from simfluence_platform.tasks.data import load_examples
from simfluence_platform.tasks.training import Trainer


def timed_run(trainer: Trainer, batches: np.ndarray, seed: int, root: Path, run_id: int) -> float:
    header = RunHeader("bench", run_id, batches.shape[0], batches.shape[1], len(trainer.test_data))
    writer = LossShardWriter(root, header, flush_every=10)
    start = time.perf_counter()
    outcome = trainer.run(batches, seed, writer)
    assert outcome.status == "complete", outcome.reason
    return time.perf_counter() - start


def bench_preset(name: str, steps: int | None, naive: bool) -> dict:
    config = preset(name)
    examples = load_examples(config.data, config.model.task)
    start = time.perf_counter()
    trainer = Trainer(config, examples)
    setup_s = time.perf_counter() - start
    full_steps = config.steps
    batches = curriculum_for_run(config, 0)[: steps or full_steps]
    with tempfile.TemporaryDirectory() as root:
        timed_run(trainer, batches[:2], 0, Path(root), 99)  # warm-up
        trainer.timings = type(trainer.timings)()
        run_s = timed_run(trainer, batches, run_seed(config, 0), Path(root), 0)
    t = trainer.timings
    per_step = {"train": t.train / t.steps, "evaluate": t.evaluate / (t.steps + 1), "log": t.log / (t.steps + 1)}
    run_estimate = run_s / len(batches) * full_steps
    result = {
        "preset": name, "steps_per_run": full_steps, "steps_timed": len(batches), "n_train": config.data.n_train,
        "n_test": config.data.n_test, "trainable_parameters": trainer.n_trainable, "process_setup_seconds": setup_s,
        "seconds_per_run": run_estimate, "runs_per_hour": 3600 / run_estimate,
        "train_seconds_per_step": per_step["train"], "eval_seconds_per_step": per_step["evaluate"],
        "log_seconds_per_step": per_step["log"],
        "logging_overhead_percent": 100 * per_step["log"] / per_step["evaluate"],
    }
    print(f"[{name}] {full_steps} steps x {config.data.n_test} test examples, {trainer.n_trainable / 1e6:.1f} M trainable "
          f"parameters: {run_estimate:.1f} s per run = {3600 / run_estimate:.0f} runs/hour "
          f"(timed on {len(batches)} steps; process setup {setup_s:.1f} s once)")
    print(f"[{name}] per step: train {per_step['train'] * 1e3:.0f} ms, evaluate {per_step['evaluate'] * 1e3:.0f} ms, "
          f"log {per_step['log'] * 1e3:.2f} ms = {result['logging_overhead_percent']:.2f}% of the evaluation")
    if naive:
        result.update(bench_naive(name, batches, run_estimate / full_steps * len(batches)))
    return result


def bench_naive(name: str, batches: np.ndarray, optimised_s: float) -> dict:
    """Reload and re-tokenise per run, recompute the frozen layers, evaluate one test example at a time."""
    config = from_dict(_merge(PRESETS[name], {"training": {"eval_batch_size": 1}}))
    start = time.perf_counter()
    trainer = Trainer(config, load_examples(config.data, config.model.task), cache_frozen=False)
    with tempfile.TemporaryDirectory() as root:
        timed_run(trainer, batches, 0, Path(root), 0)
    naive_s = time.perf_counter() - start
    print(f"[{name}] naive loop (reload + re-tokenise per run, no frozen-prefix cache, unbatched evaluation): "
          f"{naive_s:.1f} s for "
          f"{len(batches)} steps vs {optimised_s:.1f} s optimised: {naive_s / optimised_s:.1f}x slower")
    return {"naive_seconds": naive_s, "optimised_seconds": optimised_s, "speedup_vs_naive": naive_s / optimised_s}


def bench_prefix_cache(frozen_layers: int = 2) -> dict:
    """The demo preset with its lower layers frozen: the run time with and without the cache."""
    config = from_dict(_merge(PRESETS["demo"], {"training": {"frozen_layers": frozen_layers}}))
    examples = load_examples(config.data, config.model.task)
    batches = curriculum_for_run(config, 0)
    seconds = {}
    with tempfile.TemporaryDirectory() as root:
        for cache in (False, True):
            trainer = Trainer(config, examples, cache_frozen=cache)
            timed_run(trainer, batches[:2], 0, Path(root), 98 + cache)
            seconds[cache] = timed_run(trainer, batches, 0, Path(root), int(cache))
    print(f"[demo, first {frozen_layers} of 3 layers frozen] frozen-prefix cache: {seconds[True]:.1f} s per run vs "
          f"{seconds[False]:.1f} s recomputing the frozen layers: {seconds[False] / seconds[True]:.1f}x")
    return {"frozen_layers": frozen_layers, "cached_seconds": seconds[True], "uncached_seconds": seconds[False],
            "speedup_from_cache": seconds[False] / seconds[True]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-steps", type=int, default=12)
    parser.add_argument("--json", type=Path, default=Path("bench/results/collect_bench.json"))
    args = parser.parse_args()
    results = [bench_preset("demo", None, naive=True), bench_prefix_cache(),
               bench_preset("paper", args.paper_steps, naive=False)]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
