"""What-if questions against a published simulator and the experiment's observed runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from simfluence import curricula, whatif
from simfluence.runset import RunSet
from simfluence.simulators import Simulator, SimulatorError
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import experiment_info, load_runset
from simfluence_platform.storage.warehouse import Warehouse, WarehouseError
from simfluence_platform.errors import UserError


class TableFormatError(UserError, ValueError):
    """An output table with a suffix other than .csv or .parquet."""


@dataclass(frozen=True)
class Question:
    """A simulator and the base curriculum to question it on.

    ``curriculum``: ``int[T, b]``; ``initial_loss``: ``float[m]`` (the observed run's step 0);
    ``observed``: ``float[T+1, m]`` true losses when the base is an observed run, else None;
    ``fit_run_ids``, ``heldout_run_ids``: the runs the simulator was fitted and scored on;
    ``fitted_steps``: the number of steps of the experiment's runs (the simulator's horizon).
    """

    simulator: Simulator
    version: str
    name: str
    run_id: int | None
    curriculum: np.ndarray
    initial_loss: np.ndarray
    observed: np.ndarray | None
    fit_run_ids: list[int]
    heldout_run_ids: list[int]
    fitted_steps: int


def ask(warehouse: Warehouse, experiment: str, ref: str = "best", run: int | None = None,
        curriculum_path: str | None = None) -> Question:
    """Load the simulator ``ref`` of ``experiment`` and a base: observed run ``run`` (default: the
    first held-out run of the simulator), or the first curriculum in ``curriculum_path`` started
    from that run's initial losses."""
    simulator, info = registry.load(warehouse, experiment, ref)
    if info.manifest["experiment"] != experiment:
        raise registry.RegistryError(f"bundle {info.version} belongs to experiment {info.manifest['experiment']!r}")
    experiment_row = experiment_info(warehouse, experiment)
    n_train, n_test = experiment_row.n_train, experiment_row.n_test
    if simulator.n_train != n_train or simulator.test_ids.max() >= n_test:
        raise SimulatorError(f"simulator {info.version} was fitted on n={simulator.n_train} training examples; "
                             f"experiment {experiment!r} has n={n_train}")
    run_id = run if run is not None else info.manifest["heldout_run_ids"][0]
    try:
        runs = load_runset(warehouse, experiment, run_ids=[run_id], test_ids=simulator.test_ids)
    except WarehouseError as error:
        raise WarehouseError(f"run {run_id}: {error}") from None
    observed = runs.losses[0]
    curriculum = runs.batches[0]
    if curriculum_path is not None:
        curriculum = curricula.load(curriculum_path, n_train)[0]
        observed = None
    return Question(simulator, info.version, info.manifest["name"], run_id, curriculum, runs.losses[0, 0], observed,
                    list(info.manifest["fit_run_ids"]), list(info.manifest["heldout_run_ids"]), runs.batches.shape[1])


def refits(warehouse: Warehouse, experiment: str, question: Question, n: int, seed: int = 0) -> list[Simulator]:
    """``n`` refits of the question's simulator on bootstrap resamples of its own fitting runs
    (none when ``n`` is 0): the unit of every interval the what-if commands print."""
    if n == 0:
        return []
    runs = load_runset(warehouse, experiment, run_ids=question.fit_run_ids, test_ids=question.simulator.test_ids)
    return whatif.bootstrap_refits(question.simulator, runs, n=n, seed=seed)


@dataclass(frozen=True)
class HeldoutError:
    """How far the simulator's final losses were off on its held-out runs (nats, root mean
    square over the runs): ``per_test``: ``float[m]``; ``mean``: of the mean over the chosen test
    examples; ``spread``: the standard deviation of that observed mean across the runs (how much
    curricula move it at all). An answer smaller than ``mean`` is within the simulator's own
    error on comparable runs."""

    per_test: np.ndarray
    mean: float
    spread: float


def heldout_runs(warehouse: Warehouse, experiment: str, question: Question) -> RunSet:
    """The simulator's held-out runs, restricted to its test examples."""
    return load_runset(warehouse, experiment, run_ids=question.heldout_run_ids, test_ids=question.simulator.test_ids)


def heldout_error(question: Question, runs: RunSet, positions: np.ndarray | None = None) -> HeldoutError:
    """The simulator's final-loss error on its held-out ``runs`` (see :func:`heldout_runs`),
    each simulated from its own start; the mean over the test ``positions`` (default all)."""
    final = question.simulator.simulate(runs.batches, runs.initial_loss)[:, -1]
    true = runs.losses[:, -1]
    chosen = slice(None) if positions is None else positions
    observed = true[:, chosen].mean(axis=1)
    return HeldoutError(np.sqrt(np.mean((final - true) ** 2, axis=0)),
                        float(np.sqrt(np.mean((final[:, chosen].mean(axis=1) - observed) ** 2))),
                        float(observed.std()))


def flag_within_error(frame: pl.DataFrame, error: HeldoutError, test_ids: np.ndarray) -> pl.DataFrame:
    """Add ``heldout_error`` (per test example; the mean's for null ``test_id``) and
    ``below_error`` (``|effect|`` smaller than it: not resolvable by this simulator)."""
    by_test = pl.DataFrame({"test_id": np.asarray(test_ids, dtype=np.int64), "heldout_error": error.per_test})
    out = frame.join(by_test, on="test_id", how="left").with_columns(
        pl.col("heldout_error").fill_null(error.mean))
    return out.with_columns((pl.col("effect").abs() < pl.col("heldout_error")).alias("below_error"))


def base_curricula(warehouse: Warehouse, experiment: str, held: RunSet,
                   curricula_spec: str) -> tuple[str, np.ndarray, np.ndarray]:
    """The base curricula of an effects table: ``heldout`` (the simulator's held-out runs
    ``held``, each from its own initial losses) or a count ``N`` of curricula drawn by the
    experiment's own sampler (run ids past any collected run), from the held-out runs' mean
    initial losses. Returns (label, ``int[K, T, b]``, ``float[K, m]``)."""
    from simfluence_platform.tasks.config import stored_config
    from simfluence_platform.tasks.runs import curriculum_for_run

    if curricula_spec == "heldout":
        return "heldout", held.batches, held.initial_loss
    try:
        count = int(curricula_spec)
    except ValueError:
        count = 0
    if count < 1:
        raise EffectsRequestError(f"--curricula takes 'heldout' or a positive number of curricula, got {curricula_spec!r}")
    config = stored_config(warehouse, experiment)
    if config.curriculum.kind == "explicit":
        raise EffectsRequestError(f"experiment {experiment!r} has explicit curricula (no sampler to draw from); "
                                  f"use --curricula heldout")
    base = np.stack([curriculum_for_run(config, SAMPLED_RUN_OFFSET + k) for k in range(count)])
    return f"sampled:{count}", base, np.repeat(held.initial_loss.mean(axis=0)[None], count, axis=0)


# Sampled base curricula use run ids from here on: the sampler's curricula of runs never collected.
SAMPLED_RUN_OFFSET = 1_000_000_000


class EffectsRequestError(UserError, ValueError):
    """A bad --curricula value or an experiment whose curricula cannot be sampled."""


def snippet(text: str | None, width: int) -> str:
    """One line of an example's text, cut to ``width`` characters."""
    line = " ".join((text or "").split())
    return line if len(line) <= width else line[: width - 1] + "…"


def trajectory_table(steps_by_name: dict[str, np.ndarray], test_ids: np.ndarray, tests: np.ndarray) -> pl.DataFrame:
    """Long table: ``step``, ``test_id`` and one column per named ``float[T+1, m]`` trajectory
    (columns may differ in length; the shorter are null beyond their end)."""
    T = max(len(v) for v in steps_by_name.values())
    step = np.repeat(np.arange(T), len(tests))
    columns = {"step": step, "test_id": np.tile(test_ids[tests], T)}
    for name, values in steps_by_name.items():
        padded = np.full((T, len(tests)), np.nan)
        padded[: len(values)] = values[:, tests]
        columns[name] = padded.ravel()
    return pl.DataFrame(columns).with_columns(pl.all().fill_nan(None))


def check_table_path(path: str | Path) -> Path:
    """``path`` as a Path, or TableFormatError unless it ends in .csv or .parquet."""
    if Path(path).suffix.lower() not in (".csv", ".parquet"):
        raise TableFormatError(f"{path}: write tables as .csv or .parquet")
    return Path(path)


def write_table(frame: pl.DataFrame, path: str | Path) -> Path:
    """CSV or Parquet by the file's suffix (checked before anything is written)."""
    path = check_table_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        frame.write_parquet(path)
    else:
        frame.write_csv(path)
    return path
