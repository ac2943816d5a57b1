"""OpenClipart (Debian ``openclipart-png``, public domain): clip art with their titles, for training.

The PNGs carry a ``Title`` text chunk, but many titles are not captions: collection names shared by
dozens of files ("Lemon SVG theme"), author names, Italian/French words, mojibake. :func:`clean_title`
keeps a title when, after cleaning (underscores and camelCase split, digits dropped), every word is
English by ``wordfreq`` (Zipf frequency >= 4 in English, or >= 2.5 and not higher in Italian or
French), the title is not one of the collection words, and at most ``max_shared`` files share it. Of
6,898 files 1,680 pass. The folder path (``food/fruit``) gives keywords.

Splits: ``train`` and ``val`` (10% of distinct titles by hash), no test: the titles are too noisy to
measure with.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .._assets import AssetNotFoundError, cache_dir
from ..io import WriterLock, atomic_write, atomic_write_json, clean_stale_tmp
from .emoji import composite, resize_rgba
from .fetch import PinnedPackage, extract_deb, fetch_package

logger = logging.getLogger(__name__)

CLIPART_PACKAGE = PinnedPackage("debian", "openclipart-png", "1:0.18+dfsg-19",
                                "f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02", 130910028,
                                "public domain")
PREFIX = "usr/share/openclipart/png/"
CAPTION_TEMPLATES = {"name": "{name}", "clipart": "a clip art of {name}", "keywords": "{name}: {keywords}"}
_JUNK = re.compile(r"collection|theme|icons?\b|svg|clip ?arts?|part of|signs\b|\bset\b|\bby\b|\d{4}|pattern|"
                   r"gradient|untitled|^image|drawing|various|general|misc|test", re.I)
_TRAILING = {"and", "with", "of", "the", "a", "on", "in"}
FILTER_VERSION = 2  # bump when clean_title changes: the kept set is recomputed (prepared images are reused)
MAX_PIXELS = 50_000_000  # a few files are huge; decoding one would take GBs for a 224 px thumbnail


def _english(word: str) -> bool:
    from wordfreq import zipf_frequency

    en = zipf_frequency(word, "en")
    if en >= 4.0:  # common English words that are also Italian/French words ("car", "bus")
        return True
    return en >= 2.5 and en >= zipf_frequency(word, "it") and en >= zipf_frequency(word, "fr")


def clean_title(title: str, shared: int = 1, max_shared: int = 10) -> str | None:
    """The caption a title gives, or None when it is not a usable English description."""
    title = (title or "").strip()
    if not title or not title.isascii() or shared > max_shared or _JUNK.search(title):
        return None
    t = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", title.replace("_", " ").replace("-", " "))
    words = [w for w in re.sub(r"[^A-Za-z' ]", " ", t).lower().split() if len(w) > 1]
    while words and words[-1] in _TRAILING:
        words.pop()
    if not words or len(words) > 6 or not all(_english(w) for w in words):
        return None
    return " ".join(words)


def title_split(name: str) -> str:
    u = int.from_bytes(hashlib.sha256(f"lexvla-clipart:{name}".encode()).digest()[:8], "big") / 2.0**64
    return "val" if u < 0.1 else "train"


@dataclass
class ClipartReport:
    root: Path
    files: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    up_to_date: bool = False

    def summary(self) -> str:
        if self.up_to_date:
            return f"clipart: up to date ({self.kept} images: {dict(self.splits)})"
        return (f"clipart: {self.files} files, kept {self.kept} ({dict(self.splits)}); dropped "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))


def clipart_root(root: str | Path | None = None) -> Path:
    return Path(root).expanduser() if root is not None else cache_dir("data", "clipart")


def fetch_clipart(root: str | Path | None = None, size: int = 224, max_shared: int = 10,
                  source_dir: str | Path | None = None, downloads: str | Path | None = None,
                  package: PinnedPackage = CLIPART_PACKAGE, progress: bool = True) -> ClipartReport:
    """Fetch the .deb, unpack its PNGs, keep the English-titled ones, composite on white, resize once,
    write ``images/`` and ``pairs.jsonl`` (resumable image by image)."""
    from tqdm.auto import tqdm

    from .records import write_manifest

    root = clipart_root(root)
    report = ClipartReport(root)
    stamp = {"package": package.spec, "sha256": package.sha256, "size": size, "max_shared": max_shared,
             "filter": FILTER_VERSION}
    done = root / "prepared.json"
    with WriterLock(root, what="clipart data"):
        if done.is_file() and (root / "pairs.jsonl").is_file() and json.loads(done.read_text())["stamp"] == stamp:
            saved = json.loads(done.read_text())["report"]
            report.kept, report.up_to_date = saved["kept"], True
            report.splits.update(saved["splits"])
            return report
        deb = fetch_package(package, Path(downloads) if downloads else None, Path(source_dir) if source_dir else None)
        raw = extract_deb(deb, root / "png", PREFIX)
        files = sorted(p for p in raw.rglob("*.png"))
        report.files = len(files)
        titles: dict[Path, str] = {}
        for p in files:
            try:
                with Image.open(p) as im:
                    titles[p] = str(im.info.get("Title") or "")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
                report.dropped["unreadable"] += 1
        shared = Counter(t.strip().lower() for t in titles.values())
        (root / "images").mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(root / "images")
        rows: list[dict[str, Any]] = []
        for p, title in tqdm(titles.items(), desc="clipart", disable=not progress, unit="img"):
            name = clean_title(title, shared[title.strip().lower()], max_shared)
            if name is None:
                report.dropped["title"] += 1
                continue
            rel = p.relative_to(raw)
            image_id = rel.with_suffix("").as_posix()
            out = root / "images" / (image_id.replace("/", "__") + ".png")
            if not out.is_file():
                try:
                    _prepare_image(p, out, size)
                except ValueError as err:
                    logger.warning("%s", err)
                    report.dropped["image"] += 1
                    continue
            split = title_split(name)
            report.splits[split] += 1
            keywords = [w.replace("_", " ") for w in rel.parent.parts]
            rows.append({"id": f"clipart/{image_id}", "image": out.relative_to(root).as_posix(), "key": name,
                         "caption": [CAPTION_TEMPLATES["name"].format(name=name),
                                     CAPTION_TEMPLATES["clipart"].format(name=name),
                                     CAPTION_TEMPLATES["keywords"].format(name=name, keywords=", ".join(keywords))],
                         "split": split, "name": name, "title": title, "keywords": keywords})
        report.kept = len(rows)
        write_manifest(root / "pairs.jsonl", rows)
        atomic_write_json(done, {"stamp": stamp, "report": {"kept": report.kept, "splits": dict(report.splits),
                                                            "dropped": dict(report.dropped)}}, indent=1)
    return report


def _prepare_image(src: Path, out: Path, size: int) -> None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            im = Image.open(src)
        with im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise ValueError(f"{src}: {im.size[0]}x{im.size[1]} px is too large to decode for a thumbnail")
            im.draft("RGB", (size, size))
            rgba = im.convert("RGBA")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode {src}: {err}") from None
    rgba.thumbnail((4 * size, 4 * size))  # cheap first cut for big files; resize_rgba does the careful one
    buf = io.BytesIO()
    composite(resize_rgba(rgba, size), (255, 255, 255)).save(buf, format="PNG", compress_level=3)
    atomic_write(out, buf.getvalue(), fsync=False)


def manifest_path(root: str | Path | None = None) -> Path:
    path = clipart_root(root) / "pairs.jsonl"
    if not path.is_file():
        raise AssetNotFoundError(f"clipart is not prepared ({path} is missing); run: lexvla data fetch clipart")
    return path
