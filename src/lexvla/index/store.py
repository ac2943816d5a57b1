"""Append-only on-disk store of sparse lexical vectors for one collection (images or texts).

Layout of a collection folder::

    manifest.json                       committed state (written to a temp file, then renamed)
    shard-000000.indptr.npy             one CSR block per appended batch (raw arrays, so they open
    shard-000000.indices.npy            memory-mapped with ``np.load(mmap_mode="r")``)
    shard-000000.data.npy
    shard-000000.items.jsonl            one JSON object per row: {"id": ..., <metadata>}

A batch becomes visible only when the manifest that names its shard is renamed into place, so a crash
or Ctrl-C at any moment loses at most the batch being written; files of an uncommitted shard are
ignored and overwritten by the next append. Rows are numbered in append order and never renumbered:
deletion only records the row in the manifest's ``deleted`` list (a tombstone), so search backends can
key their own copies by row number and catch up incrementally.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lexvla.io import atomic_save_npy, atomic_write_text  # re-exported: backends import them from here

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
MANIFEST = "manifest.json"
_ARRAYS = ("indptr", "indices", "data")


@dataclass
class ShardInfo:
    name: str
    rows: int
    nnz: int


@dataclass
class StoreManifest:
    """The committed state of a collection (``manifest.json``)."""

    dim: int
    shards: list[ShardInfo] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)  # row numbers, in deletion order
    next_shard: int = 0
    generation: int = 0  # bumped on every commit; backends compare it to decide whether to catch up
    format: int = STORE_FORMAT

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def nnz(self) -> int:
        return sum(s.nnz for s in self.shards)


class UnknownIdError(KeyError):
    """Ids that are not (or no longer) in a store."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class VectorStore:
    """Sparse vectors with string ids and JSON metadata, stored as append-only CSR shards.

    Use :meth:`create` or :meth:`open`. Rows are addressed by their append position (``row``);
    ids are unique among live rows.
    """

    def __init__(self, directory: Path, manifest: StoreManifest) -> None:
        self.directory = directory
        self.manifest = manifest
        self._matrix: sp.csr_matrix | None = None
        self._items: list[dict] | None = None
        self._row_of: dict[str, int] | None = None

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | Path, dim: int) -> VectorStore:
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise FileExistsError(f"{directory} already holds a vector store")
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory, StoreManifest(dim=dim))
        store._commit()
        return store

    @classmethod
    def open(cls, directory: str | Path) -> VectorStore:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a vector store (no {MANIFEST})")
        data = json.loads(path.read_text())
        if data.get("format") != STORE_FORMAT:
            raise ValueError(f"{path}: unsupported store format {data.get('format')!r} (expected {STORE_FORMAT})")
        return cls(directory, StoreManifest(**data))

    @classmethod
    def open_or_create(cls, directory: str | Path, dim: int) -> VectorStore:
        if (Path(directory) / MANIFEST).is_file():
            store = cls.open(directory)
            if store.dim != dim:
                raise ValueError(f"{directory} stores {store.dim}-dim vectors, not {dim}")
            return store
        return cls.create(directory, dim)

    def reload(self) -> None:
        """Re-read the manifest (another process may have appended)."""
        fresh = VectorStore.open(self.directory)
        self.manifest = fresh.manifest
        self._invalidate()

    # -- properties ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def n_rows(self) -> int:
        """Rows ever appended, deleted ones included (row numbers run from 0 to n_rows - 1)."""
        return self.manifest.rows

    @property
    def n_alive(self) -> int:
        return self.n_rows - len(self.manifest.deleted)

    @property
    def generation(self) -> int:
        return self.manifest.generation

    def alive_mask(self) -> np.ndarray:
        mask = np.ones(self.n_rows, dtype=bool)
        if self.manifest.deleted:
            mask[np.asarray(self.manifest.deleted, dtype=np.int64)] = False
        return mask

    def disk_bytes(self) -> int:
        """Bytes of the committed shards and manifest on disk."""
        total = (self.directory / MANIFEST).stat().st_size
        for shard in self.manifest.shards:
            for suffix in (*_ARRAYS, "items"):
                total += self._shard_path(shard.name, suffix).stat().st_size
        return total

    # -- reading -------------------------------------------------------------------------------
    def _shard_path(self, name: str, part: str) -> Path:
        return self.directory / (f"{name}.items.jsonl" if part == "items" else f"{name}.{part}.npy")

    def matrix(self) -> sp.csr_matrix:
        """All rows (deleted ones included, see :meth:`alive_mask`) as one CSR matrix.

        A single shard is returned memory-mapped without a copy; several shards are concatenated once
        and cached.
        """
        if self._matrix is None:
            self._matrix = self._load_matrix()
        return self._matrix

    def _load_matrix(self) -> sp.csr_matrix:
        shards = self.manifest.shards
        if not shards:
            return sp.csr_matrix((0, self.dim), dtype=np.float32)
        parts = [{a: np.load(self._shard_path(s.name, a), mmap_mode="r") for a in _ARRAYS} for s in shards]
        if len(parts) == 1:
            p = parts[0]
            return sp.csr_matrix((p["data"], p["indices"], p["indptr"]), shape=(shards[0].rows, self.dim),
                                 copy=False)
        nnz = self.manifest.nnz
        index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
        indptr = np.empty(self.n_rows + 1, dtype=index_dtype)
        indptr[0] = 0
        row = offset = 0
        for s, p in zip(shards, parts):
            indptr[row + 1: row + s.rows + 1] = np.asarray(p["indptr"][1:], dtype=np.int64) + offset
            row += s.rows
            offset += s.nnz
        indices = np.concatenate([np.asarray(p["indices"], dtype=index_dtype) for p in parts])
        data = np.concatenate([np.asarray(p["data"], dtype=np.float32) for p in parts])
        return sp.csr_matrix((data, indices, indptr), shape=(self.n_rows, self.dim), copy=False)

    def items(self) -> list[dict]:
        """Per-row ``{"id": ..., <metadata>}`` dicts (deleted rows included), cached."""
        if self._items is None:
            items: list[dict] = []
            for s in self.manifest.shards:
                with open(self._shard_path(s.name, "items"), encoding="utf-8") as f:
                    items.extend(json.loads(line) for line in f)
            self._items = items
        return self._items

    def ids(self) -> list[str]:
        return [it["id"] for it in self.items()]

    def row_of(self, item_id: str) -> int | None:
        """Row of a live item, or None."""
        if self._row_of is None:
            deleted = set(self.manifest.deleted)
            self._row_of = {it["id"]: r for r, it in enumerate(self.items()) if r not in deleted}
        return self._row_of.get(item_id)

    def live_ids(self) -> set[str]:
        self.row_of("")  # builds the map
        assert self._row_of is not None
        return set(self._row_of)

    # -- writing -------------------------------------------------------------------------------
    def append(self, vectors: sp.csr_matrix, items: Sequence[dict]) -> range:
        """Append rows (a committed shard); ``items[i]`` must hold a unique string ``"id"``.

        Returns the new rows' numbers. Raises ValueError naming the offending id on duplicates.
        """
        vectors = sp.csr_matrix(vectors, dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} dimensions, the store has {self.dim}")
        if vectors.shape[0] != len(items):
            raise ValueError(f"{vectors.shape[0]} vectors but {len(items)} items")
        if vectors.shape[0] == 0:
            return range(self.n_rows, self.n_rows)
        live = self.live_ids()
        seen: set[str] = set()
        for it in items:
            item_id = it.get("id")
            if not isinstance(item_id, str) or not item_id:
                raise ValueError(f"every item needs a non-empty string 'id', got {item_id!r}")
            if item_id in live or item_id in seen:
                raise ValueError(f"id {item_id!r} is already in the store {self.directory}; delete it first")
            seen.add(item_id)
        vectors.sum_duplicates()
        vectors.sort_indices()
        name = f"shard-{self.manifest.next_shard:06d}"
        arrays = {"indptr": vectors.indptr.astype(np.int64), "indices": vectors.indices.astype(np.int32),
                  "data": vectors.data.astype(np.float32)}
        if vectors.nnz < np.iinfo(np.int32).max:
            arrays["indptr"] = arrays["indptr"].astype(np.int32)
        for part, array in arrays.items():
            atomic_save_npy(self._shard_path(name, part), array)
        atomic_write_text(self._shard_path(name, "items"),
                          "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        first = self.n_rows
        self.manifest.shards.append(ShardInfo(name=name, rows=vectors.shape[0], nnz=int(vectors.nnz)))
        self.manifest.next_shard += 1
        self._commit()
        # Keep the id caches (re-reading every items file per batch would make a build quadratic).
        self._matrix = None
        if self._items is not None:
            self._items.extend(dict(it) for it in items)
        if self._row_of is not None:
            self._row_of.update((it["id"], first + i) for i, it in enumerate(items))
        return range(first, first + vectors.shape[0])

    def delete(self, ids: Iterable[str]) -> list[int]:
        """Tombstone live items by id; unknown ids raise KeyError naming them. Returns their rows."""
        ids = list(ids)
        rows, missing = [], []
        for item_id in ids:
            row = self.row_of(item_id)
            (missing.append(item_id) if row is None else rows.append(row))
        if missing:
            raise UnknownIdError(f"{len(missing)} id(s) not in {self.directory}: {missing[:5]}")
        rows = sorted(set(rows))
        if rows:
            self.manifest.deleted.extend(rows)
            self._commit()
            self._row_of = None
        return rows

    def _commit(self) -> None:
        self.manifest.generation += 1
        data = asdict(self.manifest)
        atomic_write_text(self.directory / MANIFEST, json.dumps(data))

    def _invalidate(self) -> None:
        self._matrix = None
        self._items = None
        self._row_of = None
