"""Gradient checkpoints of a reference run: the input of TracIn-CP and influence functions.

At the configured steps of a reference run (run ``gradients.reference_run``'s curriculum), the
per-example gradient of every training and test loss with respect to the trainable parameters
is computed and projected to ``projection_dim`` dimensions with a CountSketch (each parameter
goes to one of d buckets with a random sign, seeded: inner products are preserved in
expectation, at O(parameters) per example). The curvature at each checkpoint is the
Gauss-Newton matrix on the same projection: for classification it equals the Fisher
information and is estimated with one label sampled from the model per training example; for
causal LM the empirical Fisher of the training gradients is used.
"""

from __future__ import annotations

import numpy as np
import torch

from simfluence.gradients import GradientCheckpoints
from tasks.collect import curriculum_for_run, run_seed
from tasks.config import ExperimentConfig
from tasks.model import Encoded
from tasks.training import Trainer


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


def projected_gradients(trainer: Trainer, data: Encoded, sketch: CountSketch, sample_labels: bool = False,
                        seed: int = 0) -> np.ndarray:
    """``float32[k, d]`` projected gradient of each example's loss (eval mode, one at a time).

    With ``sample_labels`` the label of each example is drawn from the model's own prediction
    (classification only): the gradients then estimate the Fisher / Gauss-Newton matrix.
    """
    model = trainer.model
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((len(data), sketch.dim), dtype=np.float32)
    for i in range(len(data)):
        example = data.rows(torch.tensor([i], device=trainer.device))
        if sample_labels:
            with torch.no_grad():
                logits = trainer.logits(example).float()
            label = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator)[:, 0]
            example = example.with_labels(label.to(trainer.device))
        model.zero_grad(set_to_none=True)
        trainer.loss(example)[0].backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in trainer.parameters])
        out[i] = sketch(flat).numpy()
    model.zero_grad(set_to_none=True)
    return out


def gradient_checkpoints(config: ExperimentConfig, trainer: Trainer) -> GradientCheckpoints:
    """Train the reference run and take gradient checkpoints at ``gradients.checkpoint_steps``."""
    g = config.gradients
    sketch = CountSketch(trainer.n_trainable, g.projection_dim, g.seed)
    steps = sorted(g.checkpoint_steps)
    train_grads, test_grads, curvatures = [], [], []

    def take() -> None:
        train_grads.append(projected_gradients(trainer, trainer.train_data, sketch))
        test_grads.append(projected_gradients(trainer, trainer.test_data, sketch))
        if config.model.task == "classification":
            fisher = projected_gradients(trainer, trainer.train_data, sketch, sample_labels=True, seed=g.seed + len(curvatures))
        else:
            fisher = train_grads[-1]
        curvatures.append(fisher.T.astype(np.float64) @ fisher / len(fisher))

    batches = curriculum_for_run(config, g.reference_run)
    trainer.reset()
    if 0 in steps:
        take()
    outcome = trainer.run(batches, run_seed(config, g.reference_run),
                          on_step=lambda step: take() if step in steps and step > 0 else None)
    if outcome.status != "complete":
        raise RuntimeError(f"the gradient reference run failed: {outcome.reason}")
    return GradientCheckpoints(np.array(steps), outcome.learning_rates, np.stack(train_grads), np.stack(test_grads),
                               batch_size=config.training.batch_size, curvatures=np.stack(curvatures).astype(np.float32))
