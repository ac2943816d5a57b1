"""The dense (CLIP-style) baseline: the same frozen backbone, adapter and LLM (+ the same LoRA) as
LexVLA, but aligned in a latent space instead of over words.

Image: adapter patch features (P x D) -> mean over patches -> L2. Text: the LLM's last-token hidden state
(D) -> a trained linear head (identity at start) -> L2. Trained with the same trainer, data, feature cache
and InfoNCE (``loss.regulariser: none``), and evaluated by the same code (``lexvla.eval``, with
``sparsification="none"``): the paper's central claim is that lexical alignment matches or beats latent
alignment, and this is the latent side of that comparison. Per-patch embeddings (``return_patches``)
give the baseline's patch similarity map for PatchDis.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LexVLAConfig
from ..outputs import LexicalOutput
from ..vocab import Vocabulary
from .lexvla import CONFIG_FILE, LexVLA

DENSE_FILE = "dense.json"  # marks a saved dense baseline (lexvla.load dispatches on it)
POOLS = ("mean", "max")


class DenseBaseline(LexVLA):
    """LexVLA's encoders with latent (dense) outputs; the vocabulary and codebooks are unused.

    Trained parameters (named under ``adapter.`` so they train in the adapter's optimiser group): the
    adapter, its ``text_head``, LoRA when the config has it, and the temperature.
    """

    def __init__(self, config: LexVLAConfig, vocab: Vocabulary | None = None, pool: str = "mean") -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        config = config.replace(train_visual_codebook=False)
        super().__init__(config, vocab)
        self.pool = pool
        d = self.text.hidden_size
        self.adapter.text_head = nn.Linear(d, d)
        with torch.no_grad():
            self.adapter.text_head.weight.copy_(torch.eye(d))
            self.adapter.text_head.bias.zero_()
        self.visual_codebook.requires_grad_(False)

    def encode_image_features(self, features: torch.Tensor, return_patches: bool = False) -> LexicalOutput:
        patches = self.adapter(features.to(self.device))
        pooled = patches.mean(1) if self.pool == "mean" else patches.amax(1)
        grid = self.backbone.grid if return_patches else None
        return LexicalOutput(F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1) if return_patches else None,
                             grid)

    def _encode_text(self, texts: Sequence[str] | str, batch_size: int) -> LexicalOutput:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) > batch_size:
            return LexicalOutput(torch.cat([self._encode_text(texts[i:i + batch_size], batch_size).vectors
                                            for i in range(0, len(texts), batch_size)]))
        hidden = self.text.hidden(texts)
        return LexicalOutput(F.normalize(self.adapter.text_head(hidden), dim=-1))

    def sparsify(self, out: LexicalOutput, threshold: float | None = None, topk: int | None = None
                 ) -> LexicalOutput:
        return out if threshold is None and topk is None else out.sparsify(threshold, topk)

    def top_words(self, x, k: int = 20):
        raise TypeError("a dense baseline has no words")

    def _save_extra(self, folder: Path) -> None:
        (folder / DENSE_FILE).write_text(json.dumps({"pool": self.pool}))

    @classmethod
    def load(cls, path: str | Path) -> DenseBaseline:
        from safetensors.torch import load_file

        from .lexvla import VOCAB_FILE, WEIGHTS_FILE

        path = Path(path)
        meta = json.loads((path / DENSE_FILE).read_text())
        model = cls(LexVLAConfig.load(path / CONFIG_FILE), vocab=Vocabulary.load(path / VOCAB_FILE),
                    pool=meta.get("pool", "mean"))
        model.load_trained(load_file(path / WEIGHTS_FILE))
        return model.eval()
