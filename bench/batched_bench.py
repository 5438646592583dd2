"""Batched training runs: runs per hour with ``training.parallel_runs`` K in {1, 4, 8}, against
the baseline of the same runs trained one at a time (separate ``Trainer.run`` calls), measured
in the same process on the same curricula; and the largest difference of any batched run's
losses from its separate run (they must agree to 1e-5).

Every run writes its shards as in a collection. On a CUDA device the runs train there with
bf16 autocast (``dtype: bfloat16``); else on the CPU in float32. The demo preset's runs are
timed on their first ``--steps`` updates (the per-step cost does not depend on the step).

Usage: ``python bench/batched_bench.py [--preset demo] [--steps 6] [--runs 8] [--ks 1 4 8]``;
results also go to ``bench/results/batched_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from simfluence_platform.storage.shards import LossShardWriter, RunHeader
from simfluence_platform.tasks.batched import BatchedTrainer
from simfluence_platform.tasks.config import PRESETS, _merge, from_dict
from simfluence_platform.tasks.data import load_examples
from simfluence_platform.tasks.runs import curriculum_for_run, run_seed
from simfluence_platform.tasks.training import Trainer

RESULTS = Path(__file__).parent / "results" / "batched_bench.json"


def writer_for(root: Path, run_id: int, batches: np.ndarray, n_tests: int) -> LossShardWriter:
    writer = LossShardWriter(root, RunHeader("bench", run_id, batches.shape[0], batches.shape[1], n_tests),
                             flush_every=10)
    writer.write_batches(batches)
    return writer


def separate(trainer: Trainer, curricula: list[np.ndarray], seeds: list[int], root: Path) -> tuple[float, list]:
    """Seconds to train the runs one at a time, and their losses."""
    start, losses = time.perf_counter(), []
    for run_id, (batches, seed) in enumerate(zip(curricula, seeds)):
        writer = writer_for(root, run_id, batches, len(trainer.test_data))
        outcome = trainer.run(batches, seed, writer)
        writer.close()
        assert outcome.status == "complete", outcome.reason
        losses.append(outcome.losses)
    return time.perf_counter() - start, losses


def batched(trainer: Trainer, curricula: list[np.ndarray], k: int, root: Path) -> tuple[float, list]:
    """Seconds to train the runs k at a time, and their losses."""
    start, losses = time.perf_counter(), []
    engine = BatchedTrainer(trainer)
    for first in range(0, len(curricula), k):
        group = curricula[first:first + k]
        writers = [writer_for(root, first + i, c, len(trainer.test_data)) for i, c in enumerate(group)]
        outcomes = engine.run(group, writers)
        for writer in writers:
            writer.close()
        assert all(o.status == "complete" for o in outcomes), [o.reason for o in outcomes]
        losses.extend(o.losses for o in outcomes)
    return time.perf_counter() - start, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    overrides = {"training": {"steps": args.steps}, "gradients": {"checkpoint_steps": [0]},
                 "device": "cuda" if cuda else "cpu", "dtype": "bfloat16" if cuda else "float32"}
    config = from_dict(_merge(PRESETS[args.preset], overrides))
    trainer = Trainer(config, load_examples(config.data, config.model.task))
    curricula = [curriculum_for_run(config, r) for r in range(args.runs)]
    seeds = [run_seed(config, r) for r in range(args.runs)]
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset}: {args.runs} runs of {args.steps} updates, {len(trainer.test_data)} test examples, "
          f"{trainer.n_trainable:,} trainable parameters; {device}")
    with tempfile.TemporaryDirectory() as root:
        separate(trainer, curricula[:1], seeds[:1], Path(root) / "warm")  # warm-up
        batched(trainer, curricula[:2], 2, Path(root) / "warm-batched")
        base_s, base_losses = separate(trainer, curricula, seeds, Path(root) / "separate")
        rows = [{"k": "separate", "seconds": base_s, "runs_per_hour": 3600 * args.runs / base_s, "ratio": 1.0,
                 "max_loss_difference": 0.0}]
        print(f"  one at a time (baseline): {base_s:7.2f} s, {rows[0]['runs_per_hour']:8.0f} runs/h")
        for k in args.ks:
            seconds, losses = batched(trainer, curricula, k, Path(root) / f"k{k}")
            difference = max(float(np.abs(a - b).max()) for a, b in zip(losses, base_losses))
            rows.append({"k": k, "seconds": seconds, "runs_per_hour": 3600 * args.runs / seconds,
                         "ratio": base_s / seconds, "max_loss_difference": difference})
            print(f"  parallel_runs = {k}:        {seconds:7.2f} s, {rows[-1]['runs_per_hour']:8.0f} runs/h, "
                  f"{base_s / seconds:5.2f}x the baseline; max |loss - separate| = {difference:.1e}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "runs": args.runs,
                                   "device": device, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
