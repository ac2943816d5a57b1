"""A sparse lexical index: collections of stored vectors + a search backend + explanations.

Layout of an index folder::

    index.json      the model and vocabulary it was built with, sparsification, default backend
    vocab.json      the lexical vocabulary (dimension -> word)
    images/         a VectorStore (see store.py) plus the backends' files for that collection
    texts/          the same for captions (image -> text search)
    .writer.lock    the single-writer lock (lexvla.io.WriterLock): a second build/add/delete is refused

Backends are looked up by name in ``lexvla.index.backends`` and describe themselves (which options are
saved, a collection's defaults); nothing here depends on a particular backend.

One writer at a time, any number of readers: writes hold the lock and re-read the committed state
first, readers take no lock and pick up commits by another process at their next query (one ``stat``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from lexvla.index.backends import SearchBackend, create_backend, get_backend
from lexvla.index.explain import Hit, explain_rows
from lexvla.index.store import CorruptIndexError, StoreManifest, VectorStore, json_digest, read_checked_json
from lexvla.io import WriterLock, atomic_write_text, clean_stale_tmp
from lexvla.sparsification import Sparsification
from lexvla.vocab import Vocabulary

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
INDEX_FILE = "index.json"
VOCAB_FILE = "vocab.json"
COLLECTIONS = ("images", "texts")
URI_ENV = "LEXVLA_INDEX_URI"  # a server address given by the environment, like --uri


def _write_meta(path: Path, meta: dict) -> None:
    atomic_write_text(path / INDEX_FILE, json.dumps({**meta, "checksum": json_digest(meta)}, indent=1))


def writer_lock(path: str | Path) -> WriterLock:
    """The index's single-writer lock (held by build/add/delete; readers never take it)."""
    return WriterLock(path, what="the index")


class ModelMismatchError(ValueError):
    """Query vectors come from a different model or vocabulary than the index was built with."""


@dataclass(frozen=True)
class ModelRecord:
    """Which model produced an index's vectors (compared on every model-based query)."""

    name: str
    fingerprint: str
    vocab_fingerprint: str
    dim: int

    @classmethod
    def from_model(cls, model: Any) -> ModelRecord:
        config = getattr(model, "config", None)
        name = getattr(config, "name", None) or type(model).__name__
        return cls(str(name), str(model.fingerprint()), model.vocab.fingerprint(), len(model.vocab))


@dataclass
class IndexInfo:
    """What ``lexvla index info`` prints."""

    path: str
    model: ModelRecord
    sparsify: Sparsification
    backend: str
    collections: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def to_csr(vectors: Any, dim: int, what: str = "vectors") -> sp.csr_matrix:
    """Sparse/dense numpy/torch/LexicalOutput input -> (N, dim) float32 CSR with sorted indices."""
    vectors = getattr(vectors, "vectors", vectors)  # LexicalOutput
    if hasattr(vectors, "detach"):  # torch tensor (dense or sparse)
        t = vectors.detach().cpu()
        vectors = t.to_dense().float().numpy() if t.is_sparse else t.float().numpy()
    if sp.issparse(vectors):
        m = sp.csr_matrix(vectors, dtype=np.float32)
    else:
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"{what} must be 1-D or 2-D, got shape {arr.shape}")
        m = sp.csr_matrix(arr)
    if m.shape[1] != dim:
        raise ValueError(f"{what} have {m.shape[1]} dimensions but the index vocabulary has {dim} words")
    if m.nnz and not np.all(np.isfinite(m.data)):
        raise ValueError(f"{what} contain NaN or infinite weights")
    m.sum_duplicates()
    m.eliminate_zeros()
    m.sort_indices()
    return m


class SparseIndex:
    """Stored lexical vectors with ids/metadata, searchable with any registered backend.

    Create with :meth:`create` (or :func:`lexvla.index.build_index` from a model), open with :meth:`open`.
    """

    def __init__(self, path: Path, meta: dict, vocab: Vocabulary, backend: str | None = None,
                 backend_options: dict | None = None) -> None:
        self.path = path
        self.meta = meta
        self.vocab = vocab
        self.model_record = ModelRecord(**meta["model"])
        self.sparsify_settings = Sparsification(**meta["sparsify"])
        self.backend_name = backend or meta.get("backend", "exact")
        options = dict(meta.get("backend_options", {}).get(self.backend_name, {}))
        given = {k: v for k, v in (backend_options or {}).items() if v is not None}
        if "uri" not in given and os.environ.get(URI_ENV):
            given["uri"] = os.environ[URI_ENV]
        saved_uri = options.get("uri")
        self._refused_uri: str | None = None
        if isinstance(saved_uri, str) and "://" in saved_uri and "uri" not in given:
            # Never connect to a network address only because a (possibly untrusted) file names it.
            options.pop("uri")
            self._refused_uri = saved_uri
        options.update(given)
        self.backend_options = options
        self._stores: dict[str, VectorStore] = {}
        self._backends: dict[str, SearchBackend] = {}
        self._synced: dict[str, int] = {}
        self._lock = threading.RLock()

    # -- creating and opening --------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, vocab: Vocabulary, model: ModelRecord,
               sparsify: Sparsification | None = None, backend: str = "exact",
               backend_options: dict | None = None, model_source: str | None = None) -> SparseIndex:
        """A new empty index at ``path`` (refuses a folder that already holds one).

        ``model_source``: how to load the model again (zoo name or checkpoint folder), so ``index add``
        and ``search`` need no ``--model``.
        """
        path = Path(path)
        if (path / INDEX_FILE).exists():
            raise FileExistsError(f"{path} already holds an index; open it or choose another --out")
        if model.dim != len(vocab) or model.vocab_fingerprint != vocab.fingerprint():
            raise ValueError("the model record does not describe this vocabulary")
        saved_options = get_backend(backend).options_to_save(backend_options or {})  # no secrets
        path.mkdir(parents=True, exist_ok=True)
        vocab.save(path / VOCAB_FILE)
        meta = {"format": INDEX_FORMAT, "uid": uuid.uuid4().hex[:12], "model": asdict(model),
                "sparsify": (sparsify or Sparsification.none()).resolve(len(vocab)).to_dict(), "backend": backend,
                "backend_options": {backend: saved_options}, "model_source": model_source}
        with writer_lock(path):
            if (path / INDEX_FILE).exists():
                raise FileExistsError(f"{path} already holds an index; open it or choose another --out")
            _write_meta(path, meta)
        return cls(path, meta, vocab, backend, backend_options)

    @classmethod
    def open(cls, path: str | Path, backend: str | None = None, backend_options: dict | None = None
             ) -> SparseIndex:
        """Open an index; ``backend`` defaults to the one it was built with."""
        path = Path(path)
        if not (path / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a lexvla index (no {INDEX_FILE}); build one with "
                                    "`lexvla index build`")
        meta_file = path / INDEX_FILE
        meta = read_checked_json(meta_file)
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: unsupported index format {meta.get('format')!r}")
        try:
            vocab = Vocabulary.load(path / VOCAB_FILE)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise CorruptIndexError(f"{path / VOCAB_FILE}: damaged ({err})") from None
        try:
            if vocab.fingerprint() != meta["model"]["vocab_fingerprint"]:
                raise CorruptIndexError(f"{path / VOCAB_FILE} does not match the vocabulary recorded in {INDEX_FILE}")
            return cls(path, meta, vocab, backend, backend_options)
        except (KeyError, TypeError) as err:
            raise CorruptIndexError(f"{meta_file}: damaged ({type(err).__name__}: {err})") from None

    def close(self) -> None:
        for b in self._backends.values():
            b.close()
        self._backends.clear()
        self._synced.clear()

    def __enter__(self) -> SparseIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update_meta(self, **values: Any) -> None:
        """Record extra fields in index.json (e.g. ``images_root``), under the writer lock."""
        with self.writing():
            self.meta.update(values)
            _write_meta(self.path, self.meta)

    # -- parts -------------------------------------------------------------------------------------
    @property
    def model_source(self) -> str | None:
        return self.meta.get("model_source")

    @property
    def dim(self) -> int:
        return len(self.vocab)

    def store(self, collection: str = "images", refresh: bool = True) -> VectorStore:
        """A collection's store; ``refresh``: first pick up commits made by another process."""
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown collection {collection!r}; an index holds {COLLECTIONS}")
        if collection not in self._stores:
            if (self.path / collection / "manifest.json").is_file():
                self._stores[collection] = VectorStore.open(self.path / collection)
                if self._stores[collection].dim != self.dim:
                    raise CorruptIndexError(f"{self.path / collection / 'manifest.json'}: {self._stores[collection].dim}"
                                            f"-dim vectors, but the index vocabulary has {self.dim} words")
            else:  # empty until a writer's first append commits it (readers never create files)
                self._stores[collection] = VectorStore(self.path / collection, StoreManifest(dim=self.dim))
        elif refresh:
            self._stores[collection].refresh()
        return self._stores[collection]

    @contextlib.contextmanager
    def writing(self) -> Iterator[SparseIndex]:
        """Hold the single-writer lock (re-entrant) with the committed state re-read; refuses with
        :class:`lexvla.io.LockedError` naming the holder's PID while another process writes."""
        with writer_lock(self.path) as lock:
            if lock.depth == 1:
                for folder in (self.path, *(self.path / c for c in COLLECTIONS)):
                    clean_stale_tmp(folder)
                for st in self._stores.values():
                    st.refresh()
            yield self

    def has_collection(self, collection: str) -> bool:
        return (self.path / collection / "manifest.json").is_file() and self.store(collection).n_alive > 0

    def backend(self, collection: str = "images") -> SearchBackend:
        """The search backend of a collection, synced with its store (thread-safe, e.g. for a web app)."""
        with self._lock:
            if collection not in self._backends:
                if self._refused_uri and not self.backend_options.get("uri"):
                    raise ValueError(
                        f"{self.path / INDEX_FILE} names the server {self._refused_uri!r}; an address read from "
                        f"a file is never connected to: pass --uri {self._refused_uri} (or set {URI_ENV}) "
                        "if you trust it")
                defaults = get_backend(self.backend_name).collection_defaults(self.meta["uid"], collection)
                options = {**defaults, **self.backend_options}
                self._backends[collection] = create_backend(self.backend_name, self.store(collection, False),
                                                            options)
            backend = self._backends[collection]
            store = self.store(collection, refresh=False)
            if self._synced.get(collection) != store.generation:  # skip the check on every query
                backend.sync()
                self._synced[collection] = store.generation
            return backend

    def sync(self) -> None:
        """Bring every collection's backend up to date and load what a search reads (stored vectors, ids),
        so the first query pays nothing extra (e.g. build a Seismic index now, not at query time)."""
        for c in COLLECTIONS:
            if (self.path / c / "manifest.json").is_file():
                self.backend(c)
                store = self.store(c)
                store.matrix(), store.items()

    # -- model checks ---------------------------------------------------------------------------------
    def check_model(self, model: Any) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` is the one this index was built with."""
        self.check_fingerprint(str(model.fingerprint()), model.vocab.fingerprint(),
                               getattr(getattr(model, "config", None), "name", type(model).__name__))

    def check_fingerprint(self, fingerprint: str, vocab_fingerprint: str | None = None, name: str = "?") -> None:
        rec = self.model_record
        if vocab_fingerprint is not None and vocab_fingerprint != rec.vocab_fingerprint:
            raise ModelMismatchError(
                f"index {self.path} was built with vocabulary {rec.vocab_fingerprint} (model {rec.name!r}), "
                f"but the query model {name!r} uses vocabulary {vocab_fingerprint}: its word dimensions "
                "mean different words. Search with the index's model or rebuild the index.")
        if fingerprint != rec.fingerprint:
            raise ModelMismatchError(
                f"index {self.path} was built with model {rec.name!r} (fingerprint {rec.fingerprint}), "
                f"but the query comes from model {name!r} (fingerprint {fingerprint}). Lexical vectors of "
                "different models are not comparable: search with the index's model or rebuild the index.")

    # -- writing ------------------------------------------------------------------------------------------
    def add(self, vectors: Any, items: Sequence[dict | str], collection: str = "images") -> range:
        """Append vectors (sparsified with the index's settings) with ids or ``{"id": ..., ...}`` items."""
        items = [{"id": it} if isinstance(it, str) else dict(it) for it in items]
        m = self.sparsify_settings(to_csr(vectors, self.dim))
        with self.writing():
            return self.store(collection).append(m, items)

    def delete(self, ids: Sequence[str], collection: str = "images") -> list[int]:
        """Tombstone ids; ids deleted before are no-ops, ids never stored raise UnknownIdError."""
        with self.writing():
            return self.store(collection).delete(ids)

    # -- searching --------------------------------------------------------------------------------------
    def prepare_queries(self, vectors: Any, sparsify: Sparsification | str | None = None) -> sp.csr_matrix:
        """Query vectors -> CSR sparsified like the documents, or by ``sparsify`` (an object or its spelling)."""
        settings = self.sparsify_settings if sparsify is None else Sparsification.parse(sparsify)
        return settings(to_csr(vectors, self.dim, "query vectors"))

    def search_vectors(self, queries: Any, k: int = 10, collection: str = "images",
                       fingerprint: str | None = None, sparsify: Sparsification | str | None = None,
                       words: int | None = None) -> list[list[Hit]]:
        """Top-``k`` explained hits per query vector (sparsified as in :meth:`prepare_queries`).

        ``words``: build only this many contributing words per hit (largest first; None: all of them).
        The hit's score and ``explanation.n_shared`` still count every shared word.

        ``fingerprint``: the model fingerprint of the queries, checked against the index when given.
        Hits are re-scored exactly from the stored vectors (the backend only proposes rows), so a hit's
        score equals the sum of its explanation's contributions.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if fingerprint is not None:
            self.check_fingerprint(fingerprint)
        q = self.prepare_queries(queries, sparsify)
        store = self.store(collection)
        if store.n_alive == 0:
            return [[] for _ in range(q.shape[0])]
        candidates = self.backend(collection).search(q, k)
        matrix, items = store.matrix(), store.items()
        alive = store.alive_mask() if store.manifest.deleted else None
        results = []
        for i, cand in enumerate(candidates):
            rows = cand.rows if alive is None else cand.rows[alive[cand.rows]]  # never show a deleted item
            if len(rows) == 0:
                results.append([])
                continue
            explanations = explain_rows(q[i], sp.csr_matrix(matrix[rows]), self.vocab.words, words)
            scored = sorted(zip(rows.tolist(), explanations), key=lambda re: (-re[1].total, re[0]))
            hits = []
            for rank, (row, expl) in enumerate(scored, start=1):
                item = items[row]
                meta = {key: v for key, v in item.items() if key != "id"}
                hits.append(Hit(rank, item["id"], expl.total, row, meta, expl))
            results.append(hits)
        return results

    def search_text(self, model: Any, texts: str | Sequence[str], k: int = 10, collection: str = "images",
                    **query_settings: Any) -> list[list[Hit]]:
        """Text query -> images (or texts): encodes with ``model`` after checking it is the index's model."""
        import torch

        self.check_model(model)
        texts = [texts] if isinstance(texts, str) else list(texts)
        with torch.no_grad():
            out = model.encode_text(texts)
        return self.search_vectors(out, k, collection, **query_settings)

    def search_image(self, model: Any, images: Any, k: int = 10, collection: str = "images",
                     **query_settings: Any) -> list[list[Hit]]:
        """Image query (paths or PIL images) -> images, or -> captions with ``collection="texts"``."""
        import torch

        import lexvla

        self.check_model(model)
        images = [images] if isinstance(images, (str, Path)) or hasattr(images, "mode") else list(images)
        pil = [lexvla.load_image(im) if isinstance(im, (str, Path)) else im for im in images]
        with torch.no_grad():
            out = model.encode_image(pil)
        return self.search_vectors(out, k, collection, **query_settings)

    # -- reporting ---------------------------------------------------------------------------------------
    def info(self) -> IndexInfo:
        cols = {}
        for c in COLLECTIONS:
            if not (self.path / c / "manifest.json").is_file():
                continue
            st = self.store(c)
            cols[c] = {"items": st.n_alive, "deleted": len(st.manifest.deleted), "shards": len(st.manifest.shards),
                       "nnz": st.manifest.nnz, "avg_active_words": st.manifest.nnz / max(st.n_rows, 1),
                       "store_bytes": st.disk_bytes()}
        return IndexInfo(str(self.path), self.model_record, self.sparsify_settings, self.backend_name, cols)
