"""What the flows share: resolving the experiment config and the warehouse from parameters."""

from __future__ import annotations

from simfluence_platform.storage.warehouse import Warehouse
from simfluence_platform.tasks.config import ExperimentConfig, load_config, preset as preset_config


def experiment_config(preset: str | None, config_path: str | None) -> ExperimentConfig:
    """Exactly one of a preset name and a YAML path."""
    if (preset is None) == (config_path is None):
        raise ValueError("give exactly one of preset and config_path")
    return preset_config(preset) if preset else load_config(config_path)


def warehouse(path: str | None) -> Warehouse:
    """The warehouse at ``path`` (default ``$SIMFLUENCE_HOME/warehouse.duckdb``)."""
    return Warehouse(path)
