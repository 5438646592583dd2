"""What the flows share: resolving the experiment config and the warehouse from parameters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.config import ExperimentConfig, load_config, preset as preset_config, stored_config


def experiment_config(preset: str | None, config_path: str | None, experiment: str | None = None,
                      warehouse_path: str | None = None) -> ExperimentConfig:
    """Exactly one of a preset name, a YAML path and a registered experiment's name (whose
    config is read from the warehouse at ``warehouse_path``)."""
    if experiment is not None:
        if preset is not None or config_path is not None:
            raise ValueError("give exactly one of preset, config_path and experiment")
        return stored_config(warehouse(warehouse_path), experiment)
    if (preset is None) == (config_path is None):
        raise ValueError("give exactly one of preset and config_path")
    return preset_config(preset) if preset else load_config(config_path)


def warehouse(path: str | None) -> Warehouse:
    """The warehouse at ``path`` (default ``$SIMFLUENCE_HOME/warehouse.duckdb``)."""
    return Warehouse(path)


def group_name(run_ids: list[int]) -> str:
    """``0``, or ``0-1-2-3`` for a group of runs: the suffix of their task and flow run names."""
    return "-".join(map(str, run_ids))


def run_name(kind: str) -> Callable[[], str]:
    """A flow-run name from the run's parameters, for the UI: ``<kind>-<experiment or preset or
    config file>`` and ``-<runs>-runs`` when the flow collects (``all`` when none is named)."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        what = (parameters.get("experiment") or parameters.get("preset")
                or (Path(parameters["config_path"]).stem if parameters.get("config_path") else "all"))
        runs = f"-{parameters['runs']}-runs" if parameters.get("runs") else ""
        return f"{kind}-{what}{runs}"

    return name
