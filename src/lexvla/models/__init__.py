from .backbones import create_backbone, list_backbones, register_backbone
from .lexvla import LexVLA
from .zoo import create_model, get_config, list_models, load, register_model

__all__ = ["LexVLA", "create_backbone", "create_model", "get_config", "list_backbones", "list_models", "load",
           "register_backbone", "register_model"]
