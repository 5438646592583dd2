"""evaluate-simulators: score published simulators on held-out runs; leaderboard, report, plots."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

import simfluence as sf
from simfluence_platform.flows.collect import artifact_key
from simfluence_platform.flows.common import warehouse as open_warehouse
from simfluence_platform.tasks.evaluate import evaluate_and_report
from simfluence_platform.tasks.steps import EVALUATE


@task(name="evaluate-and-report", cache_policy=NO_CACHE)
def evaluate_task(warehouse: str | None, experiment: str, refs: list[str] | None, n_boot: int) -> dict:
    evaluation = evaluate_and_report(open_warehouse(warehouse), experiment, refs, n_boot, log=get_run_logger().info)
    board = sf.metrics.leaderboard(evaluation.scores.drop("version"))
    return {"leaderboard": board.to_dicts(), "scores": evaluation.scores.to_dicts(), "best": evaluation.best,
            "moved_best": evaluation.moved_best,
            "report_dir": str(evaluation.report_dir.resolve()), "files": [str(f.resolve()) for f in evaluation.files]}


@flow(name="evaluate-simulators", log_prints=True)
def evaluate_simulators(experiment: str = "demo", refs: list[str] | None = None, n_boot: int = EVALUATE.n_boot,
                        warehouse: str | None = None) -> dict:
    """Score versions or aliases (default: the newest of every method) on their held-out runs,
    record them in ``evaluations``, and publish the leaderboard, a markdown report and plots."""
    result = evaluate_task(warehouse, experiment, refs, n_boot)
    create_table_artifact(key=artifact_key("leaderboard", experiment), table=result["leaderboard"],
                          description=f"held-out leaderboard of {experiment}")
    markdown = open(result["files"][0]).read()
    create_markdown_artifact(key=artifact_key("report", experiment), markdown=markdown)
    for path in result["files"][1:]:
        create_link_artifact(key=artifact_key("plot", experiment), link=f"file://{path}", link_text=path)
    return result
