"""``milvus``: a Milvus collection with a ``SPARSE_FLOAT_VECTOR`` field, synced incrementally.

Milvus Lite (a local ``*.db`` file, run as a child process) by default; any Milvus server or cluster by
URI (``http://host:19530``), with the same client code. The token is a secret: never saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lexvla.index.backends.base import Candidates, SearchBackend, read_state, register_backend
from lexvla.index.store import VectorStore, atomic_write_text


@dataclass
class MilvusOptions:
    """Where the Milvus collection lives.

    uri: a Milvus Lite file (``*.db``; default ``<index>/milvus.db``) or a server/cluster address such
        as ``http://host:19530``: the only thing to change when moving from Lite to a server.
    token: server credentials (``user:password`` or an API key); default ``$MILVUS_TOKEN``. Never saved.
    collection: collection name (default derived from the index's unique id and the collection).
    """

    uri: str | None = None
    token: str | None = field(default=None, metadata={"secret": True})
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

    @classmethod
    def options_to_save(cls, options: dict) -> dict:
        saved = super().options_to_save(options)
        if isinstance(saved.get("uri"), str) and is_local_milvus(saved["uri"]):
            # a Milvus Lite file given relative to the current folder must still be found from elsewhere
            saved["uri"] = str(Path(saved["uri"]).expanduser().resolve())
        return saved

    @classmethod
    def collection_defaults(cls, index_uid: str, collection: str) -> dict:
        return {"collection": f"lexvla_{index_uid}_{collection}"}

    def describe(self) -> dict:
        return {**super().describe(), "uri": self.uri, "collection": self.collection,
                "local": is_local_milvus(self.uri)}

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
        state = read_state(path)
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
