"""The regime map: every simulator across learning rates and optimizers on the embedded default.

For each regime (the ``demo`` preset with another optimizer and learning rate) this trains
``--runs`` real fine-tuning runs of MiniLM-3L on BBC News in process (run r always has the
same curriculum and seed), takes gradient checkpoints of a reference run every 5 steps, and
caches both under ``--cache`` (re-running reuses them). Runs ``0..F-1`` are the fitting pool,
the last ``--heldout`` runs are held out and never used for fitting or for any choice.

It prints, per regime:
- the leaderboard of every method on the held-out runs: all-steps MSE and across-runs
  Spearman with 95% intervals (bootstrap / jackknife over held-out runs), and the ratios of
  each method's MSE to the curriculum-blind mean trajectory's and of its Spearman to the best
  TracIn-CP variant's, all measured in the same run;
- the runs curve: the momentum-aware Simfluence and the baselines fitted on the first k
  fitting runs, for every k in ``--curve``, on the same held-out runs;
- with ``--unseen REGIME``: examples never seen in a fitting run. Fitting runs are trained on
  curricula that never contain a held-out set of 8 training examples; the held-out runs do.

Usage: ``python bench/regimes.py [--regimes adamw-1e-4,...] [--runs 90] [--heldout 30]``
(about 4 s per run on 2 CPU cores; the first call trains, later ones reuse the cache).
Results also go to ``bench/results/regimes.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REGIMES: dict[str, dict] = {
    "adamw-1e-4": {"optimizer": "adamw", "learning_rate": 1e-4},
    "adamw-3e-4": {"optimizer": "adamw", "learning_rate": 3e-4},
    "sgd-m0.9-3e-3": {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 3e-3},
    "sgd-m0.9-1e-2": {"optimizer": "sgd", "momentum": 0.9, "learning_rate": 1e-2},
}
CHECKPOINT_EVERY = 5  # the demo preset's checkpoint spacing
UNSEEN_COUNT = 8


@dataclass
class Collected:
    """Runs and gradient checkpoints of one regime (arrays as in RunSet)."""

    batches: np.ndarray
    losses: np.ndarray
    gradients: object
    optimizer: object


def regime_config(name: str):
    from simfluence_platform.tasks.config import PRESETS, from_dict

    data = json.loads(json.dumps(PRESETS["demo"]))
    data["name"] = f"regime-{name}"
    data["training"].update(REGIMES[name])
    return from_dict(data, f"regime {name}")


def collect(name: str, runs: int, cache: Path, unseen: bool = False) -> Collected:
    """Train (or read from the cache) ``runs`` runs of the regime; with ``unseen`` the runs'
    curricula never contain the first ``UNSEEN_COUNT`` ids of a seeded permutation."""
    import simfluence as sf

    config = regime_config(name)
    tag = f"{name}{'-unseen' if unseen else ''}"
    runs_path, grads_path = cache / f"{tag}-runs.npz", cache / f"{name}-gradients.npz"
    have = 0
    batches = losses = None
    if runs_path.exists():
        with np.load(runs_path) as data:
            batches, losses = data["batches"], data["losses"]
        have = len(batches)
    if have < runs or not grads_path.exists():
        from simfluence_platform.tasks.runs import curriculum_for_run, run_seed
        from simfluence_platform.tasks.data import load_examples
        from simfluence_platform.tasks.gradients import gradient_checkpoints
        from simfluence_platform.tasks.training import Trainer

        trainer = Trainer(config, load_examples(config.data, config.model.task))
        new_batches, new_losses = [], []
        start = time.perf_counter()
        for r in range(have, runs):
            curriculum = unseen_curriculum(config, r) if unseen else curriculum_for_run(config, r)
            outcome = trainer.run(curriculum, run_seed(config, r))
            if outcome.status != "complete":
                raise RuntimeError(f"{tag} run {r} failed: {outcome.reason}")
            new_batches.append(curriculum)
            new_losses.append(outcome.losses)
            if (r + 1) % 10 == 0:
                print(f"  {tag}: {r + 1}/{runs} runs ({time.perf_counter() - start:.0f} s)", flush=True)
        if new_batches:
            batches = np.concatenate([b for b in (batches, np.stack(new_batches)) if b is not None])
            losses = np.concatenate([v for v in (losses, np.stack(new_losses)) if v is not None])
            cache.mkdir(parents=True, exist_ok=True)
            np.savez(runs_path.with_suffix(".tmp.npz"), batches=batches, losses=losses)
            runs_path.with_suffix(".tmp.npz").replace(runs_path)
        if not grads_path.exists():
            start = time.perf_counter()
            gradient_checkpoints(config, trainer).save(grads_path.with_suffix(".tmp.npz"))
            grads_path.with_suffix(".tmp.npz").replace(grads_path)
            print(f"  {name}: gradient checkpoints in {time.perf_counter() - start:.0f} s", flush=True)
    return Collected(batches[:runs], losses[:runs], sf.GradientCheckpoints.load(grads_path), config.optimizer_spec())


def unseen_ids(n: int) -> np.ndarray:
    return np.sort(np.random.default_rng(12345).permutation(n)[:UNSEEN_COUNT])


def unseen_curriculum(config, run_id: int) -> np.ndarray:
    """A uniform curriculum over the training examples other than :func:`unseen_ids`."""
    from simfluence import curricula
    from simfluence_platform.tasks.runs import run_seed

    n, t = config.data.n_train, config.training
    allowed = np.setdiff1d(np.arange(n), unseen_ids(n))
    local = curricula.uniform(len(allowed), 1, t.steps, t.batch_size, seed=run_seed(config, 10_000 + run_id))[0]
    return allowed[local]


def methods(gradients, optimizer) -> dict:
    """Every method of the map, unfitted, by display name."""
    import simfluence as sf

    out = {
        "simfluence_momentum": sf.SimfluenceMomentum(optimizer, gradients),
        "simfluence_momentum_spearman": sf.SimfluenceMomentum(optimizer, gradients, select="spearman"),
        # the same family with the momentum kernel switched off (the ablation of the optimizer)
        "simfluence_momentum_no_kernel": sf.SimfluenceMomentum(sf.OptimizerSpec("sgd", 0.0), gradients),
        "simfluence_linear": sf.SimfluenceLinear(intercept="cv"),
        "tracin_cp": sf.TracInCP(gradients),
        "tracin_cp_rescaled": sf.TracInCP(gradients, rescaled=True),
        "tracin_cp_sum_rescaled": sf.TracInCP(gradients, rescaled=True, form="sum"),
        "influence_function_rescaled": sf.InfluenceFunction(gradients, rescaled=True),
        "mean_trajectory": sf.MeanTrajectory(),
        "constant": sf.Constant(),
    }
    if gradients.train_grads_preconditioned is not None:
        out["tracin_cp_adam_rescaled"] = sf.TracInCP(gradients, rescaled=True, preconditioned=True)
    return out


def score_all(simulators: dict, fitting, heldout) -> list[dict]:
    import simfluence as sf

    rows = []
    for name, simulator in simulators.items():
        start = time.perf_counter()
        simulator.fit(fitting)
        seconds = time.perf_counter() - start
        pred = simulator.simulate(heldout.batches, heldout.initial_loss)
        row = {"method": name, "fit_seconds": seconds}
        for metric in ("all_steps_mse", "spearman_across_runs"):
            row[metric] = sf.metrics.METRICS[metric](pred, heldout.losses)
            row[f"{metric}_ci"] = sf.metrics.confidence_interval(metric, pred, heldout.losses)
        if hasattr(simulator, "chosen"):
            row["chosen"] = simulator.chosen.label() + f" shrink={simulator.shrink_factor:.2f}"
        rows.append(row)
    mean_mse = next(r["all_steps_mse"] for r in rows if r["method"] == "mean_trajectory")
    tracin_rho = max((r["spearman_across_runs"] for r in rows if r["method"].startswith("tracin_cp")),
                     default=float("nan"))
    for row in rows:
        row["mse_vs_mean_trajectory"] = row["all_steps_mse"] / mean_mse
        row["spearman_vs_best_tracin"] = row["spearman_across_runs"] / tracin_rho
    return sorted(rows, key=lambda r: r["all_steps_mse"])


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'method':32s} {'all-steps MSE [95% CI]':>30s} {'x mean traj':>11s} "
          f"{'Spearman (runs) [95% CI]':>28s} {'x best TracIn':>13s}")
    for r in rows:
        lo, hi = r["all_steps_mse_ci"]
        slo, shi = r["spearman_across_runs_ci"]
        print(f"{r['method']:32s} {r['all_steps_mse']:10.5f} [{lo:8.5f}, {hi:8.5f}] {r['mse_vs_mean_trajectory']:11.2f} "
              f"{r['spearman_across_runs']:8.3f} [{slo:6.3f}, {shi:6.3f}] {r['spearman_vs_best_tracin']:13.2f}")
    for r in rows:
        if "chosen" in r:
            print(f"  {r['method']}: {r['chosen']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--runs", type=int, default=90, help="runs per regime (fitting pool + held out)")
    parser.add_argument("--heldout", type=int, default=30)
    parser.add_argument("--curve", default="15,30,60", help="numbers of fitting runs for the runs curve")
    parser.add_argument("--unseen", default="adamw-1e-4", help="regime of the unseen-examples test ('' to skip)")
    parser.add_argument("--unseen-runs", type=int, default=60, help="fitting runs of the unseen-examples test")
    parser.add_argument("--cache", type=Path, default=Path("simfluence-data/bench/regimes"))
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("bench/results/regimes.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    import simfluence as sf

    names = [r for r in args.regimes.split(",") if r]
    unknown = [r for r in names if r not in REGIMES]
    if unknown:
        raise SystemExit(f"unknown regimes {unknown}; choose from {', '.join(REGIMES)}")
    collected = {name: collect(name, args.runs, args.cache) for name in names}
    if args.unseen:
        unseen_runs = collect(args.unseen, args.unseen_runs, args.cache, unseen=True)
    if args.collect_only:
        return
    results: dict = {"runs": args.runs, "heldout": args.heldout, "regimes": {}}
    for name, data in collected.items():
        n = data.gradients.train_grads.shape[1]
        everything = sf.RunSet(data.batches, data.losses, n)
        fit_pool = everything.select_runs(np.arange(args.runs - args.heldout))
        heldout = everything.select_runs(np.arange(args.runs - args.heldout, args.runs))
        rows = score_all(methods(data.gradients, data.optimizer), fit_pool, heldout)
        print_table(f"== {name}: {fit_pool.n_runs} fitting runs, {heldout.n_runs} held-out runs "
                    f"(mean test loss {heldout.losses[:, 0].mean():.3f} -> {heldout.losses[:, -1].mean():.3f})", rows)
        curve = []
        for k in [int(v) for v in args.curve.split(",") if v]:
            if k > fit_pool.n_runs:
                continue
            subset = fit_pool.select_runs(np.arange(k))
            chosen = {key: value for key, value in methods(data.gradients, data.optimizer).items()
                      if key in ("simfluence_momentum", "simfluence_linear", "tracin_cp_rescaled",
                                 "tracin_cp_adam_rescaled", "mean_trajectory")}
            curve.append({"fitting_runs": k, "rows": score_all(chosen, subset, heldout)})
            print_table(f"-- {name}: runs curve, {k} fitting runs", curve[-1]["rows"])
        checkpoints = []
        steps = data.gradients.steps
        for every in (CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY, None):
            index = np.arange(len(steps)) if every == CHECKPOINT_EVERY else (
                np.flatnonzero(steps % every == 0) if every else np.array([0]))
            subset = data.gradients.select_checkpoints(index)
            scored = score_all({"simfluence_momentum": sf.SimfluenceMomentum(data.optimizer, subset),
                                "mean_trajectory": sf.MeanTrajectory()}, fit_pool, heldout)
            row = next(r for r in scored if r["method"] == "simfluence_momentum")
            checkpoints.append({"checkpoint_steps": steps[index].tolist(), **row})
        print(f"-- {name}: what the number of checkpoints buys (simfluence_momentum, {fit_pool.n_runs} fitting runs)")
        for row in checkpoints:
            print(f"  checkpoints at {row['checkpoint_steps']}: MSE {row['all_steps_mse']:.4g} "
                  f"({row['mse_vs_mean_trajectory']:.3f}x mean trajectory), Spearman {row['spearman_across_runs']:.4f}")
        results["regimes"][name] = {"leaderboard": rows, "curve": curve, "checkpoints": checkpoints}
    if args.unseen and args.unseen in collected:
        data = collected[args.unseen]
        n = data.gradients.train_grads.shape[1]
        hidden = unseen_ids(n)
        heldout = sf.RunSet(data.batches, data.losses, n).select_runs(np.arange(args.runs - args.heldout, args.runs))
        fitting = sf.RunSet(unseen_runs.batches, unseen_runs.losses, n)
        assert not np.isin(fitting.batches, hidden).any()
        share = np.isin(heldout.batches, hidden).mean()
        rows = score_all({k: v for k, v in methods(data.gradients, data.optimizer).items()
                          if k in ("simfluence_momentum", "simfluence_linear", "tracin_cp_rescaled",
                                   "tracin_cp_adam_rescaled", "mean_trajectory")}, fitting, heldout)
        print_table(f"== {args.unseen}: fitted on {fitting.n_runs} runs that never contain training examples "
                    f"{hidden.tolist()}; held-out runs hold them in {share:.0%} of batch slots", rows)
        results["unseen"] = {"regime": args.unseen, "hidden": hidden.tolist(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
