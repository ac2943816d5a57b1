"""Image-text pair sources behind one small interface, with skip accounting.

Every source yields :class:`Pair` (a decoded RGB image, its caption, a unique pair id and the id of the
image, which pairs sharing an image have in common). A sample that cannot be used (unreadable or missing
image, empty caption, a tar sample without an image or caption member) is never dropped silently: the
source records it in its :class:`SkipStats` and, where the sample was already on its way to a batch,
yields a :class:`Skipped` marker instead, which the collate function removes and carries in
``Batch.skipped`` so that the main process can count skips made inside DataLoader workers.

Sources:

- :class:`ManifestSource` - a JSONL/CSV/TSV manifest naming image files (map-style).
- :class:`TarShardSource` - WebDataset-style tar shards (CC-12M's format), streamed with ``tarfile`` and
  split across DataLoader workers and distributed ranks (iterable).
- :class:`HFDatasetSource` - a Hugging Face ``datasets.Dataset`` with configurable columns (map-style).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from lexvla.data.records import PairRecord, check_unique, iter_rows, records_from_row
from lexvla.distributed import dist_info
from lexvla.io import atomic_write_text
from lexvla.preprocess import IMAGE_SUFFIXES, ImageLoadError
from lexvla.preprocess import decode_image as _decode

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = tuple(s[1:] for s in IMAGE_SUFFIXES)  # tar member extensions
# Skip reasons (strings, so that reports and JSON stay readable).
UNREADABLE_IMAGE = "unreadable_image"
EMPTY_CAPTION = "empty_caption"
NO_IMAGE_MEMBER = "no_image_member"
NO_CAPTION_MEMBER = "no_caption_member"
UNREADABLE_SHARD = "unreadable_shard"


# ------------------------------------------------------------------------------------------------ items
@dataclass
class Pair:
    """One usable image-text pair."""

    image: Image.Image
    caption: str
    id: str
    image_id: str


@dataclass(frozen=True)
class Skipped:
    """Marker yielded in place of a sample that was skipped (removed by the collate function)."""

    id: str
    reason: str


def decode_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file or encoded bytes into a loaded, upright RGB image (the one decoder,
    :func:`lexvla.preprocess.decode_image`: pixel cap, EXIF orientation).

    Raises :class:`lexvla.ImageLoadError` (naming ``name`` or the path) for anything unreadable.
    """
    return _decode(source, name=name)


# ----------------------------------------------------------------------------------------------- stats
@dataclass
class SkipStats:
    """Counts of skipped samples by reason, with the first few offending ids.

    Counts are events: a bad image in a map-style source is counted again every time it is requested
    (every epoch). ``log_dir`` (optional) makes every process write its own ``skips-<source>-<pid>.json``
    so that skips made in DataLoader workers can be merged afterwards with :meth:`from_dir`.
    """

    source: str = "pairs"
    seen: int = 0
    yielded: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5
    log_dir: str | None = None

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def skip(self, sample_id: str, reason: str, message: str = "") -> Skipped:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(sample_id)
            logger.warning("%s: skipped %s (%s)%s", self.source, sample_id, reason, f": {message}" if message else "")
        else:
            logger.debug("%s: skipped %s (%s) %s", self.source, sample_id, reason, message)
        if self.log_dir:
            self.save(Path(self.log_dir) / f"skips-{_safe(self.source)}-{os.getpid()}.json")
        return Skipped(sample_id, reason)

    def add(self, skipped: Iterable[Skipped]) -> None:
        """Count markers that came back in batches (skips made inside DataLoader workers)."""
        for s in skipped:
            self.counts[s.reason] += 1
            ex = self.examples.setdefault(s.reason, [])
            if len(ex) < self.max_examples:
                ex.append(s.id)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seen": self.seen, "yielded": self.yielded,
                "counts": dict(self.counts), "examples": self.examples}

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkipStats:
        return cls(source=d["source"], seen=d["seen"], yielded=d["yielded"], counts=Counter(d["counts"]),
                   examples={k: list(v) for k, v in d["examples"].items()})

    @classmethod
    def merge(cls, parts: Iterable[SkipStats], source: str | None = None) -> SkipStats:
        parts = list(parts)
        out = cls(source=source or (parts[0].source if parts else "pairs"))
        for p in parts:
            out.seen += p.seen
            out.yielded += p.yielded
            out.counts.update(p.counts)
            for reason, ids in p.examples.items():
                ex = out.examples.setdefault(reason, [])
                ex.extend(ids[: max(0, out.max_examples - len(ex))])
        return out

    @classmethod
    def from_dir(cls, log_dir: str | Path, source: str | None = None) -> SkipStats:
        """Merge the per-process files written under ``log_dir`` (only ``source``'s, if given)."""
        pattern = f"skips-{_safe(source)}-*.json" if source else "skips-*.json"
        parts = [cls.from_dict(json.loads(p.read_text())) for p in sorted(Path(log_dir).glob(pattern))]
        return cls.merge(parts, source)

    def report(self) -> str:
        """One line per reason: count and example ids; says so when nothing was skipped."""
        head = f"{self.source}: {self.seen} samples seen, {self.yielded} yielded, {self.skipped} skipped"
        lines = [head]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# --------------------------------------------------------------------------------------------- protocol
@runtime_checkable
class MapPairSource(Protocol):
    """Random-access pair source: ``source[i]`` is a :class:`Pair` or a :class:`Skipped` marker."""

    stats: SkipStats

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Pair | Skipped: ...
    def pair_record(self, index: int) -> PairRecord: ...
    def fingerprint(self) -> str: ...


def _clean_caption(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _captions_of(value: Any) -> list[Any]:
    """A caption cell may hold one caption or a list of them (COCO/Flickr: five per image)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class _MapSourceBase:
    """Shared expansion of rows into pairs (one per non-empty caption) and the skip bookkeeping."""

    stats: SkipStats
    _records: list[PairRecord]

    def __len__(self) -> int:
        return len(self._records)

    def pair_record(self, index: int) -> PairRecord:
        return self._records[index]

    def pair_records(self) -> list[PairRecord]:
        return list(self._records)

    def __iter__(self) -> Iterator[Pair | Skipped]:
        for i in range(len(self)):
            yield self[i]

    def _expand(self, rows: Iterable[tuple[str | None, str, Any, str | None]], where: str) -> list[PairRecord]:
        """rows: (pair id or None, image id, caption cell, image path or None)."""
        records: list[PairRecord] = []
        seen_ids: set[str] = set()
        per_image: Counter = Counter()
        for row_id, image_id, cell, image in rows:
            captions = _captions_of(cell)
            for k, cap in enumerate(captions):
                if row_id is None:
                    pid = f"{image_id}#{per_image[image_id]}"
                    per_image[image_id] += 1
                else:
                    pid = row_id if len(captions) == 1 else f"{row_id}#{k}"
                self.stats.seen += 1
                text = _clean_caption(cap)
                if not text:
                    self.stats.skip(pid, EMPTY_CAPTION, f"in {where}")
                    continue
                if pid in seen_ids:
                    raise ValueError(f"{where}: pair id {pid!r} occurs twice; ids must be unique "
                                     "(leave the id column unset to number captions per image)")
                seen_ids.add(pid)
                records.append(PairRecord(id=pid, image_id=image_id, caption=text, image=image))
        return records


class FirstPairs(_MapSourceBase):
    """The first ``n`` pairs of a map-style source (quick runs and benchmarks); shares its stats."""

    def __init__(self, source: MapPairSource, n: int) -> None:
        if n < 1:
            raise ValueError(f"FirstPairs needs n >= 1, got {n}")
        self.source = source
        self.stats = source.stats
        self._records = [source.pair_record(i) for i in range(min(n, len(source)))]

    def __getitem__(self, index: int) -> Pair | Skipped:
        if not 0 <= index < len(self._records):
            raise IndexError(f"index {index} outside the first {len(self._records)} pairs")
        return self.source[index]

    def fingerprint(self) -> str:
        return f"{self.source.fingerprint()}-first{len(self._records)}"


# --------------------------------------------------------------------------------------------- manifest
def pair_or_skip(rec: PairRecord, stats: SkipStats, decode: Callable[[], Image.Image]) -> Pair | Skipped:
    """Decode ``rec``'s image with ``decode()`` into a :class:`Pair`, or count and return the skip.

    One rule for every map-style source: an unreadable image is a ``Skipped`` (counted in ``stats``),
    anything else is counted as yielded.
    """
    try:
        image = decode()
    except ImageLoadError as err:
        return stats.skip(rec.id, UNREADABLE_IMAGE, str(err))
    stats.yielded += 1
    return Pair(image=image, caption=rec.caption, id=rec.id, image_id=rec.image_id)


class ManifestSource(_MapSourceBase):
    """Pairs listed in a JSONL, CSV or TSV manifest; image paths relative to ``image_root``.

    The project's manifest format (``lexvla.data.records``, docs/data.md), with configurable column
    names: each row names an image (``image_key``) and a caption (``caption_key``; in JSONL it may be a
    list, giving one pair per caption). ``id_key`` names the optional id column; rows without an id get
    pair ids ``<image>#<k>``. ``split``: only rows whose ``split`` names it. Rows with empty captions are
    skipped (counted) when the manifest is read; unreadable or missing images when requested.
    """

    def __init__(self, manifest: str | Path, image_root: str | Path | None = None, image_key: str = "image",
                 caption_key: str = "caption", id_key: str | None = "id", log_dir: str | None = None,
                 split: str | None = None) -> None:
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest {self.manifest} does not exist")
        self.image_root = Path(image_root) if image_root is not None else self.manifest.parent
        self.stats = SkipStats(source=f"manifest:{self.manifest.name}", log_dir=log_dir)
        numbering: Counter = Counter()
        records: list[PairRecord] = []
        for n, row in self._read_rows():
            where = f"{self.manifest}:{n}"
            if image_key not in row:
                raise ValueError(f"{self.manifest} row {n} has no {image_key!r} field (fields: {sorted(row)})")
            # the configured column names -> the manifest format's (lexvla.data.records)
            std = {k: v for k, v in row.items() if k not in (image_key, caption_key, id_key, "id")}
            std["image"], std["caption"] = row[image_key], row.get(caption_key)
            if id_key is not None and row.get(id_key) not in (None, ""):
                std["id"] = row[id_key]
            for rec in records_from_row(std, where, self.image_root, numbering):
                if split is not None and split not in rec.split:
                    continue
                self.stats.seen += 1
                if not rec.caption:
                    self.stats.skip(rec.id, EMPTY_CAPTION, f"in {where}")
                else:
                    records.append(rec)
        check_unique(records, str(self.manifest))
        self._records = records
        logger.info("%s: %d pairs (%d skipped while reading)", self.manifest, len(self._records), self.stats.skipped)

    def _read_rows(self) -> Iterable[tuple[int, dict[str, Any]]]:
        suffix = self.manifest.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return iter_rows(self.manifest)
        if suffix in (".csv", ".tsv"):
            with self.manifest.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
            return enumerate(rows, start=2)  # line 1 is the header
        raise ValueError(f"manifest {self.manifest}: unknown format {suffix!r} (use .jsonl, .csv or .tsv)")

    def __getitem__(self, index: int) -> Pair | Skipped:
        rec = self._records[index]
        return pair_or_skip(rec, self.stats, lambda: decode_image(rec.image))

    def fingerprint(self) -> str:
        st = self.manifest.stat()
        h = hashlib.sha256(f"{self.manifest.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.image_root}".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- HF datasets
class HFDatasetSource(_MapSourceBase):
    """Pairs from a Hugging Face ``datasets.Dataset`` (in memory or ``load_from_disk`` folder).

    ``image_column`` may hold decoded PIL images, ``{"bytes", "path"}`` dicts (an ``Image`` feature; it is
    re-cast with ``decode=False`` so that decoding errors are counted here), raw bytes, or file paths
    (relative to ``image_root``). ``caption_column`` may hold a string or a list of strings.
    """

    def __init__(self, dataset: Any, image_column: str = "image", caption_column: str = "caption",
                 id_column: str | None = None, image_root: str | Path | None = None,
                 name: str = "hf", log_dir: str | None = None) -> None:
        import datasets

        if isinstance(dataset, (str, Path)):
            dataset = datasets.load_from_disk(str(dataset))
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"expected a datasets.Dataset (one split), got {type(dataset).__name__}")
        for col in (image_column, caption_column, id_column):
            if col is not None and col not in dataset.column_names:
                raise ValueError(f"dataset {name!r} has no column {col!r} (columns: {dataset.column_names})")
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.image_column = image_column
        self.image_root = Path(image_root) if image_root is not None else None
        self.stats = SkipStats(source=f"hf:{name}", log_dir=log_dir)
        ids = dataset[id_column] if id_column else [str(i) for i in range(len(dataset))]
        captions = dataset[caption_column]
        records = self._expand(
            ((str(i) if id_column else None, str(i), c, None) for i, c in zip(ids, captions, strict=True)),
            f"dataset {name!r}",
        )
        self._row_of = {str(v): n for n, v in enumerate(ids)}  # image id -> dataset row
        self._records = records

    def __getitem__(self, index: int) -> Pair | Skipped:
        rec = self._records[index]
        cell = self.dataset[self._row_of[rec.image_id]][self.image_column]
        return pair_or_skip(rec, self.stats, lambda: self._decode(cell, rec.id))

    def _decode(self, cell: Any, pid: str) -> Image.Image:
        if isinstance(cell, Image.Image):
            return cell.convert("RGB")
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return decode_image(cell["bytes"], name=cell.get("path") or pid)
            cell = cell.get("path")
        if isinstance(cell, (bytes, bytearray)):
            return decode_image(bytes(cell), name=pid)
        if isinstance(cell, str) and cell:
            return decode_image(self.image_root / cell if self.image_root else cell)
        raise ImageLoadError(f"row {pid}: no image in column {self.image_column!r} (got {type(cell).__name__})")

    def fingerprint(self) -> str:
        fp = getattr(self.dataset, "_fingerprint", None) or str(len(self.dataset))
        return hashlib.sha256(f"{fp}|{self.image_column}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ tar shards
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand brace ranges (``cc12m/{00000..01242}.tar``, zero padding kept) and comma/list inputs."""
    if isinstance(spec, str):
        specs = [s for s in spec.split(",") if s.strip()] if "{" not in spec else [spec]
    else:
        specs = list(spec)
    out: list[str] = []
    for s in specs:
        s = s.strip()
        m = _BRACE.search(s)
        if m is None:
            out.append(s)
            continue
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"shard pattern {s!r}: range {lo}..{hi} is empty")
        width = len(lo) if lo.startswith("0") else 0
        for n in range(int(lo), int(hi) + 1):
            out.extend(expand_shards(s[: m.start()] + str(n).zfill(width) + s[m.end():]))
    if not out:
        raise ValueError(f"shard spec {spec!r} names no shard")
    return out


class TarShardSource(IterableDataset):
    """Stream pairs from WebDataset-style tar shards (``<key>.jpg`` + ``<key>.txt`` and/or ``<key>.json``).

    Members sharing a key (path up to the first dot of the file name) form one sample, as in
    WebDataset/img2dataset. The caption comes from ``.txt``, else from ``json_caption_field`` of ``.json``.

    Splitting: every (rank, worker) pair gets a disjoint part. With at least as many shards as
    ``world_size x num_workers`` whole shards are dealt round-robin; with fewer, every process reads all
    shards and keeps every n-th sample (correct, but each process reads all bytes). Ranks may then get
    different sample counts; a DDP trainer should use ``repeat=True`` and a fixed number of steps.
    ``rank``/``world_size`` default to ``torch.distributed`` when it is initialised, else 0/1.
    """

    def __init__(self, shards: str | Sequence[str], rank: int | None = None, world_size: int | None = None,
                 shuffle_shards: bool = False, seed: int = 0, repeat: bool = False,
                 json_caption_field: str = "caption", yield_skips: bool = True,
                 name: str = "shards", log_dir: str | None = None) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards, self.seed, self.repeat = shuffle_shards, seed, repeat
        self.json_caption_field = json_caption_field
        self.yield_skips = yield_skips
        self.epoch = 0
        self.stats = SkipStats(source=f"tar:{name}", log_dir=log_dir)

    def set_epoch(self, epoch: int) -> None:
        """Shard order (with ``shuffle_shards``) depends on seed + epoch; call before each epoch."""
        self.epoch = epoch

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.shards:
            try:
                st = os.stat(s)
                h.update(f"{s}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{s}|missing\n".encode())
        return h.hexdigest()[:16]

    def _assignment(self, epoch: int) -> tuple[list[str], int, int]:
        """(shards this process reads, sample stride, sample offset) for one epoch."""
        rank, world = (self.rank, self.world_size) if self.world_size is not None else dist_info()
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        total, gid = world * n_workers, rank * n_workers + worker
        shards = list(self.shards)
        if self.shuffle_shards:
            random.Random(self.seed + epoch).shuffle(shards)
        if len(shards) >= total:
            return shards[gid::total], 1, 0
        if epoch == 0 and gid == 0:
            logger.warning("%d shards for %d readers (%d ranks x %d workers): every reader scans all shards; "
                           "write more, smaller shards", len(shards), total, world, n_workers)
        return shards, total, gid

    def __iter__(self) -> Iterator[Pair | Skipped]:
        epoch = self.epoch
        while True:
            yield from self._pass(*self._assignment(epoch))
            if self.stats.skipped:
                logger.info("%s", self.stats.report())
            if not self.repeat:
                return
            epoch += 1

    def iter_all(self) -> Iterator[Pair | Skipped]:
        """One pass over every sample of every shard in listed order, whatever the rank, worker, shuffle
        and repeat settings: what a cache of the whole dataset (built once, shared by all ranks) reads."""
        yield from self._pass(list(self.shards), 1, 0)

    def _pass(self, shards: list[str], stride: int, offset: int) -> Iterator[Pair | Skipped]:
        counter = 0
        for shard in shards:
            for key, members in self._samples(shard):
                keep = counter % stride == offset
                counter += 1
                if not keep:
                    continue
                self.stats.seen += 1
                item = self._to_pair(key, members, shard)
                if isinstance(item, Pair):
                    self.stats.yielded += 1
                    yield item
                elif self.yield_skips:
                    yield item

    def _samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Group consecutive members by key; a damaged shard is counted and abandoned, not fatal."""
        key: str | None = None
        members: dict[str, bytes] = {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, base = os.path.split(info.name)
                    if base.startswith("."):
                        continue
                    stem, _, ext = base.partition(".")
                    k = os.path.join(folder, stem) if folder else stem
                    if k != key:
                        if key is not None:
                            yield key, members
                        key, members = k, {}
                    f = tar.extractfile(info)
                    members[ext.lower()] = f.read() if f is not None else b""
                end = tar.offset
            # tarfile takes a header cut short for the end of the archive: a complete tar has two zero
            # blocks after the last member, so a file that stops before them was truncated
            if os.path.isfile(shard) and os.path.getsize(shard) < end + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"shard ends at byte {os.path.getsize(shard)} without the end-of-archive "
                                        "blocks (truncated download?)")
        except (tarfile.TarError, OSError, EOFError) as err:
            self.stats.skip(f"{shard}@{key}", UNREADABLE_SHARD, str(err))
            return
        if key is not None:
            yield key, members

    def _to_pair(self, key: str, members: dict[str, bytes], shard: str) -> Pair | Skipped:
        image_ext = next((e for e in members if e in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            return self.stats.skip(key, NO_IMAGE_MEMBER, f"members {sorted(members)} in {shard}")
        caption: Any = None
        if "txt" in members:
            caption = members["txt"].decode("utf-8", errors="replace")
        elif "json" in members:
            try:
                caption = json.loads(members["json"]).get(self.json_caption_field)
            except (json.JSONDecodeError, AttributeError) as err:
                return self.stats.skip(key, NO_CAPTION_MEMBER, f"bad json in {shard}: {err}")
        else:
            return self.stats.skip(key, NO_CAPTION_MEMBER, f"members {sorted(members)} in {shard}")
        text = _clean_caption(caption)
        if not text:
            return self.stats.skip(key, EMPTY_CAPTION, f"in {shard}")
        try:
            image = decode_image(members[image_ext], name=f"{shard}:{key}.{image_ext}")
        except ImageLoadError as err:
            return self.stats.skip(key, UNREADABLE_IMAGE, str(err))
        return Pair(image=image, caption=text, id=key, image_id=key)
