"""Named outputs of the encoders and of a training forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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

    def sparsify(self, threshold: float | str | None = None, topk: int | None = None) -> LexicalOutput:
        """Same output with ``vectors`` (and patch vectors) sparsified by
        ``Sparsification(threshold, topk)`` (both None: unchanged). ``model.sparsify(out)`` applies the
        model's own default instead."""
        from .sparsification import Sparsification

        return Sparsification(threshold, topk)(self)

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
