"""The trainer's model as a pure function of its trainable parameters (``torch.func``).

:class:`FunctionalModel` evaluates the per-example loss for any set of trainable parameters
given as a ``{name: tensor}`` dict (the frozen parameters and buffers are shared), so that
``torch.func.vmap`` can run K stacked copies of the model at once (batched training runs) or
differentiate one example at a time in one vectorised pass (per-example gradients).

Hugging Face models build their attention mask with data-dependent control flow ("is there
any padding?"), which ``vmap`` cannot trace; the mask is therefore built here, outside the
vectorised function, as the 4-D mask the model accepts as is (boolean for SDPA attention,
additive for eager attention). Whether the model attends causally (GPT-2) or both ways (BERT)
is settled on load by checking both masks against the model's own forward pass on a few test
examples: the functional losses must reproduce the plain ones, or the model is refused.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from simfluence_platform.tasks.model import Encoded, ModelError, per_example_loss

# How closely the functional forward pass must reproduce the plain one (float32 logits; the
# two differ only by the order of floating-point operations inside attention).
MATCH_TOLERANCE = 1e-4


class FunctionalModel:
    """Per-example losses of ``trainer.model`` under given trainable parameters.

    ``names``: the trainable parameters, in the order of ``trainer.parameters``; ``frozen``: the
    other parameters and the buffers (detached, shared by every copy).
    """

    def __init__(self, trainer) -> None:
        if trainer.config.training.method == "prompt_tuning":
            raise ModelError("training.method prompt_tuning cannot be run as a functional model "
                             "(peft prepends its virtual tokens to a 2-D attention mask)")
        self.trainer = trainer
        model = trainer.model
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
        self.frozen.update({name: b for name, b in model.named_buffers()})
        implementation = getattr(model.config, "_attn_implementation", "eager")
        if implementation not in ("sdpa", "eager"):
            raise ModelError(f"attention implementation {implementation!r} cannot be batched; sdpa or eager can")
        self.additive = implementation == "eager"
        self.causal = self._settle_causality()

    def parameters(self) -> dict[str, torch.Tensor]:
        """The live trainable parameters of the trainer's model, detached."""
        return {name: p.detach() for name, p in self.trainer.model.named_parameters() if p.requires_grad}

    def mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[..., k, 1, L, L]`` attention mask for ``attention_mask`` ``[..., k, L]`` (1 = token)."""
        L = attention_mask.shape[-1]
        mask = attention_mask.bool()[..., None, None, :].expand(*attention_mask.shape[:-1], 1, L, L)
        if self.causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
        if self.additive:
            return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        return mask

    def logits(self, params: dict[str, torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor,
               prefix: torch.Tensor | None) -> torch.Tensor:
        """The model's logits for ``input_ids`` ``[k, L]`` with the 4-D ``mask`` ``[k, 1, L, L]``
        and the cached frozen prefix ``[k, L, H]`` (when the trainer has one)."""
        trainer = self.trainer
        if trainer.prefix is not None:
            trainer.prefix.stub.values = prefix
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.autocast):
            return functional_call(trainer.model, (params, self.frozen), (),
                                   {"input_ids": input_ids, "attention_mask": mask}).logits

    def losses(self, params: dict[str, torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor,
               labels: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """``float[k]`` per-example loss (nats; see :func:`per_example_loss`)."""
        logits = self.logits(params, input_ids, mask, prefix)
        return per_example_loss(logits, Encoded(input_ids, mask, labels), self.trainer.config.model.task)

    def _settle_causality(self) -> bool:
        trainer = self.trainer
        rows = trainer.test_data.rows(torch.arange(min(8, len(trainer.test_data)), device=trainer.device))
        trainer.model.eval()
        errors = {}
        with torch.no_grad():
            reference = trainer.loss(rows)
            for causal in (True, False):
                self.causal = causal
                got = self.losses(self.parameters(), rows.input_ids, self.mask(rows.attention_mask), rows.labels,
                                  rows.prefix)
                errors[causal] = float(((got - reference).abs() / (1 + reference.abs())).max())
        best = min(errors, key=errors.get)
        if not errors[best] <= MATCH_TOLERANCE:
            raise ModelError(f"model.source {trainer.config.model.source!r}: its losses cannot be reproduced by a "
                             f"functional forward pass (relative error {errors[best]:.1e}); "
                             f"use training.parallel_runs: 1")
        return best


def stack_rows(data: Encoded, ids: np.ndarray) -> tuple[Encoded, torch.Tensor]:
    """The rows ``ids`` (``int[K, b]``, -1 pads) of ``data`` as one ``Encoded`` of ``K*b`` rows
    (pads take row 0), and ``float[K, b]`` weights (1 for a real row, 0 for a pad)."""
    device = data.input_ids.device
    index = torch.as_tensor(np.maximum(ids, 0).reshape(-1), device=device)
    weights = torch.as_tensor(ids >= 0, dtype=torch.float32, device=device)
    return data.rows(index), weights
