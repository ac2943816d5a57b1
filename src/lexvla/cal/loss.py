"""CAL: contrastive-alignment token re-weighting of the next-token cross-entropy.

Semantics follow the authors' implementation (Xiao et al., NeurIPS 2024, see
``shared/reference/cal.md``): for every label token, the *raw* logit of the ground-truth token with the
image minus the same logit without the image is clamped to ``[alpha, beta]``, smoothed with a window-3
average and used as that token's (gradient-free) loss weight; the weighted CE sum is normalised by the sum
of the weights of the valid tokens.

The module only needs logits; :class:`CALLoss` adds the gradient-free second forward for any model
callable that takes ``inputs_embeds`` / ``attention_mask`` / ``position_ids``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------- config
def _smooth_flattened(weights: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Official mode: one average over the flattened batch x sequence vector (crosses sample boundaries
    and ignored positions), ``AvgPool1d(window, 1, window // 2, count_include_pad=False)``."""
    flat = weights.reshape(1, 1, -1)
    out = F.avg_pool1d(flat, window, stride=1, padding=window // 2, count_include_pad=False)
    return out.reshape(weights.shape)


def _smooth_per_sequence(weights: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Per-sequence mode: average over the valid label positions of the same sequence inside the window;
    ignored positions (prompt, image, padding) neither contribute nor receive a weight."""
    v = valid.to(weights.dtype)
    kernel = torch.ones(1, 1, window, dtype=weights.dtype, device=weights.device)
    num = F.conv1d((weights * v).unsqueeze(1), kernel, padding=window // 2).squeeze(1)
    den = F.conv1d(v.unsqueeze(1), kernel, padding=window // 2).squeeze(1)
    return torch.where(valid, num / den.clamp_min(1.0), torch.zeros_like(weights))


def _no_smoothing(weights: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    return weights


SMOOTHING: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "flattened": _smooth_flattened,
    "per_sequence": _smooth_per_sequence,
    "none": _no_smoothing,
}


@dataclass
class CALConfig:
    """Hyper-parameters of CAL.

    alpha, beta: clamp range of the logit difference (the paper's ablation found [1, 5] best). alpha > 0
        keeps every token in training: image-unrelated tokens still get weight alpha.
    smoothing: "flattened" (the official code: window over the flattened batch), "per_sequence" (window
        stays inside one sequence and skips ignored positions) or "none".
    window: odd width of the moving average (3 in the paper).
    condition: how the "without image" forward is built, a key of ``lexvla.cal.conditions.CONDITIONS``:
        "remove" (image positions masked out of attention: the official choice), "mask_patches"
        (image embeddings zeroed) or "blur" (the image Gaussian-blurred before encoding).
    blur_sigma: standard deviation in pixels of the blur for ``condition="blur"``.
    eps: added to the weight sum in the normaliser (1e-6 in the official code).
    """

    alpha: float = 1.0
    beta: float = 5.0
    smoothing: str = "flattened"
    window: int = 3
    condition: str = "remove"
    blur_sigma: float = 4.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.alpha <= self.beta:
            raise ValueError(f"CALConfig: alpha ({self.alpha}) must be <= beta ({self.beta})")
        if self.smoothing not in SMOOTHING:
            raise ValueError(f"CALConfig.smoothing '{self.smoothing}' unknown; choose from {sorted(SMOOTHING)}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"CALConfig.window must be a positive odd number, got {self.window}")
        from lexvla.cal.conditions import CONDITIONS

        if self.condition not in CONDITIONS:
            raise ValueError(f"CALConfig.condition '{self.condition}' unknown; choose from {sorted(CONDITIONS)}")
        if self.blur_sigma <= 0:
            raise ValueError(f"CALConfig.blur_sigma must be positive, got {self.blur_sigma}")
        if self.eps < 0:
            raise ValueError(f"CALConfig.eps must be >= 0, got {self.eps}")


# -------------------------------------------------------------------------------------------- outputs
@dataclass
class CALOutput:
    """Result of the (CAL-weighted) next-token loss. All (B, T-1) tensors are aligned with the shifted
    labels ``labels[:, 1:]`` and detached, except ``loss``.

    loss: the training loss (CAL-weighted mean CE, or plain mean CE when CAL is off).
    ce_loss: plain mean CE over the valid tokens (for logging; equals ``loss`` without CAL).
    token_ce: per-token CE (0 at ignored positions).
    logit_diff: raw ground-truth logit with image minus without image (0 at ignored positions; None when
        no "without image" logits were given).
    weights: per-token weights used in ``loss`` (0 at ignored positions; 1 everywhere valid without CAL).
    valid: which shifted positions carry a label.
    """

    loss: torch.Tensor
    ce_loss: torch.Tensor
    token_ce: torch.Tensor
    logit_diff: torch.Tensor | None
    weights: torch.Tensor
    valid: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


# ------------------------------------------------------------------------------------------ functions
def _check_shapes(logits: torch.Tensor, labels: torch.Tensor, name: str = "logits") -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"{name} must be (B, T, V) and labels (B, T) with the same B, T; got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )


def ground_truth_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Raw logit of the next ground-truth token, (B, T-1). Ignored labels gather token 0, as the official
    code does (their value only matters for the flattened smoothing window)."""
    _check_shapes(logits, labels)
    shift_labels = labels[:, 1:]
    safe = shift_labels.masked_fill(shift_labels == IGNORE_INDEX, 0)
    return logits[:, :-1].gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()


def cal_token_weights(
    logit_diff: torch.Tensor, valid: torch.Tensor, config: CALConfig | None = None
) -> torch.Tensor:
    """Clamp ``logit_diff`` (B, T-1) to [alpha, beta], then smooth; returns detached weights with 0 at
    ignored positions."""
    config = config or CALConfig()
    with torch.no_grad():
        w = logit_diff.detach().float().clamp(config.alpha, config.beta)
        w = SMOOTHING[config.smoothing](w, valid, config.window)
        return w * valid


def cal_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logits_without_image: torch.Tensor | None = None,
    config: CALConfig | None = None,
) -> CALOutput:
    """Next-token CE on ``logits`` (B, T, V) vs ``labels`` (B, T) (-100 = ignored), CAL-weighted when
    ``logits_without_image`` (same shape, from the gradient-free "without image" forward) is given."""
    config = config or CALConfig()
    _check_shapes(logits, labels)
    shift_labels = labels[:, 1:]
    valid = shift_labels != IGNORE_INDEX
    if not bool(valid.any()):
        raise ValueError("labels contain no valid (non -100) target after the next-token shift")
    token_ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape(shift_labels.shape)
    n_valid = valid.sum()
    ce_loss = token_ce.sum() / n_valid
    if logits_without_image is None:
        weights = valid.float()
        return CALOutput(ce_loss, ce_loss.detach(), token_ce.detach(), None, weights, valid)
    _check_shapes(logits_without_image, labels, "logits_without_image")
    with torch.no_grad():
        raw_diff = ground_truth_logits(logits.detach(), labels) - ground_truth_logits(
            logits_without_image.detach(), labels
        )
        # the official flattened window sees the (token-0) diffs of ignored positions too
        weights = cal_token_weights(raw_diff, valid, config)
        norm = weights[valid].sum() + config.eps
    loss = (token_ce * weights).sum() / norm
    return CALOutput(loss, ce_loss.detach(), token_ce.detach(), raw_diff * valid, weights, valid)


# ------------------------------------------------------------------------------------------- module
LogitsFn = Callable[..., torch.Tensor]


@dataclass
class MultimodalInputs:
    """A VLM's merged input sequence, the contract between a VLM and :class:`CALLoss`.

    inputs_embeds: (B, T, D) text and image embeddings already merged.
    attention_mask: (B, T) 1 = real token, 0 = padding.
    position_ids: (B, T) positions; the "without image" forward reuses them unchanged, so removing the
        image from attention does not shift the text's positions.
    labels: (B, T) next-token targets, -100 where ignored (prompt, image, padding).
    image_mask: (B, T) bool, True at image-token positions.
    blurred_embeds: (B, T, D) the same sequence built from Gaussian-blurred images; only needed for the
        "blur" condition (built by the VLM, which owns the vision encoder).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    image_mask: torch.Tensor
    blurred_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, t = self.labels.shape
        for name in ("attention_mask", "position_ids", "image_mask"):
            if tuple(getattr(self, name).shape) != (b, t):
                raise ValueError(f"MultimodalInputs.{name} must be {(b, t)}, got {tuple(getattr(self, name).shape)}")
        if tuple(self.inputs_embeds.shape[:2]) != (b, t):
            raise ValueError(
                f"MultimodalInputs.inputs_embeds must be (B, T, D) with (B, T)={(b, t)}, "
                f"got {tuple(self.inputs_embeds.shape)}"
            )

    def label_span(self) -> int:
        """Number of trailing positions that hold every label plus the position predicting the first one;
        passing it as ``logits_to_keep`` computes the big vocabulary projection only where needed."""
        has = (self.labels != IGNORE_INDEX).any(0).nonzero()
        if has.numel() == 0:
            raise ValueError("MultimodalInputs.labels contain no valid (non -100) target")
        first = int(has[0, 0])
        return self.labels.shape[1] - max(first - 1, 0)


class CALLoss(nn.Module):
    """CAL (or plain, with ``enabled=False``) next-token loss around any logits function.

    ``logits_fn(inputs_embeds=..., attention_mask=..., position_ids=..., logits_to_keep=k)`` must return
    (B, k, V) logits of the last k positions (k=0 meaning all); a Hugging Face causal LM's forward does,
    via ``lambda **kw: lm(**kw).logits``. The "without image" forward runs under ``torch.no_grad``.
    """

    def __init__(self, config: CALConfig | None = None, enabled: bool = True) -> None:
        super().__init__()
        self.config = config or CALConfig()
        self.enabled = enabled

    def without_image_logits(self, logits_fn: LogitsFn, inputs: MultimodalInputs, keep: int) -> torch.Tensor:
        """Logits of the counterfactual "without image" forward (never part of the autograd graph)."""
        from lexvla.cal.conditions import CONDITIONS

        with torch.no_grad():
            embeds, mask = CONDITIONS[self.config.condition](inputs)
            return logits_fn(
                inputs_embeds=embeds, attention_mask=mask, position_ids=inputs.position_ids, logits_to_keep=keep
            ).detach()

    def forward(self, logits_fn: LogitsFn, inputs: MultimodalInputs, crop: bool = True) -> CALOutput:
        """``crop``: compute logits only for the trailing label span (see
        :meth:`MultimodalInputs.label_span`); the flattened window then sees fewer ignored positions than
        over the full sequence, which only matters at the crop edges."""
        keep = inputs.label_span() if crop else 0
        logits = logits_fn(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            logits_to_keep=keep,
        )
        labels = inputs.labels[:, -keep:] if keep else inputs.labels
        if not self.enabled:
            return cal_loss_from_logits(logits, labels, None, self.config)
        logits_wo = self.without_image_logits(logits_fn, inputs, keep)
        return cal_loss_from_logits(logits, labels, logits_wo, self.config)
