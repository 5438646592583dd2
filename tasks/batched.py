"""K training runs of one experiment at once, with exactly the losses of K separate runs.

The K runs' trainable parameters are stacked along a new first axis (``[K, ...]`` per
parameter) and the model runs as a pure function of them under ``torch.func.vmap``
(:class:`~simfluence_platform.tasks.functional.FunctionalModel`): one vectorised forward and
backward pass trains all K on their own batches, and one vectorised pass evaluates all K on the
test examples. The frozen parameters, the cached frozen prefix and the tokenised data are
shared. The optimizer (AdamW or SGD) is elementwise, so one optimizer over the stacked tensors
updates each run's slice exactly as that run's own optimizer would (same step count, bias
correction and decoupled weight decay for all: the runs of one experiment share their
learning-rate schedule and number of updates).

Why the losses are a separate run's: run k's loss depends on its slice of the parameters
only, so the gradient of the sum of the K runs' mean batch losses is, slice by slice, each run's
own gradient. Training has no randomness with dropout off (which the config requires for
``parallel_runs > 1``), so the per-run seed plays no part. The remaining difference is the order
of floating-point operations in the batched kernels (about 1e-7 relative per step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.func import vmap

from simfluence_platform.storage.shards import LossShardWriter
from simfluence_platform.tasks.functional import stack_rows
from simfluence_platform.tasks.training import RunOutcome, Trainer, adam_step_scale, finish_run, set_learning_rate


class BatchedTrainer:
    """Trains several runs of one experiment together on a loaded :class:`Trainer` (its model,
    data and frozen-prefix cache are shared; its own runs still work alongside)."""

    def __init__(self, trainer: Trainer) -> None:
        if trainer.config.training.dropout:
            raise ValueError("training.dropout: batched runs cannot reproduce each run's dropout masks")
        self.trainer = trainer
        self.functional = trainer.functional
        self.initial = {name: trainer.initial_state[name] for name in self.functional.names}  # a copy nothing changes
        self.test_mask = self.functional.mask(trainer.test_data.attention_mask)
        self.test_loss = vmap(self.functional.losses, in_dims=(0, None, None, None, None))
        self.stacked: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def run_parameters(self, run: int) -> dict[str, torch.Tensor]:
        """Run ``run``'s (index in the current batch) trainable parameters, detached views."""
        return {name: p[run].detach() for name, p in self.stacked.items()}

    def adam_preconditioner(self, run: int) -> torch.Tensor | None:
        """``float[p]`` Adam's step scale of run ``run`` (see :meth:`Trainer.adam_preconditioner`)."""
        return adam_step_scale(self.trainer.config, self.optimizer, list(self.stacked.values()), run)

    @torch.no_grad()
    def evaluate(self) -> np.ndarray:
        """``float64[K, m]`` loss of every test example under each run's current weights."""
        trainer, data = self.trainer, self.trainer.test_data
        trainer.model.eval()
        size = trainer.config.training.eval_batch_size
        parts = []
        for start in range(0, len(data), size):
            rows = slice(start, min(start + size, len(data)))
            prefix = None if data.prefix is None else data.prefix[rows]
            parts.append(self.test_loss(self.stacked, data.input_ids[rows], self.test_mask[rows], data.labels[rows], prefix))
        return torch.cat(parts, dim=1).double().cpu().numpy()

    def run(self, curricula: Sequence[np.ndarray], writers: Sequence[LossShardWriter | None] | None = None,
            on_step: Callable[[int], None] | None = None) -> list[RunOutcome]:
        """Train ``len(curricula)`` runs from the initial weights, run k on ``curricula[k]``
        (``int[T, b]``, -1 pads, the same shape for all). Streams run k's losses to
        ``writers[k]`` and completes or fails it; a run whose loss turns non-finite ends alone,
        the others go on. ``on_step(t)`` as in :meth:`Trainer.run` (while any run is alive)."""
        trainer = self.trainer
        batches = np.stack([np.asarray(c) for c in curricula])  # [K, T, b]; raises on unequal shapes
        K, T = batches.shape[0], batches.shape[1]
        writers = list(writers) if writers is not None else [None] * K
        self.stacked = {name: value.unsqueeze(0).repeat(K, *([1] * value.dim())).requires_grad_()
                        for name, value in self.initial.items()}
        self.optimizer = trainer.make_optimizer(list(self.stacked.values()))
        rates = trainer.learning_rate_schedule(T)
        losses = np.full((K, T + 1, len(trainer.test_data)), np.nan)
        failures: list[str | None] = [None] * K
        prefix_dim = None if trainer.train_data.prefix is None else 0
        train_loss = vmap(self.functional.losses, in_dims=(0, 0, 0, 0, prefix_dim))
        data = trainer.train_data
        b = batches.shape[2]
        shaped = lambda x: None if x is None else x.reshape(K, b, *x.shape[1:])  # noqa: E731

        def record(step: int) -> None:
            start = time.perf_counter()
            values = self.evaluate()
            trainer.timings.evaluate += time.perf_counter() - start
            start = time.perf_counter()
            for k in range(K):
                if failures[k]:
                    continue
                losses[k, step] = values[k]
                if not np.all(np.isfinite(values[k])):
                    failures[k] = f"test loss became non-finite at step {step}"
                elif writers[k] is not None:
                    writers[k].log(step, values[k])
            trainer.timings.log += time.perf_counter() - start

        record(0)
        if on_step is not None and not all(failures):
            on_step(0)
        for step in range(1, T + 1):
            if all(failures):
                break
            start = time.perf_counter()
            rows, weights = stack_rows(data, batches[:, step - 1])
            set_learning_rate(self.optimizer, rates[step - 1])
            mask = self.functional.mask(rows.attention_mask)
            per_example = train_loss(self.stacked, shaped(rows.input_ids), shaped(mask), shaped(rows.labels),
                                     shaped(rows.prefix))
            per_run = (per_example * weights).sum(dim=1) / weights.sum(dim=1)  # each run's mean batch loss
            for k in np.flatnonzero(~torch.isfinite(per_run).cpu().numpy()):
                failures[k] = failures[k] or f"training loss became non-finite at update {step}"
            self.optimizer.zero_grad(set_to_none=True)
            per_run.sum().backward()  # slice k of each gradient is run k's own
            self.optimizer.step()
            trainer.timings.train += time.perf_counter() - start
            trainer.timings.steps += K
            record(step)
            if on_step is not None:
                on_step(step)
        return [finish_run(writers[k], failures[k], losses[k], rates) for k in range(K)]
