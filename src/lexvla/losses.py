"""Training objectives as small modules returning named terms.

- :class:`ContrastiveLoss`: symmetric InfoNCE (CLIP-style) with the model's learnable temperature.
- :class:`OveruseLoss`: the paper's penalty against "false discoveries" (words that fire for everything).
- :class:`FlopsLoss`: SPLADE's FLOPs regulariser, for comparison.
- :class:`RampUp`: weight schedule for the regularisers (quadratic ramp, as SPLADE does).
- :class:`LexVLALoss`: the sum, with every term reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the batch: image i and text i are the positives.

    ``image``/``text`` may be gathered from all ranks (the caller passes the global batch and the
    offset of its local rows via ``labels``), so the same module serves one process or many.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = logit_scale * image @ text.T
        if labels is None:
            labels = torch.arange(image.shape[0], device=image.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class OveruseLoss(nn.Module):
    """``a = S.mean(0)`` per word; ``L = sum_j (a_j / sum_k a_k) * a_j^2``.

    Words activated strongly across the whole batch carry a large share *and* a large mean, so they
    are penalised most; rare, specific words almost not at all. (Form inferred from the paper's text;
    see docs/architecture.md.)
    """

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        a = vectors.abs().mean(0)
        return (a * a.pow(2)).sum() / a.sum().clamp_min(1e-12)


class FlopsLoss(nn.Module):
    """SPLADE's FLOPs regulariser: ``sum_j (mean_i |s_ij|)^2``."""

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.abs().mean(0).pow(2).sum()


@dataclass
class RampUp:
    """Weight that grows quadratically from 0 to ``final`` over ``steps`` steps, then stays."""

    final: float
    steps: int = 0

    def __call__(self, step: int) -> float:
        if self.steps <= 0 or step >= self.steps:
            return self.final
        return self.final * (max(step, 0) / self.steps) ** 2


@dataclass
class LossOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted values, for logging
    weights: dict[str, float] = field(default_factory=dict)


REGULARISERS = {"overuse": OveruseLoss, "flops": FlopsLoss, "none": None}


class LexVLALoss(nn.Module):
    """InfoNCE + ramped regulariser on both sides' lexical vectors."""

    def __init__(self, regulariser: str = "overuse", image_weight: float = 1e-3, text_weight: float = 1e-3,
                 ramp_steps: int = 0) -> None:
        super().__init__()
        if regulariser not in REGULARISERS:
            raise ValueError(f"regulariser must be one of {sorted(REGULARISERS)}, got {regulariser!r}")
        self.contrastive = ContrastiveLoss()
        cls = REGULARISERS[regulariser]
        self.regulariser = cls() if cls is not None else None
        self.name = regulariser
        self.image_weight = RampUp(image_weight, ramp_steps)
        self.text_weight = RampUp(text_weight, ramp_steps)

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, step: int = 0,
                labels: torch.Tensor | None = None) -> LossOutput:
        """``image``/``text`` are the (possibly gathered) batch vectors; the regulariser uses them too."""
        c = self.contrastive(image, text, logit_scale, labels)
        terms, weights = {"contrastive": c}, {"contrastive": 1.0}
        total = c
        if self.regulariser is not None:
            wi, wt = self.image_weight(step), self.text_weight(step)
            ri, rt = self.regulariser(image), self.regulariser(text)
            terms.update({f"{self.name}_image": ri, f"{self.name}_text": rt})
            weights.update({f"{self.name}_image": wi, f"{self.name}_text": wt})
            total = total + wi * ri + wt * rt
        return LossOutput(total, {k: v.detach() for k, v in terms.items()}, weights)
