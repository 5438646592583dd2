"""Simfluence: training-data attribution by simulating training runs (Guu et al., 2023).

The public API (names are part of the contract)::

    import simfluence as sf
    runs = sf.RunSet(batches=int[R, T, b], losses=float[R, T+1, m])
    sim = sf.SimfluenceLinear(l2=...).fit(runs)
    pred = sim.simulate(batches=int[R2, T2, b], initial_loss=float[R2, m])  # [R2, T2+1, m]
    sf.metrics.all_steps_mse(pred, true)

This package imports neither Prefect nor DuckDB.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use (PEP 562), so that ``import simfluence`` and its light
# modules (``simfluence.errors``) cost nothing: a command line that only reads a table never
# loads SciPy or Numba.
_EXPORTS = {
    "GradientCheckpoints": "simfluence.gradients",
    "OptimizerSpec": "simfluence.momentum",
    "SimfluenceMomentum": "simfluence.momentum",
    "RunSet": "simfluence.runset",
    "RunSetError": "simfluence.runset",
    "Constant": "simfluence.simulators",
    "InfluenceFunction": "simfluence.simulators",
    "LinearParameters": "simfluence.simulators",
    "MeanTrajectory": "simfluence.simulators",
    "SimfluenceAdditive": "simfluence.simulators",
    "SimfluenceLinear": "simfluence.simulators",
    "SimfluenceMultiplicative": "simfluence.simulators",
    "Simulator": "simfluence.simulators",
    "SimulatorError": "simfluence.simulators",
    "TracInCP": "simfluence.simulators",
    "load_simulator": "simfluence.simulators",
    "SolverError": "simfluence.solvers",
    "SimfluenceError": "simfluence.errors",
}
_SUBMODULES = ("curricula", "metrics", "synthetic", "whatif", "plots", "gradients", "momentum", "runset",
               "simulators", "solvers", "errors")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"simfluence.{name}")
    else:
        raise AttributeError(f"module 'simfluence' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


__version__ = "0.1.0"

__all__ = [
    "Constant",
    "GradientCheckpoints",
    "InfluenceFunction",
    "LinearParameters",
    "MeanTrajectory",
    "OptimizerSpec",
    "RunSet",
    "RunSetError",
    "SimfluenceAdditive",
    "SimfluenceLinear",
    "SimfluenceMomentum",
    "SimfluenceMultiplicative",
    "Simulator",
    "SimfluenceError",
    "SimulatorError",
    "SolverError",
    "TracInCP",
    "curricula",
    "load_simulator",
    "metrics",
    "synthetic",
]
