"""Fitting throughput on Dask with 1, 2 and 4 workers, and how the work divides into shards.

The unit of work is a shard of test examples (``tasks.fit``): each Dask task solves the exact
ridge problems of ``shard_size`` test examples against the shared, scattered runs. This times
one Simfluence-Linear fit (fixed intercept and penalty, no cross-validation) of a synthetic
workload on a LocalCluster of single-threaded in-process workers, against the same fit in one
process on every core (the solver's own threads), measured in the same run.

Usage: ``python bench/fit_scale.py [--n 500] [--m 512] [--runs 40] [--steps 100] [--shard-size 64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import simfluence as sf
from simfluence_platform.tasks.fit import _shard_fit, dask_client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--m", type=int, default=512)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("bench/results/fit_scale.json"))
    args = parser.parse_args()
    runs, _ = sf.synthetic.linear_runs(args.n, args.m, args.runs, args.steps, args.batch, noise=0.01,
                                       step_intercept=True, seed=0)
    shards = [np.arange(s, min(s + args.shard_size, args.m)) for s in range(0, args.m, args.shard_size)]
    print(f"workload: n={args.n}, m={args.m}, {args.runs} runs x {args.steps} steps (b={args.batch}); "
          f"{len(shards)} shards of {args.shard_size} test examples; {os.cpu_count()} cores")
    l2 = 1e-2 / (args.runs * args.steps)  # per transition: 1e-2 on the summed squared errors
    sf.SimfluenceLinear(intercept="step", l2=l2).fit(runs.select_tests([0]))  # compile the kernels
    start = time.perf_counter()
    sf.SimfluenceLinear(intercept="step", l2=l2).fit(runs)
    single = time.perf_counter() - start
    print(f"one process, solver threads = {os.cpu_count()}: {single:.2f} s ({args.m / single:.0f} test examples/s)")
    results = {"single_process_seconds": single, "shards": len(shards), "dask": {}}
    for workers in (1, 2, 4):
        with dask_client(None, n_workers=workers) as client:
            scattered = client.scatter(runs, broadcast=True)
            start = time.perf_counter()
            parts = client.gather(client.map(_shard_fit, ["simfluence_linear"] * len(shards), [scattered] * len(shards),
                                             shards, ["step"] * len(shards), [l2] * len(shards), pure=False))
            seconds = time.perf_counter() - start
        sf.SimfluenceLinear.concatenate(parts)
        results["dask"][workers] = seconds
        print(f"Dask LocalCluster, {workers} worker(s) x 1 thread: {seconds:.2f} s "
              f"({args.m / seconds:.0f} test examples/s; {results['dask'][1] / seconds:.2f}x one worker; "
              f"{single / seconds:.2f}x the single process)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
