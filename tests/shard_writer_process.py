"""A training-run stand-in for the storage tests: writes one run's shards from a seeded
synthetic process, optionally slowly, in its own process.

Usage: python shard_writer_process.py SHARD_ROOT EXPERIMENT RUN_ID N_STEPS N_TESTS N_TRAIN SLEEP
"""

import sys
import time

import numpy as np

from simfluence_platform.storage.shards import LossShardWriter, RunHeader


def synthetic_run(run_id: int, n_steps: int, n_tests: int, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(batches int[T, 2], losses float[T+1, m]) determined by the run id."""
    rng = np.random.default_rng(run_id)
    batches = rng.integers(0, n_train, (n_steps, 2))
    losses = 2.0 - np.cumsum(rng.uniform(0, 0.01, (n_steps + 1, n_tests)), axis=0)
    return batches, losses


def main() -> None:
    root, experiment = sys.argv[1], sys.argv[2]
    run_id, n_steps, n_tests, n_train = (int(v) for v in sys.argv[3:7])
    sleep = float(sys.argv[7])
    batches, losses = synthetic_run(run_id, n_steps, n_tests, n_train)
    writer = LossShardWriter(root, RunHeader(experiment, run_id, n_steps, 2, n_tests, seed=run_id), flush_every=2)
    writer.write_batches(batches)
    for step in range(n_steps + 1):
        writer.log(step, losses[step])
        time.sleep(sleep)
    writer.complete()


if __name__ == "__main__":
    main()
