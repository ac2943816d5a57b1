"""CAL: contrastive-alignment token re-weighting (Xiao et al., NeurIPS 2024) for training VLMs.

``CALLoss`` works with any VLM that exposes ``multimodal_inputs(...) -> MultimodalInputs`` and
``logits(inputs_embeds=, attention_mask=, position_ids=, logits_to_keep=)``; ``SmallVLM`` is a LLaVA-style
model from the project's parts and ``HFLlavaVLM`` wraps Hugging Face's LLaVA.
"""

from lexvla.cal.conditions import CONDITIONS, gaussian_blur, register_condition
from lexvla.cal.loss import (
    IGNORE_INDEX,
    CALConfig,
    CALLoss,
    CALOutput,
    MultimodalInputs,
    cal_loss_from_logits,
    cal_token_weights,
    ground_truth_logits,
)
from lexvla.cal.vlm import HFLlavaVLM, SmallVLM, TokenBatch, VLMConfig

__all__ = [
    "CONDITIONS", "IGNORE_INDEX", "CALConfig", "CALLoss", "CALOutput", "HFLlavaVLM", "MultimodalInputs",
    "SmallVLM", "TokenBatch", "VLMConfig", "cal_loss_from_logits", "cal_token_weights", "gaussian_blur",
    "ground_truth_logits", "register_condition",
]
