"""Synthetic sparse collections for benchmarks and tests: shaped like a real model's vectors, or Zipf.

A :class:`VectorStats` file (JSON) records what a model's lexical vectors look like, measured from
vectors it really encoded (``bench/vector_stats.py``): per side (documents = images, queries =
captions) the distribution of active words per vector, how concentrated a vector's weight is (its
sorted, L2-normalised weight profile) and the document frequency of words by rank (the posting-list
length distribution). :func:`generate` draws any number of vectors with those statistics, so the
search benchmark follows whatever the project's model emits; re-measure after retraining and the
benchmark changes with it. :func:`zipf_sparse` is the older fixed workload (Zipf word frequencies,
a fixed number of log-normal weights), kept as an option.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lexvla.io import atomic_write_json

STATS_FORMAT = 1
PROFILE_RANKS = 4096  # weight profile kept for the first ranks (vectors longer than this reuse its tail)
_WORD_PERM_SEED = 1234  # rank -> dimension, shared by documents and queries (frequent words agree)


@dataclass
class SideStats:
    """Statistics of one side (documents or queries) of a collection."""

    n: int  # vectors measured
    active_quantiles: list[float]  # 101 quantiles (0, 1, ..., 100 %) of active words per vector
    weight_profile: list[float]  # mean L2-normalised weight at rank r, over vectors with more than r words
    df_ranks: list[int]  # word ranks (1 = most frequent), log-spaced
    df_values: list[float]  # fraction of vectors in which the word of that rank is active
    active_mean: float = 0.0
    top16_share: float = 0.0  # mean share of a vector's summed weight held by its 16 largest words

    def __post_init__(self) -> None:
        if len(self.active_quantiles) != 101:
            raise ValueError(f"active_quantiles needs 101 values, got {len(self.active_quantiles)}")
        if len(self.df_ranks) != len(self.df_values) or not self.df_ranks:
            raise ValueError("df_ranks and df_values must be non-empty and of equal length")
        if not self.weight_profile:
            raise ValueError("weight_profile is empty")

    def df_curve(self, dim: int) -> np.ndarray:
        """Document frequency of every rank 1..dim (log-log interpolation of the measured points)."""
        ranks = np.asarray(self.df_ranks, dtype=np.float64)
        vals = np.maximum(np.asarray(self.df_values, dtype=np.float64), 1e-9)
        r = np.arange(1, dim + 1, dtype=np.float64)
        return np.exp(np.interp(np.log(r), np.log(ranks), np.log(vals), right=np.log(vals[-1])))

    def summary(self, dim: int) -> dict:
        """The numbers docs/search.md reports."""
        q = self.active_quantiles
        df = self.df_curve(dim)
        return {"active_p10": q[10], "active_median": q[50], "active_p90": q[90], "active_mean": self.active_mean,
                "top16_share": self.top16_share, "df_max": float(df.max()), "words_over_20pct": int((df > 0.2).sum()),
                "postings_per_word_mean": float(df.sum() / dim)}


@dataclass
class VectorStats:
    """What a model's document and query vectors look like (see the module docstring)."""

    dim: int
    docs: SideStats
    queries: SideStats
    source: dict = field(default_factory=dict)  # model, data, sparsification it was measured with
    format: int = STATS_FORMAT

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> VectorStats:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != STATS_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {STATS_FORMAT}")
            return cls(dim=int(raw["dim"]), docs=SideStats(**raw["docs"]), queries=SideStats(**raw["queries"]),
                       source=raw.get("source", {}))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a vector statistics file ({type(err).__name__}: {err})") from None


def measure_side(m: sp.csr_matrix) -> SideStats:
    """Statistics of the rows of a CSR matrix (one vector per row; zeros are not active)."""
    m = sp.csr_matrix(m, dtype=np.float32, copy=True)
    m.eliminate_zeros()
    n, dim = m.shape
    if n == 0:
        raise ValueError("cannot measure an empty collection")
    active = np.diff(m.indptr)
    profile_sum = np.zeros(PROFILE_RANKS)
    profile_cnt = np.zeros(PROFILE_RANKS)
    top16 = np.zeros(n)
    for i in range(n):
        w = np.sort(np.abs(m.data[m.indptr[i]:m.indptr[i + 1]]))[::-1].astype(np.float64)
        if len(w) == 0:
            continue
        top16[i] = w[:16].sum() / w.sum()
        w = w[:PROFILE_RANKS] / np.linalg.norm(w)
        profile_sum[:len(w)] += w
        profile_cnt[:len(w)] += 1
    keep = profile_cnt > 0
    profile = [float(f"{v:.5g}") for v in profile_sum[keep] / profile_cnt[keep]] or [1.0]
    df = np.sort(np.bincount(m.indices, minlength=dim))[::-1] / n
    ranks = np.unique(np.round(np.geomspace(1, dim, 200)).astype(int))
    return SideStats(n=n, active_quantiles=np.quantile(active, np.linspace(0, 1, 101)).tolist(),
                     weight_profile=profile, df_ranks=ranks.tolist(), df_values=[float(f"{v:.5g}") for v in df[ranks - 1]],
                     active_mean=float(active.mean()), top16_share=float(top16[active > 0].mean()))


def measure(docs: sp.csr_matrix, queries: sp.csr_matrix, source: dict | None = None) -> VectorStats:
    if docs.shape[1] != queries.shape[1]:
        raise ValueError(f"documents have {docs.shape[1]} dimensions, queries {queries.shape[1]}")
    return VectorStats(docs.shape[1], measure_side(docs), measure_side(queries), dict(source or {}))


def _first_distinct(draws: np.ndarray, active: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``active`` distinct values of ``draws`` in draw order; and which rows had enough."""
    order = np.argsort(draws, axis=1, kind="stable")
    srt = np.take_along_axis(draws, order, axis=1)
    first_sorted = np.ones_like(srt, dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.zeros_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)  # first occurrence, at its draw position
    keep = first & (np.cumsum(first, axis=1) <= active)
    ok = keep.sum(axis=1) == active
    picked = np.sort(draws[ok][keep[ok]].reshape(-1, active), axis=1)
    return picked, ok


def _draw_words(rng: np.random.Generator, cdf: np.ndarray, perm: np.ndarray, active: int, rows: int) -> np.ndarray:
    """``rows`` x ``active`` distinct dimensions: successive sampling (weighted, without replacement)."""
    dim = len(cdf)
    out = np.empty((rows, active), dtype=np.int64)
    todo = np.arange(rows)
    m = int(2.3 * active) + 10
    while len(todo):
        draws = np.minimum(np.searchsorted(cdf, rng.random((len(todo), m))), dim - 1)
        picked, ok = _first_distinct(perm[draws], active)
        out[todo[ok]] = picked
        todo, m = todo[~ok], min(m * 2, 64 * dim)  # rare rows with too few distinct words: draw more
    return out


def _sample(rng: np.random.Generator, probs: np.ndarray, perm: np.ndarray, actives: np.ndarray,
            profile: np.ndarray, noise: float) -> sp.csr_matrix:
    n, dim = len(actives), len(probs)
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    indptr = np.concatenate([[0], np.cumsum(actives)]).astype(np.int64)
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.float32)
    for a in np.unique(actives):  # rows of equal length are drawn together
        rows = np.flatnonzero(actives == a)
        words = _draw_words(rng, cdf, perm, int(a), len(rows))
        base = profile[np.minimum(np.arange(a), len(profile) - 1)]
        w = base[None, :] * rng.lognormal(0.0, noise, size=(len(rows), a))
        # a word's weight does not depend on how frequent it is: shuffle each row's weights
        w = np.take_along_axis(w, np.argsort(rng.random(w.shape), axis=1), axis=1)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        pos = (indptr[rows][:, None] + np.arange(a)[None, :]).ravel()
        indices[pos] = words.ravel()
        data[pos] = w.ravel()
    return sp.csr_matrix((data, indices, indptr), shape=(n, dim))


def generate(side: SideStats, n: int, dim: int, seed: int, noise: float = 0.25, calibrate: int = 3,
             chunk: int = 50_000) -> sp.csr_matrix:
    """``n`` unit vectors over ``dim`` words with the statistics of ``side``.

    Active words per vector follow the measured quantiles; words are drawn without replacement with
    probabilities calibrated (``calibrate`` rounds on a pilot sample) so their document frequencies
    follow the measured curve; weights follow the measured profile, times log-normal ``noise``.
    """
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(_WORD_PERM_SEED).permutation(dim)
    q = np.asarray(side.active_quantiles, dtype=np.float64)
    actives = np.clip(np.round(np.interp(rng.random(n), np.linspace(0, 1, 101), q)), 1, dim).astype(np.int64)
    target = side.df_curve(dim)
    profile = np.asarray(side.weight_profile, dtype=np.float64)
    probs = target / target.sum()
    pilot = min(n, 20_000)
    for _ in range(calibrate):  # successive sampling saturates frequent words: correct the probabilities
        m = _sample(np.random.default_rng(seed + 1), probs, perm, actives[:pilot], profile, noise)
        got = np.sort(np.bincount(m.indices, minlength=dim))[::-1] / pilot
        probs = probs * (target / np.maximum(got, 0.5 / pilot)) ** 0.8
        probs /= probs.sum()
    parts = [_sample(rng, probs, perm, actives[s:s + chunk], profile, noise) for s in range(0, n, chunk)]
    return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]


def zipf_sparse(n: int, dim: int, active: int, zipf_s: float, seed: int, chunk: int = 20000) -> sp.csr_matrix:
    """``n`` unit vectors with ``active`` distinct words each, p(word of rank r) ~ 1/r**s.

    Words are drawn with replacement and the first ``active`` distinct ones kept (successive sampling,
    i.e. weighted sampling without replacement); ranks are assigned to dimensions by a fixed random
    permutation shared by documents and queries. Weights are log-normal, then L2-normalised.
    """
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(_WORD_PERM_SEED).permutation(dim)
    cdf = np.cumsum(1.0 / np.arange(1, dim + 1) ** zipf_s)
    cdf /= cdf[-1]
    indices = np.empty(n * active, dtype=np.int32)
    data = np.empty(n * active, dtype=np.float32)
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        rows = _draw_words(rng, cdf, perm, active, b)
        w = rng.lognormal(0.0, 1.0, size=(b, active)).astype(np.float32)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        indices[start * active:(start + b) * active] = rows.ravel()
        data[start * active:(start + b) * active] = w.ravel()
    indptr = np.arange(0, n * active + 1, active, dtype=np.int64)
    return sp.csr_matrix((data, indices, indptr), shape=(n, dim))
