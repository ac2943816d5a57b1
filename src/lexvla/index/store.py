"""Append-only on-disk store of sparse lexical vectors for one collection (images or texts).

Layout of a collection folder::

    manifest.json                       committed state (written to a temp file, then renamed)
    shard-000000.indptr.npy             one CSR block per appended batch (raw arrays, so they open
    shard-000000.indices.npy            memory-mapped with ``np.load(mmap_mode="r")``)
    shard-000000.data.npy
    shard-000000.items.jsonl            one JSON object per row: {"id": ..., <metadata>}

A batch becomes visible only when the manifest that names its shard is renamed into place, so a crash
or Ctrl-C at any moment loses at most the batch being written; files of an uncommitted shard are
ignored and overwritten by the next append. The manifest records a digest of every shard file (xxh3-128,
about 10x faster than sha256, so opening a large index stays cheap) and a sha256 of itself; a damaged file (a flipped byte, a truncation, an edited count) is refused on reading with one
:class:`CorruptIndexError` naming it, and arrays are bounds-checked before scipy sees them, so damage
never crashes the process or silently changes a result. Rows are numbered in append order and never renumbered:
deletion only records the row in the manifest's ``deleted`` list (a tombstone), so search backends can
key their own copies by row number and catch up incrementally.
"""

from __future__ import annotations

import hashlib
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


class CorruptIndexError(ValueError):
    """An index file is damaged or inconsistent with the manifest (the message names the file)."""


def _hasher(algorithm: str):  # noqa: ANN202
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise CorruptIndexError(f"unknown digest algorithm {algorithm!r}")


def _default_algorithm() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def file_digest(path: Path, algorithm: str | None = None) -> str:
    """``"<algorithm>:<hex>"`` of a file's bytes (damage detection, not a signature)."""
    algorithm = algorithm or _default_algorithm()
    h = _hasher(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return f"{algorithm}:{h.hexdigest()}"


def digest_matches(path: Path, want: object) -> bool:
    """Whether ``path`` has the digest ``want`` (``"algo:hex"``; a bare hex is sha256)."""
    if not isinstance(want, str):
        return False
    algorithm, _, hexdigest = want.rpartition(":")
    try:
        return file_digest(path, algorithm or "sha256") == f"{algorithm or 'sha256'}:{hexdigest}"
    except (CorruptIndexError, ImportError):
        return False


def json_digest(data: dict) -> str:
    """sha256 of a JSON object's content (its own ``checksum`` field left out, keys sorted)."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_checked_json(path: Path) -> dict:
    """A JSON object written with a ``checksum`` field (index.json, the store manifest), checksum removed.

    Every kind of damage is one :class:`CorruptIndexError` naming the file; files written before
    checksums existed (no field) are accepted as they are.
    """
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptIndexError(f"{path}: damaged, not JSON ({err})") from None
    if not isinstance(data, dict):
        raise CorruptIndexError(f"{path}: damaged, not a JSON object")
    checksum = data.pop("checksum", None)
    if checksum is not None and checksum != json_digest(data):
        raise CorruptIndexError(f"{path}: damaged (its checksum does not match its content)")
    return data


@dataclass
class ShardInfo:
    name: str
    rows: int
    nnz: int
    digests: dict[str, str] | None = None  # part -> "algo:hex"; None in stores written before checksums
    sha256: dict[str, str] | None = None  # the same under its first name (bare sha256 hex); read only

    def __post_init__(self) -> None:
        if self.digests is None and self.sha256 is not None:
            self.digests, self.sha256 = self.sha256, None


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
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        for s in self.shards:
            if not (isinstance(s.rows, int) and isinstance(s.nnz, int) and s.rows >= 0 and s.nnz >= 0
                    and isinstance(s.name, str) and s.name.startswith("shard-") and "/" not in s.name):
                raise ValueError(f"bad shard record {s}")
        rows = self.rows
        if any(not isinstance(r, int) or not 0 <= r < rows for r in self.deleted):
            raise ValueError(f"deleted rows must be row numbers in [0, {rows})")

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
        self._verified: set[str] = set()  # shard files whose digest matched (shards never change)
        self._stamp = _stamp(directory / MANIFEST)

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
        return cls(directory, _read_manifest(path))

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
        stamp = _stamp(self.directory / MANIFEST)
        self.manifest = _read_manifest(self.directory / MANIFEST)
        self._stamp = stamp
        self._invalidate()

    def changed_on_disk(self) -> bool:
        """Whether another process committed since this store read its manifest (one ``stat``)."""
        return _stamp(self.directory / MANIFEST) != self._stamp

    def refresh(self) -> bool:
        """Reload if the manifest changed on disk; returns whether it did."""
        if not self.changed_on_disk():
            return False
        self.reload()
        return True

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
        parts = [self._load_shard(s) for s in shards]
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

    def _verify(self, shard: ShardInfo, part: str) -> Path:
        """The shard file's path, after checking it exists and matches the manifest's digest."""
        path = self._shard_path(shard.name, part)
        key = f"{shard.name}.{part}"
        if key in self._verified:
            return path
        if not path.is_file():
            raise CorruptIndexError(f"{path}: missing (named by {self.directory / MANIFEST})")
        digests = shard.digests
        want = None if digests is None else digests.get(part, "missing") if isinstance(digests, dict) else "damaged"
        if want is not None and not digest_matches(path, want):
            raise CorruptIndexError(f"{path}: damaged (its checksum does not match {MANIFEST}); "
                                    "restore it from a backup or rebuild the index")
        self._verified.add(key)
        return path

    def _load_shard(self, s: ShardInfo) -> dict[str, np.ndarray]:
        """A shard's CSR arrays, memory-mapped, validated so scipy never reads out of bounds."""
        arrays = {}
        for a in _ARRAYS:
            path = self._verify(s, a)
            try:
                arrays[a] = np.load(path, mmap_mode="r", allow_pickle=False)
            except Exception as err:  # noqa: BLE001 - any unreadable header is the same damage
                raise CorruptIndexError(f"{path}: not a readable array ({err})") from None
        indptr, indices, data = arrays["indptr"], arrays["indices"], arrays["data"]

        def bad(part: str, why: str) -> CorruptIndexError:
            return CorruptIndexError(f"{self._shard_path(s.name, part)}: {why} (damaged index file)")

        for a, kind in (("indptr", "i"), ("indices", "i"), ("data", "f")):
            if arrays[a].ndim != 1 or arrays[a].dtype.kind != kind:
                raise bad(a, f"expected a 1-D {'integer' if kind == 'i' else 'float'} array, got "
                             f"{arrays[a].dtype} of shape {arrays[a].shape}")
        if len(indptr) != s.rows + 1:
            raise bad("indptr", f"{len(indptr)} entries for {s.rows} rows")
        if len(indices) != s.nnz or len(data) != s.nnz:
            raise bad("indices" if len(indices) != s.nnz else "data", f"length does not match nnz={s.nnz}")
        if s.rows and (indptr[0] != 0 or indptr[-1] != s.nnz or np.any(np.diff(indptr) < 0)):
            raise bad("indptr", "row pointers are not a non-decreasing run from 0 to nnz")
        if s.nnz and (int(indices.min()) < 0 or int(indices.max()) >= self.dim):
            raise bad("indices", f"word ids outside [0, {self.dim})")
        if s.nnz and not np.all(np.isfinite(data)):
            raise bad("data", "NaN or infinite weights")
        return arrays

    def items(self) -> list[dict]:
        """Per-row ``{"id": ..., <metadata>}`` dicts (deleted rows included), cached."""
        if self._items is None:
            items: list[dict] = []
            for s in self.manifest.shards:
                path = self._verify(s, "items")
                rows = []
                try:
                    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                        row = json.loads(line)
                        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                            raise CorruptIndexError(f"{path}:{n}: not an item object with a string id")
                        rows.append(row)
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise CorruptIndexError(f"{path}: damaged ({err})") from None
                if len(rows) != s.rows:
                    raise CorruptIndexError(f"{path}: {len(rows)} items for {s.rows} rows in {MANIFEST}")
                items.extend(rows)
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
        digests = {}
        for part, array in arrays.items():
            atomic_save_npy(self._shard_path(name, part), array)
            digests[part] = file_digest(self._shard_path(name, part))
        atomic_write_text(self._shard_path(name, "items"),
                          "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        digests["items"] = file_digest(self._shard_path(name, "items"))
        first = self.n_rows
        self.manifest.shards.append(ShardInfo(name=name, rows=vectors.shape[0], nnz=int(vectors.nnz),
                                              digests=digests))
        self._verified.update(f"{name}.{part}" for part in digests)
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
        """Tombstone live items by id. Ids deleted before are no-ops (re-running a delete succeeds);
        ids never stored raise :class:`UnknownIdError` naming them. Returns the newly deleted rows."""
        ids = list(ids)
        rows, missing = [], []
        ever = None
        for item_id in ids:
            row = self.row_of(item_id)
            if row is not None:
                rows.append(row)
                continue
            if ever is None:
                ever = set(self.ids())
            if item_id not in ever:
                missing.append(item_id)
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
        data["checksum"] = json_digest(data)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / MANIFEST, json.dumps(data))
        self._stamp = _stamp(self.directory / MANIFEST)

    def _invalidate(self) -> None:
        self._matrix = None
        self._items = None
        self._row_of = None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read_manifest(path: Path) -> StoreManifest:
    """Parse and check a manifest; every kind of damage is one CorruptIndexError naming the file."""
    data = read_checked_json(path)
    if data.get("format") != STORE_FORMAT:
        raise ValueError(f"{path}: unsupported store format {data.get('format')!r} (expected {STORE_FORMAT})")
    try:
        return StoreManifest(**data)
    except (TypeError, ValueError) as err:
        raise CorruptIndexError(f"{path}: damaged ({err})") from None
