"""Named outputs of the encoders and of a training forward pass."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


def sparsify(vectors: torch.Tensor, threshold: float | None = None, topk: int | None = None) -> torch.Tensor:
    """Zero every entry except those ``> threshold`` and/or among the ``topk`` largest of each row.

    Works on any leading shape (the last dimension is the vocabulary). Ties at the k-th value keep
    exactly k entries (``torch.topk`` picks), so "top-k" always means at most k active words.
    """
    out = vectors
    if threshold is not None:
        out = out * (out > threshold)
    if topk is not None:
        if topk <= 0:
            raise ValueError(f"topk must be positive, got {topk}")
        k = min(topk, out.shape[-1])
        idx = out.topk(k, dim=-1).indices
        mask = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, idx, True)
        out = out * mask
    return out


@dataclass
class LexicalOutput:
    """Lexical vectors of a batch of images or texts.

    vectors: (N, V) non-negative, L2-normalised over the vocabulary (dense tensor; may be sparsified).
    patch_vectors: (N, P, V) per-patch non-negative lexical vectors, each L2-normalised, images only
        and only when requested (``return_patches=True``); ``grid`` = (rows, cols) with rows*cols = P.
    """

    vectors: torch.Tensor
    patch_vectors: torch.Tensor | None = None
    grid: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def sparsify(self, threshold: float | None = None, topk: int | None = None) -> LexicalOutput:
        """Same output with ``vectors`` (and patch vectors) sparsified; see :func:`sparsify`."""
        patches = None if self.patch_vectors is None else sparsify(self.patch_vectors, threshold, topk)
        return replace(self, vectors=sparsify(self.vectors, threshold, topk), patch_vectors=patches)

    def active_words(self) -> torch.Tensor:
        """Number of non-zero entries per vector, shape (N,)."""
        return (self.vectors != 0).sum(-1)

    def to_scipy(self):
        """``vectors`` as a ``scipy.sparse.csr_matrix`` (float32), for indexes and storage."""
        import scipy.sparse as sp

        return sp.csr_matrix(self.vectors.detach().float().cpu().numpy().astype(np.float32))


@dataclass
class LexVLAOutput:
    """Training forward pass: both sides' (dense, unsparsified) lexical vectors and the temperature."""

    image: LexicalOutput
    text: LexicalOutput
    logit_scale: torch.Tensor  # exp of the learnable log-scale (1/temperature), scalar
