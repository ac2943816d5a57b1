"""Metrics: retrieval ranks and recalls, semantic-segmentation confusion/IoU, sparsity measures.

All functions are pure numpy/torch on arrays the caller has already computed, so they can be checked
against straightforward reference implementations (see ``tests/test_eval_metrics.py``).

Retrieval ties
--------------
Scores tie often with sparse lexical vectors (two vectors that share no active word score exactly 0).
The rank of a query is ``1 + (number of negatives that beat its best positive)``, where "beat" is

* ``pessimistic`` (default): score ``>=`` the best positive's score. A tie counts against the model, so
  a collapsed model (all scores equal) gets chance-level recall or worse, never a perfect one;
* ``optimistic``: score ``>`` the best positive's score (ties count for the model).

Other positives never count against a query. Both rules are independent of candidate order, so results
are deterministic and do not depend on how the dataset is sorted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..losses import FlopsLoss, OveruseLoss  # the training terms' formulas, reused

TIE_RULES = ("pessimistic", "optimistic")
DEFAULT_KS = (1, 5, 10)


def ranks_from_scores(
    scores: torch.Tensor | np.ndarray, positives: torch.Tensor | np.ndarray, ties: str = "pessimistic"
) -> np.ndarray:
    """Rank (1-based) of the best-scoring positive of each query.

    scores: (Q, C) similarity of each query to each candidate (higher = better).
    positives: (Q, C) boolean, True where the candidate is a correct answer for the query.
    Raises ValueError for an empty matrix, a shape mismatch, or a query without any positive.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    s = torch.as_tensor(scores)
    p = torch.as_tensor(positives, dtype=torch.bool)
    if s.ndim != 2 or s.shape != p.shape:
        raise ValueError(f"scores {tuple(s.shape)} and positives {tuple(p.shape)} must be equal (Q, C) shapes")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"cannot rank an empty score matrix of shape {tuple(s.shape)}: no queries or candidates")
    no_pos = (~p.any(1)).nonzero().flatten()
    if len(no_pos):
        raise ValueError(
            f"{len(no_pos)} of {s.shape[0]} queries have no positive candidate (first: query {int(no_pos[0])}); "
            "every query needs at least one correct answer"
        )
    s = s.float()
    best_pos = torch.where(p, s, torch.full_like(s, -torch.inf)).max(1, keepdim=True).values
    beats = s >= best_pos if ties == "pessimistic" else s > best_pos
    return (1 + (beats & ~p).sum(1)).cpu().numpy().astype(np.int64)


@dataclass
class RecallResult:
    """Recall@K (fractions in [0, 1]) and rank statistics of one retrieval direction."""

    recall: dict[int, float]
    mean_rank: float
    median_rank: float
    num_queries: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recall"] = {f"R@{k}": v for k, v in self.recall.items()}
        return d


def recall_from_ranks(ranks: np.ndarray | Sequence[int], ks: Sequence[int] = DEFAULT_KS) -> RecallResult:
    """R@K = share of queries whose rank is <= K; mean and median rank."""
    r = np.asarray(ranks)
    if r.size == 0:
        raise ValueError("no ranks given: the query set is empty")
    if any(k <= 0 for k in ks):
        raise ValueError(f"recall cut-offs must be positive, got {list(ks)}")
    return RecallResult(
        recall={int(k): float((r <= k).mean()) for k in ks},
        mean_rank=float(r.mean()),
        median_rank=float(np.median(r)),
        num_queries=int(r.size),
    )


def key_positives(query_keys: np.ndarray, candidate_keys: np.ndarray) -> torch.Tensor:
    """Positives as "same key": (Q, C) boolean, True where ``query_keys[q] == candidate_keys[c]``.

    Image i's captions carry key i in Karpathy splits; on easy-vqa the key is (colour, shape).
    """
    q = torch.as_tensor(np.asarray(query_keys, dtype=np.int64))
    c = torch.as_tensor(np.asarray(candidate_keys, dtype=np.int64))
    return q[:, None] == c[None, :]


def chunked_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_keys: np.ndarray,
    candidate_keys: np.ndarray,
    ties: str = "pessimistic",
    chunk: int = 1024,
) -> np.ndarray:
    """Ranks for dot-product retrieval of ``candidates`` by ``queries`` without the full score matrix.

    Memory stays at ``chunk x C`` scores (COCO 5K: 25,000 x 5,000 would be 500 MB at once).
    """
    if len(queries) != len(query_keys) or len(candidates) != len(candidate_keys):
        raise ValueError("each query and candidate vector needs exactly one key")
    out = []
    cand_t = candidates.float().T.contiguous()
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk].float()
        scores = q @ cand_t
        out.append(ranks_from_scores(scores, key_positives(query_keys[start : start + chunk], candidate_keys), ties))
    if not out:
        raise ValueError("cannot rank an empty query set")
    return np.concatenate(out)


# ----------------------------------------------------------------------------- segmentation


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels skipped.

    A ground-truth value outside [0, K) other than ``ignore_index`` is an error (it would silently
    vanish otherwise).
    """
    pred = np.asarray(pred).ravel().astype(np.int64)
    target = np.asarray(target).ravel().astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"prediction ({pred.size} pixels) and mask ({target.size} pixels) differ in size")
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bad.any():
        raise ValueError(
            f"mask has labels {sorted(set(np.unique(target[bad]).tolist()))[:10]} outside [0, {num_classes}) "
            f"that are not the ignore label {ignore_index}"
        )
    if ((pred[valid] < 0) | (pred[valid] >= num_classes)).any():
        raise ValueError(f"prediction has labels outside [0, {num_classes})")
    idx = target[valid] * num_classes + pred[valid]
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class SegmentationScores:
    """mIoU over classes with a non-empty union (ground truth or prediction), per-class IoU (None where
    the class appears in neither), pixel accuracy over non-ignored pixels."""

    miou: float
    pixel_accuracy: float
    iou: list[float | None]
    num_pixels: int

    def to_dict(self) -> dict:
        return asdict(self)


def segmentation_scores(conf: np.ndarray) -> SegmentationScores:
    """Scores from a dataset-level confusion matrix (summed over images, as VOC/mmseg do)."""
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    if total == 0:
        raise ValueError("no labelled pixels: every ground-truth pixel is ignored or the set is empty")
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    return SegmentationScores(
        miou=float(np.mean(present)), pixel_accuracy=float(tp.sum() / total), iou=iou, num_pixels=int(total)
    )


# ----------------------------------------------------------------------------- sparsity


@dataclass
class SparsityStats:
    """How sparse a set of lexical vectors is.

    mean_active / median_active: non-zero words per vector. sparsity: 1 - mean_active / V.
    flops: sum_j p_j^2 with p_j the share of vectors in which word j is active = expected number of
        multiplications in one dot product of two vectors from the set (SPLADE's FLOPS measure, the
        "quadratic" sparsity measure: it punishes words active everywhere far more than rare ones).
    flops_reg: sum_j (mean_i |s_ij|)^2, the value of the FLOPs regulariser on this set.
    overuse: sum_j (a_j / sum_k a_k) a_j^2 with a_j = mean_i |s_ij|, the (inferred) overuse penalty.
    Both regulariser values come from the training loss's own formulas (``lexvla.losses``).
    """

    num_vectors: int
    vocab_size: int
    mean_active: float
    median_active: float
    sparsity: float
    flops: float
    flops_reg: float
    overuse: float

    def to_dict(self) -> dict:
        return asdict(self)


def sparsity_stats(vectors: torch.Tensor) -> SparsityStats:
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"need a non-empty (N, V) matrix, got shape {tuple(vectors.shape)}")
    v = vectors.float()
    active = (v != 0).sum(1).float()
    share = (v != 0).float().mean(0)
    return SparsityStats(
        num_vectors=len(v),
        vocab_size=v.shape[1],
        mean_active=float(active.mean()),
        median_active=float(active.median()),
        sparsity=float(1 - active.mean() / v.shape[1]),
        flops=float(share.pow(2).sum()),
        flops_reg=float(FlopsLoss()(v)),
        overuse=float(OveruseLoss()(v)),
    )


def cross_flops(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum_j p_j(a) p_j(b): expected multiplications in an a-vs-b dot product (image-text retrieval cost)."""
    return float(((a != 0).float().mean(0) * (b != 0).float().mean(0)).sum())
