"""``seismic``: approximate search with Seismic (``pyseismic-lsr``), rebuilt after any change.

Defaults are fixed values chosen by the sweep in ``bench/seismic_sweep.py`` (docs/search.md), not
values that grow with the collection: Seismic's clustering costs about the square of each kept
posting list's length, so keeping ``nnz / V`` postings a word (the old automatic value) made a 1M build
take hours.

Threads: ``pyseismic-lsr`` 0.5.4 ignores its ``num_threads`` arguments; only Rayon's global pool size
counts, read from ``RAYON_NUM_THREADS`` once, when the process first runs Seismic code. The
``num_threads`` option therefore sets that variable before Seismic's first use (or warns if the pool
already exists with another size).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lexvla.index.backends.base import Candidates, SearchBackend, quiet_stdout, read_state, register_backend
from lexvla.index.store import VectorStore, atomic_write_text, digest_matches, file_digest
from lexvla.io import atomic_path

logger = logging.getLogger(__name__)

_SEISMIC_MAX_DIM = 65536  # SeismicIndex stores term ids as u16; the LV classes take larger vocabularies
_FLOAT16_TARGET = 1024.0  # docs are scaled so their largest weight is about this (float16 max is 65504)
_RAYON_POOL: dict[str, int] = {}  # the pool size Rayon was started with in this process, once known


@dataclass
class SeismicOptions:
    """Seismic build and search settings (defaults measured in docs/search.md).

    n_postings: postings kept per word on average (Seismic's global pruning: the n_postings x V largest
        weights of the collection). A fixed number: build cost stays linear in the collection.
    max_fraction: a word's list keeps at most n_postings x max_fraction documents (Seismic's cap).
    centroid_fraction, summary_energy: blocks per list (as a fraction of its length) and how much of a
        block's weight its summary keeps. nknn: neighbours per document in Seismic's kNN graph (0: none).
    query_cut: the query's largest words searched (None: all). heap_factor: < 1 prunes blocks more.
    candidates: rows asked of Seismic per query (0: k); more than k are re-scored exactly from the store
        and the k best kept. n_knn: graph neighbours added to the candidates (needs nknn > 0).
    num_threads: Rayon threads for build and search (0: ``$RAYON_NUM_THREADS`` or every core).
    """

    n_postings: int = 100
    centroid_fraction: float = 0.1
    summary_energy: float = 0.4
    min_cluster_size: int = 2
    doc_cut: int = 15  # words per document used to assign it to a cluster while building (Seismic's default)
    max_fraction: float = 1.5
    nknn: int = 0
    query_cut: int | None = 10
    heap_factor: float = 0.9
    candidates: int = 0
    n_knn: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.n_postings is None or self.n_postings < 1:
            raise ValueError(f"n_postings must be >= 1, got {self.n_postings}")
        if self.query_cut is not None and self.query_cut < 1:
            raise ValueError(f"query_cut must be >= 1 (or None for every query word), got {self.query_cut}")
        if not 0.0 < self.heap_factor <= 1.0:
            raise ValueError(f"heap_factor must be in (0, 1], got {self.heap_factor}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        if not 0.0 < self.centroid_fraction <= 1.0 or not 0.0 < self.summary_energy <= 1.0:
            raise ValueError(f"centroid_fraction and summary_energy must be in (0, 1], got "
                             f"{self.centroid_fraction}, {self.summary_energy}")
        if self.max_fraction < 1.0:
            raise ValueError(f"max_fraction must be >= 1, got {self.max_fraction}")
        if min(self.nknn, self.candidates, self.n_knn) < 0:
            raise ValueError("nknn, candidates and n_knn must be >= 0")
        if self.n_knn and not self.nknn:
            raise ValueError("n_knn needs a kNN graph: set nknn > 0 too")


def set_rayon_threads(n: int) -> int:
    """Ask for ``n`` Rayon threads (0: leave the default); returns the size the pool will have or has.

    Works only before the process first runs Seismic: Rayon reads ``RAYON_NUM_THREADS`` once.
    """
    if "threads" in _RAYON_POOL:
        if n and n != _RAYON_POOL["threads"]:
            logger.warning("seismic: Rayon already runs %d threads in this process; num_threads=%d has no "
                           "effect (set RAYON_NUM_THREADS before the first Seismic call)", _RAYON_POOL["threads"], n)
        return _RAYON_POOL["threads"]
    if n:
        os.environ["RAYON_NUM_THREADS"] = str(n)
    env = os.environ.get("RAYON_NUM_THREADS", "")
    _RAYON_POOL["threads"] = int(env) if env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    return _RAYON_POOL["threads"]


def _import_seismic():
    try:
        import seismic
    except ImportError:
        raise ImportError("the 'seismic' backend needs pyseismic-lsr: pip install 'lexvla[index]'") from None
    return seismic


@register_backend("seismic")
class SeismicBackend(SearchBackend):
    """Approximate search with Seismic; the index file is rebuilt when the store changed."""

    Options = SeismicOptions
    STATE = "seismic.json"
    PREFIX = "seismic"

    def __init__(self, store: VectorStore, options: SeismicOptions) -> None:
        super().__init__(store, options)
        self._seismic = _import_seismic()
        self.threads = set_rayon_threads(options.num_threads)
        large = store.dim >= _SEISMIC_MAX_DIM
        self._dataset_cls = self._seismic.SeismicDatasetLV if large else self._seismic.SeismicDataset
        self._index_cls = self._seismic.SeismicIndexLV if large else self._seismic.SeismicIndex
        self._index = None
        self._scale = 1.0

    @property
    def _file(self) -> Path:
        return self.store.directory / f"{self.PREFIX}.index.seismic"

    def _params(self) -> dict:
        o = self.options
        return {"n_postings": int(o.n_postings), "centroid_fraction": o.centroid_fraction,
                "summary_energy": o.summary_energy, "min_cluster_size": o.min_cluster_size, "doc_cut": o.doc_cut,
                "max_fraction": o.max_fraction, "nknn": int(o.nknn)}

    def sync(self) -> None:
        params = self._params()
        want = {"rows": self.store.n_rows, "deleted": len(self.store.manifest.deleted), **params}
        state = read_state(self.store.directory / self.STATE)
        stale = {k: state.get(k) for k in want} != want
        if not stale and self._index is None and not state.get("empty") and (
                not self._file.exists() or not digest_matches(self._file, state.get("digest"))):
            # Seismic's loader trusts its file (a flipped byte can crash the process): rebuild instead.
            logger.warning("seismic: %s is missing or damaged; rebuilding it from the store", self._file)
            stale = True
        if stale:
            self._index = None
            self._build(self.store.matrix(), np.flatnonzero(self.store.alive_mask()), params)
            state = {**want, "scale": self._scale, "empty": self._index is None,
                     "digest": file_digest(self._file) if self._index is not None else None}
            atomic_write_text(self.store.directory / self.STATE, json.dumps(state))
        self._scale = float(state.get("scale", 1.0))
        if self._index is None and not state.get("empty") and self._file.exists():
            with quiet_stdout():
                self._index = self._index_cls.load(str(self._file))

    def _build(self, matrix: sp.csr_matrix, live_rows: np.ndarray, params: dict) -> None:
        docs = matrix[live_rows] if len(live_rows) != matrix.shape[0] else matrix
        docs = sp.csr_matrix(docs)
        if docs.nnz == 0:
            self._index, self._scale = None, 1.0
            self._file.unlink(missing_ok=True)
            return
        docs.sort_indices()
        top = float(np.max(docs.data))
        # Power-of-two scale: exact in float16, keeps weights far from both overflow and subnormals.
        self._scale = float(2.0 ** np.floor(np.log2(_FLOAT16_TARGET / top))) if top > 0 else 1.0
        t0 = time.perf_counter()
        dataset = self._dataset_cls(dim=self.store.dim)
        with quiet_stdout():
            dataset.add_documents_by_id([str(int(r)) for r in live_rows], docs.indices.astype(np.int64),
                                        (docs.data * self._scale).astype(np.float32),
                                        docs.indptr.astype(np.int64))
            index = self._index_cls.build_from_dataset(dataset, num_threads=self.threads, **params)
            with atomic_path(self._file) as tmp:  # fsynced and renamed into place, like every index file
                index.save(str(tmp))  # Seismic appends its own suffix
                os.replace(f"{tmp}.index.seismic", tmp)
        self._index = index
        logger.info("seismic: built index of %d rows in %.1fs with %d threads (%s)", len(live_rows),
                    time.perf_counter() - t0, self.threads, params)

    def search(self, queries: sp.csr_matrix, k: int) -> list[Candidates]:
        out = [Candidates.empty() for _ in range(queries.shape[0])]
        if self._index is None:
            return out
        string = self._seismic.get_seismic_string()
        qids, comps, vals = [], [], []
        for i in range(queries.shape[0]):
            s, e = queries.indptr[i], queries.indptr[i + 1]
            if e > s:
                qids.append(str(i))
                comps.append(np.asarray(queries.indices[s:e]).astype(str).astype(string))
                vals.append(np.asarray(queries.data[s:e], dtype=np.float32))
        if not qids:
            return out
        cut = self.options.query_cut or int(max(len(c) for c in comps))
        ask = max(k, self.options.candidates)
        results = self._index.batch_search(np.array(qids, dtype=string), comps, vals, k=ask, query_cut=cut,
                                           heap_factor=self.options.heap_factor, n_knn=self.options.n_knn,
                                           num_threads=self.threads)
        matrix = self.store.matrix() if ask > k else None
        # batch_search returns the lists in completion order, not query order: map them by query id.
        for res in results:
            if res:
                qi = int(res[0][0])
                rows = np.array([int(doc) for _, _, doc in res], dtype=np.int64)
                if matrix is None:
                    scores = np.array([score for _, score, _ in res], dtype=np.float32) / self._scale
                else:  # exact re-scoring of the wider candidate list from the store, then the k best
                    rows = np.unique(rows)
                    scores = np.asarray(matrix[rows] @ queries[qi].T.toarray()).ravel().astype(np.float32)
                    best = np.lexsort((rows, -scores))[:k]
                    rows, scores = rows[best], scores[best]
                out[qi] = Candidates(rows, scores)
        return out

    def describe(self) -> dict:
        return {**super().describe(), "rayon_threads": self.threads}

    def disk_bytes(self) -> int:
        return self._file.stat().st_size if self._file.exists() else 0

    def close(self) -> None:
        self._index = None
