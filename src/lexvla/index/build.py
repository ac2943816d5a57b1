"""Encode an image collection (and optionally captions) with a model into a :class:`SparseIndex`.

Resumable: each batch is committed as one shard (see store.py), items already in the index are
skipped on a re-run, so a crash or Ctrl-C loses at most the batch in flight. Unreadable images are
skipped, counted and listed in the report (and retried on the next run). A build holds the index's
single-writer lock from start to end: a second build/add/delete on the same index is refused at once.

Ids are unique across adds: images of the first folder are named by their path relative to it (the
index records it as ``images_root``); a later folder inside that root gets ids relative to the root, any
other folder ``<folder name>/<relative path>``. An id that already names a *different* file (or caption
text) is never dropped silently: it is reported by name as a duplicate in the skip list.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lexvla.index.core import ModelRecord, SparseIndex, writer_lock
from lexvla.preprocess import IMAGE_SUFFIXES
from lexvla.sparsification import Sparsification

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ImageItem:
    id: str
    path: Path
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CaptionItem:
    id: str
    text: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedItem:
    id: str
    path: str
    reason: str


@dataclass
class BuildReport:
    """What a (possibly resumed) build did."""

    out: str
    images_added: int = 0
    images_already_indexed: int = 0
    captions_added: int = 0
    captions_already_indexed: int = 0
    skipped: list[SkippedItem] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = "exact"

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def _read_lines(path: Path) -> list[str]:
    """A text file's lines; invalid UTF-8 is one error naming the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(_read_lines(path), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
            try:  # a lone surrogate ("\ud800") parses but can be neither tokenized nor saved
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{path}:{n}: contains a lone surrogate escape (not valid Unicode text)") from None
            rows.append(row)
    return rows


def _folder_prefix(folder: Path, root: str | Path | None) -> str:
    """Id prefix of a folder's images: none for the root, the path inside it, else the folder's name."""
    if root is None:
        return ""
    folder, root = folder.resolve(), Path(root)
    if folder == root:
        return ""
    if folder.is_relative_to(root):
        return folder.relative_to(root).as_posix() + "/"
    return folder.name + "/"


def collect_images(images: str | Path | Sequence[str | Path], root: str | Path | None = None) -> list[ImageItem]:
    """Images to index from a folder (recursive; ids = relative paths), a manifest or a list of paths.

    ``root``: the index's recorded images folder; a folder elsewhere gets ids prefixed with its name.
    Manifests: ``.txt`` with one path per line, or ``.jsonl``: the pairs manifest of docs/data.md
    (``{"image": ..., "id": ...(optional), ...}``; legacy ``"path"`` too) per line; relative paths are
    relative to the manifest's folder.
    """
    if isinstance(images, (str, Path)):
        src = Path(images).expanduser()
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            prefix = _folder_prefix(src, root)
            return [ImageItem(prefix + p.relative_to(src).as_posix(), p.resolve()) for p in files]
        if not src.is_file():
            raise FileNotFoundError(f"--images {src}: no such folder or manifest file")
        if src.suffix.lower() in IMAGE_SUFFIXES:
            return [ImageItem(src.name, src.resolve())]
        base = src.parent
        if src.suffix.lower() == ".jsonl":
            items, seen = [], set()
            for row in _read_jsonl(src):
                field_ = "image" if "image" in row else "path"  # 'image': the pairs manifest (docs/data.md)
                if field_ not in row:
                    raise ValueError(f"{src}: every line needs an 'image' (or 'path') field, got {sorted(row)}")
                item_id = str(row.get("id", row[field_]))
                if field_ == "image" and item_id in seen:
                    continue  # a pairs manifest may list an image once per caption
                seen.add(item_id)
                meta = {k: v for k, v in row.items() if k not in (field_, "id", "caption", "captions", "text")}
                items.append(ImageItem(item_id, (base / Path(row[field_])).resolve(), meta))
            return _unique(items, src)
        lines = [ln.strip() for ln in _read_lines(src)]
        return _unique([ImageItem(ln, (base / ln).resolve()) for ln in lines if ln and not ln.startswith("#")], src)
    return _unique([ImageItem(str(p), Path(p).expanduser().resolve()) for p in images], "the image list")


def read_captions(captions: str | Path | Sequence[str]) -> list[CaptionItem]:
    """Captions from a ``.txt`` (one a line; ids ``<file stem>:<line>``), a ``.jsonl`` (a pairs manifest,
    docs/data.md: its pairs with their pair ids; or ``{"text": ..., "id": ...(optional), ...}`` lines) or a
    list of strings (ids ``caption:<i>``)."""
    if isinstance(captions, (str, Path)):
        src = Path(captions).expanduser()
        if not src.is_file():
            raise FileNotFoundError(f"--captions {src}: no such file")
        if src.suffix.lower() == ".jsonl":
            rows = _read_jsonl(src)
            if rows and "image" in rows[0]:  # a pairs manifest (lexvla.data.records): one item per pair
                from ..data.records import read_manifest

                return _unique([CaptionItem(r.id, r.caption, {"image": r.image_id, **r.meta})
                                for r in read_manifest(src)], src)
            items = []
            for n, row in enumerate(rows):
                text = row.get("text", row.get("caption"))
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"{src}: line {n + 1} needs a non-empty 'text' (or 'caption') field")
                meta = {k: v for k, v in row.items() if k not in ("text", "caption", "id")}
                items.append(CaptionItem(str(row.get("id", f"{src.stem}:{n + 1}")), text, meta))
            return _unique(items, src)
        lines = _read_lines(src)
        return [CaptionItem(f"{src.stem}:{n}", ln.strip()) for n, ln in enumerate(lines, start=1) if ln.strip()]
    return [CaptionItem(f"caption:{i}", str(t)) for i, t in enumerate(captions)]


def _unique(items: list, source: Any) -> list:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise ValueError(f"{source}: id {it.id!r} appears twice")
        seen.add(it.id)
    return items


def _default_sparsify(model: Any, sparsify: Sparsification | str | None) -> Sparsification:
    """``sparsify`` as given (an object or its CLI spelling), or the model's own default."""
    if sparsify is None:
        return getattr(model, "sparsification", None) or Sparsification()
    return Sparsification.parse(sparsify)


ProgressCallback = Callable[[str, int, int], None]


def build_index(model: Any, images: str | Path | Sequence[str | Path] | None = None,
                out: str | Path = "index", backend: str = "exact", batch_size: int = 32,
                captions: str | Path | Sequence[str] | None = None,
                sparsify: Sparsification | str | None = None, backend_options: dict | None = None, progress: bool = True,
                on_batch: ProgressCallback | None = None, sync: bool = True,
                model_source: str | None = None, shards: str | Sequence[str] | None = None) -> BuildReport:
    """Encode ``images`` (folder, manifest or paths) and ``captions`` into the index at ``out``.

    Re-running with the same ``out`` continues an interrupted build (the index's model must match).
    ``sparsify``: document sparsification (a :class:`Sparsification` or its spelling, e.g.
    ``"threshold,topk:64"``; None: the model's default); a resumed build keeps the settings it started with. ``on_batch(collection, done, total)`` is called after each committed
    batch. ``sync``: build the backend's structures at the end (Seismic index, Milvus inserts).
    ``model_source``: zoo name or checkpoint folder recorded so later commands can reload the model.
    ``shards``: WebDataset-style tar shards (``data/{00000..00099}.tar``) of image + caption samples: each
    image goes to the images (id = sample key), each caption to the texts (id = pair id).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images is None and captions is None and shards is None:
        raise ValueError("nothing to index: give images, captions and/or shards")
    t0 = time.perf_counter()
    out = Path(out)
    with writer_lock(out):
        return _build_locked(model, images, out, backend, batch_size, captions, sparsify, backend_options,
                             progress, on_batch, sync, model_source, shards, t0)


def _new_items(items: list, store: Any, same: Callable[[Any, dict], bool], report: BuildReport) -> tuple[list, int]:
    """Items not yet in ``store`` and how many are; an id already naming something else is reported."""
    stored = store.items()
    live = {i: stored[store.row_of(i)] for i in store.live_ids()}
    todo, already = [], 0
    for it in items:
        existing = live.get(it.id)
        if existing is None:
            todo.append(it)
        elif same(it, existing):
            already += 1
        else:
            where = existing.get("path") or existing.get("text", "")
            report.skipped.append(SkippedItem(it.id, str(getattr(it, "path", "")) or it.id,
                                              f"duplicate id: {it.id!r} already names {where!r} in the index"))
            logger.warning("not adding %s: id %r already names %r", getattr(it, "path", it.id), it.id, where)
    return todo, already


def _build_locked(model: Any, images: Any, out: Path, backend: str, batch_size: int, captions: Any,
                  sparsify: Sparsification | str | None, backend_options: dict | None,
                  progress: bool, on_batch: ProgressCallback | None, sync: bool, model_source: str | None,
                  shards: Any, t0: float) -> BuildReport:
    import torch
    from tqdm.auto import tqdm

    import lexvla

    if (out / "index.json").is_file():
        index = SparseIndex.open(out, backend, backend_options)
        index.check_model(model)
        logger.info("resuming the index at %s", out)
    else:
        index = SparseIndex.create(out, model.vocab, ModelRecord.from_model(model),
                                   _default_sparsify(model, sparsify), backend, backend_options,
                                   model_source=model_source)
    report = BuildReport(str(out), backend=index.backend_name)
    try:
        if images is not None:
            folder = Path(images).expanduser() if isinstance(images, (str, Path)) else None
            if folder is not None and folder.is_dir() and not index.meta.get("images_root"):
                index.update_meta(images_root=str(folder.resolve()))
            items = collect_images(images, index.meta.get("images_root"))
            todo, report.images_already_indexed = _new_items(
                items, index.store("images"), lambda it, ex: ex.get("path") == str(it.path), report)
            bar = tqdm(total=len(todo), desc="images", unit="img", disable=not progress)
            for start in range(0, len(todo), batch_size):
                batch, pil = [], []
                for it in todo[start:start + batch_size]:
                    try:
                        pil.append(lexvla.load_image(it.path))
                        batch.append(it)
                    except (lexvla.ImageLoadError, OSError) as err:
                        report.skipped.append(SkippedItem(it.id, str(it.path), str(err)))
                        logger.warning("skipping %s: %s", it.path, err)
                if batch:
                    with torch.no_grad():
                        vectors = model.encode_image(pil).vectors
                    index.add(vectors, [{"id": it.id, "path": str(it.path), **it.meta} for it in batch], "images")
                    report.images_added += len(batch)
                bar.update(min(batch_size, len(todo) - start))
                if on_batch is not None:
                    on_batch("images", min(start + batch_size, len(todo)), len(todo))
            bar.close()
        if captions is not None:
            items = read_captions(captions)
            todo, report.captions_already_indexed = _new_items(
                items, index.store("texts"), lambda it, ex: ex.get("text") == it.text, report)
            bar = tqdm(total=len(todo), desc="captions", unit="text", disable=not progress)
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                with torch.no_grad():
                    vectors = model.encode_text([it.text for it in batch]).vectors
                index.add(vectors, [{"id": it.id, "text": it.text, **it.meta} for it in batch], "texts")
                report.captions_added += len(batch)
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch("texts", min(start + batch_size, len(todo)), len(todo))
            bar.close()
        if shards is not None:
            _index_shards(index, model, shards, batch_size, report, progress, on_batch)
        if sync:
            index.sync()
    except KeyboardInterrupt:
        logger.warning("interrupted: every finished batch is saved in %s; run the same command to continue", out)
        raise
    finally:
        index.close()
    report.seconds = time.perf_counter() - t0
    if report.skipped:
        first = report.skipped[0]
        logger.warning("%d item(s) skipped (first: %s: %s)", report.n_skipped, first.path or first.id, first.reason)
    return report


def _index_shards(index: SparseIndex, model: Any, shards: str | Sequence[str], batch_size: int,
                  report: BuildReport, progress: bool, on_batch: ProgressCallback | None) -> None:
    """Stream tar shards; encode images and captions not yet indexed, one committed batch at a time.

    Re-running skips what is committed, but still reads (and decodes) the shards up to the first new
    sample: tar files cannot be seeked by sample.
    """
    import torch
    from tqdm.auto import tqdm

    from lexvla.data.sources import Pair, TarShardSource

    source = TarShardSource(shards, rank=0, world_size=1, name="index")
    images, texts = index.store("images"), index.store("texts")
    done_images, done_texts = images.live_ids(), texts.live_ids()
    bar = tqdm(desc="shards", unit="pair", disable=not progress)
    batch: list[Pair] = []
    done = 0

    def commit() -> None:
        new_images: dict[str, Pair] = {}
        for p in batch:
            if p.image_id not in done_images and p.image_id not in new_images:
                new_images[p.image_id] = p
        new_texts = [p for p in batch if p.id not in done_texts]
        with torch.no_grad():
            if new_images:
                vectors = model.encode_image([p.image for p in new_images.values()]).vectors
                index.add(vectors, [{"id": k, "source": "tar"} for k in new_images], "images")
                done_images.update(new_images)
                report.images_added += len(new_images)
            if new_texts:
                vectors = model.encode_text([p.caption for p in new_texts]).vectors
                index.add(vectors, [{"id": p.id, "text": p.caption, "image": p.image_id} for p in new_texts], "texts")
                done_texts.update(p.id for p in new_texts)
                report.captions_added += len(new_texts)
        batch.clear()
        if on_batch is not None:
            on_batch("shards", done, 0)

    for item in source.iter_all():
        bar.update(1)
        if not isinstance(item, Pair):
            report.skipped.append(SkippedItem(item.id, "", item.reason))
            continue
        done += 1
        if item.image_id in done_images and item.id in done_texts:
            report.images_already_indexed += 1
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            commit()
    if batch:
        commit()
    bar.close()
    # Unreadable shards are counted by the source, not yielded as markers.
    for shard_id in source.stats.examples.get("unreadable_shard", []):
        report.skipped.append(SkippedItem(shard_id, shard_id.split("@")[0], "unreadable_shard"))
