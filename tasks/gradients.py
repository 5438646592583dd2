"""Gradient checkpoints of a reference run: the input of TracIn-CP and influence functions.

At the configured steps of a reference run (run ``gradients.reference_run``'s curriculum), the
per-example gradient of every training and test loss with respect to the trainable parameters
is computed and projected to ``projection_dim`` dimensions with a CountSketch (each parameter
goes to one of d buckets with a random sign, seeded: inner products are preserved in
expectation, at O(parameters) per example). The curvature at each checkpoint is the
Gauss-Newton matrix on the same projection: for classification it equals the Fisher
information and is estimated with one label sampled from the model per training example; for
causal LM the empirical Fisher of the training gradients is used.

When the experiment trains with AdamW, the training gradients are also stored multiplied by
Adam's per-parameter step scale ``1 / (sqrt(v_hat) + eps)`` of the reference run at the
checkpoint (before projection): the Adam-aware TracIn-CP and the gradient prior of the
momentum-aware Simfluence use them. At step 0 Adam has no state yet; the scale of its first
update is used, ``1 / (|g| + eps)`` with g the first batch's gradient (exactly Adam's v_hat after
one update).
"""

from __future__ import annotations

import numpy as np
import torch

from simfluence.gradients import GradientCheckpoints
from simfluence_platform.tasks.runs import curriculum_for_run, run_seed
from simfluence_platform.tasks.config import ExperimentConfig
from simfluence_platform.tasks.model import Encoded
from simfluence_platform.tasks.training import Trainer


class CountSketch:
    """Projection of a flat gradient ``float[p]`` to ``float[d]``; identity when d is 0 or >= p."""

    def __init__(self, size: int, dim: int, seed: int) -> None:
        self.identity = dim == 0 or dim >= size
        self.dim = size if self.identity else dim
        if not self.identity:
            generator = torch.Generator().manual_seed(seed)
            self.bucket = torch.randint(0, dim, (size,), generator=generator)
            self.sign = torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return flat.detach().float().cpu()
        flat = flat.detach().float().cpu()
        return torch.zeros(self.dim).index_add_(0, self.bucket, flat * self.sign)


def _flat_grad(trainer: Trainer) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in trainer.parameters])


def projected_gradients(trainer: Trainer, data: Encoded, sketch: CountSketch, sample_labels: bool = False,
                        seed: int = 0, preconditioner: torch.Tensor | None = None
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """``float32[k, d]`` projected gradient of each example's loss (eval mode, one at a time),
    and the same gradients multiplied by ``preconditioner`` (``float[p]``) before projection
    (``None`` without one).

    With ``sample_labels`` the label of each example is drawn from the model's own prediction
    (classification only): the gradients then estimate the Fisher / Gauss-Newton matrix.
    """
    model = trainer.model
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((len(data), sketch.dim), dtype=np.float32)
    scaled = None if preconditioner is None else np.empty_like(out)
    for i in range(len(data)):
        example = data.rows(torch.tensor([i], device=trainer.device))
        if sample_labels:
            with torch.no_grad():
                logits = trainer.logits(example).float()
            label = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator)[:, 0]
            example = example.with_labels(label.to(trainer.device))
        model.zero_grad(set_to_none=True)
        trainer.loss(example)[0].backward()
        flat = _flat_grad(trainer)
        out[i] = sketch(flat).numpy()
        if scaled is not None:
            scaled[i] = sketch(flat * preconditioner).numpy()
    model.zero_grad(set_to_none=True)
    return out, scaled


def first_update_preconditioner(trainer: Trainer, first_batch: np.ndarray) -> torch.Tensor:
    """Adam's step scale of the first update, ``1 / (|g| + eps)``, g the gradient of the mean
    loss of ``first_batch`` (``int[b]``, -1 pads) at the current weights."""
    trainer.model.train(trainer.config.training.dropout)
    ids = torch.as_tensor(first_batch[first_batch >= 0], device=trainer.device)
    trainer.model.zero_grad(set_to_none=True)
    trainer.loss(trainer.train_data.rows(ids)).mean().backward()
    flat = _flat_grad(trainer).detach()
    trainer.model.zero_grad(set_to_none=True)
    return 1.0 / (flat.abs() + trainer.config.training.eps)


def gradient_checkpoints(config: ExperimentConfig, trainer: Trainer) -> GradientCheckpoints:
    """Train the reference run and take gradient checkpoints at ``gradients.checkpoint_steps``."""
    g = config.gradients
    sketch = CountSketch(trainer.n_trainable, g.projection_dim, g.seed)
    steps = sorted(g.checkpoint_steps)
    train_grads, test_grads, curvatures, preconditioned = [], [], [], []
    adam = config.training.optimizer == "adamw"
    batches = curriculum_for_run(config, g.reference_run)

    def take(scale: torch.Tensor | None) -> None:
        train, train_scaled = projected_gradients(trainer, trainer.train_data, sketch, preconditioner=scale)
        train_grads.append(train)
        preconditioned.append(train_scaled)
        test_grads.append(projected_gradients(trainer, trainer.test_data, sketch)[0])
        if config.model.task == "classification":
            fisher = projected_gradients(trainer, trainer.train_data, sketch, sample_labels=True,
                                         seed=g.seed + len(curvatures))[0]
        else:
            fisher = train_grads[-1]
        curvatures.append(fisher.T.astype(np.float64) @ fisher / len(fisher))

    trainer.reset()
    if 0 in steps:
        take(first_update_preconditioner(trainer, batches[0]) if adam else None)
    outcome = trainer.run(batches, run_seed(config, g.reference_run),
                          on_step=lambda step: take(trainer.adam_preconditioner()) if step in steps and step > 0
                          else None)
    if outcome.status != "complete":
        raise RuntimeError(f"the gradient reference run failed: {outcome.reason}")
    return GradientCheckpoints(np.array(steps), outcome.learning_rates, np.stack(train_grads), np.stack(test_grads),
                               batch_size=config.training.batch_size, curvatures=np.stack(curvatures).astype(np.float32),
                               train_grads_preconditioned=np.stack(preconditioned) if adam else None)
