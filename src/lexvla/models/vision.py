"""Vision side: frozen backbone patch tokens -> trainable adapter -> per-patch features in the LLM's
hidden size, scored against the trainable visual codebook."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from ..config import AdapterConfig


class Adapter(nn.Module):
    """Input projection, one pre-norm self-attention block, then a 2-layer MLP to the LLM width.

    No position embeddings: the adapter takes any number of patches. ``window`` (set with
    :meth:`local_attention`, never saved) limits each patch's attention to the patches within that many
    rows and columns of it on the square patch grid: a model trained on small images, where attention
    spans the whole (small) image, keeps that context size on a larger image instead of mixing all its
    objects into every patch.
    """

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
        self.window: int | None = None

    @contextlib.contextmanager
    def local_attention(self, window: int | None) -> Iterator[Adapter]:
        """Inside the block, patches attend only within ``window`` rows/columns (None: all patches)."""
        if window is not None and window < 0:
            raise ValueError(f"attention window must be >= 0, got {window}")
        saved, self.window = self.window, window
        try:
            yield self
        finally:
            self.window = saved

    def _mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        side = math.isqrt(n)
        if self.window is None or side * side != n or self.window >= side - 1:
            return None
        r, c = torch.div(torch.arange(n, device=device), side, rounding_mode="floor"), torch.arange(n, device=device) % side
        far = ((r[:, None] - r[None, :]).abs() > self.window) | ((c[:, None] - c[None, :]).abs() > self.window)
        return far  # True = may not attend

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(self.norm_in(tokens))
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self._mask(h.shape[1], h.device))[0]
        return self.mlp(self.norm2(x))
