"""Fitting and simulation benchmark for Simfluence-Linear (DESIGN.md section 4).

For the reference workloads S (n=200, m=277, R=25, T=96, b=4) and M (n=1,000, m=1,000, R=100,
T=200, b=8) on synthetic runs of a known Simfluence-Linear process with per-step intercepts:

- fit time of the exact batched solver at one penalty;
- the dense per-test-example reference (NumPy lstsq on the full design of one test example),
  timed on a sample of test examples and scaled to all m; the speedup; the largest relative
  parameter difference on the sample;
- the cross-validated fit (intercept and penalty chosen over whole-run folds, each fold and
  intercept one exact penalty path; ``cv_bench.py`` compares it with the per-penalty way);
- simulate throughput on 1,000 curricula x 1,000 test examples x 200 steps (b=8);
- SGD fitting of the same model (an embedding table of (A, B) per pair trained with Adam on
  minibatches of transitions, as public research code does): the time it needs to come within
  1% of the exact solver's held-out MSE, or its held-out MSE when its time budget runs out.

Usage: ``python bench/fit_bench.py [--workloads S,M] [--sgd-budget 60] [--json PATH]``.
Every ratio printed is between numbers measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import simfluence as sf
from simfluence.solvers import TransitionProblem, dense_reference_solve, solve_ridge
from simfluence.synthetic import linear_runs

WORKLOADS = {
    "S": dict(n=200, m=277, runs=25, steps=96, batch=4, dense_sample=8),
    "M": dict(n=1000, m=1000, runs=100, steps=200, batch=8, dense_sample=1),
}
L2 = 1e-2  # on the summed squared errors; the simulators take it per transition (L2 / (R*T))
CV_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # on the summed squared errors of a fold, as L2


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_fit(name: str, spec: dict, cv: bool, sgd_budget: float) -> dict:
    runs, _ = linear_runs(spec["n"], spec["m"], spec["runs"] + 5, spec["steps"], spec["batch"],
                          noise=0.01, step_intercept=True, seed=0)
    fitting, heldout = runs.split(5, seed=0)
    l2 = L2 / (fitting.n_runs * fitting.n_steps)  # per transition
    sf.SimfluenceLinear(intercept="step", l2=l2).fit(fitting.select_tests([0]))  # compile kernels,
    sf.SimfluenceLinear(intercept="cv", l2="cv", cv_folds=3).fit(fitting.select_tests([0, 1]))  # the CV ones too
    simulator, fit_s = timed(sf.SimfluenceLinear(intercept="step", l2=l2).fit, fitting)
    problem = TransitionProblem.from_runs(fitting, 1.0, "step")
    solution = solve_ridge(problem, L2, L2)
    sample = np.linspace(0, spec["m"] - 1, spec["dense_sample"]).astype(int)
    worst, dense_s = 0.0, 0.0
    for j in sample:
        (ref_a, ref_b), seconds = timed(dense_reference_solve, problem, L2, L2, int(j))
        dense_s += seconds
        for got, ref in ((simulator.A[:, j], ref_a), (simulator.B[:, j], ref_b)):
            worst = max(worst, float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))))
    dense_all_s = dense_s / len(sample) * spec["m"]
    heldout_pred = simulator.simulate(heldout.batches, heldout.initial_loss)
    exact_mse = sf.metrics.all_steps_mse(heldout_pred, heldout.losses)
    result = {
        "workload": name, **{k: spec[k] for k in ("n", "m", "runs", "steps", "batch")},
        "fit_seconds": fit_s, "solver": solution.solver, "cg_iterations": solution.iterations,
        "dense_reference_seconds_scaled": dense_all_s, "dense_sample": len(sample),
        "speedup_vs_dense": dense_all_s / fit_s, "max_relative_parameter_difference": worst,
        "heldout_mse_exact": exact_mse,
    }
    print(f"[{name}] fit {fit_s:.2f} s ({solution.solver}, {solution.iterations} CG iterations); dense reference "
          f"{dense_s / len(sample):.2f} s per test example -> {dense_all_s:.0f} s for m={spec['m']}; "
          f"speedup {dense_all_s / fit_s:.0f}x; max relative parameter difference {worst:.1e}")
    if cv:
        fold_transitions = min(len(fit) for fit, _ in fitting.run_folds(3, 0)) * fitting.n_steps
        cv_sim = sf.SimfluenceLinear(intercept="cv", l2_grid=tuple(v / fold_transitions for v in CV_GRID), cv_folds=3)
        _, cv_s = timed(cv_sim.fit, fitting)
        cv_mse = sf.metrics.all_steps_mse(cv_sim.simulate(heldout.batches, heldout.initial_loss), heldout.losses)
        load = os.getloadavg()[0]
        result.update(cv_fit_seconds=cv_s, cv_intercept=cv_sim.fitted_intercept,
                      cv_l2=float(cv_sim.fitted_l2[0]), heldout_mse_cv=cv_mse, load_after_cv=load)
        print(f"[{name}] cross-validated fit (3 folds x 3 intercepts x 4 penalties, one penalty path per fold and "
              f"intercept) {cv_s:.1f} s = {cv_s / fit_s:.1f}x the fit: intercept={cv_sim.fitted_intercept}, "
              f"l2={cv_sim.fitted_l2[0]:.3g} per transition, held-out MSE {cv_mse:.3e} (load average {load:.2f})")
    if sgd_budget > 0:
        result.update(bench_sgd(fitting, heldout, exact_mse, fit_s, sgd_budget, name))
    return result


def bench_sgd(fitting: sf.RunSet, heldout: sf.RunSet, exact_mse: float, exact_s: float, budget: float,
              name: str, batch_transitions: int = 256, lr: float = 1e-3) -> dict:
    """Adam on an embedding table of (A, B) plus step intercepts, same objective as the solver."""
    torch.manual_seed(0)
    R, T, b = fitting.batches.shape
    n, m = fitting.n_train, fitting.n_tests
    batches = torch.from_numpy(np.where(fitting.batches < 0, n, fitting.batches).reshape(R * T, b))
    prev = torch.from_numpy(fitting.losses[:, :-1].reshape(R * T, m))
    target = torch.from_numpy((fitting.losses[:, 1:] - fitting.losses[:, :-1]).reshape(R * T, m))
    steps = torch.arange(R * T) % T
    table = torch.zeros(n + 1, 2 * m, dtype=torch.float64, requires_grad=True)
    intercepts = torch.zeros(T, 2 * m, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([table, intercepts], lr=lr)
    mask = torch.ones(n + 1, 1, dtype=torch.float64)
    mask[n] = 0
    start = time.perf_counter()
    best, reached_s, epochs = float("inf"), None, 0
    while time.perf_counter() - start < budget:
        for idx in torch.randperm(R * T).split(batch_transitions):
            effect = torch.nn.functional.embedding_bag(batches[idx], table * mask, mode="sum")
            icpt = intercepts[steps[idx]]
            pred = prev[idx] * (effect[:, :m] + icpt[:, :m]) + effect[:, m:] + icpt[:, m:]
            loss = ((pred - target[idx]) ** 2).sum() * (R * T / len(idx)) + L2 * (table[:n] ** 2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        epochs += 1
        with torch.no_grad():
            ab = table[:n].numpy()
            simulator = sf.SimfluenceLinear.from_parameters(ab[:, :m], ab[:, m:], intercepts[:, :m].numpy(),
                                                            intercepts[:, m:].numpy())
        mse = sf.metrics.all_steps_mse(simulator.simulate(heldout.batches, heldout.initial_loss), heldout.losses)
        best = min(best, mse)
        if mse <= 1.01 * exact_mse:
            reached_s = time.perf_counter() - start
            break
    elapsed = time.perf_counter() - start
    if reached_s is not None:
        print(f"[{name}] SGD (Adam, lr {lr}, {batch_transitions} transitions a batch) reached the exact held-out "
              f"MSE within 1% after {reached_s:.1f} s ({epochs} epochs): {reached_s / exact_s:.0f}x the exact fit")
    else:
        print(f"[{name}] SGD (Adam, lr {lr}) did not reach the exact held-out MSE {exact_mse:.3e} in {budget:.0f} s "
              f"({epochs} epochs): best {best:.3e} = {best / exact_mse:.2f}x the exact solver's")
    return {"sgd_seconds_to_exact_mse": reached_s, "sgd_epochs": epochs, "sgd_budget_seconds": budget,
            "sgd_best_heldout_mse": best, "sgd_elapsed_seconds": elapsed}


def bench_simulate(curricula: int = 1000, n: int = 1000, m: int = 1000, steps: int = 200, batch: int = 8) -> dict:
    rng = np.random.default_rng(0)
    simulator = sf.SimfluenceLinear.from_parameters(rng.normal(0, 1e-3, (n, m)), rng.normal(0, 1e-3, (n, m)),
                                                    rng.normal(0, 1e-3, (steps, m)), rng.normal(0, 1e-3, (steps, m)))
    batches = sf.curricula.uniform(n, curricula, steps, batch, seed=1)
    initial = rng.uniform(1, 2, (curricula, m))
    result = {}
    for dtype in (np.float64, np.float32):
        _, seconds = timed(simulator.simulate, batches, initial, dtype=dtype)
        label = np.dtype(dtype).name
        result[f"simulate_seconds_{label}"] = seconds
        print(f"[what-if] simulate {curricula} curricula x {m} test examples x {steps} steps (b={batch}), "
              f"{label}: {seconds:.2f} s ({curricula * m * steps / seconds / 1e6:.0f} M loss predictions/s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="S,M")
    parser.add_argument("--sgd-budget", type=float, default=60.0, help="seconds of SGD per workload (0: skip)")
    parser.add_argument("--no-cv", action="store_true", help="skip the cross-validated fits")
    parser.add_argument("--json", type=Path, default=Path("bench/results/fit_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {os.cpu_count()} cores; numpy {np.__version__}; torch {torch.__version__}")
    results = [bench_fit(w, WORKLOADS[w], not args.no_cv, args.sgd_budget) for w in args.workloads.split(",")]
    results.append(bench_simulate())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
