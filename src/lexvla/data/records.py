"""The project's one image-text record type and its one JSONL manifest format.

:class:`PairRecord` is a pair's metadata without the decoded image; training sources, retrieval sets,
index builds and CAL all read manifests through :func:`read_manifest` and write them with
:func:`write_manifest`.

Manifest format (``.jsonl``, UTF-8, one *image* per line; documented in docs/data.md)::

    {"image": "images/1F600.png", "caption": ["grinning face", "an emoji of grinning face"],
     "id": "noto/1F600", "key": "1F600", "split": ["train", "all"], "name": "grinning face"}

* ``image`` (required): a path, relative to the manifest's folder (or ``image_root``) unless absolute;
* ``caption``: a string or a list of strings (``captions`` and ``text`` are read as the same field);
  one pair per caption. A VQA record has ``question`` + ``answer`` instead (the answer is its caption);
* ``id``: optional; pair ids are ``<id>`` for a single caption and ``<id>#<k>`` for the k-th of several.
  Without it the captions of an image are numbered across rows: ``<image>#0``, ``<image>#1``, ... (so
  COCO-style files with one row per caption work). ``PairRecord.image_id`` is the ``image`` value;
* ``key``: what counts as a match in retrieval (a class, an emoji concept; default: the image itself);
* ``split``: a split name or a list of them (a record belongs to every split listed);
* every other field is kept in ``PairRecord.meta``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write_text

CAPTION_FIELDS = ("caption", "captions", "text")
RESERVED = ("image", "id", "key", "split", "question", "answer", *CAPTION_FIELDS)


@dataclass(frozen=True)
class PairRecord:
    """One image-text pair without the decoded image.

    ``image`` is a path (None for members of a tar shard); ``image_id`` is shared by the pairs of one
    image; ``key`` groups matches (None: the image itself); ``question`` is set for a VQA record, whose
    ``caption`` is then the answer; ``split`` lists the named splits it belongs to; ``meta`` holds the
    manifest's other fields.
    """

    id: str
    image_id: str
    caption: str
    image: str | None = None
    key: str | None = None
    question: str | None = None
    split: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def match_key(self) -> str:
        return self.key if self.key is not None else self.image_id

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with only the set fields (the feature cache stores pairs this way)."""
        d: dict[str, Any] = {"id": self.id, "image_id": self.image_id, "caption": self.caption}
        for name in ("image", "key", "question"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.split:
            d["split"] = list(self.split)
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairRecord:
        d = dict(d)
        d["split"] = tuple(d.get("split") or ())
        return cls(**d)


def _splits(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{where}: 'split' must be a string or a list of strings, got {value!r}")


def _captions(row: dict[str, Any], where: str) -> list[str]:
    if "answer" in row:
        if "question" not in row:
            raise ValueError(f"{where}: an 'answer' record needs a 'question'")
        return [" ".join(str(row["answer"]).split())]
    name = next((f for f in CAPTION_FIELDS if f in row), None)
    if name is None:
        raise ValueError(f"{where}: a record needs a 'caption' (string or list), or 'question' + 'answer'; "
                         f"fields: {sorted(row)}")
    value = row[name]
    caps = [value] if isinstance(value, str) or value is None else value
    if not isinstance(caps, (list, tuple)) or not all(c is None or isinstance(c, str) for c in caps):
        raise ValueError(f"{where}: '{name}' must be a string or a list of strings")
    return [" ".join((c or "").split()) for c in caps]


def records_from_row(row: dict[str, Any], where: str, base: Path | None = None,
                     numbering: Counter | None = None) -> list[PairRecord]:
    """The pairs of one manifest row, one per caption, empty captions included (callers drop or count
    them). ``where`` names the file and line in errors; ``numbering`` (shared by the rows of one file)
    numbers the captions of images without an ``id``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if "image" not in row:
        raise ValueError(f"{where}: a record has no 'image' field (fields: {sorted(row)})")
    image_id = str(row["image"])
    image = Path(image_id).expanduser()
    if base is not None and not image.is_absolute():
        image = base / image
    caps = _captions(row, where)
    split = _splits(row.get("split"), where)
    key = str(row["key"]) if row.get("key") is not None else None
    question = str(row["question"]) if "question" in row else None
    meta = {k: v for k, v in row.items() if k not in RESERVED}
    numbering = numbering if numbering is not None else Counter()
    out = []
    for k, cap in enumerate(caps):
        if row.get("id") is not None:
            pid = str(row["id"]) if len(caps) == 1 else f"{row['id']}#{k}"
        else:
            pid = f"{image_id}#{numbering[image_id]}"
            numbering[image_id] += 1
        out.append(PairRecord(pid, image_id, cap, str(image), key, question, split, meta))
    return out


def check_unique(records: Iterable[PairRecord], where: str) -> None:
    seen: set[str] = set()
    for rec in records:
        if rec.id in seen:
            raise ValueError(f"{where}: pair id {rec.id!r} occurs twice; ids must be unique (leave 'id' "
                             "unset to number captions per image)")
        seen.add(rec.id)


def iter_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, parsed row); bad UTF-8, bad JSON and lone surrogates are one error naming file:line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid UTF-8 ({err.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            try:  # "\ud800" parses, but such text can be neither tokenized nor written back
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{path}:{n}: contains a lone surrogate escape (not valid Unicode text)") from None
            yield n, row


def read_manifest(path: str | Path, image_root: str | Path | None = None, split: str | None = None,
                  keep_empty: bool = False) -> list[PairRecord]:
    """Every pair of a JSONL manifest (only those of ``split`` when given), images resolved against
    ``image_root`` (default: the manifest's folder); empty captions dropped unless ``keep_empty``.
    Pair ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"manifest {path}: expected a .jsonl file (one JSON object a line)")
    base = Path(image_root) if image_root is not None else path.parent
    out: list[PairRecord] = []
    numbering: Counter = Counter()
    for n, row in iter_rows(path):
        for rec in records_from_row(row, f"{path}:{n}", base, numbering):
            if (split is None or split in rec.split) and (rec.caption or keep_empty):
                out.append(rec)
    check_unique(out, str(path))
    return out


def write_manifest(path: str | Path, rows: Sequence[dict[str, Any]] | Iterable[PairRecord]) -> Path:
    """Write rows (dicts in the manifest format, or :class:`PairRecord` s: one row per pair, so that
    reading it back gives the same pair ids) atomically."""
    lines: list[str] = []
    for r in rows:
        if isinstance(r, PairRecord):
            if r.image is None:
                raise ValueError(f"pair {r.id!r} has no image path; a manifest needs one")
            row: dict[str, Any] = {"id": r.id, "image": r.image}
            if r.question is not None:
                row.update(question=r.question, answer=r.caption)
            else:
                row["caption"] = r.caption
            if r.key is not None:
                row["key"] = r.key
            if r.split:
                row["split"] = list(r.split)
            row.update(r.meta)
        else:
            if "image" not in r:
                raise ValueError(f"manifest row without 'image': {sorted(r)}")
            row = r
        lines.append(json.dumps(row, ensure_ascii=False))
    return atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
