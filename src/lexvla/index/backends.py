"""Search backends over a :class:`~lexvla.index.store.VectorStore`, chosen by name from a registry.

Every backend answers "which rows score highest against these sparse queries"; the index then
re-scores those rows exactly from the stored vectors and explains them, so scores and explanations do
not depend on the backend. The store is the source of truth: a backend keeps its own copy (postings
file, Seismic index, Milvus collection) and :meth:`SearchBackend.sync` brings it up to date after rows
were added or deleted (cheap when nothing changed).

- ``exact``: scipy CSR; the transposed matrix (postings) is saved once as raw arrays and opened
  memory-mapped; batches of queries are multiplied against it and the top-k taken with argpartition.
- ``seismic``: approximate search with Seismic (``pyseismic-lsr``); rebuilt after any change.
- ``milvus``: a Milvus collection with a ``SPARSE_FLOAT_VECTOR`` field; Milvus Lite (a local file) by
  default, any Milvus server or cluster by URI. Synced incrementally (inserts and deletes).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from lexvla.index.store import VectorStore, atomic_save_npy, atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class Candidates:
    """Rows found for one query, best first, with the backend's own scores."""

    rows: np.ndarray  # int64
    scores: np.ndarray  # float32

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))


class SearchBackend(abc.ABC):
    """Interface of a search backend. Subclasses declare ``name`` and an ``Options`` dataclass."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = object

    def __init__(self, store: VectorStore, options: Any) -> None:
        self.store = store
        self.options = options

    @abc.abstractmethod
    def sync(self) -> None:
        """Bring the backend's copy up to date with the store."""

    @abc.abstractmethod
    def search(self, queries: sp.csr_matrix, k: int) -> list[Candidates]:
        """Top-``k`` live rows per query row (queries: (B, V) CSR float32). Call after :meth:`sync`."""

    def disk_bytes(self) -> int:
        """Bytes this backend keeps on disk beside the store (0 when nothing local)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook: backends without resources need nothing
        """Release files, handles and child processes."""

    def __enter__(self) -> SearchBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BACKENDS: dict[str, type[SearchBackend]] = {}


def register_backend(name: str) -> Callable[[type[SearchBackend]], type[SearchBackend]]:
    """Class decorator adding a backend to :data:`BACKENDS` under ``name``."""

    def deco(cls: type[SearchBackend]) -> type[SearchBackend]:
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is already registered")
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return deco


def list_backends() -> list[str]:
    return sorted(BACKENDS)


def create_backend(name: str, store: VectorStore, options: dict | None = None) -> SearchBackend:
    """Instantiate backend ``name`` over ``store``; ``options`` are its ``Options`` fields."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown search backend {name!r}; available: {', '.join(list_backends())}") from None
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options or {}) - fields)
    if unknown:
        raise ValueError(f"backend {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return cls(store, cls.Options(**(options or {})))


# -- helpers ---------------------------------------------------------------------------------------
def _read_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def topk_rows(cols: np.ndarray, vals: np.ndarray, k: int) -> Candidates:
    """The ``k`` largest ``vals`` (ties broken by smaller row), best first."""
    if len(vals) > k:
        part = np.argpartition(-vals, k - 1)[:k]
        cols, vals = cols[part], vals[part]
    order = np.lexsort((cols, -vals))
    return Candidates(cols[order].astype(np.int64), vals[order].astype(np.float32))


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence native code that prints progress to file descriptor 1 (keeps ``--json`` output clean)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (some embedded runners): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# -- exact -----------------------------------------------------------------------------------------
@dataclass
class ExactOptions:
    query_batch: int = 32  # queries multiplied at once; bounds the (batch x N) score matrix

    def __post_init__(self) -> None:
        if self.query_batch < 1:
            raise ValueError(f"query_batch must be >= 1, got {self.query_batch}")


@register_backend("exact")
class ExactBackend(SearchBackend):
    """Exact top-k: queries (B x V) @ postings (V x N, the transposed store, memory-mapped)."""

    Options = ExactOptions
    STATE = "exact.json"
    PREFIX = "exact.postings"

    def __init__(self, store: VectorStore, options: ExactOptions) -> None:
        super().__init__(store, options)
        self._postings: sp.csr_matrix | None = None
        self._state: dict = {}

    def _files(self) -> dict[str, Path]:
        return {a: self.store.directory / f"{self.PREFIX}.{a}.npy" for a in ("indptr", "indices", "data")}

    def sync(self) -> None:
        want = {"rows": self.store.n_rows, "nnz": self.store.manifest.nnz}
        state = _read_state(self.store.directory / self.STATE)
        if {k: state.get(k) for k in want} != want:
            t0 = time.perf_counter()
            csc = self.store.matrix().tocsc()  # CSC arrays of docs == CSR arrays of docs^T
            csc.sort_indices()
            for part, path in self._files().items():
                atomic_save_npy(path, np.asarray(getattr(csc, part)))
            atomic_write_text(self.store.directory / self.STATE, json.dumps(want))
            logger.info("exact: wrote postings for %d rows in %.1fs", want["rows"], time.perf_counter() - t0)
            self._postings = None
        if self._postings is None:
            arrays = {a: np.load(p, mmap_mode="r") for a, p in self._files().items()}
            self._postings = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]),
                                           shape=(self.store.dim, want["rows"]), copy=False)
            self._state = want

    def search(self, queries: sp.csr_matrix, k: int) -> list[Candidates]:
        if self._postings is None:
            self.sync()
        assert self._postings is not None
        alive = self.store.alive_mask() if self.store.manifest.deleted else None
        out: list[Candidates] = []
        step = self.options.query_batch
        for start in range(0, queries.shape[0], step):
            scores = (queries[start:start + step] @ self._postings).tocsr()
            for i in range(scores.shape[0]):
                s, e = scores.indptr[i], scores.indptr[i + 1]
                cols, vals = scores.indices[s:e], scores.data[s:e]
                if alive is not None:
                    keep = alive[cols]
                    cols, vals = cols[keep], vals[keep]
                out.append(topk_rows(cols, vals, k))
        return out

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files().values() if p.exists())


# -- seismic ---------------------------------------------------------------------------------------
_SEISMIC_MAX_DIM = 65536  # SeismicIndex stores term ids as u16; the LV classes take larger vocabularies
_FLOAT16_TARGET = 1024.0  # docs are scaled so their largest weight is about this (float16 max is 65504)


@dataclass
class SeismicOptions:
    """Seismic build and search settings (defaults measured in docs/search.md: recall@10 >= 0.95).

    n_postings: postings kept per word on average (Seismic's global pruning). None: automatic,
        ``max(1000, nnz / V)``, i.e. no pruning below 1000 postings a word on average.
    query_cut: query words considered (None: all). heap_factor: < 1 prunes blocks more aggressively.
    """

    n_postings: int | None = None
    centroid_fraction: float = 0.1
    summary_energy: float = 0.4
    min_cluster_size: int = 2
    doc_cut: int = 15  # words per document used to assign it to a cluster while building (Seismic's default)
    query_cut: int | None = None
    heap_factor: float = 0.9
    num_threads: int = 0  # 0: Rayon's default (all cores)

    def __post_init__(self) -> None:
        if self.n_postings is not None and self.n_postings < 1:
            raise ValueError(f"n_postings must be >= 1, got {self.n_postings}")
        if not 0.0 < self.heap_factor <= 1.0:
            raise ValueError(f"heap_factor must be in (0, 1], got {self.heap_factor}")


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
        large = store.dim >= _SEISMIC_MAX_DIM
        self._dataset_cls = self._seismic.SeismicDatasetLV if large else self._seismic.SeismicDataset
        self._index_cls = self._seismic.SeismicIndexLV if large else self._seismic.SeismicIndex
        self._index = None
        self._scale = 1.0

    @property
    def _file(self) -> Path:
        return self.store.directory / f"{self.PREFIX}.index.seismic"

    def _params(self, nnz: int) -> dict:
        o = self.options
        n_postings = o.n_postings or max(1000, int(np.ceil(nnz / self.store.dim)))
        return {"n_postings": int(n_postings), "centroid_fraction": o.centroid_fraction,
                "summary_energy": o.summary_energy, "min_cluster_size": o.min_cluster_size, "doc_cut": o.doc_cut}

    def sync(self) -> None:
        alive = self.store.alive_mask()
        live_rows = np.flatnonzero(alive)
        matrix = self.store.matrix()
        nnz = int(np.diff(matrix.indptr)[live_rows].sum()) if len(live_rows) else 0
        params = self._params(nnz)
        want = {"rows": self.store.n_rows, "deleted": len(self.store.manifest.deleted), **params}
        state = _read_state(self.store.directory / self.STATE)
        if {k: state.get(k) for k in want} != want:
            self._index = None
            self._build(matrix, live_rows, params)
            state = {**want, "scale": self._scale, "empty": self._index is None}
            atomic_write_text(self.store.directory / self.STATE, json.dumps(state))
        self._scale = float(state.get("scale", 1.0))
        if self._index is None and not state.get("empty") and self._file.exists():
            with _quiet_stdout():
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
        with _quiet_stdout():
            dataset.add_documents_by_id([str(int(r)) for r in live_rows], docs.indices.astype(np.int64),
                                        (docs.data * self._scale).astype(np.float32),
                                        docs.indptr.astype(np.int64))
            index = self._index_cls.build_from_dataset(dataset, num_threads=self.options.num_threads, **params)
            tmp = self.store.directory / f".{self.PREFIX}-tmp-{os.getpid()}"
            index.save(str(tmp))
        os.replace(f"{tmp}.index.seismic", self._file)
        self._index = index
        logger.info("seismic: built index of %d rows in %.1fs (%s)", len(live_rows),
                    time.perf_counter() - t0, params)

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
        results = self._index.batch_search(np.array(qids, dtype=string), comps, vals, k=k, query_cut=cut,
                                           heap_factor=self.options.heap_factor,
                                           num_threads=self.options.num_threads)
        # batch_search returns the lists in completion order, not query order: map them by query id.
        for res in results:
            if res:
                rows = np.array([int(doc) for _, _, doc in res], dtype=np.int64)
                scores = np.array([score for _, score, _ in res], dtype=np.float32) / self._scale
                out[int(res[0][0])] = Candidates(rows, scores)
        return out

    def disk_bytes(self) -> int:
        return self._file.stat().st_size if self._file.exists() else 0

    def close(self) -> None:
        self._index = None


# -- milvus ----------------------------------------------------------------------------------------
@dataclass
class MilvusOptions:
    """Where the Milvus collection lives.

    uri: a Milvus Lite file (``*.db``; default ``<index>/milvus.db``) or a server/cluster address such
        as ``http://host:19530``: the only thing to change when moving from Lite to a server.
    token: server credentials (``user:password`` or an API key); default ``$MILVUS_TOKEN``. Never saved.
    collection: collection name (default derived from the index's unique id and the collection).
    """

    uri: str | None = None
    token: str | None = None
    collection: str | None = None
    index_type: str = "SPARSE_INVERTED_INDEX"
    inverted_index_algo: str = "DAAT_MAXSCORE"  # exact dynamic pruning
    drop_ratio_search: float = 0.0  # 0: use every query word (exact)
    insert_batch: int = 5000
    flush_every: int = 50_000  # rows inserted between flushes (the resume points of an interrupted sync)
    search_batch: int = 200

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_ratio_search < 1.0:
            raise ValueError(f"drop_ratio_search must be in [0, 1), got {self.drop_ratio_search}")
        if self.insert_batch < 1 or self.search_batch < 1:
            raise ValueError("insert_batch and search_batch must be >= 1")


def _import_pymilvus():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # milvus-lite imports the deprecated pkg_resources
        try:
            import pymilvus
        except ImportError:
            raise ImportError("the 'milvus' backend needs pymilvus and milvus-lite: "
                              "pip install 'lexvla[index]'") from None
    return pymilvus


def is_local_milvus(uri: str) -> bool:
    """Milvus Lite URIs are local file paths ending in ``.db``; servers are ``http(s)://`` / ``tcp://``."""
    return "://" not in uri


@register_backend("milvus")
class MilvusBackend(SearchBackend):
    """A Milvus collection (int64 primary key = store row, sparse vector field, IP metric)."""

    Options = MilvusOptions
    STATE = "milvus.json"
    VECTOR = "vec"

    def __init__(self, store: VectorStore, options: MilvusOptions) -> None:
        super().__init__(store, options)
        self.uri = options.uri or str(store.directory.parent / "milvus.db")
        self.collection = options.collection or f"lexvla_{store.directory.name}"
        if is_local_milvus(self.uri):
            if not self.uri.endswith(".db"):
                raise ValueError(f"a Milvus Lite uri must be a file ending in .db, got {self.uri!r}")
            self.uri = str(Path(self.uri).expanduser().resolve())
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        pymilvus = _import_pymilvus()
        token = options.token if options.token is not None else os.environ.get("MILVUS_TOKEN", "")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._client = pymilvus.MilvusClient(uri=self.uri, token=token)
        self._pymilvus = pymilvus

    def _create_collection(self) -> None:
        client, dt = self._client, self._pymilvus.DataType
        if client.has_collection(self.collection):
            client.drop_collection(self.collection)
        schema = self._pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", dt.INT64, is_primary=True)
        schema.add_field(self.VECTOR, dt.SPARSE_FLOAT_VECTOR)
        params = client.prepare_index_params()
        params.add_index(field_name=self.VECTOR, index_type=self.options.index_type, metric_type="IP",
                         params={"inverted_index_algo": self.options.inverted_index_algo})
        client.create_collection(self.collection, schema=schema, index_params=params, consistency_level="Strong")

    def sync(self) -> None:
        path = self.store.directory / self.STATE
        state = _read_state(path)
        target = {"uri": self.uri, "collection": self.collection}
        if {k: state.get(k) for k in target} != target or not self._client.has_collection(self.collection):
            self._create_collection()
            state = {**target, "rows": 0, "deleted": 0}
            atomic_write_text(path, json.dumps(state))
        deleted = self.store.manifest.deleted
        n_rows = self.store.n_rows
        if state["rows"] < n_rows:
            # Rows past the recorded point may be half inserted by a run that died before its flush:
            # remove them, so re-inserting cannot duplicate primary keys.
            self._client.delete(self.collection, filter=f"id >= {int(state['rows'])}")
            alive = self.store.alive_mask()
            matrix = self.store.matrix()
            step = self.options.insert_batch
            for start in range(state["rows"], n_rows, step):
                stop = min(start + step, n_rows)
                batch = sp.csr_matrix(matrix[start:stop])
                lengths = np.diff(batch.indptr)
                # Milvus rejects empty sparse vectors; such rows can never match a query anyway.
                rows = [{"id": start + i, self.VECTOR: batch[i]} for i in range(stop - start)
                        if alive[start + i] and lengths[i] > 0]
                if rows:
                    self._client.insert(self.collection, rows)
                if stop == n_rows or (stop - state["rows"]) >= self.options.flush_every:
                    # Progress is recorded only once flushed (durable), so a crash resumes from here.
                    self._client.flush(self.collection)
                    state["rows"] = stop
                    atomic_write_text(path, json.dumps(state))
        if state["deleted"] < len(deleted):
            new = [int(r) for r in deleted[state["deleted"]:]]
            self._client.delete(self.collection, ids=new)
            self._client.flush(self.collection)
            state["deleted"] = len(deleted)
            atomic_write_text(path, json.dumps(state))
        self._client.load_collection(self.collection)

    def search(self, queries: sp.csr_matrix, k: int) -> list[Candidates]:
        out = [Candidates.empty() for _ in range(queries.shape[0])]
        lengths = np.diff(queries.indptr)
        slots = [i for i in range(queries.shape[0]) if lengths[i] > 0]  # Milvus rejects empty vectors
        params = {"metric_type": "IP", "params": {"drop_ratio_search": self.options.drop_ratio_search}}
        step = self.options.search_batch
        for start in range(0, len(slots), step):
            chunk = slots[start:start + step]
            res = self._client.search(self.collection, data=[queries[i] for i in chunk], anns_field=self.VECTOR,
                                      limit=k, search_params=params)
            for slot, hits in zip(chunk, res):
                out[slot] = Candidates(np.array([h["id"] for h in hits], dtype=np.int64),
                                       np.array([h["distance"] for h in hits], dtype=np.float32))
        return out

    def disk_bytes(self) -> int:
        if not is_local_milvus(self.uri):
            return 0
        p = Path(self.uri)
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size if p.exists() else 0

    def drop(self) -> None:
        """Remove the collection from Milvus (the local store is kept)."""
        if self._client.has_collection(self.collection):
            self._client.drop_collection(self.collection)
        (self.store.directory / self.STATE).unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a client whose server already exited is harmless
            self._client.close()
