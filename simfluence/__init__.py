"""Simfluence: training-data attribution by simulating training runs (Guu et al., 2023).

The public API (names are part of the contract)::

    import simfluence as sf
    runs = sf.RunSet(batches=int[R, T, b], losses=float[R, T+1, m])
    sim = sf.SimfluenceLinear(l2=...).fit(runs)
    pred = sim.simulate(batches=int[R2, T2, b], initial_loss=float[R2, m])  # [R2, T2+1, m]
    sf.metrics.all_steps_mse(pred, true)

This package imports neither Prefect nor DuckDB.
"""

from simfluence import curricula, metrics, synthetic
from simfluence.gradients import GradientCheckpoints
from simfluence.momentum import OptimizerSpec, SimfluenceMomentum
from simfluence.runset import RunSet, RunSetError
from simfluence.simulators import (
    Constant,
    InfluenceFunction,
    MeanTrajectory,
    SimfluenceAdditive,
    SimfluenceLinear,
    SimfluenceMultiplicative,
    Simulator,
    SimulatorError,
    TracInCP,
    load_simulator,
)
from simfluence.solvers import SolverError

__version__ = "0.1.0"

__all__ = [
    "Constant",
    "GradientCheckpoints",
    "InfluenceFunction",
    "MeanTrajectory",
    "OptimizerSpec",
    "RunSet",
    "RunSetError",
    "SimfluenceAdditive",
    "SimfluenceLinear",
    "SimfluenceMomentum",
    "SimfluenceMultiplicative",
    "Simulator",
    "SimulatorError",
    "SolverError",
    "TracInCP",
    "curricula",
    "load_simulator",
    "metrics",
    "synthetic",
]
