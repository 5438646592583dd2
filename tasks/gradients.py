"""Gradient checkpoints of a reference run: the input of TracIn-CP and influence functions.

At the configured steps of a reference run (run ``gradients.reference_run``'s curriculum), the
per-example gradient of every training and test loss with respect to the trainable parameters
is computed and projected to ``projection_dim`` dimensions with a CountSketch (each parameter
goes to one of d buckets with a random sign, seeded: inner products are preserved in
expectation, at O(parameters) per example). The curvature at each checkpoint is the
Gauss-Newton matrix on the same projection: for classification it equals the Fisher
information and is estimated with one label sampled from the model per training example; for
causal LM the empirical Fisher of the training gradients is used.

The checkpoints are taken by :class:`GradientRecorder`, the trainer's step hook, while the
reference run trains: during its own collection, in process or on its train-run worker (no
second training run), or, when that run was collected earlier without them, by training it
again. Per-example gradients are computed with ``torch.func`` (``vmap`` of ``grad`` over the
examples of a chunk, on the model's device) and projected there; the loop of single backward
passes remains for prompt tuning (which the functional model does not support) and as the
reference the vectorised one is tested against.

When the experiment trains with AdamW, the training gradients are also stored multiplied by
Adam's per-parameter step scale ``1 / (sqrt(v_hat) + eps)`` of the reference run at the
checkpoint (before projection): the Adam-aware TracIn-CP and the gradient prior of the
momentum-aware Simfluence use them. At step 0 Adam has no state yet; the scale of its first
update is used, ``1 / (|g| + eps)`` with g the first batch's gradient (exactly Adam's v_hat after
one update).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.func import grad, vmap

from simfluence.gradients import GradientCheckpoints
from simfluence_platform.tasks.config import ExperimentConfig
from simfluence_platform.tasks.model import Encoded
from simfluence_platform.tasks.runs import curriculum_for_run, run_seed
from simfluence_platform.tasks.training import RunOutcome, Trainer

# Per-example gradients held at once by the vectorised path: chunk * parameters * 4 bytes.
CHUNK_BYTES = 2**28


class CountSketch:
    """Projection of flat gradients ``float[c, p]`` to ``float32[c, d]`` on ``device``; identity
    when d is 0 or >= p. The buckets and signs are drawn on the CPU (the same on every device)."""

    def __init__(self, size: int, dim: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.identity = dim == 0 or dim >= size
        self.dim = size if self.identity else dim
        if not self.identity:
            generator = torch.Generator().manual_seed(seed)
            self.bucket = torch.randint(0, dim, (size,), generator=generator).to(device)
            self.sign = (torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1).to(device)

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        flat = flat.detach().float()
        if self.identity:
            return flat
        out = torch.zeros(flat.shape[0], self.dim, device=flat.device)
        return out.index_add_(1, self.bucket, flat * self.sign)


def vectorised(trainer: Trainer) -> bool:
    """Whether per-example gradients can be taken with ``torch.func`` (all but prompt tuning)."""
    return trainer.config.training.method != "prompt_tuning"


def _flat_grad(trainer: Trainer) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in trainer.parameters])


def loop_gradients(trainer: Trainer, data: Encoded) -> Iterator[torch.Tensor]:
    """``float[1, p]`` gradient of each example's loss under the live weights, one backward pass
    each (eval mode)."""
    trainer.model.eval()
    for i in range(len(data)):
        trainer.model.zero_grad(set_to_none=True)
        trainer.loss(data.rows(torch.tensor([i], device=trainer.device)))[0].backward()
        yield _flat_grad(trainer)[None]
    trainer.model.zero_grad(set_to_none=True)


def vmap_gradients(trainer: Trainer, data: Encoded, params: dict[str, torch.Tensor] | None = None
                   ) -> Iterator[torch.Tensor]:
    """``float[c, p]`` gradients of the examples of each chunk under ``params`` (default: the
    live weights), in one ``vmap(grad)`` pass per chunk (eval mode)."""
    functional = trainer.functional
    params = functional.parameters() if params is None else params
    trainer.model.eval()

    def one(params, input_ids, mask, labels, prefix):
        return functional.losses(params, input_ids[None], mask[None], labels[None],
                                 None if prefix is None else prefix[None])[0]

    per_example = vmap(grad(one), in_dims=(None, 0, 0, 0, None if data.prefix is None else 0))
    chunk = max(1, min(trainer.config.training.eval_batch_size, CHUNK_BYTES // (4 * trainer.n_trainable)))
    for start in range(0, len(data), chunk):
        rows = data.rows(torch.arange(start, min(start + chunk, len(data)), device=trainer.device))
        grads = per_example(params, rows.input_ids, functional.mask(rows.attention_mask), rows.labels, rows.prefix)
        yield torch.cat([grads[name].reshape(len(rows), -1) for name in functional.names], dim=1)


def example_gradients(trainer: Trainer, data: Encoded, params: dict[str, torch.Tensor] | None = None,
                      loop: bool = False) -> Iterator[torch.Tensor]:
    """Per-example gradients in chunks ``float[c, p]`` (see :func:`vmap_gradients`); the loop of
    single backward passes with ``loop`` or for prompt tuning (live weights only)."""
    if loop or not vectorised(trainer):
        if params is not None:
            raise ValueError("per-example gradients of other than the live weights need the vectorised path")
        return loop_gradients(trainer, data)
    return vmap_gradients(trainer, data, params)


@torch.no_grad()
def sampled_labels(trainer: Trainer, data: Encoded, generator: torch.Generator,
                   params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``int64[k]`` one label per example drawn from the model's predicted distribution
    (classification; eval mode), under ``params`` (default: the live weights)."""
    trainer.model.eval()
    size = trainer.config.training.eval_batch_size
    parts = []
    for start in range(0, len(data), size):
        rows = data.rows(torch.arange(start, min(start + size, len(data)), device=trainer.device))
        if params is None:
            parts.append(trainer.logits(rows).float())
        else:
            functional = trainer.functional
            parts.append(functional.logits(params, rows.input_ids, functional.mask(rows.attention_mask),
                                           rows.prefix).float())
    probabilities = torch.softmax(torch.cat(parts), -1).cpu()
    return torch.multinomial(probabilities, 1, generator=generator)[:, 0].to(trainer.device)


def projected_gradients(trainer: Trainer, data: Encoded, sketch: CountSketch,
                        preconditioner: torch.Tensor | None = None, params: dict[str, torch.Tensor] | None = None,
                        loop: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``float32[k, d]`` projected gradient of each example's loss (eval mode) under ``params``
    (default: the live weights), and the same gradients multiplied by ``preconditioner``
    (``float[p]``) before projection (``None`` without one). ``loop``: one backward pass per
    example instead of the vectorised pass."""
    out, scaled = [], []
    for flat in example_gradients(trainer, data, params, loop):
        out.append(sketch(flat).cpu())
        if preconditioner is not None:
            scaled.append(sketch(flat * preconditioner).cpu())
    return torch.cat(out).numpy(), (torch.cat(scaled).numpy() if preconditioner is not None else None)


def first_update_preconditioner(trainer: Trainer, first_batch: np.ndarray,
                                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Adam's step scale of the first update, ``1 / (|g| + eps)``, g the gradient of the mean
    loss of ``first_batch`` (``int[b]``, -1 pads) at ``params`` (default: the live weights), in
    training mode. The random state is restored after (dropout draws), so a run whose
    checkpoints are taken trains exactly as one whose are not."""
    ids = torch.as_tensor(first_batch[first_batch >= 0], device=trainer.device)
    rows = trainer.train_data.rows(ids)
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        trainer.model.train(trainer.config.training.dropout)
        if vectorised(trainer):
            functional = trainer.functional
            params = functional.parameters() if params is None else params
            mean = lambda p: functional.losses(p, rows.input_ids, functional.mask(rows.attention_mask),  # noqa: E731
                                               rows.labels, rows.prefix).mean()
            gradient = grad(mean)(params)
            flat = torch.cat([gradient[name].reshape(-1) for name in functional.names])
        else:
            trainer.model.zero_grad(set_to_none=True)
            trainer.loss(rows).mean().backward()
            flat = _flat_grad(trainer).detach()
            trainer.model.zero_grad(set_to_none=True)
    return 1.0 / (flat.abs() + trainer.config.training.eps)


class GradientRecorder:
    """The step hook that takes a run's gradient checkpoints at ``gradients.checkpoint_steps``
    while it trains (``on_step`` of :meth:`Trainer.run`; of :meth:`BatchedTrainer.run` with
    ``batched`` and the run's index ``run`` in its batch).

    At each checkpoint: projected per-example gradients of every training and test example,
    the Adam-preconditioned training gradients (AdamW), and the curvature (see the module).
    It leaves the run's weights, optimizer and random state as it found them.
    """

    def __init__(self, config: ExperimentConfig, trainer: Trainer, first_batch: np.ndarray, batched=None,
                 run: int = 0, loop: bool = False) -> None:
        """``first_batch``: ``int[b]`` the reference run's first batch (-1 pads)."""
        self.config, self.trainer, self.batched, self.run, self.loop = config, trainer, batched, run, loop
        g = config.gradients
        self.steps = sorted(g.checkpoint_steps)
        self.sketch = CountSketch(trainer.n_trainable, g.projection_dim, g.seed, trainer.device)
        self.first_batch = first_batch
        self.adam = config.training.optimizer == "adamw"
        self.train_grads: list[np.ndarray] = []
        self.test_grads: list[np.ndarray] = []
        self.preconditioned: list[np.ndarray | None] = []
        self.curvatures: list[np.ndarray] = []

    def __call__(self, step: int) -> None:
        if step not in self.steps:
            return
        trainer, g = self.trainer, self.config.gradients
        params = None if self.batched is None else self.batched.run_parameters(self.run)
        scale = None
        if self.adam:
            scale = (first_update_preconditioner(trainer, self.first_batch, params) if step == 0 else
                     trainer.adam_preconditioner() if self.batched is None else
                     self.batched.adam_preconditioner(self.run))
        train, train_scaled = projected_gradients(trainer, trainer.train_data, self.sketch, scale, params, self.loop)
        self.train_grads.append(train)
        self.preconditioned.append(train_scaled)
        self.test_grads.append(projected_gradients(trainer, trainer.test_data, self.sketch, None, params, self.loop)[0])
        if self.config.model.task == "classification":
            generator = torch.Generator().manual_seed(g.seed + len(self.curvatures))
            labels = sampled_labels(trainer, trainer.train_data, generator, params)
            fisher = projected_gradients(trainer, trainer.train_data.with_labels(labels), self.sketch, None, params,
                                         self.loop)[0]
        else:
            fisher = train
        self.curvatures.append(fisher.T.astype(np.float64) @ fisher / len(fisher))

    def result(self, outcome: RunOutcome) -> GradientCheckpoints:
        """The checkpoints of the run that ended with ``outcome`` (which must be complete)."""
        if outcome.status != "complete":
            raise RuntimeError(f"the gradient reference run failed: {outcome.reason}")
        return GradientCheckpoints(np.array(self.steps), outcome.learning_rates, np.stack(self.train_grads),
                                   np.stack(self.test_grads), batch_size=self.config.training.batch_size,
                                   curvatures=np.stack(self.curvatures).astype(np.float32),
                                   train_grads_preconditioned=np.stack(self.preconditioned) if self.adam else None)


def gradient_checkpoints(config: ExperimentConfig, trainer: Trainer, loop: bool = False) -> GradientCheckpoints:
    """Train the reference run (again) and take its gradient checkpoints; for an experiment
    whose reference run was collected without them (collection takes them in-run)."""
    reference = config.gradients.reference_run
    batches = curriculum_for_run(config, reference)
    recorder = GradientRecorder(config, trainer, batches[0], loop=loop)
    return recorder.result(trainer.run(batches, run_seed(config, reference), on_step=recorder))
