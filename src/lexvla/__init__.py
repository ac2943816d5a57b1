"""lexvla: interpretable vision-language alignment through a unified lexical representation.

Data flow: images / texts -> encoders (frozen backbone + adapter | LLM + LoRA) -> codebook scores ->
mapper -> sparse lexical vectors over real words -> index / retrieval / evaluation / pictures.
"""

from .config import AdapterConfig, BackboneConfig, LexVLAConfig, LoraSettings, MapperConfig, TextConfig
from .models import LexVLA, create_model, get_config, list_models, load, register_model
from .outputs import LexicalOutput, LexVLAOutput
from .preprocess import ImageLoadError, ImagePreprocessor, load_image
from .sparsification import Sparsification
from .vocab import Vocabulary, VocabularyFilter, build_vocabulary

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "BackboneConfig", "ImageLoadError", "ImagePreprocessor", "LexVLA", "LexVLAConfig",
    "LexVLAOutput", "LexicalOutput", "LoraSettings", "MapperConfig", "Sparsification", "TextConfig", "Vocabulary",
    "VocabularyFilter", "build_vocabulary", "create_model", "get_config", "list_models", "load", "load_image",
    "register_model",
]
