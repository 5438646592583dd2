"""What-if questions against a published simulator and the experiment's observed runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from simfluence import curricula
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
    ``observed``: ``float[T+1, m]`` true losses when the base is an observed run, else None.
    """

    simulator: Simulator
    version: str
    name: str
    run_id: int | None
    curriculum: np.ndarray
    initial_loss: np.ndarray
    observed: np.ndarray | None


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
    return Question(simulator, info.version, info.manifest["name"], run_id, curriculum, runs.losses[0, 0], observed)


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


def write_table(frame: pl.DataFrame, path: str | Path) -> Path:
    """CSV or Parquet by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        frame.write_parquet(path)
    elif path.suffix.lower() == ".csv":
        frame.write_csv(path)
    else:
        raise TableFormatError(f"{path}: write tables as .csv or .parquet")
    return path
