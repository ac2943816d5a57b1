"""The weightless mapper: codebook scores -> non-negative, L2-normalised lexical vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MapperConfig
from ..sparsification import Sparsification


class LexicalMapper(nn.Module):
    def __init__(self, cfg: MapperConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-vector centering (see MapperConfig.centering), margin, then the activation.

        Every step is monotonic within a vector, so the word ranking of the raw scores (the LLM's own
        next-word ranking on the text side) is kept exactly.
        """
        x = scores
        if self.cfg.centering != "none":
            x = x - x.mean(-1, keepdim=True)
            if self.cfg.centering == "standardize":
                x = x / (x.std(-1, keepdim=True) + 1e-6)
        x = x - self.cfg.margin
        if self.cfg.activation == "elu1":
            return F.elu(x) + 1.0
        return torch.log1p(F.relu(x))

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, eps=1e-12)

    def cap(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the ``max_words`` largest entries of each vector (all when unset).

        The forward value is the capped vector; its gradient reaches every entry (straight-through). With
        a hard cap a word outside an image's top k gets no gradient, so at the start of training (random
        adapter, disjoint image and caption top-k sets, every similarity 0) nothing would move.
        """
        k = self.cfg.max_words
        if k is None or k >= x.shape[-1]:
            return x
        kept = Sparsification(None, topk=k)(x)  # the one top-k rule
        if not (torch.is_grad_enabled() and x.requires_grad):
            return kept
        return kept + (x - x.detach()) - (kept - kept.detach())

    def text(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) last-token scores -> (B, V) lexical vectors."""
        return self.normalize(self.cap(self.activate(scores)))

    def image(self, patch_scores: torch.Tensor, return_patches: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, P, V) patch scores -> image vectors (B, V) by max over patches, and optionally the
        per-patch lexical vectors (B, P, V), each normalised on its own."""
        act = self.activate(patch_scores)
        vectors = self.normalize(self.cap(act.amax(dim=1)))
        return vectors, (self.normalize(self.cap(act)) if return_patches else None)

