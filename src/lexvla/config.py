"""Typed configuration of a LexVLA model. Every field is saved with a checkpoint as JSON."""

from __future__ import annotations

import dataclasses
import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sparsification import Sparsification
from .vocab import VocabularyFilter

ACTIVATIONS = ("elu1", "log1p_relu")
CENTERINGS = ("standardize", "center", "none")

# Sanity limits checked before anything is allocated (a config file may come from anywhere): far above
# any real model, far below what would exhaust memory building one.
MAX_IMAGE_SIZE, MAX_GRID, MAX_WIDTH, MAX_LAYERS, MAX_TEXT_LENGTH = 4096, 256, 32768, 256, 8192
_ARCH_LIMITS = {"hidden_size": MAX_WIDTH, "intermediate_size": 4 * MAX_WIDTH, "num_hidden_layers": MAX_LAYERS,
                "num_attention_heads": 1024, "num_key_value_heads": 1024, "image_size": MAX_IMAGE_SIZE,
                "patch_size": MAX_IMAGE_SIZE, "num_channels": 16, "max_position_embeddings": 1 << 20,
                "vocab_size": 1 << 22, "head_dim": 4096}


def _check_int(what: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")


def _check_arch(what: str, arch: dict[str, Any]) -> None:
    if not isinstance(arch, dict):
        raise ValueError(f"{what} must be a mapping of architecture fields, got {type(arch).__name__}")
    for key, high in _ARCH_LIMITS.items():
        if key in arch:
            _check_int(f"{what}.{key}", arch[key], 1, high)


def check_prompt(prompt: str) -> None:
    """A prompt is a literal template with exactly one plain ``{caption}`` field (no format spec, no
    conversion, no attribute or index access), so rendering it cannot run code or allocate wildly."""
    if not isinstance(prompt, str):
        raise ValueError(f"text prompt must be a string, got {type(prompt).__name__}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(prompt) if f is not None]
    except ValueError as err:
        raise ValueError(f"text prompt {prompt!r} is not a valid template: {err}") from None
    if fields != [("caption", "", None)]:
        raise ValueError(f"text prompt must contain exactly one plain '{{caption}}' field and no other braces "
                         f"(write '{{{{' for a literal brace), got {prompt!r}")
    if len(prompt) > MAX_TEXT_LENGTH:
        raise ValueError(f"text prompt has {len(prompt)} characters; the limit is {MAX_TEXT_LENGTH}")


def _sections(cls: type, value: Any, where: str) -> Any:
    """A nested section from a dict, refusing unknown keys with their dotted names (one clear line)."""
    if not isinstance(value, dict):
        return value
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown config keys {[f'{where}.{k}' for k in unknown]}; {where} has {sorted(known)}")
    return cls(**value)


@dataclass
class BackboneConfig:
    """Frozen vision backbone that yields patch tokens."""

    name: str = "dinov2"  # registry key in lexvla.models.backbones
    # Weight source, separate from the architecture: a hub id or local folder (DINOv2), "embedded"
    # (weights from a registry package) or "random" (no weights: seeded random init of ``arch``).
    source: str = "random"
    image_size: int = 224
    # Backbone-specific depths to take patch tokens from; empty = the backbone's default (last layer).
    # Several depths are concatenated channel-wise: late CNN features lose colour (see docs).
    taps: tuple[int, ...] = ()
    # Pool the patch grid to grid x grid tokens (None = native grid). Cuts the patch x vocabulary cost.
    grid: int | None = None
    # Architecture (for DINOv2: Dinov2Config fields). A random init builds it; loaded weights must match it.
    arch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.taps = tuple(int(t) for t in self.taps)
        _check_int("backbone.image_size", self.image_size, 1, MAX_IMAGE_SIZE)
        if self.grid is not None:
            _check_int("backbone.grid", self.grid, 1, MAX_GRID)
        _check_arch("backbone.arch", self.arch)


@dataclass
class AdapterConfig:
    """Trainable adapter: input projection, one self-attention block, 2-layer MLP to the LLM width."""

    width: int = 512
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_int("adapter.width", self.width, 1, MAX_WIDTH)
        _check_int("adapter.heads", self.heads, 1, 1024)
        if not 0 < self.mlp_ratio <= 16:
            raise ValueError(f"adapter.mlp_ratio must be in (0, 16], got {self.mlp_ratio!r}")
        if self.width % self.heads:
            raise ValueError(f"adapter width {self.width} must be divisible by heads {self.heads}")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # LoRA on the last N decoder layers only (None = all). The frozen layers below then give the same
    # hidden states for a caption at every step, so training computes them once per distinct caption
    # and runs (and backpropagates through) only the top N layers (docs/training.md, "Text side").
    last_layers: int | None = None

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.last_layers is not None and self.last_layers < 1:
            raise ValueError(f"lora.last_layers must be >= 1 or None, got {self.last_layers}")


@dataclass
class TextConfig:
    """Causal LLM that predicts the caption's lexical vector from its last token."""

    # Weight source: "embedded:smollm2", a hub id / local folder (local files only), a .gguf file, or
    # "random" (no weights: seeded random init of ``arch`` with the tokenizer from ``tokenizer``).
    source: str = "random"
    tokenizer: str = "embedded:smollm2"  # used when source="random"; weights bring their own
    # Architecture (LlamaConfig fields). A random init builds it; loaded weights must match it.
    arch: dict[str, Any] = field(default_factory=dict)
    # In-context lexical prediction prompt. It ends without a quote or space so the next token is a
    # word-initial token ("Ġapple"), the kind the vocabulary is made of.
    prompt: str = 'This sentence: "{caption}" means in one word:'
    max_length: int = 96
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    # Prior subtraction (ours, not the paper's): the scores of this neutral caption ("" = the prompt with
    # an empty caption) are subtracted from every caption's scores before the mapper, so a word scores by
    # how much *this* caption raises it over the LLM's caption-independent prior (pointwise mutual
    # information up to a per-vector constant, which the mapper's centering removes). Words the prompt
    # alone predicts ("it", "the", "something") stop firing for every caption. None = off (the paper).
    prior: str | None = None
    # Data-driven prior (ours): the running mean of the training captions' last-token states (momentum
    # 0.1 per step, as BatchNorm's statistics; saved with the trained weights) is subtracted instead, so
    # what every training caption shares (a template such as "an emoji of") stops scoring too. Under DDP
    # each process averages its own batches; rank 0's mean is saved.
    prior_mean: bool = False

    def __post_init__(self) -> None:
        check_prompt(self.prompt)
        if self.prior_mean and self.prior is not None:
            raise ValueError("text.prior and text.prior_mean exclude each other: set one")
        if self.prior is not None and (not isinstance(self.prior, str) or len(self.prior) > MAX_TEXT_LENGTH):
            raise ValueError(f"text.prior must be a caption string (\"\" = empty) or None, got {self.prior!r}")
        _check_int("text.max_length", self.max_length, 1, MAX_TEXT_LENGTH)
        _check_arch("text.arch", self.arch)
        self.lora = _sections(LoraSettings, self.lora, "text.lora")


@dataclass
class MapperConfig:
    """Scores -> non-negative normalised lexical vectors."""

    activation: str = "elu1"  # "elu1": elu(x)+1 (paper); "log1p_relu": log(1+relu(x)) (exact zeros)
    # Per-vector normalisation of the scores before the activation. The LLM's head scores on real
    # words share a large positive offset (SmolLM2: mean ~15, std ~2.5), which makes elu+1 vectors
    # dense and nearly identical. Softmax (the LLM's own prediction) is shift-invariant, so centering
    # keeps the prediction; "standardize" also divides by the std so `margin` is in std units.
    centering: str = "standardize"
    margin: float = 2.0  # subtracted after centering: only words `margin` std above the mean get > 1
    # Default sparsification at inference (lexvla.sparsification.Sparsification): "inv_sqrt_v" = 1/sqrt(V).
    threshold: str | float | None = "inv_sqrt_v"
    topk: int | None = None
    # Top-k inside the mapper, in training and at inference alike: each vector keeps at most this many
    # words before the L2 norm (gradients reach the kept ones only). None = no cap.
    max_words: int | None = None

    def __post_init__(self) -> None:
        if self.max_words is not None and self.max_words < 1:
            raise ValueError(f"max_words must be >= 1 or None, got {self.max_words}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {self.centering!r}")
        Sparsification(self.threshold, self.topk)  # validates both


@dataclass
class LexVLAConfig:
    name: str = "custom"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    vocab: VocabularyFilter = field(default_factory=VocabularyFilter)
    init_temperature: float = 0.07
    # Seed of the trained parts' initialisation (adapter, LoRA). Random backbones and LLMs (source="random") use seed 0,
    # so their frozen weights are a function of ``arch`` alone and need not be saved.
    init_seed: int = 0
    # Train the visual codebook (paper) or keep it tied to the frozen text codebook.
    train_visual_codebook: bool = True

    def __post_init__(self) -> None:
        for name, cls in (("backbone", BackboneConfig), ("adapter", AdapterConfig), ("text", TextConfig),
                          ("mapper", MapperConfig), ("vocab", VocabularyFilter)):
            setattr(self, name, _sections(cls, getattr(self, name), name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LexVLAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LexVLA config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_json

        atomic_write_json(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> LexVLAConfig:
        """Read a config file; every problem is one ValueError naming the file."""
        try:
            data = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable JSON config ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config must be a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def replace(self, **overrides: Any) -> LexVLAConfig:
        """Copy with dotted overrides, e.g. ``replace(**{"backbone.grid": 4, "init_temperature": 0.05})``."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                if not isinstance(node.get(p), dict):
                    raise KeyError(f"unknown config section '{p}' in override '{key}'")
                node = node[p]
            if leaf not in node:
                raise KeyError(f"unknown config key '{key}'")
            node[leaf] = value
        return LexVLAConfig.from_dict(data)
