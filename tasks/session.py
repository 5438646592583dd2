"""An experiment read-session: what evaluation, plots, what-if and the report read, read once.

Every bundle is resolved and hash-verified once per session (whichever aliases point at it),
every set of observed runs is loaded once, and every simulation of a version on a set of runs
is computed once and reused (scores, the refit promotion rule and the trajectory plots all use
the same predictions). Reads go through short read-only connections, never held while the
session computes, so writes (one transaction for all evaluations) are never blocked by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simfluence.runset import RunSet
from simfluence.simulators import Simulator
from simfluence_platform.storage import registry
from simfluence_platform.storage.experiments import load_runset
from simfluence_platform.storage.warehouse import Warehouse


@dataclass
class ExperimentSession:
    """Reads of one experiment, cached for the life of the session (one evaluation, one report)."""

    warehouse: Warehouse
    experiment: str
    _versions: dict[str, str] = field(default_factory=dict)  # ref -> version
    _bundles: dict[str, tuple[Simulator, registry.BundleInfo]] = field(default_factory=dict)  # version ->
    _runs: dict[tuple[tuple[int, ...], tuple[int, ...]], RunSet] = field(default_factory=dict)
    _predictions: dict[tuple[str, tuple[int, ...]], np.ndarray] = field(default_factory=dict)

    def load(self, ref: str) -> tuple[Simulator, registry.BundleInfo]:
        """The verified simulator of a version or alias (resolved and verified once)."""
        if ref not in self._versions:
            version = registry.resolve_version(self.warehouse, self.experiment, ref)
            if version not in self._bundles:
                self._bundles[version] = registry.load(self.warehouse, self.experiment, version)
            self._versions[ref] = version
        return self._bundles[self._versions[ref]]

    def runs(self, run_ids: list[int], test_ids: np.ndarray) -> RunSet:
        """Observed complete runs ``run_ids`` restricted to ``test_ids``, in that order (loaded once)."""
        key = (tuple(int(r) for r in run_ids), tuple(int(t) for t in test_ids))
        if key not in self._runs:
            self._runs[key] = load_runset(self.warehouse, self.experiment, run_ids=list(key[0]),
                                          test_ids=np.array(key[1]))
        return self._runs[key]

    def predict(self, ref: str, run_ids: list[int]) -> tuple[RunSet, np.ndarray]:
        """The observed runs and the simulator's ``float[R, T+1, m]`` prediction of them from
        their own initial losses (simulated once per version and runs)."""
        simulator, info = self.load(ref)
        runs = self.runs(run_ids, simulator.test_ids)
        key = (info.version, tuple(int(r) for r in run_ids))
        if key not in self._predictions:
            self._predictions[key] = simulator.simulate(runs.batches, runs.initial_loss)
        return runs, self._predictions[key]
