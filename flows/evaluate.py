"""evaluate-simulators: score published simulators on held-out runs; leaderboard, report, plots."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from simfluence_platform.flows.collect import artifact_key
from simfluence_platform.flows.common import warehouse as open_warehouse
from simfluence_platform.tasks.evaluate import evaluate_and_report, leaderboard_rows
from simfluence_platform.tasks.steps import EVALUATE


def image_markdown(path: Path) -> str:
    """Markdown that shows the PNG itself in the Prefect UI (embedded as a data URI, so it needs
    no file server), and where the file is on the machine that ran the flow."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"![{path.stem}](data:image/png;base64,{data})\n\n`{path}`"


@task(name="evaluate-and-report", cache_policy=NO_CACHE)
def evaluate_task(warehouse: str | None, experiment: str, refs: list[str] | None, n_boot: int) -> dict:
    evaluation = evaluate_and_report(open_warehouse(warehouse), experiment, refs, n_boot, log=get_run_logger().info)
    return {"leaderboard": leaderboard_rows(evaluation.scores), "scores": evaluation.scores.to_dicts(),
            "best": evaluation.best,
            "moved_best": evaluation.moved_best,
            "report_dir": str(evaluation.report_dir.resolve()), "files": [str(f.resolve()) for f in evaluation.files]}


@flow(name="evaluate-simulators", log_prints=True, flow_run_name="evaluate-{experiment}")
def evaluate_simulators(experiment: str = "demo", refs: list[str] | None = None, n_boot: int = EVALUATE.n_boot,
                        warehouse: str | None = None) -> dict:
    """Score versions or aliases (default: the newest of every method) on their held-out runs,
    record them in ``evaluations``, and publish the leaderboard, a markdown report and plots."""
    result = evaluate_task(warehouse, experiment, refs, n_boot)
    create_table_artifact(key=artifact_key("leaderboard", experiment), table=result["leaderboard"],
                          description=f"held-out leaderboard of {experiment}: value [95% interval over held-out runs]")
    markdown = open(result["files"][0]).read()
    create_markdown_artifact(key=artifact_key("report", experiment), markdown=markdown)
    for path in map(Path, result["files"][1:]):  # one key per plot, so that none hides another
        create_markdown_artifact(key=artifact_key(f"plot-{path.stem}", experiment), markdown=image_markdown(path),
                                 description=f"{path.stem} plot of {experiment}")
    get_run_logger().info(f"best: {result['best']}" + (" (moved by this evaluation)" if result["moved_best"] else ""))
    return result
