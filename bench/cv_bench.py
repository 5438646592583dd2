"""Cross-validated Simfluence-Linear fit: the penalty path against one fit and today's way.

On synthetic runs of a known Simfluence-Linear process with step intercepts (noise 0.01;
default n=300, m=200, 40 fitting runs of 100 steps, b=8, 10 held-out runs), in one run:

- one fit at a fixed penalty (1e-2 on the summed squared errors, as ``fit_bench.py``; the
  median of three);
- the cross-validated fit (3 intercepts x 8 penalties over 5 folds of whole runs), each fold
  and intercept solved as one penalty path (``solve_ridge_path``) to the CV tolerance
  (``simfluence.simulators.CV_TOLERANCE``) with float32 operator products
  (``CV_SHIFT_DTYPE``), the final fit to 1e-8 in float64;
- the same cross-validation the way it was done before the path: one ``solve_ridge`` per
  penalty to 1e-8 in float64 (its structure rebuilt each time), warm-started from the previous penalty,
  on the same penalties, then the final fit at the chosen penalty as that code did it;
- optionally (``--reference-rev main``) the cross-validated and the fixed fit of another git
  revision's ``simfluence`` (extracted with ``git archive``, run in a subprocess on the same
  synthetic data with its own default grid).

Printed: CV time / one-fit time, path against per-penalty rebuild, the chosen intercept and
penalty, the held-out all-steps MSE of each, and the largest relative difference between the
cross-validation errors of the two ways. The grid is today's default on the summed squared
errors (1e-3 .. 1e4), expressed per transition of a fold (the folds are equal here), so both
ways score identical problems; the final fit of the path way uses the chosen per-transition
penalty times the number of fitting transitions (1.25x the fold's), the old way the fold's.

Usage: ``python bench/cv_bench.py [--n 300] [--m 200] [--runs 40] [--steps 100] [--batch 8]
[--reference-rev main] [--json PATH]``. Every ratio is between numbers measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import simfluence as sf
from simfluence.solvers import TransitionProblem, solve_ridge

OLD_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # the former default, on the summed errors
FIXED_L2 = 1e-2  # on the summed squared errors
HELDOUT = 10
FOLDS = 5

REFERENCE_SCRIPT = """
import json, sys, time
import simfluence as sf
n, m, runs, steps, batch, heldout_runs, fixed = json.loads(sys.argv[1])
data, _ = sf.synthetic.linear_runs(n, m, runs + heldout_runs, steps, batch, noise=0.01, step_intercept=True, seed=0)
fitting, heldout = data.split(heldout_runs, seed=0)
sf.SimfluenceLinear(intercept="step", l2=fixed).fit(fitting.select_tests([0]))  # compile the kernels,
sf.SimfluenceLinear(intercept="cv", l2="cv", cv_folds=5).fit(fitting.select_tests([0, 1]))  # the CV ones too
ones = []
for _ in range(3):
    start = time.perf_counter(); sf.SimfluenceLinear(intercept="step", l2=fixed).fit(fitting)
    ones.append(time.perf_counter() - start)
one = sorted(ones)[1]
sim = sf.SimfluenceLinear(intercept="cv", l2="cv", cv_folds=5)
start = time.perf_counter(); sim.fit(fitting); cv = time.perf_counter() - start
mse = sf.metrics.all_steps_mse(sim.simulate(heldout.batches, heldout.initial_loss), heldout.losses)
print(json.dumps({"module": sf.__file__, "one_fit_seconds": one, "cv_fit_seconds": cv,
                  "intercept": sim.fitted_intercept, "l2_sum": float(sim.fitted_l2[0]), "heldout_mse": mse}))
"""


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


class PerPenalty(sf.SimfluenceLinear):
    """Simfluence-Linear cross-validated the way it was done before the path: a separate
    ``solve_ridge`` to 1e-8 per penalty (its structure rebuilt each time), warm-started from the
    previous one. Everything else (folds, validation, choice) is the simulator's own."""

    def _solve(self, runs, intercept, path, tol=1e-8, shift_dtype=np.float64):
        problem = TransitionProblem.from_runs(runs, self.base, intercept)
        transitions = runs.n_runs * runs.n_steps
        solutions, warm = [], None
        for l2 in path:
            warm = solve_ridge(problem, l2 * transitions, l2 * transitions, solver=self.solver, warm_start=warm,
                               threads=self.threads)
            solutions.append(warm)
        return solutions


def reference_revision(rev: str, sizes: list) -> dict:
    """Run REFERENCE_SCRIPT against ``rev``'s simfluence package in a subprocess."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", root, "archive", rev, "simfluence"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        out = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT, json.dumps(sizes)], cwd=tmp, text=True,
                             capture_output=True, check=True, env={**os.environ, "PYTHONPATH": tmp})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result.pop("module").startswith(tmp):
        raise RuntimeError(f"the reference run did not import {rev}'s simfluence")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--m", type=int, default=200)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reference-rev", default=None, help="also time this git revision's CV fit (e.g. main)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/cv_bench.json"))
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"workload n={args.n}, m={args.m}, {args.runs} fitting runs x {args.steps} steps, b={args.batch}")
    data, _ = sf.synthetic.linear_runs(args.n, args.m, args.runs + HELDOUT, args.steps, args.batch, noise=0.01,
                                       step_intercept=True, seed=0)
    fitting, heldout = data.split(HELDOUT, seed=0)
    fold_transitions = {len(fit) * args.steps for fit, _ in fitting.run_folds(FOLDS, 0)}
    if len(fold_transitions) != 1:
        raise SystemExit(f"--runs must be a multiple of {FOLDS} (equal folds score identical problems both ways)")
    fold_n = fold_transitions.pop()
    all_n = fitting.n_runs * fitting.n_steps
    grid = tuple(v / fold_n for v in OLD_GRID)  # per transition

    def heldout_mse(sim: sf.SimfluenceLinear) -> float:
        return sf.metrics.all_steps_mse(sim.simulate(heldout.batches, heldout.initial_loss), heldout.losses)

    sf.SimfluenceLinear(intercept="step", l2=1.0).fit(fitting.select_tests([0]))  # compile the kernels,
    sf.SimfluenceLinear(intercept="cv", l2="cv", l2_grid=grid, cv_folds=FOLDS).fit(
        fitting.select_tests([0, 1]))  # the cross-validation ones too (timed runs never compile)
    one_s = float(np.median([timed(sf.SimfluenceLinear(intercept="step", l2=FIXED_L2 / all_n).fit, fitting)[1]
                             for _ in range(3)]))

    path_sim = sf.SimfluenceLinear(intercept="cv", l2="cv", l2_grid=grid, cv_folds=FOLDS)
    path_errors, path_cv_s = timed(path_sim.cross_validation_errors, fitting)
    (intercept, l2), _ = timed(path_sim.choose, path_errors)
    _, path_final_s = timed(path_sim.fit_with, fitting, intercept, l2)
    path_s = path_cv_s + path_final_s

    old_sim = PerPenalty(intercept="cv", l2="cv", l2_grid=grid, cv_folds=FOLDS)
    old_errors, old_cv_s = timed(old_sim.cross_validation_errors, fitting)
    old_intercept, old_l2 = old_sim.choose(old_errors)
    _, old_final_s = timed(old_sim.fit_with, fitting, old_intercept, old_l2 * fold_n / all_n)
    old_s = old_cv_s + old_final_s
    error_diff = float(np.max(np.abs(path_errors - old_errors) / np.abs(old_errors)))

    result = {
        "n": args.n, "m": args.m, "runs": args.runs, "steps": args.steps, "batch": args.batch, "load": load,
        "one_fit_seconds": one_s,
        "path": {"cv_seconds": path_cv_s, "final_fit_seconds": path_final_s, "total_seconds": path_s,
                 "intercept": intercept, "l2_per_transition": float(l2), "l2_sum_fold": float(l2) * fold_n,
                 "l2_sum_final": float(l2) * all_n, "heldout_mse": heldout_mse(path_sim)},
        "per_penalty": {"cv_seconds": old_cv_s, "final_fit_seconds": old_final_s, "total_seconds": old_s,
                        "intercept": old_intercept, "l2_sum": float(old_l2) * fold_n,
                        "heldout_mse": heldout_mse(old_sim)},
        "max_relative_cv_error_difference": error_diff,
    }
    print(f"one fit at a fixed penalty: {one_s:.2f} s")
    print(f"CV fit, penalty path:        {path_s:.1f} s = {path_s / one_s:.1f}x one fit (CV {path_cv_s:.1f} s + final "
          f"fit {path_final_s:.2f} s); intercept={intercept}, l2={l2:.3g} per transition = {l2 * fold_n:g} on a "
          f"fold's summed errors ({l2 * all_n:g} in the final fit); held-out MSE {result['path']['heldout_mse']:.4e}")
    print(f"CV fit, per-penalty rebuild: {old_s:.1f} s = {old_s / one_s:.1f}x one fit; intercept={old_intercept}, "
          f"l2={old_l2 * fold_n:g} on the summed errors; held-out MSE {result['per_penalty']['heldout_mse']:.4e}")
    print(f"path vs per-penalty rebuild: {old_s / path_s:.2f}x faster (cross-validation alone "
          f"{old_cv_s / path_cv_s:.2f}x); largest relative difference of the CV errors {error_diff:.1e}")
    if args.reference_rev:
        ref = reference_revision(args.reference_rev, [args.n, args.m, args.runs, args.steps, args.batch, HELDOUT,
                                                      FIXED_L2])
        result["reference"] = {"rev": args.reference_rev, **ref}
        print(f"{args.reference_rev}: one fit {ref['one_fit_seconds']:.2f} s, CV fit {ref['cv_fit_seconds']:.1f} s = "
              f"{ref['cv_fit_seconds'] / ref['one_fit_seconds']:.1f}x its one fit ({ref['cv_fit_seconds'] / path_s:.2f}x "
              f"the path's CV fit); intercept={ref['intercept']}, l2={ref['l2_sum']:g} on the summed errors; "
              f"held-out MSE {ref['heldout_mse']:.4e}")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
