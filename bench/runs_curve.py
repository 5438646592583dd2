"""How the simulators improve with the number of fitting runs, on fixed held-out runs.

Reads an experiment from the warehouse (collect it first, e.g.
``simfluence collect --preset demo --runs 200``), holds out every 5th run id (as the fit flow
does), fits each method on the first k fitting runs for every k in ``--sizes``, and prints the
held-out all-steps MSE and across-runs Spearman of each, with the ratio of Simfluence-Linear's
MSE to TracIn-CP's and to the curriculum-blind mean trajectory's, measured in the same run.

Usage: ``python bench/runs_curve.py [--experiment demo] [--sizes 10,20,40,80,160] [--warehouse PATH]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

import simfluence as sf
from simfluence_platform.storage.experiments import load_gradients, load_runset
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.storage.experiments import complete_run_ids
from simfluence_platform.tasks.fit import split_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--sizes", default="10,20,40,80,160")
    parser.add_argument("--warehouse", default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/results/runs_curve.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    wh = Warehouse(args.warehouse)
    run_ids = np.array(sorted(complete_run_ids(wh, args.experiment)), dtype=np.int64)
    fit_ids, held_ids = split_runs(run_ids, 5)
    heldout = load_runset(wh, args.experiment, run_ids=held_ids)
    gradients = load_gradients(wh, args.experiment)
    sizes = [k for k in (int(s) for s in args.sizes.split(",")) if k <= len(fit_ids)]
    print(f"{args.experiment}: {len(run_ids)} complete runs; {len(held_ids)} held out (fixed); "
          f"fitting on the first k of {len(fit_ids)} for k in {sizes}")
    print(f"{'k':>5} {'method':<26} {'all-steps MSE':>14} {'Spearman (runs)':>16}")
    results = []
    for k in sizes:
        fitting = load_runset(wh, args.experiment, run_ids=fit_ids[:k])
        sims = {"simfluence_linear": sf.SimfluenceLinear(intercept="cv"),
                "simfluence_additive": sf.SimfluenceAdditive(intercept="cv"),
                "tracin_cp_rescaled": sf.TracInCP(gradients, rescaled=True),
                "mean_trajectory": sf.MeanTrajectory()}
        for simulator in sims.values():
            simulator.fit(fitting)
        board = {row["method"]: row for row in sf.metrics.leaderboard(sf.metrics.score(sims, heldout, n_boot=10)).to_dicts()}
        for method, row in board.items():
            print(f"{k:>5} {method:<26} {row['all_steps_mse']:>14.4f} {row['spearman_across_runs'] or float('nan'):>16.3f}")
        linear = board["simfluence_linear"]["all_steps_mse"]
        print(f"{k:>5} ratios: Linear/TracIn-CP MSE {linear / board['tracin_cp_rescaled']['all_steps_mse']:.2f}, "
              f"Linear/mean-trajectory MSE {linear / board['mean_trajectory']['all_steps_mse']:.2f}; "
              f"Linear chose intercept={sims['simfluence_linear'].fitted_intercept}, "
              f"l2={sims['simfluence_linear'].fitted_l2[0]:g}")
        results.append({"k": k, "scores": board})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
