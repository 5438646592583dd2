"""Logged training runs: the curricula used and the losses of every test example.

A :class:`RunSet` is the one data structure every simulator is fitted on and scored
against. Shapes (R runs, T steps, batch size b, m test examples, n training examples):

- ``batches``: ``int64[R, T, b]``; ``batches[r, t-1]`` holds the training ids used by update
  ``t`` of run ``r``. ``-1`` pads a batch smaller than ``b``.
- ``losses``: ``float64[R, T+1, m]``; ``losses[r, t, j]`` is the loss (nats) of test example
  ``j`` after update ``t``; ``losses[r, 0, j]`` is before any update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simfluence.errors import SimfluenceError

PAD = -1


class RunSetError(SimfluenceError):
    """Raised when logged runs are malformed; the message names the field, run and step."""


@dataclass(frozen=True)
class RunSet:
    """Validated arrays of R runs of T steps.

    Args:
        batches: ``int[R, T, b]`` training ids per update, ``-1`` for padding.
        losses: ``float[R, T+1, m]`` loss of each test example before and after each update.
        n_train: number of training examples n (ids are ``0..n-1``); defaults to the largest
            id used plus one.
        run_ids: ``int64[R]`` identifiers of the runs (default ``0..R-1``).
        test_ids: ``int64[m]`` identifiers of the test examples (default ``0..m-1``).
    """

    batches: np.ndarray
    losses: np.ndarray
    n_train: int = -1
    run_ids: np.ndarray = field(default=None)  # type: ignore[assignment]
    test_ids: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        batches = _as_int_array(self.batches, "batches")
        losses = np.asarray(self.losses, dtype=np.float64)
        if batches.ndim != 3:
            raise RunSetError(f"batches must have shape [R, T, b], got {batches.shape}")
        if losses.ndim != 3:
            raise RunSetError(f"losses must have shape [R, T+1, m], got {losses.shape}")
        R, T, b = batches.shape
        if R == 0:
            raise RunSetError("the run set is empty: batches has no runs")
        if T == 0 or b == 0:
            raise RunSetError(f"batches has no steps or an empty batch width: shape {batches.shape}")
        if losses.shape[0] != R:
            raise RunSetError(f"batches has {R} runs but losses has {losses.shape[0]}")
        if losses.shape[1] != T + 1:
            raise RunSetError(
                f"losses must have T+1={T + 1} steps (before training and after each of the "
                f"{T} updates), got {losses.shape[1]}"
            )
        if losses.shape[2] == 0:
            raise RunSetError("losses has no test examples (m = 0)")
        n_train = int(self.n_train)
        if n_train < 0:
            n_train = int(batches.max()) + 1
        if n_train <= 0:
            raise RunSetError("every batch is padding: no training example is used")
        bad = (batches < PAD) | (batches >= n_train)
        if bad.any():
            r, t, p = (int(v) for v in np.argwhere(bad)[0])
            raise RunSetError(
                f"batches[{r}, {t}, {p}] = {int(batches[r, t, p])} is not a training id "
                f"in 0..{n_train - 1} (or -1 for padding)"
            )
        empty = (batches == PAD).all(axis=2)
        if empty.any():
            r, t = (int(v) for v in np.argwhere(empty)[0])
            raise RunSetError(f"run index {r}, update {t + 1} has an empty batch (all -1)")
        run_ids = _ids(self.run_ids, R, "run_ids")
        test_ids = _ids(self.test_ids, losses.shape[2], "test_ids")
        finite = np.isfinite(losses)
        if not finite.all():
            r, t, j = (int(v) for v in np.argwhere(~finite)[0])
            raise RunSetError(
                f"run {run_ids[r]} has a non-finite loss {losses[r, t, j]} at step {t} for test "
                f"example {test_ids[j]}; mark diverged runs failed instead of fitting on them"
            )
        object.__setattr__(self, "batches", batches)
        object.__setattr__(self, "losses", losses)
        object.__setattr__(self, "n_train", n_train)
        object.__setattr__(self, "run_ids", run_ids)
        object.__setattr__(self, "test_ids", test_ids)

    @property
    def n_runs(self) -> int:
        """Number of runs R."""
        return self.batches.shape[0]

    @property
    def n_steps(self) -> int:
        """Number of updates T per run."""
        return self.batches.shape[1]

    @property
    def batch_size(self) -> int:
        """Width b of the batch array (the largest batch; smaller ones are padded)."""
        return self.batches.shape[2]

    @property
    def n_tests(self) -> int:
        """Number of test examples m."""
        return self.losses.shape[2]

    @property
    def initial_loss(self) -> np.ndarray:
        """``float64[R, m]`` losses before the first update."""
        return self.losses[:, 0, :]

    def select_runs(self, index: np.ndarray | list[int]) -> RunSet:
        """A RunSet of the runs at these positions (not run ids)."""
        index = np.asarray(index, dtype=np.int64)
        return RunSet(
            self.batches[index], self.losses[index], self.n_train, self.run_ids[index], self.test_ids
        )

    def select_tests(self, index: np.ndarray | list[int]) -> RunSet:
        """A RunSet restricted to the test examples at these positions (not test ids)."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n_tests):
            raise RunSetError(f"test positions must lie in 0..{self.n_tests - 1}")
        return RunSet(
            self.batches, self.losses[:, :, index], self.n_train, self.run_ids, self.test_ids[index]
        )

    def split(self, n_heldout: int | float, seed: int = 0) -> tuple[RunSet, RunSet]:
        """Split by whole runs into (fitting, held-out), seeded and reproducible.

        Args:
            n_heldout: number of held-out runs, or a fraction in (0, 1).
            seed: seed of the permutation of runs.
        """
        R = self.n_runs
        k = int(round(n_heldout * R)) if isinstance(n_heldout, float) and n_heldout < 1 else int(n_heldout)
        if not 1 <= k < R:
            raise RunSetError(f"cannot hold out {n_heldout} of {R} runs: need 1..{R - 1} held-out runs")
        order = np.random.default_rng(seed).permutation(R)
        return self.select_runs(np.sort(order[k:])), self.select_runs(np.sort(order[:k]))

    def run_folds(self, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """K-fold partition of run positions: a list of (fit positions, validation positions)."""
        if not 2 <= n_folds <= self.n_runs:
            raise RunSetError(f"cross-validation needs 2..{self.n_runs} folds over runs, got {n_folds}")
        order = np.random.default_rng(seed).permutation(self.n_runs)
        folds = np.array_split(order, n_folds)
        return [
            (np.sort(np.concatenate([f for g, f in enumerate(folds) if g != k])), np.sort(folds[k]))
            for k in range(n_folds)
        ]


def _as_int_array(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.mod(array, 1) == 0):
            raise RunSetError(f"{name} must hold integer training ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def _ids(ids: np.ndarray | None, size: int, name: str) -> np.ndarray:
    if ids is None:
        return np.arange(size, dtype=np.int64)
    ids = _as_int_array(np.asarray(ids), name)
    if ids.shape != (size,):
        raise RunSetError(f"{name} must have {size} entries, got shape {ids.shape}")
    if len(np.unique(ids)) != size:
        raise RunSetError(f"{name} has duplicate values")
    return ids
