"""The LexVLA model: both encoders, the shared vocabulary and the mapper, with the public encode API."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import LexVLAConfig
from ..outputs import LexicalOutput, LexVLAOutput
from ..preprocess import ImageInput
from ..sparsification import Sparsification
from ..vocab import Vocabulary, build_vocabulary, check_vocabulary
from .backbones import create_backbone
from .mapper import LexicalMapper
from .text import TextLexicalEncoder, load_causal_lm
from .vision import Adapter

logger = logging.getLogger(__name__)

CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE = "config.json", "vocab.json", "model.safetensors"


class UntrainedModelWarning(UserWarning):
    """The model's image side (adapter, visual codebook) was never trained: its image words are noise."""


class LexVLA(nn.Module):
    """Images and texts -> lexical vectors over one word vocabulary.

    Frozen: the vision backbone, the LLM (unless LoRA is configured) and the text codebook.
    Trained: adapter, visual codebook, LoRA, temperature.
    """

    def __init__(self, config: LexVLAConfig, vocab: Vocabulary | None = None) -> None:
        super().__init__()
        # init_seed seeds what is built here without its own seed (the adapter, LoRA), without touching the
        # caller's RNG; random backbones and LLMs seed themselves (0), so their frozen weights follow from
        # `arch` alone. An untrained zoo model is the same model (and fingerprint) in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self._build(config, vocab)

    def _build(self, config: LexVLAConfig, vocab: Vocabulary | None) -> None:
        self.config = config
        llm, tokenizer = load_causal_lm(config.text.source, config.text.dtype, config.text.tokenizer,
                                        config.text.arch)
        if vocab is None:
            vocab = build_vocabulary(tokenizer, config.vocab, source=config.text.source)
            logger.info("vocabulary: %d words from %s", len(vocab), config.text.source)
        check_vocabulary(vocab, llm.get_output_embeddings().weight.shape[0])
        self.vocab = vocab
        self.text = TextLexicalEncoder(config.text, llm, tokenizer, vocab.token_ids)
        self.backbone = create_backbone(config.backbone)
        self.adapter = Adapter(self.backbone.embed_dim, self.text.hidden_size, config.adapter)
        # The visual codebook starts as a copy of the frozen text codebook (paper), then is trained.
        self.visual_codebook = nn.Parameter(self.text.codebook.clone(),
                                            requires_grad=config.train_visual_codebook)
        self.mapper = LexicalMapper(config.mapper)
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / config.init_temperature).log())
        # False until trained weights are loaded (load_trained) or a trainer takes the model; until then
        # the adapter is random and image vectors mean nothing, which warn_if_untrained says once.
        self.image_trained = False
        self._untrained_warned = False

    def warn_if_untrained(self) -> bool:
        """Warn (once per model) that the image side was never trained; True when it warned."""
        if self.image_trained or self._untrained_warned:
            return False
        self._untrained_warned = True
        warnings.warn(
            f"model {self.config.name!r}: its image side was never trained (random adapter, visual codebook = "
            "text codebook), so image words, search hits and patch maps are noise. Train it (lexvla train) "
            "or pass a trained checkpoint folder.", UntrainedModelWarning, stacklevel=3)
        return True

    # ---------------------------------------------------------------- preprocessing and devices
    @property
    def preprocess(self):
        """Callable: image(s) (paths or PIL) -> (B, 3, H, W) tensor with this backbone's size/mean/std."""
        return self.backbone.preprocess

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # ---------------------------------------------------------------- image side
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen backbone patch tokens (B, P, C); cacheable, since the backbone never changes."""
        return self.backbone(pixels.to(self.device))

    def image_patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        codebook = self.visual_codebook if self.config.train_visual_codebook else self.text.codebook
        return self.adapter(features.to(self.device)) @ codebook.T

    def encode_image_features(self, features: torch.Tensor, return_patches: bool = False) -> LexicalOutput:
        vectors, patches = self.mapper.image(self.image_patch_scores(features), return_patches)
        return LexicalOutput(vectors, patches, self.backbone.grid if return_patches else None)

    def encode_image(self, images: torch.Tensor | Sequence[ImageInput] | ImageInput,
                     return_patches: bool = False, batch_size: int = 64, grad: bool = False) -> LexicalOutput:
        """Images (paths, PIL images, or a preprocessed (B, 3, H, W) tensor) -> lexical vectors.

        Runs under ``torch.inference_mode()`` (no autograd graph is kept while a large set is encoded)
        unless ``grad=True``; training goes through :meth:`forward`, which keeps gradients."""
        self.warn_if_untrained()
        with _autograd(grad):
            if not isinstance(images, torch.Tensor):
                images = [images] if isinstance(images, (str, Path)) or hasattr(images, "mode") else list(images)
                outs = [self.encode_image(self.preprocess(images[i:i + batch_size]), return_patches, grad=grad)
                        for i in range(0, len(images), batch_size)]
                return _concat(outs)
            return self.encode_image_features(self.image_features(images), return_patches)

    # ---------------------------------------------------------------- text side
    def encode_text(self, texts: Sequence[str] | str, batch_size: int = 64, grad: bool = False) -> LexicalOutput:
        """Texts -> lexical vectors, under ``torch.inference_mode()`` unless ``grad=True`` (see encode_image)."""
        with _autograd(grad):
            return self._encode_text(texts, batch_size)

    def _encode_text(self, texts: Sequence[str] | str, batch_size: int) -> LexicalOutput:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) > batch_size:
            return _concat([self._encode_text(texts[i:i + batch_size], batch_size)
                            for i in range(0, len(texts), batch_size)])
        return LexicalOutput(self.mapper.text(self.text.scores(texts)))

    # ---------------------------------------------------------------- training and similarity
    def forward(self, texts: Sequence[str] | None = None, pixels: torch.Tensor | None = None,
                features: torch.Tensor | None = None, text_vectors: torch.Tensor | None = None) -> LexVLAOutput:
        """Training pass: dense lexical vectors for both sides. Pass backbone ``features`` (from a
        cache) instead of ``pixels``, and ``text_vectors`` (cached, frozen text side) instead of texts."""
        if features is None:
            if pixels is None:
                raise ValueError("forward needs pixels or precomputed backbone features")
            features = self.image_features(pixels)
        image = self.encode_image_features(features)
        if text_vectors is not None:
            text = LexicalOutput(text_vectors.to(self.device))
        elif texts is not None:
            text = self._encode_text(texts, batch_size=max(len(texts), 1))  # with gradients (LoRA)
        else:
            raise ValueError("forward needs texts or precomputed text vectors")
        return LexVLAOutput(image=image, text=text, logit_scale=self.logit_scale.exp())

    @staticmethod
    def similarity(a: LexicalOutput | torch.Tensor, b: LexicalOutput | torch.Tensor, grad: bool = False
                   ) -> torch.Tensor:
        """Dot products (N, M) of two sets of lexical vectors; under inference mode unless ``grad=True``."""
        a = a.vectors if isinstance(a, LexicalOutput) else a
        b = b.vectors if isinstance(b, LexicalOutput) else b
        with _autograd(grad):
            return a @ b.T

    @property
    def sparsification(self) -> Sparsification:
        """The model's default inference sparsification (``config.mapper.threshold/topk``)."""
        return Sparsification(self.config.mapper.threshold, self.config.mapper.topk)

    def sparsify(self, out: LexicalOutput, threshold: float | str | None = None, topk: int | None = None
                 ) -> LexicalOutput:
        """Sparsify with the given settings, or (neither given) the model's default, :attr:`sparsification`."""
        if threshold is None and topk is None:
            return self.sparsification(out)
        return Sparsification(threshold, topk)(out)

    def top_words(self, x: LexicalOutput | torch.Tensor, k: int = 20) -> list[list[tuple[str, float]]]:
        """The k highest-weighted words of each vector (zero entries never listed)."""
        v = x.vectors if isinstance(x, LexicalOutput) else x
        v = v.detach().float().reshape(-1, v.shape[-1]).cpu()
        vals, idx = v.topk(min(k, v.shape[-1]), dim=-1)
        return [[(self.vocab.words[int(i)], float(w)) for w, i in zip(vs, ix) if w > 0]
                for vs, ix in zip(vals, idx)]

    # ---------------------------------------------------------------- checkpoints
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: adapter, visual codebook, LoRA, temperature."""
        # clone: a snapshot must not change as training goes on (on CPU .cpu() shares storage)
        return {n: t.detach().cpu().clone() for n, t in self._trained_tensors().items()}

    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        """Trained parameters, plus statistics training keeps (the text side's running prior mean)."""
        out: dict[str, torch.Tensor] = {n: p for n, p in self.named_parameters() if p.requires_grad}
        out.update({n: b for n, b in self.named_buffers() if n.endswith("prior_state")})
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        h.update(self.vocab.fingerprint().encode())
        for name, t in sorted(self.trainable_state_dict().items()):
            h.update(name.encode())
            h.update(t.float().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_pretrained(self, path: str | Path) -> Path:
        """config.json + vocab.json + model.safetensors (trained weights only), written atomically."""
        from safetensors.torch import save_file

        from lexvla.io import atomic_dir

        path = Path(path)
        # Staged beside ``path`` and swapped in; leftovers of a killed save (.old, .tmp) are repaired first.
        with atomic_dir(path) as tmp:
            self.config.save(tmp / CONFIG_FILE)
            self.vocab.save(tmp / VOCAB_FILE)
            save_file(self.trainable_state_dict(), tmp / WEIGHTS_FILE, metadata={"format": "lexvla"})
            self._save_extra(tmp)
        return path

    def _save_extra(self, folder: Path) -> None:
        """Subclasses (the dense baseline) add their own files to a checkpoint here."""

    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self._trained_tensors())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing={sorted(missing)[:5]} "
                             f"unexpected={sorted(unexpected)[:5]}")
        params = self._trained_tensors()
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise ValueError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, "
                                     f"model expects {tuple(params[name].shape)}")
                params[name].copy_(value)
        self.image_trained = True


def _autograd(grad: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if grad else torch.inference_mode()


def _concat(outs: list[LexicalOutput]) -> LexicalOutput:
    if len(outs) == 1:
        return outs[0]
    patches = None if outs[0].patch_vectors is None else torch.cat([o.patch_vectors for o in outs])
    return LexicalOutput(torch.cat([o.vectors for o in outs]), patches, outs[0].grid)
