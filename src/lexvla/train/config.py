"""Typed training configuration: YAML file + ``key=value`` overrides -> :class:`TrainConfig`.

Every section is a dataclass validated in ``__post_init__``. Overrides use dotted paths
(``optim.lr.adapter=3e-4``, ``data.batch_size=32``). Once a path reaches a free-form mapping
(``model.overrides``, ``data.options``, ``validation.options``, ``optim.lr``) the rest of the path is one
key of that mapping, so ``model.overrides.backbone.grid=4`` sets the model override ``backbone.grid``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
# Parameter groups of a LexVLA model, each with its own learning rate (see optim.param_groups).
PARAM_GROUPS = ("adapter", "visual_codebook", "lora", "temperature")


def _float(obj: Any, *names: str) -> None:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; accept it as the number the user meant."""
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        try:
            setattr(obj, name, float(value))
        except (TypeError, ValueError):
            raise ValueError(f"{type(obj).__name__}.{name} must be a number, got {value!r}") from None


@dataclass
class ModelSection:
    """Which model to train: a zoo name (``lexvla.list_models()``) with dotted config overrides, or a
    checkpoint folder saved by ``save_pretrained`` (then ``overrides`` must be empty)."""

    name: str = "lexvla-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name must name a zoo model or a checkpoint folder")
        self.overrides = dict(self.overrides or {})


@dataclass
class DataSection:
    """Training pairs.

    ``source`` is a key of ``lexvla.train.data.TRAIN_SOURCES`` (``manifest``, ``shards``, ``hf``,
    ``easy-vqa``); ``options`` are that source's keyword arguments. ``batch_size`` is the *global*
    batch of one optimiser micro-step (all processes together); each process takes
    ``batch_size / num_processes`` of it, and the contrastive loss sees all of it.
    ``feature_cache``: folder for the backbone feature cache (map-style sources only), ``"auto"`` for
    the project cache, or None to run the backbone every step. ``text_cache`` likewise for text vectors
    (only possible when the text side is frozen, i.e. no LoRA).
    """

    source: str = "easy-vqa"
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    num_workers: int = 0
    shuffle: bool = True
    feature_cache: str | None = None
    text_cache: str | None = None
    cache_dtype: str = "float16"

    def __post_init__(self) -> None:
        self.options = dict(self.options or {})
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class ValidationSection:
    """Periodic zero-shot retrieval (``lexvla.eval``) on a registered retrieval set, main process only.

    ``dataset`` is a key of ``lexvla.eval.retrieval_data.RETRIEVAL_DATASETS`` (e.g. ``easy-vqa``), or None
    for no validation; ``options`` are ``RetrievalDataConfig`` fields (``split``, ``limit``, ``root``...).
    """

    dataset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    every: int = 0  # steps; 0 = only at the end (when a dataset is set)
    sparsification: str = "threshold"  # a lexvla.Sparsification spelling: "threshold" = 1/sqrt(V) (paper)
    batch_size: int = 64

    def __post_init__(self) -> None:
        self.options = dict(self.options or {})
        if self.every < 0:
            raise ValueError(f"validation.every must be >= 0, got {self.every}")


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine decay (to ``min_lr_ratio`` x lr), per-group learning rates."""

    lr: dict[str, float] = field(default_factory=lambda: {"adapter": 1e-4, "visual_codebook": 1e-4,
                                                           "lora": 1e-4, "temperature": 1e-4})
    weight_decay: dict[str, float] = field(default_factory=lambda: {"adapter": 0.05, "visual_codebook": 0.0,
                                                                    "lora": 0.0, "temperature": 0.0})
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    # CLIP's clamp: 1/temperature stays <= 100 so the softmax does not saturate.
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        for table in ("lr", "weight_decay"):
            given = dict(getattr(self, table) or {})
            unknown = set(given) - set(PARAM_GROUPS)
            if unknown:
                raise ValueError(f"optim.{table} has unknown parameter groups {sorted(unknown)}; "
                                 f"groups are {list(PARAM_GROUPS)}")
            default = {"lr": 1e-4, "weight_decay": 0.0}[table]
            merged = {g: given.get(g, getattr(self, table).get(g, default)) for g in PARAM_GROUPS}
            try:
                merged = {g: float(v) for g, v in merged.items()}
            except (TypeError, ValueError):
                raise ValueError(f"optim.{table} values must be numbers, got {given}") from None
            if any(v < 0 for v in merged.values()):
                raise ValueError(f"optim.{table} values must be >= 0, got {merged}")
            setattr(self, table, merged)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _float(self, "eps", "min_lr_ratio", "grad_clip", "max_logit_scale")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class LossSection:
    """InfoNCE + regulariser (``lexvla.losses.LexVLALoss``), gathered across processes.

    ``local_loss``: each process scores only its own rows against the gathered batch (open_clip's
    ``local_loss``; less compute and memory for large global batches, gradients flow back through the
    gather). Off: every process scores the whole gathered batch (cheap: the logits are N x N). Both give
    the single-process gradient of the global batch.
    """

    regulariser: str = "overuse"  # "overuse" (paper) | "flops" (SPLADE) | "none"
    image_weight: float = 1e-3
    text_weight: float = 1e-3
    ramp_steps: int = 0  # quadratic ramp-up of the regulariser weights (SPLADE's scheduler)
    local_loss: bool = False

    def __post_init__(self) -> None:
        _float(self, "image_weight", "text_weight")
        from ..losses import REGULARISERS

        if self.regulariser not in REGULARISERS:
            raise ValueError(f"loss.regulariser must be one of {sorted(REGULARISERS)}, got {self.regulariser!r}")
        if self.ramp_steps < 0:
            raise ValueError(f"loss.ramp_steps must be >= 0, got {self.ramp_steps}")


@dataclass
class TrainConfig:
    """One training run. ``steps`` (optimiser steps) wins over ``epochs`` when both are set; iterable
    sources (tar shards) need ``steps``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    steps: int | None = None
    epochs: float | None = None
    # micro-batches per optimiser step, scored as ONE contrastive batch of grad_accum x data.batch_size
    # pairs (cached embeddings, GradCache: one extra forward pass per micro-batch)
    grad_accum: int = 1
    mixed_precision: str = "no"
    # Activation checkpointing in the LLM (None = as the model config says). Saves memory with LoRA.
    gradient_checkpointing: bool | None = None
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2  # newest step checkpoints kept (the final one is always kept)
    log_every: int = 10
    output_dir: str = "runs/lexvla"
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True
    cpu: bool = False  # keep a GPU machine on the CPU (without GPUs the CPU is used anyway, any process count)
    log_samples: bool = False  # rank 0 writes samples.jsonl: the sample ids every rank trained on, per step

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelSection), ("data", DataSection), ("validation", ValidationSection),
                          ("optim", OptimSection), ("loss", LossSection)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(cls, value, name))
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        _float(self, "epochs")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown keys in {where}: {sorted(unknown)} (known: {sorted(known)})")
    return cls(**data)


# Mappings whose keys are free-form: an override path that reaches one keeps the rest as a single key.
_FREE_MAPPINGS = {("model", "overrides"), ("data", "options"), ("validation", "options"), ("optim", "lr"),
                  ("optim", "weight_decay")}


def parse_value(text: str) -> Any:
    """An override's value as YAML (numbers, booleans, null, lists, mappings), ``1e-4`` as a float."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` strings to a plain config dict (the dict is changed and returned)."""
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.path=value")
        parts = key.strip().split(".")
        if parts[0] not in sections:
            raise ValueError(f"override {item!r}: unknown top-level key {parts[0]!r} (known: {sorted(sections)})")
        node = data
        depth = 0
        while depth < len(parts) - 1:
            if tuple(parts[: depth + 1]) in _FREE_MAPPINGS:
                break
            node = node.setdefault(parts[depth], {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            depth += 1
        if tuple(parts[: depth + 1]) in _FREE_MAPPINGS and depth < len(parts) - 1:
            node = node.setdefault(parts[depth], {})
            node[".".join(parts[depth + 1:])] = parse_value(raw)
        else:
            node[parts[depth]] = parse_value(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or the defaults) with ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"training config {path} must hold a mapping at the top level")
        data = loaded or {}
    data = apply_overrides(data, list(overrides or []))
    return TrainConfig.from_dict(data)
