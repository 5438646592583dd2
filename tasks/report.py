"""A self-contained HTML report of an experiment: one file, no server, no network.

Sections: a summary (the best simulator, how well it did, its strongest effects and how far
to trust them), the experiment and its runs, example coverage, the leaderboard with its
intervals, true-vs-simulated trajectories, the most helpful and most harmful training examples
(with text, label and intervals), and the influences, interactions and order effects of a
simulator on a held-out run. Plots are PNGs embedded as data URIs; there is no script and no
external resource, so the file opens from disk in any browser.
"""

from __future__ import annotations

import base64
import html
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from simfluence import curricula, plots, whatif
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import experiment_info, run_summary
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.evaluate import TRAJECTORY_ALIASES, method_aliases, plot_trajectories
from simfluence_platform.tasks.session import ExperimentSession
from simfluence_platform.tasks.effects import EffectsAnswer, effects_for
from simfluence_platform.tasks.steps import ANSWER
from simfluence_platform.tasks.whatif import ask, refits, snippet

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:.9rem}td.text{text-align:left}
"""


def _table(frame: pl.DataFrame, digits: int = 4) -> str:
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.{digits}g}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    def td(value) -> str:
        return f"<td class='text'>{cell(value)}</td>" if isinstance(value, str) else f"<td>{cell(value)}</td>"

    rows = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in frame.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _summary(board: pl.DataFrame, question, effects: EffectsAnswer) -> list[str]:
    """The report's first paragraphs (HTML): which simulator, how well it did, what it says,
    how far to trust it."""
    parts = []
    mse = board.filter(pl.col("metric") == "all_steps_mse")
    mine = mse.filter(pl.col("version") == question.version)
    if mine.height:
        row = mine.row(0, named=True)
        text = (f"The best simulator is <b>{html.escape(question.name)}</b> (<code>{question.version}</code>): on "
                f"held-out runs its all-steps MSE is {row['value']:.3g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}]")
        mean = mse.filter(pl.col("method") == "mean_trajectory")
        if mean.height and mean["value"][0] > 0:
            text += (f", {row['value'] / mean['value'][0]:.2f}x the error of the mean trajectory, a baseline that "
                     f"ignores the curriculum")
        rho = board.filter((pl.col("metric") == "spearman_across_runs") & (pl.col("version") == question.version))
        tracin = board.filter((pl.col("metric") == "spearman_across_runs") & pl.col("method").str.starts_with("tracin"))
        if rho.height and rho["value"][0] is not None:
            text += f"; it ranks held-out curricula by final loss with Spearman {rho['value'][0]:.3f}"
            if all(v is not None and np.isfinite(v) for v in (rho["ci_low"][0], rho["ci_high"][0])):
                text += f" [{rho['ci_low'][0]:.2f}, {rho['ci_high'][0]:.2f}]"
            if tracin.height:
                best = tracin.sort("value", descending=True, nulls_last=True).row(0, named=True)
                text += f" (best TracIn-CP: {best['value']:.3f})"
        parts.append(text + ".")
    else:
        parts.append(f"Simulator <b>{html.escape(question.name)}</b> (<code>{question.version}</code>) has no "
                     f"held-out evaluation yet: run evaluate-simulators.")
    ranking = effects.ranking(None)
    if ranking.height:
        def describe(row: dict) -> str:
            interval = ("" if row["ci_low"] is None else f" [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]")
            return (f"example {row['train_id']} ({html.escape(str(row['train_label']))}, "
                    f"&ldquo;{html.escape(snippet(row['train_text'], 80))}&rdquo;) {row['effect']:+.4f} nats{interval}")
        helpful, harmful = ranking.row(0, named=True), ranking.row(ranking.height - 1, named=True)
        parts.append(f"Averaged over {effects.n_curricula} held-out curricula, the strongest effects on the mean "
                     f"final test loss are: most helpful {describe(helpful)}; most harmful {describe(harmful)} "
                     f"({effects.level:.0%} intervals over {effects.n_refits} refits on resampled fitting runs).")
    counts = effects.resolved()
    trust = (f"How far to trust them: the simulator's mean final loss was off by {effects.error.mean:.4f} nats on its "
             f"held-out runs. Of {counts['effects']} per-test effects, {counts['interval_excludes_zero']} have an "
             f"interval that excludes zero and {counts['excludes_zero_and_above_error']} of those are also larger than "
             f"that test example's held-out error.")
    if ranking.height:
        strongest = max(abs(helpful["effect"]), abs(harmful["effect"]))
        trust += (f" The strongest effect on the mean ({strongest:.4f} nats) is "
                  + ("larger" if strongest > effects.error.mean else "smaller") + " than that error.")
    if counts["excludes_zero_and_above_error"] == 0:
        trust += (" No single example's effect is larger than the simulator's own error: read the rankings as "
                  "hypotheses to test by training, not as measurements.")
    parts.append(trust)
    return parts


def plain_text(fragment: str) -> str:
    """An HTML fragment as one line of text (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


@dataclass(frozen=True)
class Report:
    """A written report: its file and its summary paragraphs as plain text."""

    path: Path
    summary: list[str]


def build_report(warehouse: Warehouse, experiment: str, ref: str = "best", out: str | Path | None = None,
                 top: int = 10, pairs: int = 6, n_refits: int = ANSWER.n_refits,
                 step: Callable[[str], None] = lambda stage: None) -> Report:
    """Write the report (default ``<home>/reports/<experiment>/report.html``). Stores the
    effects table of ``ref`` on the way (its summary reads it)."""
    out = Path(out) if out else warehouse.home / "reports" / experiment / "report.html"
    info = experiment_info(warehouse, experiment)
    description, n_train, n_test, created = info.description, info.n_train, info.n_test, info.created_at
    runs, coverage = run_summary(warehouse, experiment)
    newest = registry.aliases(warehouse, experiment)
    board = registry.evaluation_scores(warehouse, experiment,
                                       sorted({newest[a] for a in method_aliases(warehouse, experiment)}))
    question = ask(warehouse, experiment, ref)
    refitted = refits(warehouse, experiment, question, n_refits)
    step("effects")
    effects = effects_for(warehouse, experiment, question, refitted, "heldout", ANSWER.level)
    summary = _summary(board, question, effects)
    sections = [f"<h1>Simfluence report: {html.escape(experiment)}</h1>",
                f"<p class='note'>{html.escape(description or '')}; {n_train} training and {n_test} test examples; "
                f"created {created}.</p>", "<h2>Summary</h2>", *(f"<p>{part}</p>" for part in summary),
                "<h2>Runs</h2>", _table(runs)]
    step("coverage")
    sections += ["<h2>Example coverage</h2>",
                 f"<p class='note'>How often each training example appears across complete runs "
                 f"(least covered first; mean {coverage['occurrences'].mean():.1f} occurrences).</p>",
                 _table(coverage.head(10))]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        step("leaderboard")
        sections.append("<h2>Leaderboard (held-out runs)</h2>")
        if board.height:
            wide = board.with_columns(
                (pl.col("value").round(4).cast(pl.Utf8) + " [" + pl.col("ci_low").round(3).cast(pl.Utf8) + ", "
                 + pl.col("ci_high").round(3).cast(pl.Utf8) + "]").alias("cell"))
            wide = wide.pivot(on="metric", index=["method", "version"], values="cell")
            order = board.filter(pl.col("metric") == "all_steps_mse").sort("value")["method"].to_list()
            wide = wide.with_columns(pl.col("method").replace_strict({m: i for i, m in enumerate(order)},
                                                                     default=len(order)).alias("_rank"))
            sections += ["<p class='note'>Value [95% interval over held-out runs]; best all-steps MSE first. The "
                         "across-runs Spearman is the curriculum-level analogue of the linear datamodeling score "
                         "(LDS) of attribution methods: how well the predicted final losses of held-out curricula "
                         "rank their true final losses.</p>",
                         _table(wide.sort("_rank").drop("_rank"))]
            step("trajectories")
            refs = [a for a in method_aliases(warehouse, experiment) if a in TRAJECTORY_ALIASES]
            if refs:
                picture = plot_trajectories(ExperimentSession(warehouse, experiment), refs[:3],
                                            scratch / "trajectories.png")
                sections += ["<h2>Trajectories: true vs simulated</h2>",
                             "<p class='note'>Methods whose predictions coincide are drawn once, under both "
                             "names.</p>", _image(picture, "true vs simulated")]
        else:
            sections.append("<p class='note'>No evaluations yet: run evaluate-simulators.</p>")
        step("influence")
        shown = ["train_id", "train_label", "effect", "ci_low", "ci_high", "below_error", "train_text"]
        ranking = effects.ranking(None).with_columns(pl.col("train_text").map_elements(lambda text: snippet(text, 80), return_dtype=pl.Utf8))
        sections += [
            f"<h2>Effects: {html.escape(question.name)} <code>{question.version}</code></h2>",
            f"<p class='note'>Expected leave-one-out effect on the mean final test loss (nats; negative: the example "
            f"lowered it), averaged over the {effects.n_curricula} held-out curricula, with {effects.level:.0%} "
            f"intervals over {effects.n_refits} refits on bootstrap resamples of the fitting runs; below_error: "
            f"smaller than the {effects.error.mean:.4f} nats the simulator's mean final loss was off by on held-out "
            f"runs. The whole train x test table is in the warehouse (table effects, views most_helpful_examples "
            f"and most_harmful_examples).</p>",
            "<h3>Most helpful</h3>", _table(ranking.head(top).select(shown)),
            "<h3>Most harmful</h3>", _table(ranking.reverse().head(top).select(shown)),
        ]
        sim, curriculum, initial = question.simulator, question.curriculum, question.initial_loss
        run_ranking = whatif.influence(sim, curriculum, initial, refits=refitted, level=ANSWER.level)
        candidates = whatif.strongest(run_ranking, pairs)
        pair_table = whatif.interactions(sim, curriculum, initial, candidates)
        order_table = whatif.order_effects(sim, curriculum, initial, candidates)
        bars = plots.influence_bars(scratch / "influence.png", run_ranking, top=top,
                                    title=f"{question.name}: leave-one-out effect on run {question.run_id}")
        best_example = int(run_ranking["example_id"][0])
        test = int(np.argmax(np.abs(question.observed[-1] - question.observed[0])))
        base = sim.simulate(curriculum[None], initial[None])[0]
        removed = sim.simulate(curricula.remove(curriculum, [best_example])[None], initial[None])[0]
        curve = plots.trajectory(scratch / "whatif.png", curriculum,
                                 {f"{question.name}": base[:, test], f"without example {best_example}": removed[:, test]},
                                 true=question.observed[:, test], mark_example=best_example,
                                 title=f"run {question.run_id}, test {sim.test_ids[test]}")
        sections += [
            f"<h2>Influence on one held-out run (run {question.run_id})</h2>",
            "<p class='note'>Effect = simulated final loss (mean over test examples) with the example minus without "
            "it, on this run's curriculum only; negative means the example lowered the loss.</p>",
            _image(bars, "influence"),
            "<h3>Most helpful</h3>", _table(run_ranking.head(top)),
            "<h3>Most harmful</h3>", _table(run_ranking.reverse().head(top)),
            "<h3>Interactions</h3><p class='note'>Joint removal against the sum of single removals; non-zero means "
            "the examples' effects do not add up (positive: redundant).</p>", _table(pair_table.head(10)),
            "<h3>Order effects</h3><p class='note'>Final loss with every occurrence moved to the last step minus "
            "to the first step.</p>", _table(order_table),
            f"<h3>What if example {best_example} were removed?</h3>", _image(curve, "what-if"),
            "<h2>Configuration</h2>",
            f"<pre>{html.escape(json.dumps(info.config, indent=2))}</pre>",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(sections)
    out.write_text(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Simfluence: "
                   f"{html.escape(experiment)}</title><style>{STYLE}</style></head><body>{body}</body></html>")
    return Report(out, [plain_text(part) for part in summary])
