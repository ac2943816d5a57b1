"""Training LexVLA: typed config, Accelerate trainer, cross-process contrastive loss, exact resume.

Needs the ``train`` extras only for TensorBoard and Hugging Face datasets; the library itself
(``lexvla.models``) never imports this package.
"""

from .config import TrainConfig, load_config
from .trainer import TrainResult, build_model, train

__all__ = ["TrainConfig", "TrainResult", "build_model", "load_config", "train"]
