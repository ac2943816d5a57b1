"""The noisy-token finder: which caption words does the image contradict?

CAL's raw signal, the logit of a token with the image minus without it, is dominated by an offset that
every token gets from "there is an image" (docs/cal.md: +20..30 for all tokens of a briefly trained VLM),
so ranking captions by their smallest raw difference surfaces function words, never wrong captions. The
finder scores a token instead by how much the image changes its probability *relative to what the
language model alone expects*, and only content tokens:

* signal ``"pmi"``: ``log p(y_t | image, prefix) - log p(y_t | prefix)`` with the prefix-only prediction
  from CAL's "without image" forward (the log-softmax removes the per-position offset that raw logits
  carry); ``"pmi_marginal"``: the same with the prefix-only prediction taken as the VLM's marginal over a
  set of reference images, ``log mean_k p(y_<=t | image_k) - log mean_k p(y_<t | image_k)`` (what the
  model expects of the text when it knows the kind of image but not this one: the "without image"
  forward is out of distribution for a VLM that never saw a caption without its image, and its prior
  over names is the base LM's, not the captions'); or ``"logit_diff"``: CAL's raw difference;
* normalisation per caption: ``"function"`` subtracts the mean over the caption's non-content tokens
  (separators, function words: what the image should not change), ``"median"`` subtracts the median over
  its content tokens, ``"none"`` keeps the value;
* a word's score is the minimum over its tokens, a caption's the minimum over its content words (its most
  contradicted content word): low = suspect.

Detection quality is ROC AUC against known injections (:func:`roc_auc`); the baseline detector is the
caption's plain cross-entropy under the VLM (high = suspect).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

SIGNALS = ("pmi", "pmi_marginal", "logit_diff")
NORMALISATIONS = ("function", "median", "none")


@dataclass(frozen=True)
class FinderConfig:
    signal: str = "pmi"
    normalise: str = "function"

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ValueError(f"FinderConfig.signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"FinderConfig.normalise must be one of {NORMALISATIONS}, got {self.normalise!r}")


@dataclass
class ScoredCaption:
    """Finder output for one caption: per token its score (None for non-content tokens), per word the
    minimum over its tokens, and the caption's score (its most contradicted content word)."""

    token_scores: list[float | None]
    word_scores: dict[int, float]
    score: float
    worst_word: int | None
    ce: float  # plain mean cross-entropy of the caption tokens with the image (baseline detector)


def score_tokens(values: Sequence[float], content: Sequence[bool], normalise: str = "function") -> list[float | None]:
    """Normalise one caption's per-token values; non-content tokens get None."""
    if len(values) != len(content):
        raise ValueError(f"{len(values)} values for {len(content)} content flags")
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    ref = 0.0
    if normalise == "function":
        others = [v for v, c in zip(values, content, strict=True) if not c]
        ref = sum(others) / len(others) if others else 0.0
    elif normalise == "median":
        mine = [v for v, c in zip(values, content, strict=True) if c]
        ref = statistics.median(mine) if mine else 0.0
    return [v - ref if c else None for v, c in zip(values, content, strict=True)]


def score_caption(values: Sequence[float], token_word: Sequence[int | None], content_words: Sequence[bool],
                  nll: Sequence[float], normalise: str = "function") -> ScoredCaption:
    """Score a caption from its per-token signal ``values``, each token's word index (None: separator),
    each word's content flag and the per-token negative log-likelihood with the image."""
    content = [w is not None and content_words[w] for w in token_word]
    scores = score_tokens(values, content, normalise)
    words: dict[int, float] = {}
    for s, w in zip(scores, token_word, strict=True):
        if s is not None and w is not None:
            words[w] = min(words.get(w, s), s)
    worst = min(words, key=words.__getitem__) if words else None
    ce = sum(nll) / len(nll) if nll else float("nan")
    return ScoredCaption(scores, words, words[worst] if worst is not None else float("nan"), worst, ce)


# ----------------------------------------------------------------------------------------- ROC / AUC
def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) of ``score >= threshold`` over all thresholds
    (higher score = predicted positive); ties move both rates at once."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    pos = sum(bool(x) for x in labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise ValueError("ROC needs both positive and negative examples")
    pairs = sorted(zip(scores, labels, strict=True), key=lambda p: -p[0])
    fpr, tpr, tp, fp, i = [0.0], [0.0], 0, 0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            tp += bool(pairs[j][1])
            fp += not pairs[j][1]
            j += 1
        fpr.append(fp / neg)
        tpr.append(tp / pos)
        i = j
    return fpr, tpr


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties count half."""
    fpr, tpr = roc_curve(scores, labels)
    return sum((fpr[k] - fpr[k - 1]) * (tpr[k] + tpr[k - 1]) / 2 for k in range(1, len(fpr)))
