"""Vision side: frozen backbone patch tokens -> trainable adapter -> per-patch features in the LLM's
hidden size, scored against the trainable visual codebook."""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig


class Adapter(nn.Module):
    """Input projection, one pre-norm self-attention block, then a 2-layer MLP to the LLM width."""

    def __init__(self, in_dim: int, out_dim: int, cfg: AdapterConfig) -> None:
        super().__init__()
        w = cfg.width
        self.proj_in = nn.Linear(in_dim, w)
        self.norm_in = nn.LayerNorm(in_dim)  # backbone features (CNN maps especially) vary in scale
        self.norm1 = nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(w)
        hidden = int(w * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(self.norm_in(tokens))
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.mlp(self.norm2(x))
