"""lexvla: interpretable vision-language alignment through a unified lexical representation.

Data flow: images / texts -> encoders (frozen backbone + adapter | LLM + LoRA) -> codebook scores ->
mapper -> sparse lexical vectors over real words -> index / retrieval / evaluation / pictures.

The names below load on first use (PEP 562), so ``import lexvla.cli`` and ``lexvla --help`` do not pay
for torch; ``lexvla.create_model`` and the rest work as plain attributes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    ".config": ("AdapterConfig", "BackboneConfig", "LexVLAConfig", "LoraSettings", "MapperConfig", "TextConfig"),
    ".models": ("LexVLA", "create_model", "get_config", "list_models", "load", "register_model"),
    ".outputs": ("LexicalOutput", "LexVLAOutput"),
    ".preprocess": ("ImageLoadError", "ImagePreprocessor", "load_image"),
    ".sparsification": ("Sparsification",),
    ".vocab": ("Vocabulary", "VocabularyFilter", "build_vocabulary"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "AdapterConfig", "BackboneConfig", "ImageLoadError", "ImagePreprocessor", "LexVLA", "LexVLAConfig",
    "LexVLAOutput", "LexicalOutput", "LoraSettings", "MapperConfig", "Sparsification", "TextConfig", "Vocabulary",
    "VocabularyFilter", "build_vocabulary", "create_model", "get_config", "list_models", "load", "load_image",
    "register_model",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lexvla' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:
    from .config import AdapterConfig, BackboneConfig, LexVLAConfig, LoraSettings, MapperConfig, TextConfig
    from .models import LexVLA, create_model, get_config, list_models, load, register_model
    from .outputs import LexicalOutput, LexVLAOutput
    from .preprocess import ImageLoadError, ImagePreprocessor, load_image
    from .sparsification import Sparsification
    from .vocab import Vocabulary, VocabularyFilter, build_vocabulary
