"""On-disk caches for the frozen parts of the model: image patch features and text vectors.

The vision backbone is frozen, so its patch features depend only on (backbone weights, preprocessing,
image). They are computed once and stored as memory-mapped ``.npy`` chunks; later epochs read rows from
the memmaps instead of running the backbone. The same store holds text vectors (one row per unique
caption) when the text side is frozen.

Layout of one cache (``<root>/<kind>-<digest>/``, the digest hashing the :class:`CacheKey`)::

    key.json              the CacheKey (backbone, preprocessing, dataset, dtype), for humans and checks
    chunk-000000.npy      rows [0, n0) as an (n0, *row_shape) array (float16 by default)
    chunk-000000.json     the ids of those rows, plus the pair records seen while they were computed
    ...
    pairs.jsonl           (image caches) every usable pair: id, image_id, caption
    index.json            written last: chunk list, row shape, dtype, counts, skip report

Every file is written to a temporary name and renamed; a chunk counts only once its ``.json`` exists,
so a build killed at any point resumes from the last committed chunk (rows are recomputed for at most
one chunk). ``index.json`` marks a finished cache; opening one never calls the compute function.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lexvla.data.sources import Pair, PairRecord, Skipped, SkipStats
from lexvla.io import WriterLock, atomic_save_npy, atomic_write_text, clean_stale_tmp

logger = logging.getLogger(__name__)

DTYPES = ("float16", "float32", "bfloat16")
INDEX_FILE = "index.json"
KEY_FILE = "key.json"
PAIRS_FILE = "pairs.jsonl"
NOT_IN_CACHE = "not_in_cache"


@dataclass(frozen=True)
class CacheKey:
    """What the cached rows depend on. Change any field and a different cache folder is used.

    ``backbone``: fingerprint or name of the frozen network (``model.fingerprint()`` or a backbone id);
    ``preprocessing``: anything that changes the pixels fed to it (size, mean/std, resize mode);
    ``dataset``: fingerprint of the data (``source.fingerprint()``). ``dtype`` is the storage type
    (``bfloat16`` is stored as float32 on disk, since numpy has no bfloat16).
    """

    backbone: str
    preprocessing: str
    dataset: str
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("backbone", "preprocessing", "dataset"):
            if not getattr(self, name):
                raise ValueError(f"CacheKey.{name} must be a non-empty string")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype("float16" if self.dtype == "float16" else "float32")


def _to_numpy(x: torch.Tensor | np.ndarray, dtype: np.dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=dtype)


# ------------------------------------------------------------------------------------------------ store
class ArrayStore:
    """A finished cache opened read-only: rows by id, backed by memory-mapped chunks."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a finished cache (no {INDEX_FILE})")
        self.index: dict[str, Any] = json.loads(index_path.read_text())
        self.key = CacheKey(**self.index["key"])
        self.row_shape = tuple(self.index["row_shape"])
        # numpy cannot memory-map a zero-row array (a chunk that only carries pair records)
        self._chunks = [np.load(self.folder / c["file"], mmap_mode="r" if c["rows"] else None)
                        for c in self.index["chunks"]]
        self.ids: list[str] = []
        for c in self.index["chunks"]:
            self.ids.extend(json.loads((self.folder / c["ids"]).read_text())["ids"])
        self._starts = list(np.cumsum([0] + [len(c) for c in self._chunks])[:-1])
        self.row_of = {i: n for n, i in enumerate(self.ids)}
        if len(self.row_of) != len(self.ids):
            raise ValueError(f"cache {self.folder} holds duplicate ids; delete it and rebuild")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.row_of

    def row(self, n: int) -> np.ndarray:
        c = bisect.bisect_right(self._starts, n) - 1
        return self._chunks[c][n - self._starts[c]]

    def get(self, item_id: str) -> np.ndarray:
        """The stored row (a read-only memmap view, storage dtype)."""
        try:
            return self.row(self.row_of[item_id])
        except KeyError:
            raise KeyError(f"id {item_id!r} is not in cache {self.folder}") from None

    def stack(self, item_ids: Sequence[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(self.get(i), dtype=np.float32) for i in item_ids])).to(dtype)

    def pairs(self) -> list[PairRecord]:
        path = self.folder / PAIRS_FILE
        if not path.is_file():
            return []
        with path.open(encoding="utf-8") as f:
            return [PairRecord.from_dict(json.loads(line)) for line in f if line.strip()]

    @property
    def skips(self) -> SkipStats:
        return SkipStats.from_dict(self.index["skips"])


# ------------------------------------------------------------------------------------------------ build
@dataclass
class BuildResult:
    """What one :func:`build_cache` call did."""

    store: ArrayStore
    computed_rows: int  # rows computed by this call (0 when the cache was complete already)
    reused_rows: int  # rows found in committed chunks from an earlier, interrupted call
    skips: SkipStats = field(default_factory=SkipStats)


class _ChunkWriter:
    def __init__(self, folder: Path, key: CacheKey, chunk_bytes: int) -> None:
        self.folder, self.key, self.chunk_bytes = folder, key, chunk_bytes
        self.done: set[str] = set()
        self.chunks: list[dict[str, Any]] = []
        self.pairs: dict[str, PairRecord] = {}
        for meta_path in sorted(folder.glob("chunk-*.json")):
            meta = json.loads(meta_path.read_text())
            npy = folder / meta["file"]
            if not npy.is_file():
                continue
            self.chunks.append({"file": meta["file"], "ids": meta_path.name, "rows": len(meta["ids"])})
            self.done.update(meta["ids"])
            for p in meta.get("pairs", []):
                self.pairs[p["id"]] = PairRecord.from_dict(p)
        self.reused = len(self.done)
        self.row_shape: tuple[int, ...] | None = None
        if self.chunks:
            self.row_shape = tuple(np.load(folder / self.chunks[0]["file"], mmap_mode="r").shape[1:])
        self._rows: list[np.ndarray] = []
        self._ids: list[str] = []
        self._pending_pairs: list[PairRecord] = []
        self._rows_per_chunk: int | None = None

    def add_pair(self, rec: PairRecord) -> None:
        if rec.id not in self.pairs:
            self.pairs[rec.id] = rec
            self._pending_pairs.append(rec)

    def add_rows(self, ids: list[str], rows: np.ndarray) -> None:
        if self.row_shape is None:
            self.row_shape = tuple(rows.shape[1:])
        elif tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"compute function returned rows of shape {tuple(rows.shape[1:])}, "
                             f"earlier rows were {self.row_shape}")
        if self._rows_per_chunk is None:
            self._rows_per_chunk = max(1, self.chunk_bytes // max(1, rows[0].nbytes))
        for i, r in zip(ids, rows, strict=True):
            self._ids.append(i)
            self._rows.append(r)
            self.done.add(i)
            if len(self._rows) >= self._rows_per_chunk:
                self.commit()

    def commit(self) -> None:
        if not self._rows and not self._pending_pairs:
            return
        n = len(self.chunks)
        name = f"chunk-{n:06d}"
        if self._rows:
            atomic_save_npy(self.folder / f"{name}.npy", np.stack(self._rows))
        else:  # pairs only (their images were committed earlier): an empty chunk keeps them resumable
            atomic_save_npy(self.folder / f"{name}.npy", np.zeros((0, *(self.row_shape or (0,))),
                                                                   self.key.numpy_dtype))
        # the .json is the commit record: a chunk without it is ignored (and overwritten) on resume
        atomic_write_text(self.folder / f"{name}.json", json.dumps({
            "file": f"{name}.npy", "ids": self._ids, "pairs": [p.to_dict() for p in self._pending_pairs]}))
        self.chunks.append({"file": f"{name}.npy", "ids": f"{name}.json", "rows": len(self._ids)})
        self._rows, self._ids, self._pending_pairs = [], [], []

    def finish(self, skips: SkipStats, with_pairs: bool) -> None:
        self.commit()
        if with_pairs:
            lines = [json.dumps(p.to_dict()) for p in self.pairs.values() if p.image_id in self.done]
            atomic_write_text(self.folder / PAIRS_FILE, "\n".join(lines) + ("\n" if lines else ""))
        atomic_write_text(self.folder / INDEX_FILE, json.dumps({
            "key": asdict(self.key),
            "row_shape": list(self.row_shape or ()),
            "storage_dtype": str(self.key.numpy_dtype),
            "rows": sum(c["rows"] for c in self.chunks),
            "chunks": self.chunks,
            "skips": skips.to_dict(),
        }, indent=1))


def cache_folder(root: str | Path, key: CacheKey, kind: str) -> Path:
    return Path(root) / f"{kind}-{key.digest()}"


def build_cache(
    root: str | Path,
    key: CacheKey,
    items: Iterable[tuple[str, Any] | PairItem],
    compute: Callable[[list[Any]], torch.Tensor | np.ndarray],
    kind: str = "features",
    batch_size: int = 64,
    chunk_bytes: int = 256 << 20,
    skips: SkipStats | None = None,
    progress: Callable[[int], None] | None = None,
) -> BuildResult:
    """Compute ``compute(payloads)`` once per unique id and store the rows; reuse a finished cache.

    ``items`` yields ``(id, payload)``, or :class:`PairItem` (a pair's record plus a payload thunk, so that
    ids already cached are not decoded again), or :class:`Skipped` markers (counted). Repeated ids are
    computed once. ``compute`` gets a list of payloads and returns a (B, ...) tensor/array.
    ``progress(n)`` is called with the number of rows computed after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    folder = cache_folder(root, key, kind)
    if (folder / INDEX_FILE).is_file():
        store = ArrayStore(folder)
        logger.info("cache hit: %s (%d rows)", folder, len(store))
        return BuildResult(store=store, computed_rows=0, reused_rows=len(store), skips=store.skips)
    folder.mkdir(parents=True, exist_ok=True)
    # One builder per cache folder (the cache is shared): a second process waits, then finds it built.
    with WriterLock(folder, what="the cache", timeout=6 * 3600):
        if (folder / INDEX_FILE).is_file():
            store = ArrayStore(folder)
            return BuildResult(store=store, computed_rows=0, reused_rows=len(store), skips=store.skips)
        clean_stale_tmp(folder)
        return _build_cache_locked(folder, key, kind, items, compute, batch_size, chunk_bytes, skips, progress)


def _build_cache_locked(folder: Path, key: CacheKey, kind: str, items: Iterable[Any], compute: Callable,
                        batch_size: int, chunk_bytes: int, skips: SkipStats | None,
                        progress: Callable[[int], None] | None) -> BuildResult:
    atomic_write_text(folder / KEY_FILE, json.dumps(asdict(key), indent=1))
    writer = _ChunkWriter(folder, key, chunk_bytes)
    if writer.reused:
        logger.info("resuming cache %s: %d rows already committed", folder, writer.reused)
    skips = skips if skips is not None else SkipStats(source=f"cache:{kind}")
    with_pairs = False
    batch_ids: list[str] = []
    batch: list[Any] = []
    failed: dict[str, str] = {}  # image id -> skip reason
    computed = 0

    def flush() -> None:
        nonlocal computed
        if not batch:
            return
        with torch.no_grad():
            rows = _to_numpy(compute(list(batch)), key.numpy_dtype)
        if rows.shape[0] != len(batch):
            raise ValueError(f"compute function returned {rows.shape[0]} rows for a batch of {len(batch)}")
        writer.add_rows(list(batch_ids), rows)
        computed += len(batch)
        batch.clear()
        batch_ids.clear()
        if progress is not None:
            progress(computed)

    for item in items:
        if isinstance(item, Skipped):
            skips.add([item])
            continue
        if isinstance(item, PairItem):
            with_pairs = True
            skips.seen += 1
            item_id = item.record.image_id
            if item_id in failed:  # another caption of an image that could not be read: not decoded again
                skips.add([Skipped(item.record.id, failed[item_id])])
                continue
            if item_id in writer.done or item_id in batch_ids:
                writer.add_pair(item.record)
                skips.yielded += 1
                continue
            payload = item.load()
            if isinstance(payload, Skipped):
                skips.add([payload])
                failed[item_id] = payload.reason
                continue
            writer.add_pair(item.record)
            skips.yielded += 1
        else:
            item_id, payload = item
            if item_id in writer.done or item_id in batch_ids:
                continue
        batch_ids.append(item_id)
        batch.append(payload)
        if len(batch) >= batch_size:
            flush()
    flush()
    writer.finish(skips, with_pairs)
    store = ArrayStore(folder)
    logger.info("cache %s: %d rows (%d computed now, %d reused), %d skipped",
                folder, len(store), computed, writer.reused, skips.skipped)
    return BuildResult(store=store, computed_rows=computed, reused_rows=writer.reused, skips=skips)


@dataclass(frozen=True)
class PairItem:
    """A pair for :func:`build_cache`: its record now, its decoded image only when needed."""

    record: PairRecord
    load: Callable[[], Any]


def pair_items(source: Any) -> Iterator[PairItem | Skipped]:
    """Items for an image cache from any pair source.

    Map-style sources (with ``pair_record``) give records without decoding, so a resumed build decodes
    only images that are not cached yet; tar streams are read once, whole (``iter_all``): the cache holds
    the dataset, and every rank then samples its share of it.
    """
    if hasattr(source, "pair_record") and hasattr(source, "__len__"):
        for i in range(len(source)):
            rec = source.pair_record(i)

            def load(i: int = i) -> Any:
                item = source[i]
                return item.image if isinstance(item, Pair) else item

            yield PairItem(rec, load)
        return
    # a tar stream is read whole (not just this rank's share, and once even when it repeats endlessly)
    stream = source.iter_all() if hasattr(source, "iter_all") else iter(source)
    for item in stream:
        if isinstance(item, Skipped):
            yield item
            continue
        yield PairItem(PairRecord(id=item.id, image_id=item.image_id, caption=item.caption),
                       lambda image=item.image: image)


def build_feature_cache(
    root: str | Path,
    source: Any,
    features_fn: Callable[[torch.Tensor], torch.Tensor],
    preprocess: Callable[[list[Any]], torch.Tensor],
    backbone: str,
    preprocessing: str,
    dtype: str = "float16",
    batch_size: int = 64,
    chunk_bytes: int = 256 << 20,
    progress: Callable[[int], None] | None = None,
) -> BuildResult:
    """Patch features ``features_fn(preprocess(images)) -> (B, P, C)`` of every image of a pair source.

    The key's dataset part is ``source.fingerprint()``. The cache also records the usable pairs
    (``pairs.jsonl``), so :class:`CachedPairDataset` can serve later epochs without the source.
    """
    key = CacheKey(backbone=backbone, preprocessing=preprocessing, dataset=source.fingerprint(), dtype=dtype)
    stats = SkipStats(source=f"cache:{getattr(source, 'stats', SkipStats()).source}")
    result = build_cache(root, key, pair_items(source), lambda images: features_fn(preprocess(images)),
                         kind="features", batch_size=batch_size, chunk_bytes=chunk_bytes, skips=stats,
                         progress=progress)
    if result.skips.skipped:
        logger.warning("feature cache skipped samples:\n%s", result.skips.report())
    return result


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """The one identity of a frozen network in every feature-cache key (the trainer, ``lexvla data cache``,
    the demo and CAL all call this): its class, its config (``backbone.cfg``, where it has one) less the
    weight source, and every parameter and buffer (name, shape, dtype, values). The weights are hashed,
    so where they came from does not matter; the trained parts of a model never enter it."""
    h = hashlib.sha256(type(backbone).__qualname__.encode())
    cfg = getattr(backbone, "cfg", None)
    if cfg is not None and dataclasses.is_dataclass(cfg):
        fields = {k: v for k, v in asdict(cfg).items() if k != "source"}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, t in itertools.chain(backbone.named_parameters(), backbone.named_buffers()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_backbone_features(root: str | Path, source: Any, backbone: torch.nn.Module, dtype: str = "float16",
                            features_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            **kwargs: Any) -> BuildResult:
    """:func:`build_feature_cache` keyed the one way: :func:`backbone_fingerprint` and the backbone's own
    ``preprocess``. ``features_fn`` defaults to the backbone (a model passes ``model.image_features`` to
    run it on its device); ``kwargs`` go to :func:`build_feature_cache` (batch size, progress)."""
    return build_feature_cache(root, source, features_fn or backbone, backbone.preprocess,
                               backbone=backbone_fingerprint(backbone), preprocessing=repr(backbone.preprocess),
                               dtype=dtype, **kwargs)


# ------------------------------------------------------------------------------------------------- text
def caption_id(caption: str) -> str:
    """Stable id of a caption string (the text cache's row key)."""
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()[:20]


class TextVectorCache:
    """Vectors of unique captions from a frozen text side (``text_fn(list[str]) -> (B, D)``).

    ``text_key`` identifies the text model + prompt (e.g. ``model.fingerprint()``); the dataset part of
    the key is a hash of the sorted unique captions.
    """

    def __init__(self, root: str | Path, captions: Iterable[str], text_fn: Callable[[list[str]], torch.Tensor],
                 text_key: str, dtype: str = "float32", batch_size: int = 256,
                 chunk_bytes: int = 256 << 20) -> None:
        unique = sorted({c for c in captions})
        h = hashlib.sha256("\n".join(unique).encode("utf-8")).hexdigest()[:16]
        key = CacheKey(backbone=text_key, preprocessing="text", dataset=h, dtype=dtype)
        self.result = build_cache(root, key, ((caption_id(c), c) for c in unique), text_fn, kind="text",
                                  batch_size=batch_size, chunk_bytes=chunk_bytes)
        self.store = self.result.store

    def vectors(self, captions: Sequence[str], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.store.stack([caption_id(c) for c in captions], dtype=dtype)


# ------------------------------------------------------------------------------------------- datasets
@dataclass
class CachedPair:
    """One pair served from the feature cache."""

    features: torch.Tensor  # (P, C) in the cache's storage dtype (float16 by default)
    caption: str
    id: str
    image_id: str


class CachedPairDataset:
    """Map-style dataset of (cached features, caption, id) for training epochs after the first.

    ``pairs`` defaults to the pairs recorded in the cache; pairs whose image has no cached row (it was
    skipped when the cache was built) are dropped and counted in ``stats``.
    """

    def __init__(self, store: ArrayStore, pairs: Sequence[PairRecord] | None = None) -> None:
        self.store = store
        self.stats = SkipStats(source=f"cached:{store.folder.name}")
        records = list(pairs) if pairs is not None else store.pairs()
        self.records: list[PairRecord] = []
        for r in records:
            self.stats.seen += 1
            if r.image_id in store:
                self.records.append(r)
            else:
                self.stats.skip(r.id, NOT_IN_CACHE, f"image {r.image_id}")
        self.stats.yielded = len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def pair_record(self, index: int) -> PairRecord:
        return self.records[index]

    def __getitem__(self, index: int) -> CachedPair:
        r = self.records[index]
        # storage dtype (float16 by default); the collate function stacks and converts a whole batch at once
        feats = torch.from_numpy(np.array(self.store.get(r.image_id)))  # a copy: memmaps are read-only
        return CachedPair(features=feats, caption=r.caption, id=r.id, image_id=r.image_id)
