"""Scoring published simulators on their held-out runs, with plots and a markdown report.

Each version is scored on the held-out runs recorded in its manifest (never on runs it was
fitted on) with the metrics of :mod:`simfluence.metrics` and their 95% intervals; the scores go
to the ``evaluations`` table. Plots (PNG) and ``leaderboard.md`` are written to
``<home>/reports/<experiment>/``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

import simfluence as sf
from simfluence import plots
from simfluence.runset import RunSet
from simfluence_platform.storage import registry
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.fit import METHODS
from simfluence_platform.tasks.session import ExperimentSession
from simfluence_platform.tasks.steps import EVALUATE

METRIC_LABELS = {
    "all_steps_mse": "all-steps MSE (lower is better)",
    "spearman_across_runs": "final-step Spearman across runs (higher is better)",
}


# The methods drawn in trajectory plots: the default simulator and the two baselines it must beat.
TRAJECTORY_ALIASES = tuple(METHODS[name].alias for name in ("simfluence_momentum", "tracin_cp_rescaled",
                                                            "mean_trajectory"))


@dataclass(frozen=True)
class Evaluation:
    scores: pl.DataFrame          # method, version, metric, value, ci_low, ci_high
    report_dir: Path
    files: list[Path]
    best: str | None              # the version ``best`` points at afterwards
    moved_best: bool              # whether this evaluation moved it (see promote_best)


def method_aliases(warehouse: Warehouse, experiment: str) -> list[str]:
    """The ``latest-<method>`` aliases of an experiment that exist: the newest version of every
    method (in the method registry's order)."""
    existing = registry.aliases(warehouse, experiment)
    return [m.alias for m in METHODS.values() if m.alias in existing]


def evaluate(session: ExperimentSession, refs: list[str], n_boot: int = EVALUATE.n_boot,
             heldout_run_ids: list[int] | None = None) -> pl.DataFrame:
    """Score each version or alias on its own held-out runs (or on ``heldout_run_ids``, which
    must not overlap its fitting runs) and record all the scores in one transaction. Refs that
    name one version are scored once; two versions of one method are named ``method@version``."""
    frames = []
    names: dict[str, str] = {}  # version -> leaderboard name
    recorded: list[tuple[str, list[dict], list[int]]] = []
    for ref in refs:
        _, info = session.load(ref)
        if info.version in names:
            continue
        name = info.manifest["name"]
        if name in names.values():
            name = f"{name}@{info.version[:8]}"
        names[info.version] = name
        held = heldout_run_ids if heldout_run_ids is not None else info.manifest["heldout_run_ids"]
        overlap = set(held) & set(info.manifest["fit_run_ids"])
        if overlap:
            raise registry.RegistryError(f"version {info.version} was fitted on runs {sorted(overlap)[:5]}; "
                                         f"it cannot be scored on them")
        heldout, pred = session.predict(ref, held)
        scores = sf.metrics.score_predictions(name, pred, heldout.losses, n_boot=n_boot)
        recorded.append((info.version, scores.to_dicts(), held))
        frames.append(scores.with_columns(pl.lit(info.version).alias("version")))
    registry.record_evaluations(session.warehouse, session.experiment, recorded)
    return pl.concat(frames).select("method", "version", "metric", "value", "ci_low", "ci_high")


def plot_metrics(scores: pl.DataFrame, path: Path) -> Path:
    """Bars of each method's all-steps MSE and across-runs Spearman with their intervals."""
    fig = Figure(figsize=(13, 4.5))
    axes = fig.subplots(1, len(METRIC_LABELS))
    for ax, (metric, label) in zip(axes, METRIC_LABELS.items()):
        rows = scores.filter(pl.col("metric") == metric).sort("value", descending=metric.startswith("spearman"))
        values = rows["value"].to_numpy()
        low = np.nan_to_num(values - rows["ci_low"].to_numpy())
        high = np.nan_to_num(rows["ci_high"].to_numpy() - values)
        ax.barh(rows["method"].to_list(), values, xerr=[low, high], color="#4878a8", capsize=3)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=10)
        if metric == "all_steps_mse":
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_trajectories(session: ExperimentSession, refs: list[str], path: Path, n_runs: int = 2,
                      n_tests: int = 3) -> Path:
    """True vs simulated loss of a few test examples on a few held-out runs, for each version
    (the session's predictions of the first version's held-out runs, reused)."""
    held = session.load(refs[0])[1].manifest["heldout_run_ids"]
    predictions = {}
    for ref in refs:
        _, info = session.load(ref)
        runs, pred = session.predict(ref, held)
        predictions[info.manifest["name"]] = pred[:, :, np.argsort(runs.test_ids)]  # by test id
        heldout = runs
    order = np.argsort(heldout.test_ids)
    heldout = RunSet(heldout.batches, heldout.losses[:, :, order], heldout.n_train, test_ids=heldout.test_ids[order])
    curves = plots.merge_identical(predictions)
    change = np.abs(heldout.losses[:n_runs, -1] - heldout.losses[:n_runs, 0]).mean(axis=0)
    tests = heldout.test_ids[np.argsort(change)[::-1][:n_tests]]  # the test examples whose loss moved most
    shown = min(n_runs, heldout.n_runs)
    fig = Figure(figsize=(4.2 * len(tests), 3.2 * shown))
    axes = fig.subplots(shown, len(tests), squeeze=False)
    steps = np.arange(heldout.n_steps + 1)
    for r in range(shown):
        for c, test_id in enumerate(tests):
            ax = axes[r][c]
            j = int(np.flatnonzero(heldout.test_ids == test_id)[0])
            ax.plot(steps, heldout.losses[r, :, j], color="black", lw=2, label="true")
            for k, (method, pred) in enumerate(curves.items()):
                ax.plot(steps, pred[r, :, j], lw=1.2, ls=plots.STYLES[k % len(plots.STYLES)], label=method)
            ax.set_title(f"run {held[r]}, test {test_id}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def leaderboard_rows(scores: pl.DataFrame) -> list[dict[str, str]]:
    """One row per method, best all-steps MSE first: method, version, and each metric as
    ``value [ci_low, ci_high]`` (4 and 3 significant digits)."""
    board = sf.metrics.leaderboard(scores.drop("version"))
    versions = dict(zip(scores["method"], scores["version"]))
    rows = []
    for method in board["method"]:
        row = {"method": method, "version": versions[method]}
        for name in sf.metrics.METRICS:
            cell = scores.filter((pl.col("method") == method) & (pl.col("metric") == name)).row(0, named=True)
            row[name] = f"{cell['value']:.4g} [{cell['ci_low']:.3g}, {cell['ci_high']:.3g}]"
        rows.append(row)
    return rows


def markdown_report(experiment: str, scores: pl.DataFrame, files: list[Path]) -> str:
    """The leaderboard as a markdown table (value [95% interval] per metric), best MSE first."""
    names = list(sf.metrics.METRICS)
    lines = [f"# Simfluence leaderboard: {experiment}", "",
             "Held-out runs only; 95% intervals over runs (bootstrap; jackknife for across-runs Spearman).", "",
             "| method | version | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in leaderboard_rows(scores):
        lines.append(f"| {row['method']} | `{row['version']}` | " + " | ".join(row[n] for n in names) + " |")
    lines += ["", "Plots:"] + [f"- {f.name}: `{f}`" for f in files]
    return "\n".join(lines) + "\n"


def best_version(scores: pl.DataFrame) -> str | None:
    """The version with the lowest held-out all-steps MSE among the methods that depend on the
    curriculum (the curriculum-blind baselines answer every what-if with zero); None if none."""
    blind = {"mean_trajectory", "constant"}
    method = pl.col("method").str.split("@").list.first()  # "name@version" when one method has two versions
    rows = scores.filter((pl.col("metric") == "all_steps_mse") & ~method.is_in(list(blind)))
    return None if rows.is_empty() else rows.sort("value")["version"][0]


def promote_best(session: ExperimentSession, scores: pl.DataFrame, n_boot: int = EVALUATE.n_boot,
                 log: Callable[[str], None] = lambda message: None) -> tuple[str | None, bool]:
    """The refit rule: the best curriculum-aware version of ``scores`` becomes ``best`` when
    there is none yet, or when it beats the current ``best`` on its own held-out runs (the
    current one is scored on the same runs). Returns (``best`` afterwards, whether it moved)."""
    warehouse, experiment = session.warehouse, session.experiment
    new = best_version(scores)
    current = registry.alias_version(warehouse, experiment, "best")
    if new is None or new == current:
        return current, False
    moved = current is None
    if current is not None:
        new_mse = scores.filter((pl.col("version") == new) & (pl.col("metric") == "all_steps_mse"))["value"][0]
        held = session.load(new)[1].manifest["heldout_run_ids"]
        old = evaluate(session, [current], n_boot=n_boot, heldout_run_ids=held)
        old_mse = old.filter(pl.col("metric") == "all_steps_mse")["value"][0]
        log(f"held-out MSE on the same runs: new {new_mse:.4g}, best {old_mse:.4g}")
        moved = new_mse < old_mse
    if moved:
        registry.set_alias(warehouse, experiment, "best", new)
        log(f"best -> {new}")
    return (new if moved else current), moved


def evaluate_and_report(warehouse: Warehouse, experiment: str, refs: list[str] | None = None,
                        n_boot: int = EVALUATE.n_boot, log: Callable[[str], None] = lambda message: None
                        ) -> Evaluation:
    """Evaluate the versions (default: the newest of every method), move ``best`` by
    :func:`promote_best`, plot, and write the report: the experiment's standing report in
    ``reports/<experiment>/`` for the default, or ``reports/<experiment>/versions-<hash>/`` for
    chosen versions (so that comparing a few never overwrites the standing report)."""
    chosen = refs is not None
    refs = refs or method_aliases(warehouse, experiment)
    if not refs:
        raise registry.RegistryError(f"experiment {experiment!r} has no published simulators; run the fit first")
    session = ExperimentSession(warehouse, experiment)
    scores = evaluate(session, refs, n_boot=n_boot)
    best, moved = promote_best(session, scores, n_boot, log)
    report_dir = warehouse.home / "reports" / experiment
    if chosen:
        versions = json.dumps(sorted(set(scores["version"].to_list())))
        report_dir = report_dir / f"versions-{hashlib.sha256(versions.encode()).hexdigest()[:12]}"
    report_dir.mkdir(parents=True, exist_ok=True)
    shown = [ref for ref in refs if ref in TRAJECTORY_ALIASES]
    files = [plot_metrics(scores, report_dir / "metrics.png"),
             plot_trajectories(session, shown or refs[:3], report_dir / "trajectories.png")]
    (report_dir / "leaderboard.md").write_text(markdown_report(experiment, scores, files))
    return Evaluation(scores, report_dir, [report_dir / "leaderboard.md", *files], best, moved)
