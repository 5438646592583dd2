"""Gradient checkpoints: the documented input of the TracIn-CP and influence-function simulators.

Produced by a reference training run (the training-runs code) and stored as one ``.npz``
file (no pickles). With K checkpoints, n training and m test examples, d (projected)
gradient dimensions and T updates:

- ``steps``: ``int64[K]`` number of updates done when each checkpoint was taken, increasing.
- ``learning_rates``: ``float64[T]`` learning rate of update t at index t-1.
- ``train_grads``: ``float[K, n, d]`` per-example gradients of the training loss.
- ``test_grads``: ``float[K, m, d]`` per-example gradients of the test losses.
- ``batch_size``: training batch size (the batch loss is a mean, so one example moves the
  weights by lr / b times its gradient).
- ``curvature`` (optional): ``float[K, d, d]`` damped Gauss-Newton matrices on the same
  projection; when absent, the empirical Fisher ``G^T G / n`` of the training gradients.
- ``train_grads_preconditioned`` (optional, training with Adam): ``float[K, n, d]`` the
  training gradients multiplied elementwise by Adam's step scale ``1 / (sqrt(v_hat) + eps)``
  of the reference run at the checkpoint, then projected: ``<g_i * P, g_j>`` is then the
  first-order change of test loss j per unit learning rate that example i causes under Adam
  (its momentum aside).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simfluence.errors import SimfluenceError
from simfluence.runset import RunSet


class GradientError(SimfluenceError):
    """Raised for malformed or mismatched gradient checkpoints."""


OPTIONAL_ARRAYS = ("curvatures", "train_grads_preconditioned")


@dataclass(frozen=True)
class GradientCheckpoints:
    steps: np.ndarray
    learning_rates: np.ndarray
    train_grads: np.ndarray
    test_grads: np.ndarray
    batch_size: int
    curvatures: np.ndarray | None = None
    train_grads_preconditioned: np.ndarray | None = None

    def __post_init__(self) -> None:
        steps = np.asarray(self.steps, dtype=np.int64)
        train, test = np.asarray(self.train_grads), np.asarray(self.test_grads)
        if train.ndim != 3 or test.ndim != 3:
            raise GradientError(f"train_grads and test_grads must be [K, n, d] and [K, m, d], got {train.shape}, {test.shape}")
        K, d = train.shape[0], train.shape[2]
        if steps.shape != (K,) or test.shape[0] != K or test.shape[2] != d:
            raise GradientError(f"steps {steps.shape}, train_grads {train.shape} and test_grads {test.shape} disagree on K or d")
        if K == 0 or np.any(np.diff(steps) <= 0) or steps[0] < 0:
            raise GradientError(f"steps must be non-negative and strictly increasing, got {steps.tolist()}")
        for name, array in (("train_grads", train), ("test_grads", test), ("learning_rates", self.learning_rates)):
            if not np.all(np.isfinite(array)):
                raise GradientError(f"{name} has NaN or infinite values")
        if self.batch_size < 1:
            raise GradientError(f"batch_size must be positive, got {self.batch_size}")
        pre = self.train_grads_preconditioned
        if pre is not None and (np.asarray(pre).shape != train.shape or not np.all(np.isfinite(pre))):
            raise GradientError(f"train_grads_preconditioned must be finite and shaped like train_grads {train.shape}")
        if self.curvatures is not None and np.asarray(self.curvatures).shape != (K, d, d):
            raise GradientError(f"curvatures must be [K, d, d] = [{K}, {d}, {d}], got {np.asarray(self.curvatures).shape}")
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "learning_rates", np.asarray(self.learning_rates, dtype=np.float64))

    def check_matches(self, runs: RunSet) -> None:
        """Raise unless the gradients cover the runs' n training and m test examples."""
        n, m = self.train_grads.shape[1], self.test_grads.shape[1]
        if n != runs.n_train or m != runs.n_tests:
            raise GradientError(
                f"gradients are for n={n} training and m={m} test examples, the runs have "
                f"n={runs.n_train} and m={runs.n_tests}"
            )

    def dots(self, preconditioned: bool = False) -> np.ndarray:
        """``float64[K, n, m]`` gradient inner products <g_i, g_j> at each checkpoint (with
        ``preconditioned``, <g_i * P, g_j> where Adam's step scale P is stored, else plain)."""
        train = self.train_grads
        if preconditioned and self.train_grads_preconditioned is not None:
            train = self.train_grads_preconditioned
        return np.einsum("knd,kmd->knm", np.asarray(train, dtype=np.float64), np.asarray(self.test_grads, dtype=np.float64))

    def select_checkpoints(self, index: list[int] | np.ndarray) -> GradientCheckpoints:
        """The same gradients at a subset of the checkpoints (positions, not steps)."""
        index = np.asarray(index, dtype=np.int64)
        pick = lambda a: None if a is None else np.asarray(a)[index]  # noqa: E731
        return GradientCheckpoints(self.steps[index], self.learning_rates, pick(self.train_grads),
                                   pick(self.test_grads), self.batch_size, pick(self.curvatures),
                                   pick(self.train_grads_preconditioned))

    def curvature(self, k: int) -> np.ndarray:
        """``float64[d, d]`` curvature at checkpoint k (empirical Fisher if none was stored)."""
        if self.curvatures is not None:
            return np.asarray(self.curvatures[k], dtype=np.float64)
        grads = np.asarray(self.train_grads[k], dtype=np.float64)
        return grads.T @ grads / grads.shape[0]

    def save(self, path: str | Path) -> None:
        arrays = {
            "steps": self.steps,
            "learning_rates": self.learning_rates,
            "train_grads": self.train_grads,
            "test_grads": self.test_grads,
            "batch_size": np.asarray(self.batch_size),
        }
        if self.curvatures is not None:
            arrays["curvatures"] = self.curvatures
        if self.train_grads_preconditioned is not None:
            arrays["train_grads_preconditioned"] = self.train_grads_preconditioned
        # which optional arrays the file holds, so that a damaged zip index cannot drop one unseen
        arrays["optional"] = np.array([name for name in OPTIONAL_ARRAYS if name in arrays], dtype="U32")
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> GradientCheckpoints:
        """The checkpoints :meth:`save` wrote to ``path``; :class:`GradientError` naming the file
        when it is missing, truncated, corrupt (the zip's CRC catches changed bytes) or malformed."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = set(data["optional"].tolist()) - set(data.files) if "optional" in data else set()
                if missing:
                    raise KeyError(f"arrays {sorted(missing)} are listed but absent")
                return cls(
                    data["steps"], data["learning_rates"], data["train_grads"], data["test_grads"],
                    int(data["batch_size"]), data["curvatures"] if "curvatures" in data else None,
                    data["train_grads_preconditioned"] if "train_grads_preconditioned" in data else None,
                )
        except GradientError as error:
            raise GradientError(f"{path}: {error}") from None
        except (OSError, KeyError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile) as error:
            raise GradientError(f"{path}: not a gradient checkpoint file: {error}") from None
