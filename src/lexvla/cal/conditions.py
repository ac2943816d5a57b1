"""The "without image" conditions of CAL's contrastive forward (the paper's ablation).

Each condition maps the merged sequence to the (inputs_embeds, attention_mask) of the second forward;
positions are never changed, so the text tokens keep exactly the positions they had with the image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .._registry import Registry

if TYPE_CHECKING:
    from lexvla.cal.loss import MultimodalInputs

Condition = Callable[["MultimodalInputs"], tuple[torch.Tensor, torch.Tensor]]
CONDITIONS: Registry[Condition] = Registry("CAL condition")


register_condition = CONDITIONS.register


@register_condition("remove")
def remove_image(inputs: MultimodalInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Official: image tokens stay in the sequence, but nothing attends to them."""
    mask = inputs.attention_mask.masked_fill(inputs.image_mask, 0)
    return inputs.inputs_embeds, mask


@register_condition("mask_patches")
def mask_patches(inputs: MultimodalInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings zeroed (attended to, but carry no content)."""
    embeds = inputs.inputs_embeds.masked_fill(inputs.image_mask.unsqueeze(-1), 0.0)
    return embeds, inputs.attention_mask


@register_condition("blur")
def blurred_image(inputs: MultimodalInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence built from the Gaussian-blurred image (the VLM provides ``blurred_embeds``)."""
    if inputs.blurred_embeds is None:
        raise ValueError(
            "CAL condition 'blur' needs MultimodalInputs.blurred_embeds (built by the VLM from blurred pixels); "
            "this VLM did not provide them"
        )
    return inputs.blurred_embeds, inputs.attention_mask


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images (kernel radius 3 sigma, reflect padding)."""
    if pixels.dim() != 4:
        raise ValueError(f"gaussian_blur expects (B, C, H, W) pixels, got shape {tuple(pixels.shape)}")
    radius = max(1, int(round(3 * sigma)))
    radius = min(radius, pixels.shape[-1] - 1, pixels.shape[-2] - 1)
    x = torch.arange(-radius, radius + 1, dtype=pixels.dtype, device=pixels.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = pixels.shape[1]
    out = F.pad(pixels, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
