"""Image-text retrieval sets: Karpathy Flickr30k / COCO splits, generic manifests, easy-vqa.

Every loader returns a :class:`RetrievalSet`: image paths, texts, and one integer *key* per image and
per text. A text is a correct answer for an image (and vice versa) exactly when their keys are equal:
in Karpathy splits the key of a caption is its image's index (5 positives per image, 1 per caption);
on easy-vqa the key is the (colour, shape) pair, so every image of the same colour and shape matches.

Caption handling (recorded in ``RetrievalSet.protocol`` and so in every results file): the ``raw``
caption of the Karpathy file, whitespace collapsed (``" ".join(raw.split())``); case kept unless
``lowercase=True`` (the LLM tokenizer is case-sensitive; CLIP's tokenizer lower-cases by itself); the
first ``captions_per_image`` captions in file order (5: a few COCO images have 6-7, the standard 25,000
caption COCO 5K test set keeps 5); no truncation here: the model truncates its tokenised prompt to its
own maximum length.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._registry import Registry

logger = logging.getLogger(__name__)


@dataclass
class RetrievalSet:
    """Images, texts, and their match keys (``image_keys[i] == text_keys[t]`` <=> a correct pair)."""

    name: str
    image_paths: list[Path]
    texts: list[str]
    image_keys: np.ndarray
    text_keys: np.ndarray
    protocol: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_keys = np.asarray(self.image_keys, dtype=np.int64)
        self.text_keys = np.asarray(self.text_keys, dtype=np.int64)
        if not self.image_paths or not self.texts:
            raise ValueError(f"retrieval set '{self.name}' is empty ({len(self.image_paths)} images, {len(self.texts)} texts)")
        if len(self.image_keys) != len(self.image_paths) or len(self.text_keys) != len(self.texts):
            raise ValueError(f"retrieval set '{self.name}': one key per image and per text is needed")
        lonely_t = ~np.isin(self.text_keys, self.image_keys)
        lonely_i = ~np.isin(self.image_keys, self.text_keys)
        if lonely_t.any() or lonely_i.any():
            raise ValueError(
                f"retrieval set '{self.name}': {int(lonely_i.sum())} images without a matching text and "
                f"{int(lonely_t.sum())} texts without a matching image"
            )


@dataclass
class RetrievalDataConfig:
    """Where a retrieval set lives and how captions are handled (see module docstring)."""

    root: Path | None = None  # image folder (Karpathy: the folder with the images or their sub-folders)
    annotations: Path | None = None  # Karpathy JSON / manifest; default: looked for under root
    split: str = "test"
    captions_per_image: int | None = 5  # None = all captions
    lowercase: bool = False
    limit: int | None = None  # first N images only (quick checks; not the paper's protocol)
    check_split: bool = True  # COCO: compare against eccv-caption's 5K test ids when that package is installed

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser() if self.root is not None else None
        self.annotations = Path(self.annotations).expanduser() if self.annotations is not None else None
        if self.captions_per_image is not None and self.captions_per_image <= 0:
            raise ValueError("captions_per_image must be positive or None")
        if self.limit is not None and self.limit <= 0:
            raise ValueError("limit must be positive or None")


RETRIEVAL_DATASETS: Registry[Callable[[RetrievalDataConfig], RetrievalSet]] = Registry("retrieval data set")


register_retrieval_dataset = RETRIEVAL_DATASETS.register


def load_retrieval_set(name: str, config: RetrievalDataConfig) -> RetrievalSet:
    return RETRIEVAL_DATASETS.lookup(name)(config)


def clean_caption(text: str, lowercase: bool) -> str:
    text = " ".join(str(text).split())
    return text.lower() if lowercase else text


def _find_file(config: RetrievalDataConfig, names: list[str], what: str) -> Path:
    if config.annotations is not None:
        if not config.annotations.is_file():
            raise FileNotFoundError(f"{what} file not found: {config.annotations}")
        return config.annotations
    if config.root is None:
        raise ValueError(f"give --root (image folder) and/or --annotations ({what})")
    folders = [config.root, config.root.parent, config.root / "annotations", config.root / "karpathy"]
    for folder in folders:
        for n in names:
            if (folder / n).is_file():
                return folder / n
    raise FileNotFoundError(
        f"{what} not found: looked for {names} in {[str(f) for f in folders]}; pass --annotations <file>"
    )


def _resolve_images(entries: list[dict], root: Path, extra_dirs: tuple[str, ...], name: str) -> list[Path]:
    """Pick the folder layout that holds the first image, then require every image to exist there."""

    def candidates(e: dict) -> list[Path]:
        c = []
        if e.get("filepath"):
            c.append(root / e["filepath"] / e["filename"])
        c.append(root / e["filename"])
        c += [root / d / e["filename"] for d in extra_dirs]
        return c

    first = candidates(entries[0])
    layout = next((i for i, p in enumerate(first) if p.is_file()), None)
    if layout is None:
        raise FileNotFoundError(
            f"{name}: image {entries[0]['filename']} not found under {root}; tried {[str(p) for p in first]}"
        )
    paths = [candidates(e)[layout] for e in entries]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} of {len(paths)} images are missing, e.g. {missing[:3]}")
    return paths


def load_karpathy(
    json_path: Path, image_root: Path, config: RetrievalDataConfig, name: str, extra_dirs: tuple[str, ...] = ()
) -> RetrievalSet:
    """Read a Karpathy split file (``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``)."""
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{json_path} is not a Karpathy split file (no top-level 'images' list)")
    entries = [e for e in data["images"] if e.get("split") == config.split]
    if not entries:
        splits = sorted({str(e.get("split")) for e in data["images"]})
        raise ValueError(f"{json_path}: no images in split {config.split!r} (splits present: {splits})")
    if config.limit is not None:
        entries = entries[: config.limit]
    paths = _resolve_images(entries, image_root, extra_dirs, name)
    texts: list[str] = []
    text_keys: list[int] = []
    sent_ids: list[list[int]] = []
    for i, e in enumerate(entries):
        sentences = e.get("sentences") or []
        if not sentences:
            raise ValueError(f"{json_path}: image {e.get('filename')} has no sentences")
        kept = sentences[: config.captions_per_image] if config.captions_per_image else sentences
        texts += [clean_caption(s["raw"], config.lowercase) for s in kept]
        text_keys += [i] * len(kept)
        sent_ids.append([int(s.get("sentid", -1)) for s in kept])
    few = sum(
        1 for e in entries if config.captions_per_image and len(e.get("sentences", [])) < config.captions_per_image
    )
    protocol = {
        "source": str(json_path),
        "image_root": str(image_root),
        "split": config.split,
        "captions_per_image": config.captions_per_image,
        "images_with_fewer_captions": few,
        "caption_field": "raw",
        "whitespace": "collapsed",
        "lowercase": config.lowercase,
        "truncation": "none in the loader; the model truncates its tokenised prompt",
        "limit": config.limit,
    }
    rs = RetrievalSet(name, paths, texts, np.arange(len(entries)), np.asarray(text_keys), protocol)
    rs.protocol["source_ids"] = {"image": [e.get("cocoid", e.get("imgid")) for e in entries], "text": sent_ids}
    return rs


@register_retrieval_dataset("flickr30k")
def flickr30k(config: RetrievalDataConfig) -> RetrievalSet:
    """Flickr30k 1K test (Karpathy): 1,000 images, 5,000 captions."""
    ann = _find_file(config, ["dataset_flickr30k.json"], "Karpathy Flickr30k split (dataset_flickr30k.json)")
    root = config.root or ann.parent
    rs = load_karpathy(ann, root, config, "flickr30k", extra_dirs=("flickr30k-images", "images", "Images"))
    rs.protocol.pop("source_ids")
    return rs


@register_retrieval_dataset("coco")
def coco(config: RetrievalDataConfig) -> RetrievalSet:
    """MSCOCO 5K test (Karpathy): 5,000 images, 25,000 captions (first 5 per image)."""
    ann = _find_file(config, ["dataset_coco.json"], "Karpathy COCO split (dataset_coco.json)")
    root = config.root or ann.parent
    rs = load_karpathy(ann, root, config, "coco", extra_dirs=("val2014", "images", "train2014"))
    ids = rs.protocol.pop("source_ids")
    if config.check_split and config.split == "test" and config.limit is None and config.captions_per_image == 5:
        rs.protocol["eccv_caption_check"] = check_coco_split(ids["image"], ids["text"])
    return rs


def eccv_caption_reference() -> Path | None:
    """``original_image_to_caption.json`` (COCO id -> its 5 caption ids) of the installed ``eccv-caption``."""
    spec = importlib.util.find_spec("eccv_caption")
    if spec is None or not spec.submodule_search_locations:
        return None
    ref = Path(list(spec.submodule_search_locations)[0]) / "data" / "original_image_to_caption.json"
    return ref if ref.is_file() else None


def check_coco_split(image_ids: list, caption_ids: list[list[int]], reference: Path | None = None) -> str:
    """Compare a COCO 5K test split with the ids shipped in the ``eccv-caption`` package.

    Karpathy's ``sentid`` of a COCO caption is its COCO annotation id, which is what eccv-caption lists.
    Returns "passed ..." or "skipped (...)"; raises ValueError on a mismatch (wrong split file, or
    captions not the first five of each image). The package is read as data, not imported.
    """
    ref_file = reference or eccv_caption_reference()
    if ref_file is None:
        return "skipped (eccv-caption not installed)"
    with open(ref_file, encoding="utf-8") as f:
        ref = {int(k): sorted(int(c) for c in v) for k, v in json.load(f).items()}
    ours = {int(i): sorted(c) for i, c in zip(image_ids, caption_ids)}
    if set(ours) != set(ref):
        extra, lacking = len(set(ours) - set(ref)), len(set(ref) - set(ours))
        raise ValueError(
            f"COCO test split differs from the standard 5K test split (eccv-caption): {extra} images not in it, "
            f"{lacking} of its images missing. Use Karpathy's dataset_coco.json, or pass --no-split-check."
        )
    bad = [i for i in ours if ours[i] != ref[i]]
    if bad:
        raise ValueError(
            f"COCO test split: captions of {len(bad)} images differ from the standard 25K captions (eccv-caption), "
            f"e.g. image {bad[0]}. Pass --no-split-check to evaluate anyway."
        )
    return f"passed ({len(ours)} images / {sum(len(c) for c in ours.values())} captions match {ref_file.name})"


@register_retrieval_dataset("manifest")
def manifest(config: RetrievalDataConfig) -> RetrievalSet:
    """A manifest in the project's format (``lexvla.data.records``: JSONL rows with ``image``, ``caption``
    string or list, optional ``key`` and ``split``), or a CSV with ``image`` and ``caption`` columns.

    Rows with the same ``key`` match each other (e.g. a class label); default key = the image, so an
    image's captions are its positives. Relative image paths are resolved against ``root`` or the file's
    folder. When rows carry ``split`` names, only those of ``--split`` are used.
    """
    from ..data.records import read_manifest, records_from_row

    if config.annotations is None:
        raise ValueError("the manifest dataset needs --annotations <file.jsonl|file.csv>")
    path = config.annotations
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = config.root or path.parent
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: CSV needs 'image' and 'caption' columns, has {reader.fieldnames}")
            records = [r for n, row in enumerate(reader, 2) for r in records_from_row(row, f"{path}:{n}", base)]
    else:
        records = read_manifest(path, base)
    if any(r.split for r in records):
        records = [r for r in records if config.split in r.split]
    images: dict[str, int] = {}
    paths: list[Path] = []
    image_group: list[str] = []
    texts: list[str] = []
    text_group: list[str] = []
    per_image: dict[str, int] = {}
    for rec in records:
        if not rec.caption:
            continue
        img = Path(str(rec.image))
        group = rec.key or str(img)
        if str(img) not in images:
            if config.limit is not None and len(images) >= config.limit:
                continue
            images[str(img)] = len(paths)
            paths.append(img)
            image_group.append(group)
        if config.captions_per_image and per_image.get(str(img), 0) >= config.captions_per_image:
            continue
        per_image[str(img)] = per_image.get(str(img), 0) + 1
        texts.append(clean_caption(rec.caption, config.lowercase))
        text_group.append(group)
    if not paths:
        raise ValueError(f"{path}: no image with a caption" + (f" in split {config.split!r}" if records else ""))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} images are missing, e.g. {missing[:3]}")
    ids = {g: i for i, g in enumerate(dict.fromkeys(image_group + text_group))}
    protocol = {
        "source": str(path),
        "captions_per_image": config.captions_per_image,
        "lowercase": config.lowercase,
        "whitespace": "collapsed",
        "match": "same key" if any(r.key is not None for r in records) else "same image",
        "limit": config.limit,
    }
    return RetrievalSet(
        "manifest", paths, texts, [ids[g] for g in image_group], [ids[g] for g in text_group], protocol
    )


@register_retrieval_dataset("easy-vqa")
def easy_vqa(config: RetrievalDataConfig) -> RetrievalSet:
    """easy-vqa toy set (``lexvla.data.easyvqa``): a match = same colour and same shape.

    Captions come from the templates; identical captions are kept once (a duplicate query would only
    weight its class twice), so each image has ``len(templates)`` positive texts. All templates are
    used: ``captions_per_image`` (a Karpathy setting) does not apply here.
    """
    from ..data.easyvqa import load_easyvqa

    ds = load_easyvqa(config.split, caption_mode="all")
    records = ds.records[: config.limit] if config.limit else ds.records
    if not records:
        raise ValueError(f"easy-vqa split {config.split!r} has no images")
    classes = {c: i for i, c in enumerate(sorted({(r.colour, r.shape) for r in records}))}
    texts: dict[str, int] = {}
    for r in records:
        for cap in r.captions:
            texts.setdefault(clean_caption(cap, config.lowercase), classes[(r.colour, r.shape)])
    protocol = {
        "source": "easy-vqa (lexvla.data.easyvqa)",
        "split": config.split,
        "match": "same colour and shape",
        "texts": "distinct template captions of the evaluated images",
        "lowercase": config.lowercase,
        "limit": config.limit,
    }
    return RetrievalSet(
        f"easy-vqa-{config.split}",
        [Path(r.path) for r in records],
        list(texts),
        [classes[(r.colour, r.shape)] for r in records],
        list(texts.values()),
        protocol,
    )


def _emoji(name: str) -> Callable[[RetrievalDataConfig], RetrievalSet]:
    def load(config: RetrievalDataConfig) -> RetrievalSet:
        """Emoji by concept (``lexvla.data.emoji``): one text per concept, "an emoji of <name>"; a match =
        the same concept (all skin tones of a hand match its name)."""
        from ..data.emoji import DATASET_STYLES, EmojiConfig, load_images, retrieval_texts

        images = load_images(EmojiConfig(styles=DATASET_STYLES[name], split=config.split))
        images = images[: config.limit] if config.limit else images
        concepts, texts = retrieval_texts(images)
        ids = {c: i for i, c in enumerate(concepts)}
        protocol = {"source": "lexvla.data.emoji", "styles": list(DATASET_STYLES[name]), "split": config.split,
                    "match": "same concept (base emoji code)", "texts": "an emoji of <concept name>, one per concept",
                    "lowercase": config.lowercase, "limit": config.limit}
        return RetrievalSet(f"{name}-{config.split}", [im.image for im in images],
                            [clean_caption(t, config.lowercase) for t in texts],
                            [ids[im.concept] for im in images], list(range(len(concepts))), protocol)

    return load


for _name in ("emoji-noto", "emoji-fluent", "emoji-openmoji", "emoji"):
    register_retrieval_dataset(_name)(_emoji(_name))


@register_retrieval_dataset("fashion-mnist")
def fashion_mnist(config: RetrievalDataConfig) -> RetrievalSet:
    """Fashion-MNIST zero-shot classification (``lexvla data fetch fashion-mnist``): texts are the 10
    prompts "a photo of a <class>", a match = the same class, so image->text R@1 is top-1 accuracy.
    ``--root``: a prepared folder other than the cache's."""
    from ..data.fashion import CLASSES, PROMPT, manifest_path
    from ..data.records import read_manifest

    records = read_manifest(manifest_path(config.split, config.root))
    records = records[: config.limit] if config.limit else records
    present = [c for c in CLASSES if any(r.key == c for r in records)]  # --limit may leave some out
    index = {c: i for i, c in enumerate(present)}
    protocol = {"source": "dataset-fashion-mnist (Debian)", "split": config.split, "prompt": PROMPT,
                "match": "same class; image->text R@1 = zero-shot top-1 accuracy", "limit": config.limit}
    return RetrievalSet(f"fashion-mnist-{config.split}", [Path(str(r.image)) for r in records],
                        [clean_caption(PROMPT.format(c), config.lowercase) for c in present],
                        [index[str(r.key)] for r in records], list(range(len(present))), protocol)


@register_retrieval_dataset("clipart")
def clipart(config: RetrievalDataConfig) -> RetrievalSet:
    """OpenClipart titles (``lexvla data fetch clipart``; splits train, val): a match = the same title."""
    import dataclasses

    from ..data.clipart import manifest_path

    rs = manifest(dataclasses.replace(config, annotations=manifest_path(config.root), root=None))
    rs.name = f"clipart-{config.split}"
    return rs
