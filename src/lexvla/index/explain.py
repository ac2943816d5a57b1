"""Explanations of lexical matches: the shared words and what each adds to the score.

The score of a hit is the dot product of two sparse lexical vectors, which is a sum over the words
both vectors activate of ``query_weight * doc_weight``. An :class:`Explanation` lists those terms,
largest first; the reported score *is* their sum (computed in float64 from the stored vectors), so
the words account for the whole score whichever backend found the hit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class WordContribution:
    word: str
    dim: int
    query_weight: float
    doc_weight: float
    contribution: float  # query_weight * doc_weight


@dataclass
class Explanation:
    """Shared words of a query and a document, sorted by contribution (largest first).

    ``words`` may be cut to the largest contributions (``search_vectors(..., words=n)``: a page shows a
    few words per hit, and building all of them is most of a search's Python time); ``score`` and
    ``n_shared`` always describe every shared word.
    """

    words: list[WordContribution] = field(default_factory=list)
    score: float | None = None  # sum of all contributions (float64); None: the sum of ``words``
    n_shared: int | None = None  # number of shared words; None: len(words)

    def __post_init__(self) -> None:
        if self.n_shared is None:
            self.n_shared = len(self.words)

    @property
    def total(self) -> float:
        """Sum of all contributions, in float64 (equals the hit's score)."""
        if self.score is not None:
            return self.score
        return float(np.sum([w.contribution for w in self.words], dtype=np.float64))

    @property
    def complete(self) -> bool:
        """Whether ``words`` lists every shared word."""
        return len(self.words) == self.n_shared

    def top(self, n: int = 5) -> list[WordContribution]:
        return self.words[:n]

    def summary(self, n: int = 5) -> str:
        """``"dog 0.21, beach 0.104, ..."``: the ``n`` largest contributions (3 significant digits)."""
        return ", ".join(f"{w.word} {w.contribution:.3g}" for w in self.top(n))


@dataclass
class Hit:
    """One search result. ``score`` is the exact dot product recomputed from the stored vectors."""

    rank: int
    id: str
    score: float
    row: int
    metadata: dict
    explanation: Explanation

    def to_dict(self, top_words: int | None = None) -> dict:
        words = self.explanation.words if top_words is None else self.explanation.top(top_words)
        return {"rank": self.rank, "id": self.id, "score": self.score, "row": self.row,
                "metadata": self.metadata, "words": [asdict(w) for w in words]}


def explain_pair(q_idx: np.ndarray, q_val: np.ndarray, d_idx: np.ndarray, d_val: np.ndarray,
                 words: Sequence[str]) -> Explanation:
    """Explain one (query, document) pair given their sorted-or-not sparse (indices, values)."""
    shared, qi, di = np.intersect1d(q_idx, d_idx, assume_unique=True, return_indices=True)
    qw = q_val[qi].astype(np.float64)
    dw = d_val[di].astype(np.float64)
    contrib = qw * dw
    order = np.lexsort((shared, -contrib))  # largest first; ties by dimension for a stable order
    return Explanation([
        WordContribution(words[int(shared[j])], int(shared[j]), float(qw[j]), float(dw[j]), float(contrib[j]))
        for j in order
    ])


def explain_rows(query: sp.csr_matrix, docs: sp.csr_matrix, words: Sequence[str], top: int | None = None
                 ) -> list[Explanation]:
    """Explanations of one query (1 x V CSR) against every row of ``docs`` (same result as
    :func:`explain_pair` row by row, without its per-pair set operations).

    ``top``: build only the ``top`` largest contributions of each row (the score and the count of shared
    words still cover all of them).
    """
    qdense = np.zeros(query.shape[1], dtype=np.float64)
    qdense[query.indices] = query.data
    out = []
    for r in range(docs.shape[0]):
        s, e = docs.indptr[r], docs.indptr[r + 1]
        d_idx = np.asarray(docs.indices[s:e])
        qw = qdense[d_idx]
        shared = qw != 0
        dims, qw = d_idx[shared], qw[shared]
        dw = np.asarray(docs.data[s:e])[shared].astype(np.float64)
        contrib = qw * dw
        order = np.lexsort((dims, -contrib))[:top]  # largest first; ties by dimension, as explain_pair
        out.append(Explanation([
            WordContribution(words[dim], dim, a, b, c)
            for dim, a, b, c in zip(dims[order].tolist(), qw[order].tolist(), dw[order].tolist(),
                                    contrib[order].tolist())
        ], score=float(np.sum(contrib, dtype=np.float64)), n_shared=len(dims)))
    return out
