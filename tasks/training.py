"""One fine-tuning run on a curriculum, streaming every test example's loss after every update.

A :class:`Trainer` loads the model once per process, tokenises every example once, and keeps
the initial weights in memory; each run resets to them (tens of milliseconds) rather than
reloading from disk. Losses of all test examples are evaluated before training and after each
update (eval mode, no grad, batched, ``reduction="none"``) and handed to a
:class:`~storage.shards.LossShardWriter`. A non-finite training or test loss ends the run as
failed, with its reason.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from simfluence_platform.storage.shards import LossShardWriter
from simfluence_platform.tasks.config import ExperimentConfig
from simfluence_platform.tasks.data import Examples
from simfluence_platform.tasks.model import Encoded, FrozenPrefix, encode, load_model, per_example_loss, resolve_device


@dataclass
class StepTimings:
    """Seconds spent in each part of the runs of a trainer (accumulated)."""

    train: float = 0.0
    evaluate: float = 0.0
    log: float = 0.0
    steps: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"train_seconds": self.train, "eval_seconds": self.evaluate, "log_seconds": self.log, "steps": self.steps}


@dataclass
class RunOutcome:
    """``losses``: ``float64[T+1, m]`` as evaluated (rows after a failure are NaN);
    ``learning_rates``: ``float64[T]`` of each update."""

    status: str
    reason: str | None
    losses: np.ndarray
    learning_rates: np.ndarray = field(default_factory=lambda: np.zeros(0))


class Trainer:
    """Fine-tunes one configured model on curricula over one set of examples."""

    def __init__(self, config: ExperimentConfig, examples: Examples, cache_frozen: bool = True) -> None:
        """``cache_frozen``: compute frozen embeddings and lower layers once (see FrozenPrefix)."""
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
        self.config = config
        self.task = config.model.task
        self.device = resolve_device(config.device)
        self.model, self.tokenizer = load_model(config, len(examples.labels))
        self.model.to(self.device)
        self.autocast = self.device.type == "cuda" and config.dtype == "bfloat16"
        args = (self.tokenizer, self.task, config.model.max_length, examples.labels)
        self.train_data: Encoded = encode(examples.train, *args).to(self.device)
        self.test_data: Encoded = encode(examples.test, *args).to(self.device)
        self.prefix = FrozenPrefix.install(self.model, config) if cache_frozen else None
        if self.prefix is not None:
            size = config.training.eval_batch_size
            self.train_data.prefix = self.prefix.compute(self.train_data, size)
            self.test_data.prefix = self.prefix.compute(self.test_data, size)
            self.prefix.swap()
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("training: every parameter is frozen; nothing would be trained")
        self.timings = StepTimings()

    @functools.cached_property
    def functional(self):
        """The model as a pure function of its trainable parameters (:mod:`.functional`)."""
        from simfluence_platform.tasks.functional import FunctionalModel

        return FunctionalModel(self)

    @functools.cached_property
    def batched(self):
        """This trainer's :class:`~.batched.BatchedTrainer` (several runs at once), built once:
        a collection trains group after group on it."""
        from simfluence_platform.tasks.batched import BatchedTrainer

        return BatchedTrainer(self)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def reset(self) -> None:
        """Back to the initial weights."""
        self.model.load_state_dict(self.initial_state)

    def logits(self, batch: Encoded) -> torch.Tensor:
        """The model's logits for a batch (from the cached prefix when there is one)."""
        if self.prefix is not None:
            self.prefix.stub.values = batch.prefix
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def loss(self, batch: Encoded) -> torch.Tensor:
        """``float[k]`` per-example loss of a batch under the current weights."""
        return per_example_loss(self.logits(batch), batch, self.task)

    @torch.no_grad()
    def evaluate(self) -> np.ndarray:
        """``float64[m]`` loss of every test example under the current weights."""
        self.model.eval()
        size = self.config.training.eval_batch_size
        parts = [self.loss(self.test_data.rows(torch.arange(s, min(s + size, len(self.test_data)))))
                 for s in range(0, len(self.test_data), size)]
        return torch.cat(parts).double().cpu().numpy()

    def make_optimizer(self, parameters: list[torch.Tensor] | None = None) -> torch.optim.Optimizer:
        """The configured optimizer (fresh state) over ``parameters`` (default: the trainable
        parameters). Every optimizer here is elementwise, so it may also be handed K runs'
        parameters stacked along a new first axis: each run's slice is updated exactly as alone."""
        t = self.config.training
        parameters = self.parameters if parameters is None else parameters
        if t.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=t.learning_rate, betas=tuple(t.betas), eps=t.eps,
                                     weight_decay=t.weight_decay)
        return torch.optim.SGD(parameters, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay)

    def adam_preconditioner(self) -> torch.Tensor | None:
        """``float[p]`` Adam's per-parameter step scale 1 / (sqrt(v_hat) + eps) of the current
        run's optimizer state (flat, in :attr:`parameters` order); ``None`` for SGD or before
        the first update."""
        return adam_step_scale(self.config, getattr(self, "optimizer", None), self.parameters)

    def learning_rate_schedule(self, steps: int) -> np.ndarray:
        """``float64[steps]``: the learning rate of each update."""
        t = self.config.training
        rates = np.full(steps, t.learning_rate)
        if t.warmup_steps:
            rates[: t.warmup_steps] *= np.arange(1, t.warmup_steps + 1) / t.warmup_steps
        if t.schedule == "linear":
            tail = np.arange(steps - t.warmup_steps)
            rates[t.warmup_steps:] *= 1.0 - tail / max(1, steps - t.warmup_steps)
        return rates

    def run(self, curriculum: np.ndarray, seed: int, writer: LossShardWriter | None = None,
            on_step=None) -> RunOutcome:
        """Train from the initial weights on ``curriculum`` (``int[T, b]``, -1 pads).

        Streams losses to ``writer`` (if given) and completes or fails it. ``on_step(t)`` is
        called once the losses of step ``t`` are recorded: at 0 before the first update, then
        after each update (progress reporting, gradient checkpoints).
        """
        curriculum = np.asarray(curriculum)
        T = curriculum.shape[0]
        self.reset()
        torch.manual_seed(seed)
        t = self.config.training
        optimiser = self.make_optimizer()
        self.optimizer = optimiser
        rates = self.learning_rate_schedule(T)
        losses = np.full((T + 1, len(self.test_data)), np.nan)

        def record(step: int) -> str | None:
            start = time.perf_counter()
            losses[step] = self.evaluate()
            self.timings.evaluate += time.perf_counter() - start
            if not np.all(np.isfinite(losses[step])):
                return f"test loss became non-finite at step {step}"
            start = time.perf_counter()
            if writer is not None:
                writer.log(step, losses[step])
            self.timings.log += time.perf_counter() - start
            return None

        failure = record(0)
        if on_step is not None and not failure:
            on_step(0)
        for step in range(1, T + 1):
            if failure:
                break
            start = time.perf_counter()
            ids = curriculum[step - 1]
            batch = self.train_data.rows(torch.as_tensor(ids[ids >= 0], device=self.device))
            self.model.train(t.dropout)
            set_learning_rate(optimiser, rates[step - 1])
            loss = self.loss(batch).mean()
            if not torch.isfinite(loss):
                failure = f"training loss became non-finite at update {step}"
                break
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            self.timings.train += time.perf_counter() - start
            self.timings.steps += 1
            failure = record(step)
            if on_step is not None:
                on_step(step)
        return finish_run(writer, failure, losses, rates)


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    """The learning rate of every parameter group for the next update."""
    for group in optimizer.param_groups:
        group["lr"] = rate


def finish_run(writer: LossShardWriter | None, failure: str | None, losses: np.ndarray,
               rates: np.ndarray) -> RunOutcome:
    """Complete (or fail, with ``failure``) the run's shards and return its outcome; ``losses``
    ``float64[T+1, m]`` (nats), ``rates`` ``float[T]``."""
    if writer is not None:
        writer.fail(failure) if failure else writer.complete()
    return RunOutcome("failed" if failure else "complete", failure, losses, rates)


def adam_step_scale(config: ExperimentConfig, optimizer: torch.optim.Optimizer | None, parameters: list[torch.Tensor],
                    run: int | None = None) -> torch.Tensor | None:
    """``float[p]`` Adam's step scale 1 / (sqrt(v_hat) + eps) of ``parameters`` (flat, in their
    order); with ``run``, of that run's slice of parameters stacked ``[K, ...]``. ``None`` for
    SGD or before the first update."""
    if not isinstance(optimizer, torch.optim.AdamW):
        return None
    beta2, eps = config.training.betas[1], config.training.eps
    parts = []
    for p in parameters:
        state = optimizer.state.get(p)
        if not state:
            return None
        v_hat = (state["exp_avg_sq"] if run is None else state["exp_avg_sq"][run]) / (1 - beta2 ** float(state["step"]))
        parts.append((1.0 / (v_hat.sqrt() + eps)).reshape(-1))
    return torch.cat(parts)
