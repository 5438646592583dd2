"""Curricula: how training runs choose their batches, and edits of a curriculum.

A curriculum of one run is ``int64[T, b]`` (``-1`` pads); a set of runs is ``int64[R, T, b]``.
Every sampler is seeded and reproducible. Edits return a new array and never modify their
input; when an edit needs a wider batch, every batch is padded with ``-1``.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runset import PAD


class CurriculumError(SimfluenceError):
    """Raised for an impossible curriculum request; the message names the parameter or id."""


def uniform(n: int, runs: int, steps: int, batch_size: int, seed: int = 0) -> np.ndarray:
    """Each batch draws ``batch_size`` distinct ids uniformly; batches are independent, so an
    example can recur across steps (sampling with replacement over the run).

    Returns ``int64[runs, steps, batch_size]``.
    """
    _check_sizes(n, runs, steps, batch_size)
    rng = np.random.default_rng(seed)
    keys = rng.random((runs, steps, n))
    return np.argpartition(keys, batch_size - 1, axis=2)[:, :, :batch_size].astype(np.int64)


def subset_epochs(
    n: int, runs: int, subset_size: int, epochs: int, batch_size: int, seed: int = 0
) -> np.ndarray:
    """Each run trains on a random subset of ``subset_size`` examples for ``epochs`` shuffled
    epochs (the GPTfluence scheme). The run is chopped into batches of ``batch_size``; the last
    batch is padded with ``-1``. Returns ``int64[runs, ceil(subset_size*epochs/batch_size), batch_size]``.
    """
    if not 1 <= subset_size <= n:
        raise CurriculumError(f"subset_size must lie in 1..{n} (the training set), got {subset_size}")
    if epochs < 1:
        raise CurriculumError(f"epochs must be at least 1, got {epochs}")
    _check_sizes(n, runs, 1, batch_size)
    rng = np.random.default_rng(seed)
    length = subset_size * epochs
    steps = -(-length // batch_size)
    out = np.full((runs, steps * batch_size), PAD, dtype=np.int64)
    for r in range(runs):
        subset = rng.choice(n, subset_size, replace=False)
        out[r, :length] = np.concatenate([rng.permutation(subset) for _ in range(epochs)])
    return out.reshape(runs, steps, batch_size)


def from_list(curricula: list, n: int) -> np.ndarray:
    """Explicit curricula from nested lists ``[run][step][position]``; ragged batches are
    padded with ``-1``. Ids are checked against ``0..n-1``. Returns ``int64[R, T, b]``."""
    if not curricula:
        raise CurriculumError("the curriculum list is empty")
    steps = {len(run) for run in curricula}
    if len(steps) != 1 or 0 in steps:
        raise CurriculumError(f"every run must have the same positive number of steps, got {sorted(steps)}")
    width = max(len(batch) for run in curricula for batch in run)
    out = np.full((len(curricula), steps.pop(), width), PAD, dtype=np.int64)
    for r, run in enumerate(curricula):
        for t, batch in enumerate(run):
            out[r, t, : len(batch)] = batch
    check_ids(out, n)
    return out


def load(path: str | Path, n: int) -> np.ndarray:
    """Curricula from a file: ``.json`` (nested lists as in :func:`from_list`, or one run as
    ``[step][position]``), ``.npy`` (``int[R, T, b]`` or ``int[T, b]``, no pickles), or
    ``.csv`` with columns ``run, step, position, example_id`` (steps counted from 1)."""
    path = Path(path)
    if not path.is_file():
        raise CurriculumError(f"curriculum file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
                raise CurriculumError(f"expected nested lists ([run][step][position] or [step][position]), "
                                      f"got {type(data).__name__}")
            if data and data[0] and not isinstance(data[0][0], list):
                data = [data]
            return from_list(data, n)
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            array = array[None] if array.ndim == 2 else array
            if array.ndim != 3:
                raise CurriculumError(f"{path}: expected an array [R, T, b] or [T, b], got {array.shape}")
            check_ids(array.astype(np.int64), n)
            return array.astype(np.int64)
        if suffix == ".csv":
            return _load_csv(path, n)
    except (json.JSONDecodeError, ValueError, TypeError) as error:
        if isinstance(error, CurriculumError):
            raise CurriculumError(f"{path}: {error}") from None
        raise CurriculumError(f"{path}: cannot read a curriculum: {error}") from None
    raise CurriculumError(f"{path}: unknown curriculum format {suffix!r} (use .json, .npy or .csv)")


def _load_csv(path: Path, n: int) -> np.ndarray:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        need = {"run", "step", "position", "example_id"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise CurriculumError(f"columns must include {sorted(need)}, got {reader.fieldnames}")
        rows = np.array([[int(row[c]) for c in ("run", "step", "position", "example_id")] for row in reader])
    if rows.size == 0:
        raise CurriculumError("the file has no rows")
    runs = np.unique(rows[:, 0], return_inverse=True)[1]
    if rows[:, 1].min() < 1 or rows[:, 2].min() < 0:
        raise CurriculumError("steps count from 1 and positions from 0")
    out = np.full((runs.max() + 1, rows[:, 1].max(), rows[:, 2].max() + 1), PAD, dtype=np.int64)
    out[runs, rows[:, 1] - 1, rows[:, 2]] = rows[:, 3]
    check_ids(out, n)
    return out


def check_ids(batches: np.ndarray, n: int) -> None:
    """Raise :class:`CurriculumError` naming the first id outside ``0..n-1`` (``-1`` pads)."""
    bad = (batches < PAD) | (batches >= n)
    if bad.any():
        index = tuple(int(v) for v in np.argwhere(bad)[0])
        raise CurriculumError(
            f"unknown training id {int(batches[index])} at (run, step index, position) {index}; "
            f"ids must lie in 0..{n - 1}"
        )


def _check_sizes(n: int, runs: int, steps: int, batch_size: int) -> None:
    if n < 1:
        raise CurriculumError(f"the training set is empty (n = {n})")
    if runs < 1 or steps < 1:
        raise CurriculumError(f"need at least one run and one step, got runs={runs}, steps={steps}")
    if not 1 <= batch_size <= n:
        raise CurriculumError(f"batch size {batch_size} must lie in 1..{n} (the training set size)")


# ---- edits of one curriculum int64[T, b] -------------------------------------------------


def _one(curriculum: np.ndarray) -> np.ndarray:
    array = np.array(curriculum, dtype=np.int64)
    if array.ndim != 2:
        raise CurriculumError(f"an edit takes one run's curriculum [T, b], got shape {array.shape}")
    return array


def _step_index(curriculum: np.ndarray, step: int) -> int:
    if not 1 <= step <= curriculum.shape[0]:
        raise CurriculumError(f"step {step} is outside 1..{curriculum.shape[0]}")
    return step - 1


def remove(curriculum: np.ndarray, example_ids: list[int] | np.ndarray) -> np.ndarray:
    """Drop every occurrence of these examples; their batches become smaller (padded)."""
    out = _one(curriculum)
    out[np.isin(out, np.asarray(example_ids))] = PAD
    return _compact(out)


def insert(curriculum: np.ndarray, example_id: int, step: int) -> np.ndarray:
    """Add ``example_id`` to the batch of update ``step`` (1-based), widening if needed."""
    out = _one(curriculum)
    t = _step_index(out, step)
    free = np.flatnonzero(out[t] == PAD)
    if free.size == 0:
        out = np.concatenate([out, np.full((out.shape[0], 1), PAD, dtype=np.int64)], axis=1)
        free = np.array([out.shape[1] - 1])
    out[t, free[0]] = example_id
    return out


def repeat(curriculum: np.ndarray, example_id: int, times: int, seed: int = 0) -> np.ndarray:
    """Make ``example_id`` appear ``times`` times in total: extra copies go to random steps
    without it (seeded); surplus occurrences are removed from the end."""
    if times < 0:
        raise CurriculumError(f"times must be non-negative, got {times}")
    out = _one(curriculum)
    where = np.argwhere(out == example_id)
    if len(where) >= times:
        for t, p in where[times:]:
            out[t, p] = PAD
        return _compact(out)
    rng = np.random.default_rng(seed)
    without = [t for t in range(out.shape[0]) if example_id not in out[t]]
    needed = times - len(where)
    if needed > len(without):
        raise CurriculumError(f"cannot place {needed} more copies of {example_id} in {len(without)} free steps")
    for t in np.sort(rng.choice(without, needed, replace=False)):
        out = insert(out, example_id, int(t) + 1)
    return out


def move(curriculum: np.ndarray, example_id: int, to_step: int) -> np.ndarray:
    """Move every occurrence of ``example_id`` to update ``to_step`` (1-based)."""
    out = _one(curriculum)
    occurrences = int((out == example_id).sum())
    if occurrences == 0:
        raise CurriculumError(f"example {example_id} is not in this curriculum")
    _step_index(out, to_step)
    out = remove(out, [example_id])
    for _ in range(occurrences):
        out = insert(out, example_id, to_step)
    return out


def reorder(curriculum: np.ndarray, order: list[int] | np.ndarray) -> np.ndarray:
    """Permute the batches: new update t uses old update ``order[t-1]`` (1-based steps)."""
    out = _one(curriculum)
    order = np.asarray(order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(1, out.shape[0] + 1)):
        raise CurriculumError(f"order must be a permutation of the steps 1..{out.shape[0]}")
    return out[order - 1]


def swap(curriculum: np.ndarray, step_a: int, step_b: int) -> np.ndarray:
    """Exchange the batches of two updates (1-based)."""
    out = _one(curriculum)
    a, b = _step_index(out, step_a), _step_index(out, step_b)
    out[[a, b]] = out[[b, a]]
    return out


def replace_batch(curriculum: np.ndarray, step: int, example_ids: list[int]) -> np.ndarray:
    """Replace the batch of update ``step`` (1-based) by ``example_ids``."""
    out = _one(curriculum)
    t = _step_index(out, step)
    if len(example_ids) > out.shape[1]:
        pad = np.full((out.shape[0], len(example_ids) - out.shape[1]), PAD, dtype=np.int64)
        out = np.concatenate([out, pad], axis=1)
    out[t] = PAD
    out[t, : len(example_ids)] = example_ids
    return out


def _compact(curriculum: np.ndarray) -> np.ndarray:
    """Move padding to the end of each batch (ids keep their order)."""
    order = np.argsort(curriculum == PAD, axis=1, kind="stable")
    return np.take_along_axis(curriculum, order, axis=1)


# ---- coverage ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """How often each training example appears. ``occurrences``: ``int64[n]`` over all runs
    and steps; ``runs_with``: ``int64[n]`` number of runs that contain it."""

    occurrences: np.ndarray
    runs_with: np.ndarray

    def rare(self, min_occurrences: int) -> np.ndarray:
        """Ids that appear fewer than ``min_occurrences`` times in all."""
        return np.flatnonzero(self.occurrences < min_occurrences)


def coverage(batches: np.ndarray, n: int, min_occurrences: int = 5) -> Coverage:
    """Coverage of ``int[R, T, b]`` curricula over ``n`` training examples; warns when some
    example appears fewer than ``min_occurrences`` times (its parameters are then mostly the
    penalty's prior, not the data's)."""
    batches = np.asarray(batches, dtype=np.int64)
    check_ids(batches, n)
    valid = batches[batches != PAD]
    occurrences = np.bincount(valid, minlength=n)
    runs_with = np.zeros(n, dtype=np.int64)
    for run in batches:
        runs_with[np.unique(run[run != PAD])] += 1
    result = Coverage(occurrences, runs_with)
    rare = result.rare(min_occurrences)
    if rare.size:
        shown = ", ".join(str(i) for i in rare[:10]) + (" ..." if rare.size > 10 else "")
        warnings.warn(
            f"{rare.size} training examples appear fewer than {min_occurrences} times "
            f"(ids {shown}); their fitted effects are unreliable: collect more runs",
            stacklevel=2,
        )
    return result
