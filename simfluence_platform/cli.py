"""The ``simfluence`` command line.

Every command prints human-readable output by default and one JSON document with ``--json``;
bad input exits with status 2 and a one-line message naming the file, field or id.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, NoReturn

from simfluence.errors import SimfluenceError
from simfluence_platform.errors import UserError
from simfluence_platform.tasks.steps import ANSWER, EVALUATE, FIT

if TYPE_CHECKING:
    import polars as pl

    from simfluence.simulators import Simulator

# Heavy modules (NumPy, Polars, SciPy, the simulators, Prefect) are imported by the commands
# that use them, so a read-only command starts in a fraction of a second.

# Bad input: the science's own errors and the platform's UserError (one line, exit status 2).
USER_ERRORS = (SimfluenceError, FileNotFoundError, UserError)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _bounded_int(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse with bad arguments reported in one line (exit status 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def default_simulators(seed: int = 0) -> dict[str, Simulator]:
    """The methods every leaderboard shows when no gradients are available."""
    from simfluence.simulators import (
        Constant,
        MeanTrajectory,
        SimfluenceAdditive,
        SimfluenceLinear,
        SimfluenceMultiplicative,
    )

    return {
        "simfluence_linear": SimfluenceLinear(intercept="cv", seed=seed),
        "simfluence_linear_paper": SimfluenceLinear(parametrization="paper", intercept="cv", seed=seed),
        "simfluence_additive": SimfluenceAdditive(intercept="cv", seed=seed),
        "simfluence_multiplicative": SimfluenceMultiplicative(intercept="cv", seed=seed),
        "mean_trajectory": MeanTrajectory(),
        "constant": Constant(),
    }


def format_leaderboard(scores: pl.DataFrame) -> str:
    """A fixed-width leaderboard: one row per method, each metric as ``value [ci_low, ci_high]``."""
    import polars as pl

    from simfluence import metrics

    board = metrics.leaderboard(scores)
    names = list(metrics.METRICS)
    header = f"{'method':<28}" + "".join(f"{name:>32}" for name in names)
    lines = [header, "-" * len(header)]
    for method in board["method"]:
        cells = []
        for name in names:
            row = scores.filter((pl.col("method") == method) & (pl.col("metric") == name)).row(0, named=True)
            cells.append(f"{row['value']:>10.4g} [{row['ci_low']:.3g}, {row['ci_high']:.3g}]".rjust(32))
        lines.append(f"{method:<28}" + "".join(cells))
    return "\n".join(lines)


def cmd_synthetic(args: argparse.Namespace) -> dict:
    """Fit and score every simulator on synthetic runs with a known non-additive process."""
    from tqdm import tqdm

    from simfluence import metrics, synthetic

    runs, _ = synthetic.redundancy_runs(args.n_train, args.n_tests, args.runs, args.steps, args.batch_size,
                                        seed=args.seed)
    fitting, heldout = runs.split(args.heldout, seed=args.seed)
    simulators = default_simulators(args.seed)
    timings = {}
    for name, simulator in tqdm(simulators.items(), desc="fitting", disable=args.json, file=sys.stderr):
        start = time.perf_counter()
        simulator.fit(fitting)
        timings[name] = time.perf_counter() - start
    scores = metrics.score(simulators, heldout, n_boot=args.bootstrap, seed=args.seed)
    if not args.json:
        print(f"Synthetic redundancy runs: n={args.n_train} training, m={args.n_tests} test examples, "
              f"{fitting.n_runs} fitting + {heldout.n_runs} held-out runs of {args.steps} steps (batch {args.batch_size}).")
        print("Held-out metrics with 95% bootstrap intervals over runs:\n")
        print(format_leaderboard(scores))
        print("\nFit seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    return {"scores": scores.to_dicts(), "fit_seconds": timings}


def cmd_demo(args: argparse.Namespace) -> dict:
    """The whole pipeline on the embedded default, in this process: collect, fit, evaluate."""
    from simfluence_platform.flows.collect import collect_runs
    from simfluence_platform.flows.evaluate import evaluate_simulators
    from simfluence_platform.flows.fit import fit_simulators

    ensure_api()
    collect_runs(preset="demo", runs=args.runs, warehouse=args.warehouse)
    fit_simulators(experiment="demo", warehouse=args.warehouse)
    result = evaluate_simulators(experiment="demo", warehouse=args.warehouse)
    if not args.json:
        print(open(result["files"][0]).read())
    return result


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the embedded default (collect, fit, evaluate)")
    p.add_argument("--runs", type=positive_int, default=48)
    p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
    p.set_defaults(handler=cmd_demo)
    p = sub.add_parser("synthetic", help="fit and score every simulator on synthetic runs with known ground truth")
    p.add_argument("--n-train", type=positive_int, default=200)
    p.add_argument("--n-tests", type=positive_int, default=100)
    p.add_argument("--runs", type=positive_int, default=80)
    p.add_argument("--steps", type=positive_int, default=60)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--heldout", type=positive_int, default=16)
    p.add_argument("--bootstrap", type=positive_int, default=500)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.set_defaults(handler=cmd_synthetic)


def ensure_api() -> None:
    """A Prefect API for the flows this command runs (called after its input is checked, so
    bad input is answered before any server starts): see :mod:`simfluence_platform.prefect_api`."""
    from simfluence_platform.prefect_api import ensure_api as ensure

    ensure()


def _warehouse(args: argparse.Namespace):
    from simfluence_platform.storage.warehouse import Warehouse  # the science itself never imports DuckDB

    return Warehouse(args.warehouse)


def cmd_ingest(args: argparse.Namespace) -> dict:
    """Load new loss shards into the warehouse (the single writer): the ingest-losses flow."""
    from simfluence_platform.flows.ingest import ingest_losses

    ensure_api()
    report = ingest_losses(warehouse=args.warehouse, experiment=args.experiment)
    if not args.json:
        print(f"loaded {report['loaded_shards']} shards ({report['loaded_rows']} rows); "
              f"{len(report['completed_runs'])} runs completed, {len(report['failed_runs'])} failed")
        for failed in report["failed_runs"]:
            print(f"  failed: {failed['experiment']} run {failed['run_id']}: {failed['reason']}")
        for rejected in report["rejected"]:
            print(f"  rejected: {rejected['path']}: {rejected['reason']}", file=sys.stderr)
    return report


def cmd_sql(args: argparse.Namespace) -> dict | None:
    """Run one read-only query (see :meth:`Warehouse.query_relation`); never takes the writer lock.
    A table of plain columns short enough to show whole is laid out without loading Polars."""
    from simfluence_platform.storage.warehouse import to_frame

    with _warehouse(args).query_relation(args.query) as relation:
        if args.format == "table" and not args.json:
            from simfluence_platform.plain_table import POLARS_NAMES, plain_table

            if all(str(kind) in POLARS_NAMES for kind in relation.types):  # else no need to run it twice
                text = plain_table(relation.columns, relation.types, relation.limit(args.max_rows + 1).fetchall(),
                                   args.max_rows)
                if text is not None:
                    print(text)
                    return None
        frame = to_frame(relation)
    import polars as pl

    if args.json:
        return {"columns": frame.columns, "rows": frame.rows()}
    if args.format == "json":
        print(to_json(frame.to_dicts()))
    elif args.format == "csv":
        print(nested_as_json(frame).write_csv(), end="")
    else:
        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            print(frame)
    return None


def nested_as_json(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with its list, array and struct columns as JSON text (CSV has no nested values)."""
    import polars as pl

    return frame.with_columns(
        pl.Series(name, [None if value is None else to_json(value, indent=None) for value in frame[name].to_list()],
                  dtype=pl.String)
        for name, dtype in frame.schema.items() if dtype.is_nested()
    )


def _add_storage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="load new loss shards into the warehouse")
    p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
    p.add_argument("--experiment", default=None, help="only this experiment's shards")
    p.set_defaults(handler=cmd_ingest)
    p = sub.add_parser("sql", help="run one read-only SQL query against the warehouse "
                                        "(files only under its shards folder)")
    p.add_argument("query")
    p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-rows", type=positive_int, default=50, help="rows shown in table format")
    p.set_defaults(handler=cmd_sql)


class ConfigChoiceError(UserError, ValueError):
    """Neither or both of --preset and --config."""


def cmd_collect(args: argparse.Namespace) -> dict:
    """Fine-tune runs on sampled curricula and stream their losses: the collect-runs flow."""
    from simfluence_platform.flows.collect import collect_runs

    from simfluence_platform.flows.common import experiment_config

    if (args.preset is None) == (args.config is None):
        raise ConfigChoiceError("give exactly one of --preset and --config")
    experiment_config(args.preset, args.config)  # a bad config fails before any flow starts
    ensure_api()
    result = collect_runs(preset=args.preset, config_path=args.config, runs=args.runs, warehouse=args.warehouse,
                          gradients=not args.no_gradients, on_workers=args.on_workers)
    if not args.json:
        print(f"{result['experiment']}: trained {len(result['trained'])} runs; {len(result['complete'])} complete "
              f"in the warehouse; {len(result['failed'])} failed")
        for run_id, reason in result["failed"].items():
            print(f"  run {run_id}: {reason}")
    return result


def cmd_progress(args: argparse.Namespace) -> dict:
    """Follow a collection from its shard markers: runs done, runs per minute, time left."""
    from simfluence_platform.storage.shards import finished_runs

    warehouse = _warehouse(args)
    started = time.monotonic()
    first = shown = None  # runs complete at the start (the rate counts from them); last line shown
    last_print = 0.0
    while True:
        complete, failed = finished_runs(warehouse.shard_root, args.experiment, args.runs)
        first = complete if first is None else first
        alive = args.while_pid is None or _pid_alive(args.while_pid)
        now = time.monotonic()
        if (complete, failed) != shown or now - last_print >= 60 or complete + failed >= args.runs or not alive:
            minutes = (now - started) / 60
            rate = (complete - first) / minutes if minutes > 0 else 0.0
            left = args.runs - complete - failed
            eta = f", about {math.ceil(left / rate)} min left" if rate > 0 and left > 0 else ""
            line = (f"{args.experiment}: {complete}/{args.runs} runs complete" + (f", {failed} failed" if failed else "")
                    + (f", {rate:.1f} runs/min" if rate > 0 else "") + eta + f" ({minutes:.1f} min)")
            if not args.json:
                print(line, flush=True)
            shown, last_print = (complete, failed), now
        if complete + failed >= args.runs or not alive:
            return {"experiment": args.experiment, "runs": args.runs, "complete": complete, "failed": failed,
                    "minutes": round((time.monotonic() - started) / 60, 2)}
        time.sleep(args.interval)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmd_fit(args: argparse.Namespace) -> list:
    """Fit and publish simulators: the fit-simulators flow."""
    from simfluence_platform.flows.fit import fit_simulators
    from simfluence_platform.tasks.fit import check_fit_request

    methods = args.methods.split(",") if args.methods else None
    check_fit_request(_warehouse(args), args.experiment, methods, args.heldout_every)  # before any flow starts
    ensure_api()
    rows = fit_simulators(experiment=args.experiment, methods=methods,
                          heldout_every=args.heldout_every, dask_address=args.dask_address, n_workers=args.n_workers,
                          shard_size=args.shard_size, warehouse=args.warehouse)
    if not args.json:
        for row in rows:
            print(f"{row['method']:<30} version {row['version']}  ({row['fit_seconds']:.1f} s)")
    return rows


def cmd_evaluate(args: argparse.Namespace) -> dict:
    """Score simulators on held-out runs: the evaluate-simulators flow."""
    from simfluence_platform.flows.evaluate import evaluate_simulators
    from simfluence_platform.storage import registry

    refs = args.versions.split(",") if args.versions else ([args.alias] if args.alias else None)
    for ref in refs or []:
        registry.resolve(_warehouse(args), args.experiment, ref)  # unknown refs fail before any flow starts
    ensure_api()
    result = evaluate_simulators(experiment=args.experiment, refs=refs, n_boot=args.bootstrap, warehouse=args.warehouse)
    if not args.json:
        import polars as pl

        print(format_leaderboard(pl.DataFrame(result["scores"]).drop("version")))
        print(f"\nreport: {result['files'][0]}")
    return result


def cmd_refit(args: argparse.Namespace) -> dict:
    """Refit and evaluate when new complete runs exist: the refit flow."""
    from simfluence_platform.flows.refit import refit
    from simfluence_platform.storage.experiments import experiment_info

    experiment_info(_warehouse(args), args.experiment)  # an unknown experiment fails before any flow starts
    ensure_api()
    result = refit(experiment=args.experiment, heldout_every=args.heldout_every, dask_address=args.dask_address,
                   warehouse=args.warehouse)
    if not args.json:
        print(("refitted: " if result["refit"] else "nothing new to refit: ")
              + f"latest {result['latest']}, best {result['best']}")
    return result


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    for name, handler, help_text in (("fit", cmd_fit, "fit and publish simulators (Dask)"),
                                     ("evaluate", cmd_evaluate, "score simulators on held-out runs"),
                                     ("refit", cmd_refit, "refit when new complete runs exist")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--experiment", required=True)
        p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
        p.set_defaults(handler=handler)
        if name in ("fit", "refit"):
            p.add_argument("--heldout-every", type=positive_int, default=FIT.heldout_every, help="hold out run ids k-1, 2k-1, ...")
            p.add_argument("--dask-address", default=None, help="tcp://host:8786 (default: a LocalCluster)")
        if name == "fit":
            p.add_argument("--methods", default=None, help="comma-separated (default: all)")
            p.add_argument("--n-workers", type=positive_int, default=FIT.n_workers, help="LocalCluster workers")
            p.add_argument("--shard-size", type=positive_int, default=FIT.shard_size, help="test examples per Dask task")
        if name == "evaluate":
            p.add_argument("--versions", default=None, help="comma-separated versions")
            p.add_argument("--alias", default=None, help="an alias such as latest or best")
            p.add_argument("--bootstrap", type=positive_int, default=EVALUATE.n_boot)


def _add_collect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("collect", help="fine-tune runs on sampled curricula and stream their losses")
    p.add_argument("--preset", choices=("tiny", "demo", "paper"), default=None)
    p.add_argument("--config", default=None, help="an experiment YAML file")
    p.add_argument("--runs", type=positive_int, required=True, help="make runs 0..RUNS-1 complete (resumable)")
    p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
    p.add_argument("--no-gradients", action="store_true", help="skip the gradient checkpoints of the baselines")
    p.add_argument("--on-workers", action="store_true", help="one train-run deployment run per run (work pool)")
    p.set_defaults(handler=cmd_collect)
    p = sub.add_parser("progress", help="follow a collection: runs done, runs per minute, time left")
    p.add_argument("--experiment", required=True)
    p.add_argument("--runs", type=positive_int, required=True, help="the collection's size (runs 0..RUNS-1)")
    p.add_argument("--while-pid", type=positive_int, default=None,
                   help="stop when this process ends (e.g. the command that runs the collection)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between looks (default 5)")
    p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
    p.set_defaults(handler=cmd_progress)


class TestIdsError(UserError, ValueError):
    """--tests that are not a comma-separated list of integers."""


def _tests(args: argparse.Namespace) -> list[int] | None:
    """The test example ids of ``--tests`` (default all)."""
    return list(_id_list(args.tests, "--tests", "test", TestIdsError)) or None


def _interval(low: float, high: float) -> str:
    """`` [low, high]`` for a finite interval, else nothing."""
    return f" [{low:+.4f}, {high:+.4f}]" if math.isfinite(low) and math.isfinite(high) else ""


def _examples(args: argparse.Namespace, split: str) -> dict[int, tuple[str, str]]:
    """``example_id -> (text, label)`` of one split of the experiment."""
    from simfluence_platform.storage.effects import example_labels

    frame = example_labels(_warehouse(args), args.experiment, split)
    return {int(i): (t or "", str(lab) if lab is not None else "") for i, t, lab in frame.iter_rows()}


def cmd_whatif(args: argparse.Namespace) -> dict:
    """Simulate an observed run edited, beside the run itself and its plain simulation."""
    from simfluence import plots, whatif
    from simfluence_platform.tasks.whatif import (ask, heldout_error, heldout_runs, refits, trajectory_table,
                                                  write_table)

    warehouse = _warehouse(args)
    question = ask(warehouse, args.experiment, args.ref, args.run, getattr(args, "curriculum", None))
    edited = (whatif.apply_edits(question.curriculum, args.edit or [], n_train=question.simulator.n_train)
              if args.command == "whatif" else question.curriculum)
    tests = whatif.test_positions(question.simulator, question.initial_loss, _tests(args))
    refitted = refits(warehouse, args.experiment, question, args.bootstrap) if args.command == "whatif" else []
    result, draws = whatif.change_draws(question.simulator, question.curriculum, edited, question.initial_loss,
                                        refitted)
    low, high = whatif.interval(draws, ANSWER.level)
    error = heldout_error(question, heldout_runs(warehouse, args.experiment, question), tests)
    columns = {"simulated_base": result.base, "simulated_whatif": result.edited}
    if question.observed is not None:
        columns = {"observed": question.observed, **columns}
    table = trajectory_table(columns, question.simulator.test_ids, tests)
    ids = question.simulator.test_ids
    out = {"version": question.version, "method": question.name, "run_id": question.run_id,
           "fitted_steps": question.fitted_steps, "steps": int(edited.shape[0]),
           "heldout_final_error": {"mean": error.mean, **{int(ids[t]): float(error.per_test[t]) for t in tests}}}
    warning = None
    if edited.shape[0] > question.fitted_steps:
        warning = (f"the curriculum has {edited.shape[0]} steps, past the {question.fitted_steps} the simulator was "
                   f"fitted on: the steps beyond reuse the last fitted step's intercepts, an extrapolation")
        out["warning"] = warning
    if args.command == "simulate":
        out["simulated_final_loss"] = {int(ids[t]): float(result.base[-1, t]) for t in tests}
        out["simulated_losses"] = {int(ids[t]): result.base[:, t].tolist() for t in tests}
    else:
        mean_change = result.effect[tests].mean()
        mean_low, mean_high = whatif.interval(draws[:, tests].mean(axis=1), ANSWER.level)
        out.update({"edits": args.edit or [], "n_refits": len(refitted),
                    "final_loss_change": {int(ids[t]): float(result.effect[t]) for t in tests},
                    "ci_low": {int(ids[t]): float(low[t]) for t in tests},
                    "ci_high": {int(ids[t]): float(high[t]) for t in tests},
                    "mean_change": {"effect": float(mean_change), "ci_low": float(mean_low),
                                    "ci_high": float(mean_high),
                                    "below_error": bool(abs(mean_change) < error.mean)}})
    if args.out:
        out["table"] = str(write_table(table, args.out))
    if args.plot:
        t = int(tests[0])
        curves = {"simulated": result.base[:, t], "what-if": result.edited[:, t]}
        out["plot"] = str(plots.trajectory(args.plot, question.curriculum, curves,
                                           true=None if question.observed is None else question.observed[:, t],
                                           mark_example=args.mark, title=f"test {ids[t]}"))
    if not args.json:
        if args.command == "simulate":
            final = result.base[-1, tests]
            print(f"{question.name} {question.version}: curriculum {args.curriculum} ({edited.shape[0]} "
                  f"steps) from run {question.run_id}'s initial losses")
            print(f"simulated final loss: mean {final.mean():.4f} nats over {len(tests)} test examples "
                  f"(min {final.min():.4f}, max {final.max():.4f}); held-out error of the mean final loss "
                  f"{error.mean:.4f} nats; the trajectories: --out FILE")
        else:
            change = out["mean_change"]
            print(f"{question.name} {question.version}, run {question.run_id}, edits: {', '.join(args.edit)}")
            print(f"mean change of the final loss: {change['effect']:+.4f} nats"
                  f"{_interval(change['ci_low'], change['ci_high'])} over {len(tests)} test examples "
                  f"(negative: the edit lowers the loss; {ANSWER.level:.0%} interval over {len(refitted)} refits)")
            if change["below_error"]:
                print(f"  within the simulator's own error: its mean final loss was off by {error.mean:.4f} nats "
                      f"(root mean square) on its held-out runs, more than this change")
            labels = _examples(args, "test")
            ranked = sorted(((int(ids[t]), float(result.effect[t]), float(low[t]), float(high[t])) for t in tests),
                            key=lambda row: row[1])
            for title, part in (("largest decreases", [r for r in ranked if r[1] < 0][:5]),
                                ("largest increases", [r for r in ranked[::-1] if r[1] > 0][:5])):
                print(f"  {title}:" + ("" if part else " none"))
                for test_id, change_t, lo, hi in part:
                    label = labels.get(test_id, ("", ""))[1]
                    print(f"    test {test_id} ({label}): {change_t:+.4f}{_interval(lo, hi)}")
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        for key in ("table", "plot"):
            if key in out:
                print(f"{key}: {out[key]}")
    return out


def cmd_influence(args: argparse.Namespace) -> dict:
    """Rank training examples by leave-one-out effect; pair interactions; order effects."""
    import polars as pl
    from tqdm import tqdm

    from simfluence import plots, whatif
    from simfluence_platform.tasks.whatif import ask, heldout_error, heldout_runs, refits, snippet, write_table

    warehouse = _warehouse(args)
    question = ask(warehouse, args.experiment, args.ref, args.run, args.curriculum)
    tests = _tests(args)
    stages = tqdm(total=4, desc="influence", disable=args.json, file=sys.stderr)
    refitted = refits(warehouse, args.experiment, question, args.bootstrap)
    stages.update()
    ranking = whatif.influence(question.simulator, question.curriculum, question.initial_loss, tests, refitted,
                               ANSWER.level)
    # The effects are on the mean final loss over the chosen test examples: compare them with the
    # simulator's held-out error of that same mean.
    positions = whatif.test_positions(question.simulator, question.initial_loss, tests)
    scale = heldout_error(question, heldout_runs(warehouse, args.experiment, question), positions).mean
    examples = _examples(args, "train")
    ranking = ranking.with_columns(
        (pl.col("effect").abs() < scale).alias("below_error"),
        pl.col("example_id").map_elements(lambda i: examples.get(i, ("", ""))[1], return_dtype=pl.Utf8).alias("label"),
        pl.col("example_id").map_elements(lambda i: snippet(examples.get(i, ("", ""))[0], 60),
                                          return_dtype=pl.Utf8).alias("text"))
    stages.update()
    candidates = whatif.strongest(ranking, args.pairs)
    pairs = whatif.interactions(question.simulator, question.curriculum, question.initial_loss, candidates, tests)
    stages.update()
    order = whatif.order_effects(question.simulator, question.curriculum, question.initial_loss, candidates, tests)
    stages.update()
    stages.close()
    helpful = ranking.filter(pl.col("effect") < 0).head(args.top)
    harmful = ranking.filter(pl.col("effect") > 0).sort("effect", descending=True).head(args.top)
    out = {"version": question.version, "method": question.name, "run_id": question.run_id, "tests": tests,
           "n_refits": len(refitted), "heldout_final_error": scale,
           "helpful": helpful.to_dicts(), "harmful": harmful.to_dicts(),
           "interactions": pairs.head(args.top).to_dicts(), "order_effects": order.to_dicts()}
    if args.out:
        out["table"] = str(write_table(ranking, args.out))
    if args.plot:
        out["plot"] = str(plots.influence_bars(args.plot, ranking, top=args.top,
                                               title=f"{question.name}: run {question.run_id}"))
    if not args.json:
        shown = ["example_id", "label", "effect", "ci_low", "ci_high", "below_error", "occurrences", "text"]
        with pl.Config(tbl_rows=args.top, tbl_width_chars=200, fmt_str_lengths=60, float_precision=4):
            print(f"{question.name} {question.version}; base: run {question.run_id}; tests: {tests or 'all'}")
            print(f"leave-one-out effect on the final loss, nats ({ANSWER.level:.0%} interval over {len(refitted)} "
                  f"refits; below_error: smaller than the {scale:.4f} nats the simulator's final loss was off by on "
                  f"its held-out runs)")
            print("most helpful (removing them raises the loss):")
            print(helpful.select(shown))
            print("most harmful (removing them lowers the loss):")
            print(harmful.select(shown))
            print("pair interactions among the strongest examples (joint minus the sum of singles):")
            print(pairs.head(args.top))
            print("order effects (last step minus first step):")
            print(order)
        for key in ("table", "plot"):
            if key in out:
                print(f"{key}: {out[key]}")
    return out


def cmd_effects(args: argparse.Namespace) -> dict:
    """The effects table: expected leave-one-out effects with intervals, stored in the warehouse."""
    import polars as pl

    from simfluence_platform.tasks.effects import compute_effects
    from simfluence_platform.tasks.whatif import check_table_path, write_table

    if args.out:
        check_table_path(args.out)  # before the work
    answer = compute_effects(_warehouse(args), args.experiment, args.ref, args.curricula, args.bootstrap, args.seed,
                             ANSWER.level)
    tests = _tests(args)
    counts = answer.resolved()
    out = {"version": answer.version, "method": answer.name, "base": answer.base, "n_curricula": answer.n_curricula,
           "n_refits": answer.n_refits, "heldout_final_error_of_mean": answer.error.mean, "rows": answer.table.height,
           **counts}
    rankings = {None: answer.ranking(None)} | {t: answer.ranking(t) for t in tests or []}
    out["rankings"] = {("mean" if t is None else int(t)): {"helpful": r.head(args.top).to_dicts(),
                                                          "harmful": r.reverse().head(args.top).to_dicts()}
                       for t, r in rankings.items()}
    if args.out:
        out["table"] = str(write_table(answer.table, args.out))
    if not args.json:
        print(f"{answer.name} {answer.version}: expected leave-one-out effect of each training example on each test "
              f"example's final loss (nats; negative: the example lowered it), averaged over {answer.n_curricula} "
              f"base curricula ({answer.base}), {ANSWER.level:.0%} intervals over {answer.n_refits} bootstrap refits")
        print(f"stored: {answer.table.height} rows in the warehouse table effects (views effects_named, "
              f"most_helpful_examples, most_harmful_examples)")
        print(f"{counts['interval_excludes_zero']} of {counts['effects']} per-test effects have an interval that "
              f"excludes zero; {counts['excludes_zero_and_above_error']} of those are also larger than the "
              f"simulator's held-out final-loss error of that test example")
        shown = ["train_id", "train_label", "effect", "ci_low", "ci_high", "below_error", "train_text"]
        with pl.Config(tbl_rows=args.top, tbl_width_chars=200, fmt_str_lengths=60, float_precision=4):
            for test_id, ranking in rankings.items():
                what = "the mean final loss over test examples" if test_id is None else f"test {test_id}"
                print(f"most helpful for {what}:")
                print(ranking.head(args.top).select(shown))
                print(f"most harmful for {what}:")
                print(ranking.reverse().head(args.top).select(shown))
        if args.out:
            print(f"table: {out['table']}")
    return out


def cmd_report(args: argparse.Namespace) -> dict:
    """A self-contained HTML report of an experiment."""
    from tqdm import tqdm

    from simfluence_platform.tasks.report import build_report

    stages = ["effects", "coverage", "leaderboard", "trajectories", "influence"]
    bar = tqdm(total=len(stages), desc="report", disable=args.json, file=sys.stderr)
    report = build_report(_warehouse(args), args.experiment, args.ref, args.out, n_refits=args.bootstrap,
                          step=lambda stage: bar.update())
    bar.close()
    if not args.json:
        for paragraph in report.summary:
            print(textwrap.fill(paragraph, width=100), end="\n\n")
        print(f"report: {report.path}")
    return {"report": str(report.path), "summary": report.summary}


def _add_whatif(sub: argparse._SubParsersAction) -> None:
    from simfluence.edit_syntax import EDIT_HELP  # light: simfluence.curricula would load NumPy for every command

    for name, handler, help_text in (
            ("whatif", cmd_whatif, "simulate edits of an observed run beside the run itself"),
            ("simulate", cmd_whatif, "simulate a curriculum from a file (.json, .npy, .csv)"),
            ("influence", cmd_influence, "rank training examples by simulated leave-one-out effect"),
            ("effects", cmd_effects, "the train x test table of expected leave-one-out effects, with intervals"),
            ("report", cmd_report, "write a self-contained HTML report of an experiment")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--experiment", required=True)
        p.add_argument("--ref", default="best", help="a version or alias (default best: the evaluated simulator with "
                       "the lowest held-out MSE; also latest, latest-<method>)")
        p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
        p.set_defaults(handler=handler, bootstrap=0)
        if name in ("whatif", "influence", "effects", "report"):
            p.add_argument("--bootstrap", type=nonnegative_int, default=ANSWER.n_refits,
                           help=f"refits on bootstrap resamples of the fitting runs behind the intervals "
                                f"(default {ANSWER.n_refits}; 0: no intervals)")
        if name == "report":
            p.add_argument("--out", default=None, help="HTML file (default <home>/reports/<experiment>/report.html)")
            continue
        if name == "effects":
            p.add_argument("--curricula", default=ANSWER.curricula,
                           help="base curricula: heldout (the simulator's held-out runs) or a number to draw with the "
                                "experiment's sampler")
            p.add_argument("--tests", default=None, help="also print the rankings of these test ids (comma-separated)")
            p.add_argument("--top", type=positive_int, default=5)
            p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the bootstrap resamples")
            p.add_argument("--out", default=None, help="also export the table as .csv or .parquet")
            continue
        p.add_argument("--run", type=nonnegative_int, default=None, help="observed run (default: the first held-out run)")
        p.add_argument("--tests", default=None, help="comma-separated test ids (default: all)")
        p.add_argument("--out", default=None, help="write the table as .csv or .parquet")
        p.add_argument("--plot", default=None, help="write a PNG")
        if name == "simulate":
            p.add_argument("--curriculum", required=True, help="a curriculum file; starts from --run's initial losses")
            p.set_defaults(edit=None, mark=None)
        if name == "whatif":
            p.add_argument("--edit", action="append", help=EDIT_HELP)
            p.add_argument("--mark", type=nonnegative_int, default=None, help="shade the steps that contain this training example")
        if name == "influence":
            p.add_argument("--curriculum", default=None, help="a curriculum file instead of the observed run")
            p.add_argument("--top", type=positive_int, default=15)
            p.add_argument("--pairs", type=positive_int, default=6, help="strongest examples to test for interactions")


def cmd_registry(args: argparse.Namespace) -> dict | list:
    """The simulator registry: list versions, show one, compare several, set or move an alias."""
    from simfluence_platform.storage import registry

    warehouse = _warehouse(args)
    if args.action == "list":
        rows = registry.list_versions(warehouse, args.experiment)
        scores = registry.leaderboard_by_version(warehouse, args.experiment)
        for row in rows:
            row.update(scores.get(row["version"], {}))
        if not args.json:
            print(f"{'version':<18}{'method':<30}{'created':<21}{'MSE (held out)':>16}{'Spearman':>10}  aliases")
            for row in rows:
                mse, rho = row.get("all_steps_mse"), row.get("spearman_across_runs")
                print(f"{row['version']:<18}{row['method']:<30}{row['created_at'][:19]:<21}"
                      f"{'' if mse is None else f'{mse:.4g}':>16}{'' if rho is None else f'{rho:.3f}':>10}  "
                      f"{', '.join(row['aliases'])}")
        return rows
    if args.action == "alias":
        if len(args.refs) != 2:
            raise RegistryUsageError("registry alias takes ALIAS VERSION (set or move ALIAS to VERSION)")
        alias, ref = args.refs
        version = registry.resolve_version(warehouse, args.experiment, ref)
        before = registry.alias_version(warehouse, args.experiment, alias)
        registry.set_alias(warehouse, args.experiment, alias, version)
        if not args.json:
            print(f"{alias}: {before or '(new)'} -> {version}")
        return {"alias": alias, "version": version, "previous": before}
    if not args.refs:
        raise RegistryUsageError(f"registry {args.action} takes at least one version or alias")
    if args.action == "show" and len(args.refs) != 1:
        raise RegistryUsageError("registry show takes one version or alias (compare takes several)")
    rows = registry.compare(warehouse, args.experiment, args.refs)
    scores = registry.leaderboard_by_version(warehouse, args.experiment)
    for row in rows:
        row["heldout"] = scores.get(row["version"], {})
    if not args.json:
        for row in rows:
            print(f"{row['ref']} = {row['version']}: {row['name']} ({row['method']}), {row['n_fit_runs']} fitting and "
                  f"{row['n_heldout_runs']} held-out runs, data hash {row['data_hash']}")
            print(f"  hyperparameters: {_short_json(row['hyperparameters'])}")
            print(f"  held-out scores: {_short_json(row['heldout']) or 'not evaluated'}")
    return rows[0] if args.action == "show" else rows


def _short_json(value: object, width: int = 400) -> str:
    text = json.dumps(_jsonable(value)) if value else ""
    return text if len(text) <= width else text[: width - 1] + "…"


class RegistryUsageError(UserError, ValueError):
    """registry show/compare/alias with the wrong number of versions."""


def _add_registry(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="simulator versions: list, show, compare, alias")
    p.add_argument("action", choices=("list", "show", "compare", "alias"))
    p.add_argument("refs", nargs="*", help="versions or aliases (unique prefixes of versions accepted); "
                                           "alias takes ALIAS VERSION")
    p.add_argument("--experiment", required=True)
    p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
    p.set_defaults(handler=cmd_registry)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_storage, _add_collect, _add_pipeline,
                                                               _add_whatif, _add_registry]


# ---- optimize: the curriculum a simulator rates best, trained for real beside random ones ----


class IdListError(UserError, ValueError):
    """An option that takes comma-separated example ids given something else."""


def _id_list(text: str | None, option: str, kind: str = "training",
             error: type[UserError] = IdListError) -> tuple[int, ...]:
    """The integer ids of a comma-separated option naming ``kind`` examples (empty when absent)."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise error(f"{option} takes comma-separated {kind} example ids, got {text!r}") from None


class CurriculumOutError(UserError, ValueError):
    """An --out file with a suffix other than .json or .npy."""


def write_curriculum(curriculum: list, path: str) -> str:
    """Write one curriculum ``[step][position]`` as ``simfluence simulate --curriculum`` reads it:
    ``.json`` (nested lists; -1 pads) or ``.npy`` (``int64[T, b]``)."""
    from pathlib import Path

    import numpy as np

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix.lower() == ".npy":
        np.save(target, np.asarray(curriculum, dtype=np.int64))
    else:
        target.write_text(json.dumps(np.asarray(curriculum).tolist()) + "\n")
    return str(target)


def cmd_optimize(args: argparse.Namespace) -> dict:
    """Search for the curriculum with the lowest simulated loss, train it and random ones for
    real, and report predicted against actual: the optimize-curriculum flow."""
    from simfluence.optimize import Constraints
    from simfluence_platform.flows.optimize import optimize_curriculum
    from simfluence_platform.tasks.optimize import check_request

    include, exclude = _id_list(args.include, "--include"), _id_list(args.exclude, "--exclude")
    constraints = Constraints(include, exclude, args.max_repeats)
    trust_region = not args.no_trust_region
    check_request(_warehouse(args), args.experiment, args.ref, _tests(args), constraints,  # before any flow starts
                  trust_region)
    if args.out and not args.out.lower().endswith((".json", ".npy")):
        raise CurriculumOutError(f"--out {args.out}: write the curriculum as .json or .npy")
    ensure_api()
    result = optimize_curriculum(experiment=args.experiment, ref=args.ref, tests=_tests(args), include=list(include),
                                 exclude=list(exclude), max_repeats=args.max_repeats, random=args.random,
                                 seed=args.seed, starts=args.starts, iterations=args.iterations,
                                 temperature=args.temperature, trust_region=trust_region, warehouse=args.warehouse,
                                 on_workers=args.on_workers)
    if args.out:
        result["out"] = write_curriculum(result["curriculum"], args.out)
    if not args.json:
        print(format_optimize(result))
    return result


def format_optimize(result: dict) -> str:
    """The human report of :func:`cmd_optimize`: one row per trained run, then the verdict."""
    def nats(value: float | None, sign: str = "") -> str:
        return "-" if value is None else format(value, f"{sign}.4f")

    tests = result["tests"]
    lines = [f"{result['method']} {result['version']} on {result['experiment']}; mean final loss over "
             f"{len(tests)} test examples (nats); search from run {result['base_run']}'s initial losses: best random "
             f"start {result['search']['start']:.4f} -> proposal {result['search']['proposal']:.4f} "
             f"({result['search']['evaluations']} curricula simulated)",
             f"simulator's held-out RMSE of this quantity {result['heldout_rmse']:.4f} over {result['n_heldout']} runs "
             f"(observed spread across them {result['heldout_spread']:.4f}); each example at most "
             f"{result['constraints']['max_repeats'] or 'any number of'} times (in its fitting runs: at most "
             f"{result['constraints']['fitted_max_repeats']}); "
             + ("simulated losses kept within the fitting runs' range" if result["constraints"]["trust_region"]
                else "no trust region"),
             "",
             f"{'curriculum':<10} {'run_id':>8} {'predicted':>10} {'actual':>10} {'error':>9}"]
    for row in result["runs"]:
        error = None if row["actual"] is None else row["predicted"] - row["actual"]
        lines.append(f"{row['role']:<10} {row['run_id']:>8} {nats(row['predicted']):>10} {nats(row['actual']):>10} "
                     f"{nats(error, '+'):>9}")
    summary = result["summary"]
    if "actual_improvement" in summary:
        verdict = "beats every random curriculum" if summary["proposed_beats_every_random"] else \
            "does not beat every random curriculum"
        lines += ["", f"proposed {summary['proposed_actual']:.4f} against random mean "
                      f"{summary['random_actual_mean']:.4f}: actual improvement "
                      f"{summary['actual_improvement']:+.4f} (predicted {summary['predicted_improvement']:+.4f}); "
                      f"the proposal {verdict}"]
    if "out" in result:
        lines.append(f"curriculum: {result['out']}")
    return "\n".join(lines)


def _add_optimize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="search for the curriculum with the lowest simulated loss, then train it "
                                        "and random curricula for real and compare")
    p.add_argument("--experiment", required=True)
    p.add_argument("--ref", default="best", help="a simulator version or alias (default best)")
    p.add_argument("--warehouse", default=None, help="DuckDB file (default $SIMFLUENCE_HOME/warehouse.duckdb)")
    p.add_argument("--tests", default=None, help="comma-separated test ids whose mean final loss is minimised "
                                                 "(default: all)")
    p.add_argument("--include", default=None, help="comma-separated training ids that must appear")
    p.add_argument("--exclude", default=None, help="comma-separated training ids that must not appear")
    p.add_argument("--max-repeats", type=positive_int, default=None,
                   help="most appearances of one example (default: the most in any of the simulator's fitting runs)")
    p.add_argument("--random", type=nonnegative_int, default=3, help="random curricula trained beside the proposal")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--starts", type=positive_int, default=256, help="random curricula the search starts from")
    p.add_argument("--iterations", type=nonnegative_int, default=300, help="local-search iterations at most")
    p.add_argument("--temperature", type=float, default=0.0, help="simulated annealing's first temperature in nats "
                                                                  "(0: greedy)")
    p.add_argument("--no-trust-region", action="store_true",
                   help="let the search leave the fitting runs' repeats and loss range (where the simulator extrapolates)")
    p.add_argument("--out", default=None, help="write the proposed curriculum (.json or .npy) for simulate/whatif")
    p.add_argument("--on-workers", action="store_true", help="one train-run deployment run per curriculum")
    p.set_defaults(handler=cmd_optimize)


COMMANDS.append(_add_optimize)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="simfluence", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():  # also after the command; absent there, the value above stays
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help="print one JSON document instead of tables")
    return parser


def prefect_defaults() -> None:
    """The Prefect settings this command line runs flows with, unless the user set them:
    analytics off (with it on, SQLite 'database is locked' at startup), a longer start-up
    timeout for the temporary server on small machines, and a PREFECT_HOME folder that exists."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if os.environ.get("PREFECT_HOME"):
        os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)  # Prefect's SQLite needs it


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefect_defaults()
    if getattr(args, "dask_address", None):  # the user's own command line may name a Dask scheduler
        from simfluence_platform.tasks.fit import allow_dask_address

        allow_dask_address(args.dask_address)
    try:
        result = args.handler(args)
    except USER_ERRORS as error:
        print(f"simfluence {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"simfluence {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json and result is not None:
        print(to_json(result))
    return 0


def to_json(value: object, indent: int | None = 2) -> str:
    """Strict JSON of a command's result: NaN and infinities become null, NumPy values and
    decimals plain numbers and lists, anything else that JSON lacks (dates, paths) its text."""
    return json.dumps(_jsonable(value), indent=indent, allow_nan=False)


def _jsonable(value: object) -> object:
    numpy = sys.modules.get("numpy")  # a NumPy value exists only once NumPy is loaded
    if numpy is not None and isinstance(value, (numpy.generic, numpy.ndarray)):
        value = value.tolist()
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
