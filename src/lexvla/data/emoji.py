"""Emoji in three drawing styles with their CLDR names and keywords, split by concept.

Sources (npm, fetched into the cache by ``lexvla data fetch emoji``; see :mod:`lexvla.data.fetch`):

======== ====================================== ====================================== ===========
style    package                                images                                 licence
======== ====================================== ====================================== ===========
noto     ``emoji-datasource-google@16.0.0``     ``img/google/64/<hex>.png`` (64 px)    Apache-2.0
fluent   ``@lobehub/fluent-emoji-3d@1.1.0``     ``assets/<hex>.webp`` (256 px)         MIT
openmoji ``openmoji@17.0.0``                    ``color/svg/<HEX>.svg`` (cairosvg)     CC BY-SA 4.0
======== ====================================== ====================================== ===========

Names and keywords are OpenMoji's ``data/openmoji.json`` (CLDR English ``annotation`` and ``tags``).
The three packages spell codes differently (``0023-fe0f-20e3``, ``1f3f4-e0067_e0062_..._e0067``); all are
joined after :func:`normalize_code`. A skin-tone variant is the same *concept* as its base emoji and takes
the base's keywords.

Every image is prepared once: padded to a square, resized to ``size`` px (alpha premultiplied), stored
as an RGBA cut-out (``<style>/rgba/``, for collages) and composited on a plain background
(``<style>/images/``, what models see). ``<style>/pairs.jsonl`` lists the images in the project's
manifest format (:mod:`lexvla.data.records`).

Splits are by concept (the base emoji code), never by image, so that no concept is in two splits and a
concept lands in the same split in every style (:func:`concept_split`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._assets import AssetNotFoundError, cache_dir
from ..io import WriterLock, atomic_write, atomic_write_json, atomic_write_text, clean_stale_tmp
from .fetch import PinnedPackage, fetch_package
from .sources import Pair, PairRecord, Skipped, SkipStats, decode_image, pair_or_skip

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ pins
NOTO_PACKAGE = PinnedPackage("npm", "emoji-datasource-google", "16.0.0",
                             "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438", 74344091,
                             "images Apache-2.0, data MIT")
FLUENT_PACKAGE = PinnedPackage("npm", "@lobehub/fluent-emoji-3d", "1.1.0",
                               "c1bb7eee7de090205a232518a9ab4adb3df458bfbe8a1f78232991194c8b2e58", 15792027, "MIT")
OPENMOJI_PACKAGE = PinnedPackage("npm", "openmoji", "17.0.0",
                                 "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68", 4339458,
                                 "CC BY-SA 4.0")
OPENMOJI_JSON = "package/data/openmoji.json"
NOTO_JSON = "package/emoji.json"
CATALOGUE_VERSION = 3  # bump when build_catalogue changes: styles are re-listed (their images are reused)


@dataclass(frozen=True)
class StyleSpec:
    """Where one style's images are inside its package and how to decode them."""

    name: str
    package: PinnedPackage
    member: re.Pattern[str]  # group 1 = the code as the package spells it
    kind: str  # "raster" | "svg"
    licence: str


STYLES: dict[str, StyleSpec] = {
    "noto": StyleSpec("noto", NOTO_PACKAGE, re.compile(r"^package/img/google/64/([0-9a-fA-F_-]+)\.png$"),
                      "raster", "Apache-2.0"),
    "fluent": StyleSpec("fluent", FLUENT_PACKAGE, re.compile(r"^package/assets/([0-9a-fA-F_-]+)\.webp$"),
                        "raster", "MIT"),
    "openmoji": StyleSpec("openmoji", OPENMOJI_PACKAGE, re.compile(r"^package/color/svg/([0-9a-fA-F_-]+)\.svg$"),
                          "svg", "CC BY-SA 4.0"),
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLES)

# ------------------------------------------------------------------------------------------------ codes
SKIN_TONES = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
_TAG_CHARS = range(0xE0020, 0xE007F)  # tag letters/digits of subdivision flags; E007F ends the sequence


def normalize_code(code: str) -> str:
    """One spelling for an emoji code: FE0F dropped, upper-case hex without leading zeros, '-' joined,
    the E007F terminator of a tag-sequence flag added where a package left it out."""
    parts = [p.upper().lstrip("0") or "0" for p in re.split(r"[-_\s]+", code.strip()) if p]
    parts = [p for p in parts if p != "FE0F"]
    if not parts or any(re.fullmatch(r"[0-9A-F]{1,6}", p) is None for p in parts):
        raise ValueError(f"not an emoji code: {code!r}")
    if len(parts) > 1 and parts[0] == "1F3F4" and all(int(p, 16) in _TAG_CHARS for p in parts[1:]):
        parts.append("E007F")
    return "-".join(parts)


def strip_skin_tones(code: str) -> str:
    """The base emoji of a (normalised) code: skin-tone modifiers removed."""
    parts = [p for p in code.split("-") if p not in SKIN_TONES]
    return "-".join(parts) or code


def _is_flag_code(code: str) -> bool:
    parts = code.split("-")
    regional = all(0x1F1E6 <= int(p, 16) <= 0x1F1FF for p in parts)
    return (len(parts) == 2 and regional) or (parts[0] == "1F3F4" and parts[-1] == "E007F")


# ---------------------------------------------------------------------------------------------- names
@dataclass(frozen=True)
class EmojiInfo:
    """One emoji code with its CLDR name, keywords and where it sits in the emoji taxonomy."""

    code: str  # normalised
    name: str
    keywords: tuple[str, ...]
    concept: str  # normalised base code (skin tones removed): the unit of the splits
    group: str
    subgroup: str

    @property
    def is_flag(self) -> bool:
        return self.group == "flags" or self.subgroup in FLAG_SUBGROUPS


FLAG_SUBGROUPS = frozenset({"country-flag", "subdivision-flag", "flags"})
DUPLICATE_NAME = "duplicate-name"
# skin-tone swatches and hair components (not objects); OpenMoji extras named like a Unicode emoji
SKIP_GROUPS = frozenset({"component", DUPLICATE_NAME})


def _split_tags(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.strip() for t in str(text or "").split(",") if t.strip()))


def build_catalogue(openmoji: Sequence[dict[str, Any]], fallback: Sequence[dict[str, Any]] = ()) -> dict[str, EmojiInfo]:
    """Normalised code -> :class:`EmojiInfo` from OpenMoji's ``openmoji.json`` rows.

    Skin-tone variants take their base's keywords (their own ``tags`` are empty in CLDR). ``fallback``
    (emoji-datasource's ``emoji.json`` rows: ``unified``, ``name``, ``category``) names codes OpenMoji
    lacks; their names are upper-case Unicode names, lower-cased here.
    """
    rows: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(openmoji):
        try:
            rows[normalize_code(row["hexcode"])] = row
        except (KeyError, ValueError) as err:
            raise ValueError(f"openmoji.json entry {n}: {err}") from None
    out: dict[str, EmojiInfo] = {}
    for code, row in rows.items():
        base = normalize_code(row["skintone_base_hexcode"]) if row.get("skintone_base_hexcode") else strip_skin_tones(code)
        base_row = rows.get(base, row)
        keywords = _split_tags(row.get("tags")) or _split_tags(base_row.get("tags"))
        out[code] = EmojiInfo(code, str(row.get("annotation") or "").strip(), keywords, base,
                              str(base_row.get("group", "")), str(base_row.get("subgroups", "")))
    for row in fallback:
        codes = [row.get("unified")] + [v.get("unified") for v in (row.get("skin_variations") or {}).values()]
        for raw in filter(None, codes):
            code = normalize_code(raw)
            if code in out:
                continue
            base = strip_skin_tones(code)
            known = out.get(base)
            name = str(row.get("name") or "").strip().lower()
            if not name:
                continue
            group = known.group if known else ("flags" if _is_flag_code(code) else "")
            out[code] = EmojiInfo(code, name, known.keywords if known else (), base, group,
                                  known.subgroup if known else "")
    # OpenMoji's own extras re-draw a few Unicode emoji under the same name ("link", "moai"): two
    # concepts with one name would be two retrieval classes with the same text. The Unicode one stays.
    unicode_names = {i.name for i in out.values() if not i.group.startswith("extras")}
    for code, info in list(out.items()):
        if not info.name:
            out.pop(code)
        elif info.group.startswith("extras") and info.name in unicode_names:
            out[code] = EmojiInfo(code, info.name, info.keywords, info.concept, DUPLICATE_NAME, info.subgroup)
    return out


# ---------------------------------------------------------------------------------------------- splits
SPLIT_FRACTIONS = {"test": 0.1, "val": 0.1}
# Held out whole: their words (most bird, fish, fruit ... names) then never occur in training captions.
HELD_OUT_SUBGROUPS: tuple[str, ...] = (
    "animal-bird", "animal-marine", "food-fruit", "food-vegetable", "transport-air", "transport-water",
    "musical-instrument", "sport", "plant-flower", "sky-weather",
)
CONCEPT_SPLITS = ("train", "val", "test")
SPLITS: tuple[str, ...] = (
    "train", "val", "test", "flags", "subgroups-train", "subgroups-val", "subgroups-test",
    "cross-train", "cross-val", "cross-test", "all",
)
CROSS_TRAIN_STYLES = ("noto", "openmoji")
CROSS_TEST_STYLES = ("fluent",)


def concept_hash(concept: str) -> float:
    """A concept's fixed position in [0, 1) (sha256 of its base code; no seed, no file order)."""
    digest = hashlib.sha256(f"lexvla-emoji:{concept}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def concept_split(concept: str) -> str:
    """``test`` (10% of concepts), ``val`` (10%) or ``train`` by :func:`concept_hash`."""
    u = concept_hash(concept)
    if u < SPLIT_FRACTIONS["test"]:
        return "test"
    return "val" if u < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["val"] else "train"


def splits_of(concept: str, subgroup: str, is_flag: bool, style: str) -> tuple[str, ...]:
    """Every named split an image belongs to (see docs/data.md).

    * ``train``/``val``/``test``: by concept hash; flags are in none of them, only in ``flags``;
    * ``subgroups-*``: the :data:`HELD_OUT_SUBGROUPS` are ``subgroups-test``; the other concepts'
      hash-val is ``subgroups-val``, the rest ``subgroups-train``;
    * ``cross-*``: Noto + OpenMoji for training (hash-val concepts as ``cross-val``), Fluent 3D for test;
    * ``all``: every image (flags included).
    """
    if is_flag:
        return ("flags", "all")
    own = concept_split(concept)
    out = [own]
    out.append("subgroups-test" if subgroup in HELD_OUT_SUBGROUPS
               else ("subgroups-val" if own == "val" else "subgroups-train"))
    if style in CROSS_TEST_STYLES:
        out.append("cross-test")
    elif style in CROSS_TRAIN_STYLES:
        out.append("cross-val" if own == "val" else "cross-train")
    out.append("all")
    return tuple(out)


# --------------------------------------------------------------------------------------------- captions
CAPTION_TEMPLATES: dict[str, str] = {
    "name": "{name}",
    "emoji": "an emoji of {name}",
    "keywords": "{name}: {keywords}",
}
DEFAULT_CAPTIONS: tuple[str, ...] = ("name", "emoji", "keywords")
CAPTION_MODES = ("all", "first", "random")


def caption_templates(captions: Sequence[str]) -> tuple[str, ...]:
    """Caption set names (``name``, ``emoji``, ``keywords``) or templates with ``{name}`` / ``{keywords}``."""
    out = []
    for c in captions:
        t = CAPTION_TEMPLATES.get(c, c)
        if "{name}" not in t:
            raise ValueError(f"caption {c!r} is neither one of {sorted(CAPTION_TEMPLATES)} nor a template "
                             "with '{name}'")
        out.append(t)
    if not out:
        raise ValueError("the caption set is empty")
    return tuple(out)


def make_captions(name: str, keywords: Sequence[str], templates: Sequence[str], max_keywords: int | None = None) -> list[str]:
    """Captions of one image; a keyword template is left out when the emoji has no keywords."""
    kws = list(keywords)[:max_keywords] if max_keywords else list(keywords)
    out: list[str] = []
    for t in templates:
        if "{keywords}" in t and not kws:
            continue
        cap = t.format(name=name, keywords=", ".join(kws))
        if cap not in out:
            out.append(cap)
    return out or [name]


# ---------------------------------------------------------------------------------------------- images
def _square(im: Image.Image) -> Image.Image:
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(im, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_rgba(im: Image.Image, size: int) -> Image.Image:
    """Square RGBA at ``size`` px; resampled with premultiplied alpha (no dark fringes)."""
    im = _square(im.convert("RGBA"))
    if im.size != (size, size):
        im = im.convert("RGBa").resize((size, size), Image.LANCZOS).convert("RGBA")
    return im


def composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    bg = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _render_svg(data: bytes, size: int, where: str) -> Image.Image:
    try:
        import cairosvg
    except (ImportError, OSError) as err:  # OSError: cairocffi cannot find libcairo
        raise AssetNotFoundError(
            f"OpenMoji is SVG: rendering it needs 'cairosvg' (pip install cairosvg==2.8.2) and the cairo "
            f"library (Debian: libcairo2); {type(err).__name__}: {err}. Fetch the other styles with "
            "--styles noto,fluent") from None
    try:
        png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size)
    except Exception as err:  # noqa: BLE001 - any renderer failure is one unusable file
        raise ValueError(f"cannot render {where}: {err}") from None
    return Image.open(io.BytesIO(png)).convert("RGBA")


def decode_emoji(data: bytes, kind: str, size: int, where: str) -> Image.Image:
    """Package bytes -> square RGBA at ``size`` px. Raises ValueError naming ``where`` when unusable."""
    if kind == "svg":
        im = _render_svg(data, size, where)
    else:
        try:
            with Image.open(io.BytesIO(data)) as src:
                src.load()
                im = src.convert("RGBA")
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"cannot decode {where}: {err}") from None
    return resize_rgba(im, size)


# --------------------------------------------------------------------------------------------- prepare
@dataclass
class StyleReport:
    """What preparing one style did (and what it found in its package)."""

    style: str
    images: int = 0
    prepared: int = 0  # decoded and written this run
    reused: int = 0  # already on disk from an earlier (possibly killed) run
    unmatched: list[str] = field(default_factory=list)  # codes without a name
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    splits: Counter = field(default_factory=Counter)
    concepts: int = 0
    up_to_date: bool = False

    @property
    def join_rate(self) -> float:
        named = self.images
        return named / max(1, named + len(self.unmatched))

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.style}: up to date ({self.images} images, {self.concepts} concepts)"
        sk = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.style}: {self.images} images of {self.concepts} concepts ({self.prepared} prepared, "
                f"{self.reused} reused); names joined {100 * self.join_rate:.2f}% "
                f"({len(self.unmatched)} unnamed); skipped: {sk}")

    def to_dict(self) -> dict[str, Any]:
        return {"style": self.style, "images": self.images, "concepts": self.concepts, "prepared": self.prepared,
                "reused": self.reused, "join_rate": self.join_rate, "unmatched": self.unmatched[:50],
                "skipped": dict(self.skipped), "splits": dict(self.splits)}


@dataclass(frozen=True)
class PrepareSettings:
    """How images are prepared; a change means the style is prepared again."""

    size: int = 224
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 1024:
            raise ValueError(f"size must be in [16, 1024], got {self.size}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be an RGB triple of 0-255 values, got {self.background}")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "background": list(self.background)}


def emoji_root(root: str | Path | None = None) -> Path:
    """Folder of the prepared emoji (default: the cache's ``data/emoji``)."""
    return Path(root).expanduser() if root is not None else cache_dir("data", "emoji")


def read_tar_member(tar_path: Path, member: str) -> bytes:
    with tarfile.open(tar_path, "r:gz") as tar:
        try:
            f = tar.extractfile(member)
        except KeyError:
            raise ValueError(f"{tar_path} has no member {member}") from None
        if f is None:
            raise ValueError(f"{tar_path}: {member} is not a file")
        return f.read()


def load_catalogue_from(openmoji_tgz: Path, noto_tgz: Path | None = None) -> dict[str, EmojiInfo]:
    try:
        rows = json.loads(read_tar_member(openmoji_tgz, OPENMOJI_JSON))
    except json.JSONDecodeError as err:
        raise ValueError(f"{openmoji_tgz}:{OPENMOJI_JSON} is not valid JSON: {err}") from None
    fallback = json.loads(read_tar_member(noto_tgz, NOTO_JSON)) if noto_tgz is not None else []
    return build_catalogue(rows, fallback)


def _members(tar_path: Path, pattern: re.Pattern[str]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(raw code, lazy reader) for the members matching ``pattern``, in archive order (one pass)."""
    with tarfile.open(tar_path, "r|gz") as tar:
        for info in tar:
            m = pattern.match(info.name)
            if m is None or not info.isfile():
                continue
            f = tar.extractfile(info)
            data_cache: list[bytes] = []

            def read(f=f, cache=data_cache) -> bytes:
                if not cache:
                    cache.append(f.read() if f is not None else b"")
                return cache[0]

            yield m.group(1), read


def prepare_style(spec: StyleSpec, tarball: Path, catalogue: dict[str, EmojiInfo], root: Path,
                  settings: PrepareSettings, progress: bool = True) -> StyleReport:
    """Decode, resize and write one style's images and its ``pairs.jsonl``; resumable image by image."""
    from tqdm.auto import tqdm

    from .records import write_manifest

    folder = root / spec.name
    done_file = folder / "prepared.json"
    stamp = {"package": spec.package.spec, "sha256": spec.package.sha256, "catalogue": CATALOGUE_VERSION,
             **settings.to_dict()}
    report = StyleReport(spec.name)
    if done_file.is_file() and (folder / "pairs.jsonl").is_file():
        done = json.loads(done_file.read_text())
        if done.get("stamp") == stamp:
            rep = done["report"]
            report.images, report.concepts, report.up_to_date = rep["images"], rep["concepts"], True
            report.splits.update(rep["splits"])
            return report
    for sub in ("rgba", "images"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(folder / sub)  # half-written images of a killed run
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    with tqdm(desc=f"emoji {spec.name}", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for raw, read in _members(tarball, spec.member):
            bar.update(1)
            try:
                code = normalize_code(raw)
            except ValueError:
                report.skipped["bad_code"] += 1
                continue
            info = catalogue.get(code)
            if info is None:
                report.unmatched.append(code)
                continue
            if info.group in SKIP_GROUPS:
                report.skipped[info.group] += 1
                continue
            if code in seen:
                report.skipped["duplicate_code"] += 1
                continue
            seen.add(code)
            rgba_path, rgb_path = folder / "rgba" / f"{code}.png", folder / "images" / f"{code}.png"
            if rgba_path.is_file() and rgb_path.is_file():
                report.reused += 1
            else:
                try:
                    rgba = decode_emoji(read(), spec.kind, settings.size, f"{tarball.name}:{raw}")
                except ValueError as err:
                    logger.warning("%s", err)
                    report.skipped["unreadable"] += 1
                    continue
                if rgba.getchannel("A").getextrema()[1] == 0:
                    report.skipped["blank"] += 1
                    continue
                _save_png(rgba, rgba_path)
                _save_png(composite(rgba, settings.background), rgb_path)  # written last: marks the image done
                report.prepared += 1
            splits = splits_of(info.concept, info.subgroup, info.is_flag, spec.name)
            report.splits.update(splits)
            rows.append({
                "id": f"{spec.name}/{code}", "image": f"images/{code}.png", "key": info.concept,
                "caption": make_captions(info.name, info.keywords, caption_templates(DEFAULT_CAPTIONS)),
                "split": list(splits), "name": info.name, "keywords": list(info.keywords), "code": code,
                "style": spec.name, "group": info.group, "subgroup": info.subgroup, "flag": info.is_flag,
                "rgba": f"rgba/{code}.png",
            })
    if not rows:
        raise ValueError(f"{tarball}: no usable images matched {spec.member.pattern}")
    report.images = len(rows)
    report.concepts = len({r["key"] for r in rows})
    write_manifest(folder / "pairs.jsonl", rows)
    atomic_write_json(done_file, {"stamp": stamp, "report": report.to_dict()}, indent=1)
    return report


def _save_png(im: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    atomic_write(path, buf.getvalue(), fsync=False)  # one image: cheap to redo after a crash


@dataclass
class FetchReport:
    root: Path
    styles: dict[str, StyleReport]

    @property
    def up_to_date(self) -> bool:
        return all(r.up_to_date for r in self.styles.values())

    def table(self) -> str:
        names = [s for s in SPLITS if any(r.splits.get(s) for r in self.styles.values())]
        head = f"{'style':<10}{'images':>8}{'concepts':>9}" + "".join(f"{s:>16}" for s in names)
        lines = [head]
        for r in self.styles.values():
            lines.append(f"{r.style:<10}{r.images:>8}{r.concepts:>9}" + "".join(f"{r.splits.get(s, 0):>16}" for s in names))
        return "\n".join(lines)


def fetch_emoji(styles: Iterable[str] = STYLE_NAMES, root: str | Path | None = None,
                settings: PrepareSettings | None = None, source_dir: str | Path | None = None,
                downloads: str | Path | None = None, progress: bool = True,
                packages: dict[str, PinnedPackage] | None = None) -> FetchReport:
    """Fetch the pinned packages and prepare the chosen styles under ``root`` (resumable; a second run
    with the same settings does nothing). ``packages`` replaces pins (style name or ``names``)."""
    styles = tuple(dict.fromkeys(styles))
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ValueError(f"unknown emoji styles {unknown}; choose from {list(STYLE_NAMES)}")
    settings = settings or PrepareSettings()
    root = emoji_root(root)
    pins = {s: spec.package for s, spec in STYLES.items()} | {"names": OPENMOJI_PACKAGE} | dict(packages or {})
    dl = Path(downloads) if downloads is not None else None
    src = Path(source_dir) if source_dir is not None else None
    with WriterLock(root, what="emoji data"):
        names_tgz = fetch_package(pins["names"], dl, src)
        tarballs = {s: fetch_package(pins[s], dl, src) for s in styles}
        catalogue = load_catalogue_from(names_tgz, tarballs.get("noto"))
        reports = {}
        for s in styles:
            spec = STYLES[s]
            spec = StyleSpec(spec.name, pins[s], spec.member, spec.kind, spec.licence)
            reports[s] = prepare_style(spec, tarballs[s], catalogue, root, settings, progress)
            logger.info("%s", reports[s].summary())
        atomic_write_text(root / "README.txt", _readme(styles))
    return FetchReport(root, reports)


def _readme(styles: Sequence[str]) -> str:
    lines = ["Prepared by `lexvla data fetch emoji` (lexvla.data.emoji). Licences:"]
    lines += [f"  {s}: {STYLES[s].package.spec} ({STYLES[s].licence})" for s in styles]
    lines.append("  names/keywords: openmoji@17.0.0 data/openmoji.json (CLDR, Unicode licence)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class EmojiConfig:
    """Which emoji to load and how to caption them.

    ``styles``: any of noto, fluent, openmoji. ``split``: one of :data:`SPLITS`. ``captions``: caption
    set names of :data:`CAPTION_TEMPLATES` or templates with ``{name}``/``{keywords}``; ``caption_mode``:
    ``all`` (one pair per image x caption), ``first``, or ``random`` (one per image, drawn once from
    ``seed``). ``root``: prepared folder (default: the cache).
    """

    styles: tuple[str, ...] = ("noto",)
    split: str = "train"
    captions: tuple[str, ...] = DEFAULT_CAPTIONS
    caption_mode: str = "all"
    max_keywords: int | None = 8
    seed: int = 0
    root: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.styles, str):
            object.__setattr__(self, "styles", (self.styles,))
        object.__setattr__(self, "styles", tuple(self.styles))
        object.__setattr__(self, "captions", tuple(self.captions))
        bad = [s for s in self.styles if s not in STYLES]
        if bad or not self.styles:
            raise ValueError(f"unknown emoji styles {bad}; choose from {list(STYLE_NAMES)}")
        if self.split not in SPLITS:
            raise ValueError(f"emoji split must be one of {SPLITS}, got {self.split!r}")
        if self.caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {self.caption_mode!r}")
        if self.max_keywords is not None and self.max_keywords < 1:
            raise ValueError("max_keywords must be >= 1 or None")
        caption_templates(self.captions)


@dataclass(frozen=True)
class EmojiImage:
    """One prepared emoji image."""

    id: str
    style: str
    code: str
    concept: str
    name: str
    keywords: tuple[str, ...]
    group: str
    subgroup: str
    image: Path  # composited RGB
    rgba: Path  # the cut-out (collages)


def read_style(root: Path, style: str) -> list[tuple[EmojiImage, tuple[str, ...]]]:
    """Every prepared image of one style with the splits it belongs to."""
    from .records import read_manifest

    path = root / style / "pairs.jsonl"
    if not path.is_file():
        raise AssetNotFoundError(f"emoji style '{style}' is not prepared ({path} is missing); run: lexvla data "
                                 f"fetch emoji --styles {style}")
    out = []
    seen: set[str] = set()
    for rec in read_manifest(path):
        if rec.image_id in seen:
            continue  # one entry per image, not per caption
        seen.add(rec.image_id)
        m = rec.meta
        out.append((EmojiImage(f"{m['style']}/{m['code']}", m["style"], m["code"], str(rec.key), m["name"],
                               tuple(m["keywords"]), m["group"], m["subgroup"], Path(rec.image),
                               path.parent / m["rgba"]), rec.split))
    return out


def load_images(config: EmojiConfig) -> list[EmojiImage]:
    root = emoji_root(config.root)
    images: list[EmojiImage] = []
    for style in config.styles:
        images += [im for im, splits in read_style(root, style) if config.split in splits]
    if not images:
        raise ValueError(f"emoji {'+'.join(config.styles)} split {config.split!r} has no images "
                         "(cross-test is Fluent only, cross-train Noto + OpenMoji)")
    return images


class EmojiDataset:
    """Emoji images of the chosen styles and split as a map-style pair source (one pair per image x
    caption with ``caption_mode='all'``). ``images`` holds the per-image metadata."""

    def __init__(self, images: list[EmojiImage], config: EmojiConfig) -> None:
        self.images = images
        self.config = config
        self.stats = SkipStats(source=f"emoji-{'+'.join(config.styles)}-{config.split}")
        templates = caption_templates(config.captions)
        self.captions = [make_captions(im.name, im.keywords, templates, config.max_keywords) for im in images]
        if config.caption_mode == "all":
            self._index = [(i, t) for i, caps in enumerate(self.captions) for t in range(len(caps))]
        elif config.caption_mode == "first":
            self._index = [(i, 0) for i in range(len(images))]
        else:
            rng = np.random.default_rng(config.seed)
            self._index = [(i, int(rng.integers(0, len(caps)))) for i, caps in enumerate(self.captions)]

    @property
    def concepts(self) -> list[str]:
        return sorted({im.concept for im in self.images})

    def __len__(self) -> int:
        return len(self._index)

    def pair_record(self, index: int) -> PairRecord:
        i, t = self._index[index]
        im = self.images[i]
        return PairRecord(id=f"{im.id}#{t}", image_id=im.id, caption=self.captions[i][t], image=str(im.image),
                          key=im.concept)

    def pair_records(self) -> list[PairRecord]:
        return [self.pair_record(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> Pair | Skipped:
        rec = self.pair_record(index)
        return pair_or_skip(rec, self.stats, lambda: decode_image(rec.image))

    def __iter__(self) -> Iterator[Pair | Skipped]:
        for i in range(len(self)):
            yield self[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.config.styles, self.config.split, self.config.captions,
                                       self.config.caption_mode, self.config.max_keywords, self.config.seed]).encode())
        for im in self.images:
            h.update(f"{im.id}|{im.image}\n".encode())
        return h.hexdigest()[:16]


def load_emoji(style: str | Sequence[str] = "noto", split: str = "train", config: EmojiConfig | None = None,
               **options: Any) -> EmojiDataset:
    """The prepared emoji of ``style`` (a name, a list, or ``all``) and ``split`` as a pair source.

    ``options`` are further :class:`EmojiConfig` fields (``captions``, ``caption_mode``, ``root`` ...).
    """
    if config is None:
        styles = STYLE_NAMES if style == "all" else ((style,) if isinstance(style, str) else tuple(style))
        config = EmojiConfig(styles=styles, split=split, **options)
    return EmojiDataset(load_images(config), config)


RETRIEVAL_TEMPLATE = "an emoji of {name}"


def concept_name(images: Sequence[EmojiImage], concept: str) -> str:
    """The name of a concept: its base emoji's name, else an image's name without the skin tone."""
    for im in images:
        if im.code == concept:
            return im.name
    return re.sub(r":[^:]*skin tones?$", "", images[0].name).strip()


def retrieval_texts(images: Sequence[EmojiImage], template: str = RETRIEVAL_TEMPLATE) -> tuple[list[str], list[str]]:
    """(concepts in first-seen order, one text per concept) for zero-shot retrieval/classification."""
    by_concept: dict[str, list[EmojiImage]] = {}
    for im in images:
        by_concept.setdefault(im.concept, []).append(im)
    concepts = list(by_concept)
    return concepts, [template.format(name=concept_name(by_concept[c], c)) for c in concepts]


# Registered names (train sources, retrieval sets): one per style plus every style together.
DATASET_STYLES: dict[str, tuple[str, ...]] = {
    "emoji-noto": ("noto",), "emoji-fluent": ("fluent",), "emoji-openmoji": ("openmoji",), "emoji": STYLE_NAMES,
}
