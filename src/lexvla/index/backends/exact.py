"""``exact``: exact top-k over the memory-mapped transposed store (postings).

Per query (measured in docs/search.md): accumulate ``query weight x document weight`` over the
posting lists of its words into a dense vector of N scores, reading each posting once, in place in
the memory-mapped file (no copy), then take the top-k of that vector (one read to find the k-th
largest value via block maxima, one to collect the rows at or above it). scipy's sparse x sparse
product, used before, made two passes over the postings and built a CSR result of about N entries
per query. Queries run on a small thread pool (scipy's kernels release the GIL).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lexvla.index.backends.base import (
    Candidates,
    SearchBackend,
    dense_topk,
    read_state,
    register_backend,
    topk_rows,
)
from lexvla.index.store import (
    CorruptIndexError,
    VectorStore,
    atomic_save_npy,
    atomic_write_text,
    digest_matches,
    file_digest,
)

logger = logging.getLogger(__name__)

try:  # scipy's compiled CSC mat-vec (releases the GIL); private, so fall back to public indexing without it
    from scipy.sparse._sparsetools import csc_matvec as _csc_matvec
except ImportError:  # pragma: no cover - depends on the scipy build
    _csc_matvec = None


@dataclass
class ExactOptions:
    """threads: queries searched in parallel (0: one per core, at most 4). query_batch: queries handed to
    a worker at a time."""

    query_batch: int = 32
    threads: int = 0

    def __post_init__(self) -> None:
        if self.query_batch < 1:
            raise ValueError(f"query_batch must be >= 1, got {self.query_batch}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


@register_backend("exact")
class ExactBackend(SearchBackend):
    """Exact top-k: per query, its words' postings (rows of the V x N transposed store) times its weights."""

    Options = ExactOptions
    STATE = "exact.json"
    PREFIX = "exact.postings"

    def __init__(self, store: VectorStore, options: ExactOptions) -> None:
        super().__init__(store, options)
        self._postings: sp.csr_matrix | None = None
        self._dead: np.ndarray | None = None
        self._dead_count = -1
        self._pool: ThreadPoolExecutor | None = None

    def _files(self) -> dict[str, Path]:
        return {a: self.store.directory / f"{self.PREFIX}.{a}.npy" for a in ("indptr", "indices", "data")}

    def sync(self) -> None:
        want = {"rows": self.store.n_rows, "nnz": self.store.manifest.nnz}
        state = read_state(self.store.directory / self.STATE)
        if {k: state.get(k) for k in want} != want:
            self._write_postings(want)
        if self._postings is None:
            self._postings = self._load_postings(want)
            if self._postings is None:  # damaged postings are derived data: rebuild them from the store
                self._write_postings(want)
                self._postings = self._load_postings(want)
            if self._postings is None:
                raise CorruptIndexError(f"{self.store.directory}: exact postings unreadable after a rebuild")
        deleted = self.store.manifest.deleted
        if len(deleted) != self._dead_count:
            self._dead = np.asarray(sorted(deleted), dtype=np.int64) if deleted else None
            self._dead_count = len(deleted)

    def _write_postings(self, want: dict) -> None:
        t0 = time.perf_counter()
        csc = self.store.matrix().tocsc()  # CSC arrays of docs == CSR arrays of docs^T
        csc.sort_indices()
        digests = {}
        for part, path in self._files().items():
            atomic_save_npy(path, np.asarray(getattr(csc, part)))
            digests[part] = file_digest(path)
        atomic_write_text(self.store.directory / self.STATE, json.dumps({**want, "digests": digests}))
        logger.info("exact: wrote postings for %d rows in %.1fs", want["rows"], time.perf_counter() - t0)
        self._postings = None

    def _load_postings(self, want: dict) -> sp.csr_matrix | None:
        """The memory-mapped postings, checked (digest, bounds); None (logged) when damaged."""
        digests = read_state(self.store.directory / self.STATE).get("digests") or {}
        dim, rows, nnz = self.store.dim, want["rows"], want["nnz"]
        try:
            arrays = {}
            for a, p in self._files().items():
                if not isinstance(digests, dict) or not digest_matches(p, digests.get(a)):
                    raise CorruptIndexError(f"{p}: checksum mismatch")
                arrays[a] = np.load(p, mmap_mode="r", allow_pickle=False)
            indptr, indices = arrays["indptr"], arrays["indices"]
            if (len(indptr) != dim + 1 or indptr[0] != 0 or indptr[-1] != nnz or len(indices) != nnz
                    or len(arrays["data"]) != nnz or np.any(np.diff(indptr) < 0)
                    or (nnz and (int(indices.min()) < 0 or int(indices.max()) >= rows))):
                raise CorruptIndexError("postings arrays out of bounds")
        except (OSError, ValueError) as err:
            logger.warning("exact: rebuilding the postings of %s (%s)", self.store.directory, err)
            return None
        for a in arrays.values():  # start reading the postings in now, not during the first query
            m = getattr(a, "_mmap", None)
            if m is not None and hasattr(mmap, "MADV_WILLNEED"):
                m.madvise(mmap.MADV_WILLNEED)
        return sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=(dim, rows), copy=False)

    def _scores(self, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Dense scores of one query against every row: sum over its words of weight x posting list."""
        p = self._postings
        assert p is not None
        if _csc_matvec is None:  # no scipy kernel to call directly: copy the query's posting lists first
            return np.asarray(p[indices].T @ weights, dtype=np.float32)
        # Zero-copy: run scipy's CSC mat-vec kernel over the posting lists in place. Words go in
        # descending order with a zero-weight column between two lists, so every in-between column is an
        # empty (end < start) range the kernel skips: only the query's postings are read.
        t = indices[::-1]
        starts = np.empty(2 * len(t), dtype=p.indices.dtype)
        starts[0::2] = p.indptr[t]
        starts[1::2] = p.indptr[t + 1]
        x = np.zeros(2 * len(t) - 1, dtype=np.float32)
        x[0::2] = weights[::-1]
        y = np.zeros(p.shape[1], dtype=np.float32)
        _csc_matvec(p.shape[1], len(x), starts, p.indices, p.data, x, y)
        return y

    def _one(self, indices: np.ndarray, weights: np.ndarray, k: int) -> Candidates:
        if len(indices) == 0:
            return Candidates.empty()
        scores = self._scores(indices, weights)
        if self._dead is not None:
            scores[self._dead] = -np.inf
        found = dense_topk(scores, k)
        if len(found.rows) < k:  # fewer positive scores than k: rank every reached row, as a sparse product would
            assert self._postings is not None
            reached = np.unique(self._postings[indices].indices)
            if self._dead is not None:
                reached = reached[np.isfinite(scores[reached])]
            found = topk_rows(reached, scores[reached], k)
        return found

    def _chunk(self, queries: sp.csr_matrix, start: int, stop: int, k: int) -> list[Candidates]:
        ptr = queries.indptr
        return [self._one(queries.indices[ptr[i]:ptr[i + 1]], queries.data[ptr[i]:ptr[i + 1]].astype(np.float32), k)
                for i in range(start, stop)]

    def search(self, queries: sp.csr_matrix, k: int) -> list[Candidates]:
        if self._postings is None:
            self.sync()
        n, step = queries.shape[0], self.options.query_batch
        threads = self.options.threads or min(4, os.cpu_count() or 1)
        if threads <= 1 or n <= 1:
            return self._chunk(queries, 0, n, k)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lexvla-exact")
        step = min(step, -(-n // threads))  # every worker gets a share of a small batch
        parts = self._pool.map(lambda s: self._chunk(queries, s, min(s + step, n), k), range(0, n, step))
        return [c for part in parts for c in part]

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files().values() if p.exists())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
