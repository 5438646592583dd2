"""Per-example gradients: ``torch.func`` (``vmap`` of ``grad`` over chunks of examples) against
the baseline loop of one backward pass per example, measured in the same process on the same
weights and examples, both projected to ``gradients.projection_dim`` by the same CountSketch;
and the largest difference between them relative to the gradients' scale.

One checkpoint's work: the gradients of every training and test example. On a CUDA device with
bf16 autocast; else on the CPU in float32.

Usage: ``python bench/example_gradients_bench.py [--presets demo tiny] [--repeats 1]``;
results also go to ``bench/results/example_gradients_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from simfluence_platform.tasks.config import PRESETS, _merge, from_dict
from simfluence_platform.tasks.data import load_examples
from simfluence_platform.tasks.gradients import CountSketch, projected_gradients
from simfluence_platform.tasks.training import Trainer

RESULTS = Path(__file__).parent / "results" / "example_gradients_bench.json"


def timed(trainer: Trainer, sketch: CountSketch, loop: bool, repeats: int) -> tuple[float, np.ndarray]:
    """Best seconds over ``repeats`` for the gradients of every training and test example."""
    best, grads = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        grads = np.concatenate([projected_gradients(trainer, data, sketch, loop=loop)[0]
                                for data in (trainer.train_data, trainer.test_data)])
        best = min(best, time.perf_counter() - start)
    return best, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["demo", "tiny"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    rows = []
    for name in args.presets:
        config = from_dict(_merge(PRESETS[name], {"device": "cuda" if cuda else "cpu",
                                                  "dtype": "bfloat16" if cuda else "float32"}))
        trainer = Trainer(config, load_examples(config.data, config.model.task))
        sketch = CountSketch(trainer.n_trainable, config.gradients.projection_dim, 0, trainer.device)
        examples = len(trainer.train_data) + len(trainer.test_data)
        timed(trainer, sketch, False, 1)  # warm-up
        loop_s, loop = timed(trainer, sketch, True, args.repeats)
        vmap_s, vectorised = timed(trainer, sketch, False, args.repeats)
        difference = float(np.abs(loop - vectorised).max() / np.abs(loop).max())
        rows.append({"preset": name, "examples": examples, "parameters": trainer.n_trainable,
                     "loop_seconds": loop_s, "vmap_seconds": vmap_s, "speedup": loop_s / vmap_s,
                     "max_relative_difference": difference})
        print(f"{name}: {examples} examples x {trainer.n_trainable:,} parameters -> {sketch.dim}: "
              f"loop (baseline) {loop_s:.2f} s, vmap {vmap_s:.2f} s, {loop_s / vmap_s:.1f}x; "
              f"max |difference| / scale = {difference:.1e}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "results": rows},
                                  indent=2))


if __name__ == "__main__":
    main()
