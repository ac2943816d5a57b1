"""Sparsity analysis: recall as the number of active words shrinks, sparsity measures, over-used words.

The sweep re-uses one set of dense encoded vectors (cached), and applies each setting to both sides:
thresholds as multiples of 1/sqrt(V) (0 = dense) and top-k values (from V down to ~50 words).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._results import JSONResult
from .encode import Sparsification
from .metrics import cross_flops, sparsity_stats
from .retrieval import RetrievalConfig, encode_set, retrieval_from_vectors
from .retrieval_data import RetrievalSet

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD_MULTIPLES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
DEFAULT_TOPKS = (4096, 2048, 1024, 512, 256, 128, 64, 50)


@dataclass
class OverusedWord:
    word: str
    mean_activation: float  # mean weight over the set (after sparsification)
    active_share: float  # share of vectors in which the word is non-zero


def overused_words(vectors: torch.Tensor, words: Sequence[str], n: int = 25) -> list[OverusedWord]:
    """The ``n`` words with the largest mean activation over a set of (sparsified) vectors.

    A word with a high mean that is active in most vectors is a "false discovery": it carries no
    information about any particular sample, which is what the overuse penalty pushes down.
    """
    if vectors.shape[1] != len(words):
        raise ValueError(f"vectors have {vectors.shape[1]} dims but the vocabulary has {len(words)} words")
    mean = vectors.float().mean(0)
    share = (vectors != 0).float().mean(0)
    top = mean.topk(min(n, len(words))).indices
    return [OverusedWord(words[int(i)], float(mean[i]), float(share[i])) for i in top if mean[i] > 0]


@dataclass
class SparsityReport(JSONResult):
    dataset: str
    model: str
    vocab_size: int
    points: list[dict[str, Any]]  # one per setting: mode, value, active words, recalls
    stats: dict[str, dict[str, Any]]  # image / text sparsity measures at the default setting
    cross_flops: float
    overused: dict[str, list[dict[str, Any]]]
    default: dict[str, Any]
    figure: str | None = None
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        head = f"{'setting':<18}{'active img':>11}{'active txt':>11}{'I->T R@1':>10}{'T->I R@1':>10}{'I->T R@5':>10}{'T->I R@5':>10}"
        lines = [head, "-" * len(head)]
        for p in self.points:
            name = p["mode"] if p["value"] is None else f"{p['mode']} {p['value']:.4g}"
            lines.append(
                f"{name:<18}{p['active_image']:>11.1f}{p['active_text']:>11.1f}"
                f"{100 * p['image_to_text']['R@1']:>10.2f}{100 * p['text_to_image']['R@1']:>10.2f}"
                f"{100 * p['image_to_text'].get('R@5', float('nan')):>10.2f}{100 * p['text_to_image'].get('R@5', float('nan')):>10.2f}"
            )
        for side in ("image", "text"):
            s = self.stats[side]
            lines.append(
                f"{side}: mean active {s['mean_active']:.1f} / {self.vocab_size} (sparsity {100 * s['sparsity']:.2f}%), "
                f"FLOPS sum_j p_j^2 {s['flops']:.2f}, overuse {s['overuse']:.3g}"
            )
            lines.append("  most used: " + ", ".join(f"{w['word']} ({100 * w['active_share']:.0f}%)" for w in self.overused[side][:12]))
        lines.append(f"image-text FLOPS sum_j p_j(img) p_j(txt): {self.cross_flops:.2f}")
        return "\n".join(lines)


def sparsity_settings(
    vocab_size: int, threshold_multiples: Sequence[float] = DEFAULT_THRESHOLD_MULTIPLES, topks: Sequence[int] = DEFAULT_TOPKS
) -> list[Sparsification]:
    base = Sparsification().threshold_for(vocab_size)  # 1/sqrt(V)
    settings = [Sparsification(threshold=m * base) for m in threshold_multiples]
    settings += [Sparsification(threshold=None, topk=k) for k in topks if k < vocab_size]
    return settings


def sparsity_analysis(
    model: Any,
    data: RetrievalSet,
    config: RetrievalConfig | None = None,
    settings: Sequence[Sparsification] | None = None,
    words: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    model_name: str = "",
    top_words: int = 25,
) -> SparsityReport:
    """Recall at each sparsification setting, plus sparsity measures and over-used words at ``config``'s
    setting (default: 1/sqrt(V) threshold). ``words`` default to ``model.vocab.words``."""
    config = config or RetrievalConfig()
    enc = encode_set(model, data, config)
    v = enc.images.shape[1]
    if words is None:
        vocab = getattr(model, "vocab", None)
        words = list(vocab.words) if vocab is not None else [f"dim{i}" for i in range(v)]
    settings = list(settings) if settings is not None else sparsity_settings(v)
    points = []
    for s in settings:
        r = retrieval_from_vectors(enc.images, enc.texts, data, s, config.ties, config.ks)
        points.append({
            "mode": s.mode,
            "value": r.sparsification["value"],
            "active_image": r.active_words["image"],
            "active_text": r.active_words["text"],
            "active_words": (r.active_words["image"] * r.num_images + r.active_words["text"] * r.num_texts)
            / (r.num_images + r.num_texts),
            "image_to_text": {f"R@{k}": x for k, x in r.image_to_text.recall.items()},
            "text_to_image": {f"R@{k}": x for k, x in r.text_to_image.recall.items()},
        })
        logger.info("%s: active %.1f / %.1f, R@1 %.3f / %.3f", s, points[-1]["active_image"],
                    points[-1]["active_text"], r.image_to_text.recall.get(1, float("nan")),
                    r.text_to_image.recall.get(1, float("nan")))
    img = config.sparsification(enc.images)
    txt = config.sparsification(enc.texts)
    report = SparsityReport(
        dataset=data.name,
        model=model_name or getattr(model, "fingerprint", lambda: type(model).__name__)(),
        vocab_size=v,
        points=points,
        stats={"image": sparsity_stats(img).to_dict(), "text": sparsity_stats(txt).to_dict()},
        cross_flops=cross_flops(img, txt),
        overused={"image": [asdict(w) for w in overused_words(img, words, top_words)],
                  "text": [asdict(w) for w in overused_words(txt, words, top_words)]},
        default=config.sparsification.describe(v),
        protocol=data.protocol,
    )
    if out_dir is not None:
        from .figures import sparsity_plot

        report.figure = str(sparsity_plot(points, Path(out_dir) / f"sparsity_{data.name}.png",
                                          f"{data.name}: recall vs active words"))
    return report


def _caption_words(caption: str) -> set[str]:
    return {"".join(ch for ch in w if ch.isalpha()).lower() for w in caption.split()} - {""}


def overused_outside_caption(vectors: torch.Tensor, captions: Sequence[str], words: Sequence[str],
                             n: int = 10) -> list[OverusedWord]:
    """Words active in the largest share of captions whose own text does not contain them.

    ``vectors`` are the captions' (sparsified) lexical vectors. A word the caption names is a right
    answer however often it fires; one it does not name, active in many captions, is a false discovery
    (the target: none above 20% of the test captions).
    """
    if vectors.shape[0] != len(captions) or vectors.shape[1] != len(words):
        raise ValueError(f"vectors {tuple(vectors.shape)} do not fit {len(captions)} captions x {len(words)} words")
    active = (vectors != 0).float()
    named = torch.zeros_like(active, dtype=torch.bool)
    index = {w.lower(): i for i, w in enumerate(words)}
    for row, caption in enumerate(captions):
        for w in _caption_words(caption):
            if w in index:
                named[row, index[w]] = True
    share = (active * ~named).mean(0)
    mean = (vectors.float() * ~named).mean(0)
    top = share.topk(min(n, len(words))).indices
    return [OverusedWord(words[int(i)], float(mean[i]), float(share[i])) for i in top if share[i] > 0]


def top_word_share(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Per pair of rows, the share of the score ``a_i . b_i`` carried by its ``k`` largest word products
    (how well a hit is explained by its top-k shared words); 0 where the score is 0."""
    prod = (a.float() * b.float()).clamp_min(0)
    total = prod.sum(-1)
    top = prod.topk(min(k, prod.shape[-1]), dim=-1).values.sum(-1)
    return torch.where(total > 0, top / total.clamp_min(1e-12), torch.zeros_like(total))
