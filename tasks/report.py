"""A self-contained HTML report of an experiment: one file, no server, no network.

Sections: the experiment and its runs, example coverage, the leaderboard with its intervals,
true-vs-simulated trajectories, and the top influences, interactions and order effects of a
simulator on a held-out run. Plots are PNGs embedded as data URIs; there is no script and no
external resource, so the file opens from disk in any browser.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from simfluence import curricula, plots, whatif
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import experiment_info, run_summary
from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.evaluate import TRAJECTORY_ALIASES, method_aliases, plot_trajectories
from simfluence_platform.tasks.session import ExperimentSession
from simfluence_platform.tasks.whatif import ask

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:.9rem}
"""


def _table(frame: pl.DataFrame, digits: int = 4) -> str:
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.{digits}g}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def build_report(warehouse: Warehouse, experiment: str, ref: str = "best", out: str | Path | None = None,
                 top: int = 15, pairs: int = 6, step: Callable[[str], None] = lambda stage: None) -> Path:
    """Write the report (default ``<home>/reports/<experiment>/report.html``) and return its path."""
    out = Path(out) if out else warehouse.home / "reports" / experiment / "report.html"
    info = experiment_info(warehouse, experiment)
    description, n_train, n_test, created = info.description, info.n_train, info.n_test, info.created_at
    runs, coverage = run_summary(warehouse, experiment)
    newest = registry.aliases(warehouse, experiment)
    board = registry.evaluation_scores(warehouse, experiment,
                                       sorted({newest[a] for a in method_aliases(warehouse, experiment)}))
    sections = [f"<h1>Simfluence report: {html.escape(experiment)}</h1>",
                f"<p class='note'>{html.escape(description or '')}; {n_train} training and {n_test} test examples; "
                f"created {created}.</p>", "<h2>Runs</h2>", _table(runs)]
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
            sections += ["<p class='note'>Value [95% interval over held-out runs]; best all-steps MSE first.</p>",
                         _table(wide.sort("_rank").drop("_rank"))]
            step("trajectories")
            refs = [a for a in method_aliases(warehouse, experiment) if a in TRAJECTORY_ALIASES]
            if refs:
                picture = plot_trajectories(ExperimentSession(warehouse, experiment), refs[:3],
                                            scratch / "trajectories.png")
                sections += ["<h2>Trajectories: true vs simulated</h2>", _image(picture, "true vs simulated")]
        else:
            sections.append("<p class='note'>No evaluations yet: run evaluate-simulators.</p>")
        step("influence")
        question = ask(warehouse, experiment, ref)
        sim, curriculum, initial = question.simulator, question.curriculum, question.initial_loss
        ranking = whatif.influence(sim, curriculum, initial)
        candidates = whatif.strongest(ranking, pairs)
        pair_table = whatif.interactions(sim, curriculum, initial, candidates)
        order_table = whatif.order_effects(sim, curriculum, initial, candidates)
        bars = plots.influence_bars(scratch / "influence.png", ranking, top=top,
                                    title=f"{question.name}: leave-one-out effect on run {question.run_id}")
        best_example = int(ranking["example_id"][0])
        test = int(np.argmax(np.abs(question.observed[-1] - question.observed[0])))
        base = sim.simulate(curriculum[None], initial[None])[0]
        removed = sim.simulate(curricula.remove(curriculum, [best_example])[None], initial[None])[0]
        curve = plots.trajectory(scratch / "whatif.png", curriculum,
                                 {f"{question.name}": base[:, test], f"without example {best_example}": removed[:, test]},
                                 true=question.observed[:, test], mark_example=best_example,
                                 title=f"run {question.run_id}, test {sim.test_ids[test]}")
        sections += [
            f"<h2>Influence: {html.escape(question.name)} <code>{question.version}</code> on run {question.run_id}</h2>",
            "<p class='note'>Effect = simulated final loss (mean over test examples) with the example minus without "
            "it; negative means the example lowered the loss.</p>",
            _image(bars, "influence"), _table(ranking.head(top)),
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
    return out

