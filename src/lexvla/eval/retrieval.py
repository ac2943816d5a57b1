"""Zero-shot image <-> text retrieval: encode, sparsify, rank, R@K both ways."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ._results import JSONResult
from .encode import Sparsification, VectorCache, encode_cached, model_fingerprint
from .metrics import DEFAULT_KS, TIE_RULES, RecallResult, chunked_ranks, recall_from_ranks
from .retrieval_data import RetrievalSet

logger = logging.getLogger(__name__)


@dataclass
class RetrievalConfig:
    """How to run a retrieval evaluation (everything here is recorded in the results)."""

    sparsification: Sparsification = field(default_factory=Sparsification)
    ties: str = "pessimistic"  # see lexvla.eval.metrics
    ks: tuple[int, ...] = DEFAULT_KS
    batch_size: int = 32
    cache: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sparsification, str):
            self.sparsification = Sparsification.parse(self.sparsification)
        if self.ties not in TIE_RULES:
            raise ValueError(f"ties must be one of {TIE_RULES}, got {self.ties!r}")
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) <= 0:
            raise ValueError(f"ks must be positive cut-offs, got {self.ks}")
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")


@dataclass
class EncodedSet:
    """Dense (unsparsified) vectors of a retrieval set, as the model produced them."""

    images: torch.Tensor
    texts: torch.Tensor
    seconds: float


def encode_set(model: Any, data: RetrievalSet, config: RetrievalConfig) -> EncodedSet:
    start = time.perf_counter()
    cache = VectorCache.default() if config.cache else None
    kw = {"batch_size": config.batch_size, "cache": cache, "progress": config.progress}
    images = encode_cached(model, "image", data.image_paths, **kw)
    texts = encode_cached(model, "text", data.texts, **kw)
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"image vectors have {images.shape[1]} dims but text vectors {texts.shape[1]}")
    return EncodedSet(images, texts, time.perf_counter() - start)


@dataclass
class RetrievalResult(JSONResult):
    dataset: str
    model: str
    num_images: int
    num_texts: int
    image_to_text: RecallResult
    text_to_image: RecallResult
    sparsification: dict[str, Any]
    active_words: dict[str, float]  # mean non-zero entries per vector, after sparsification
    ties: str
    protocol: dict[str, Any]
    encode_seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_to_text"] = self.image_to_text.to_dict()
        d["text_to_image"] = self.text_to_image.to_dict()
        return d

    def table(self) -> str:
        """Plain-text table: one row per direction, recalls in percent."""
        ks = list(self.image_to_text.recall)
        head = f"{'direction':<14}" + "".join(f"{'R@' + str(k):>8}" for k in ks) + f"{'mean r':>9}{'med r':>7}"
        rows = [head, "-" * len(head)]
        for name, r in (("image->text", self.image_to_text), ("text->image", self.text_to_image)):
            rows.append(
                f"{name:<14}" + "".join(f"{100 * r.recall[k]:>8.2f}" for k in ks) + f"{r.mean_rank:>9.1f}{r.median_rank:>7.0f}"
            )
        s = self.sparsification
        rows.append(
            f"{self.dataset}: {self.num_images} images, {self.num_texts} texts; sparsification {s['mode']}"
            + (f" {s['value']:.4g}" if s.get("value") is not None else "")
            + f"; active words image {self.active_words['image']:.0f}, text {self.active_words['text']:.0f}; ties {self.ties}"
        )
        return "\n".join(rows)


def retrieval_from_vectors(
    images: torch.Tensor,
    texts: torch.Tensor,
    data: RetrievalSet,
    sparsification: Sparsification,
    ties: str = "pessimistic",
    ks: Sequence[int] = DEFAULT_KS,
    model_name: str = "",
    encode_seconds: float = 0.0,
) -> RetrievalResult:
    """Rank with already-encoded dense vectors (the sparsity sweep calls this once per setting)."""
    img = sparsification(images)
    txt = sparsification(texts)
    i2t = chunked_ranks(img, txt, data.image_keys, data.text_keys, ties)
    t2i = chunked_ranks(txt, img, data.text_keys, data.image_keys, ties)
    return RetrievalResult(
        dataset=data.name,
        model=model_name,
        num_images=len(img),
        num_texts=len(txt),
        image_to_text=recall_from_ranks(i2t, ks),
        text_to_image=recall_from_ranks(t2i, ks),
        sparsification=sparsification.describe(images.shape[1]),
        active_words={"image": float((img != 0).sum(1).float().mean()), "text": float((txt != 0).sum(1).float().mean())},
        ties=ties,
        protocol=data.protocol,
        encode_seconds=encode_seconds,
    )


def evaluate_retrieval(model: Any, data: RetrievalSet, config: RetrievalConfig | None = None, model_name: str = "") -> RetrievalResult:
    """Encode ``data`` with ``model`` (cached), sparsify, and compute R@K / ranks in both directions."""
    config = config or RetrievalConfig()
    enc = encode_set(model, data, config)
    name = model_name or model_fingerprint(model) or type(model).__name__
    result = retrieval_from_vectors(enc.images, enc.texts, data, config.sparsification, config.ties, config.ks, name, enc.seconds)
    logger.info("retrieval on %s: R@1 image->text %.4f, text->image %.4f", data.name,
                result.image_to_text.recall.get(1, float("nan")), result.text_to_image.recall.get(1, float("nan")))
    return result
