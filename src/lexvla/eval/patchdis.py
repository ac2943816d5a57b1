"""PatchDis: classify every image patch by its patch lexical vector against class-name text vectors.

Steps (the paper's patch-level interpretability metric): each class name is put in a prompt (default
``"a photo of a {}."``) and encoded by the text encoder; each image's patch lexical vectors
(``encode_image(..., return_patches=True)``) are scored against the class vectors by dot product after
the same sparsification as retrieval; a patch takes the highest-scoring class (ties -> the lower class
index); the patch map is upsampled to the mask size by nearest neighbour (pixel centres, the model's
preprocessing resizes the whole image without cropping, so the patch grid covers the whole image);
IoU per class, mIoU and pixel accuracy come from the confusion matrix summed over the set, 255 ignored.

Background (when the set has a background class):
* ``ignore`` (default): background pixels are not scored and background is never predicted, i.e. the
  metric measures how well patches on objects pick the right class name;
* ``class``: background is one more class with its own prompt (``"a photo of a background."``);
* ``threshold``: a patch whose best class score is below ``background_threshold`` is background.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ._results import JSONResult
from .encode import Sparsification, model_fingerprint
from .metrics import SegmentationScores, confusion_matrix, segmentation_scores
from .segmentation_data import IGNORE, SegmentationSet, SegSample, prompt_name

logger = logging.getLogger(__name__)

BACKGROUND_MODES = ("ignore", "class", "threshold")
# Which classes compete for an image's patches: every class of the set (the paper's protocol), or only
# those present in the image's ground truth (a second, easier number: localisation among known objects).
CLASS_SETS = ("all", "present")
# What a patch is scored by: its own lexical vector (the paper), or the part of the image vector it
# supplies: max pooling takes each word from one patch, so the image-text score splits exactly into
# per-patch sums over the words each patch supplied ("attributed"). A mean-pooled dense model's
# decomposition is its own patch similarity (divided by P), so it is scored the same either way.
PATCH_SCORES = ("own", "attributed")


@dataclass
class PatchDisConfig:
    prompt: str = "a photo of a {}."
    background: str = "ignore"
    background_threshold: float = 0.0
    sparsification: Sparsification = field(default_factory=Sparsification)
    batch_size: int = 8
    figures: int = 4  # how many pictures to draw (first N images)
    progress: bool = True
    classes: str = "all"  # CLASS_SETS
    # Encode at this input size with the patch grid scaled to keep the trained patch stride
    # (PatchBackbone.at_image_size); None = the model's own size.
    image_size: int | None = None
    # Limit the adapter's attention to patches within this many rows/columns (Adapter.local_attention),
    # e.g. the training grid's span on a larger image; None = all patches, as trained.
    attention_window: int | None = None
    patch_scores: str = "own"  # PATCH_SCORES

    def __post_init__(self) -> None:
        if "{}" not in self.prompt:
            raise ValueError(f"the class prompt must contain '{{}}' for the class name, got {self.prompt!r}")
        if self.background not in BACKGROUND_MODES:
            raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {self.background!r}")
        if isinstance(self.sparsification, str):
            self.sparsification = Sparsification.parse(self.sparsification)
        if self.batch_size <= 0 or self.figures < 0:
            raise ValueError("batch_size must be positive and figures >= 0")
        if self.patch_scores not in PATCH_SCORES:
            raise ValueError(f"patch_scores must be one of {PATCH_SCORES}, got {self.patch_scores!r}")
        if self.classes not in CLASS_SETS:
            raise ValueError(f"classes must be one of {CLASS_SETS}, got {self.classes!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be positive or None, got {self.image_size}")


def upsample_nearest(patch_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """(rows, cols) -> (height, width): each pixel takes the patch its centre falls in."""
    rows, cols = patch_map.shape
    r = np.minimum(((np.arange(height) + 0.5) * rows / height).astype(np.int64), rows - 1)
    c = np.minimum(((np.arange(width) + 0.5) * cols / width).astype(np.int64), cols - 1)
    return patch_map[r[:, None], c[None, :]]


@dataclass
class PatchDisResult(JSONResult):
    dataset: str
    model: str
    num_images: int
    class_names: list[str]
    scored_classes: list[str]  # classes that competed for patches
    miou: float
    pixel_accuracy: float
    iou: dict[str, float | None]
    num_pixels: int
    prompt: str
    background: str
    sparsification: dict[str, Any]
    grid: tuple[int, int] | None
    classes: str = "all"  # which classes competed per image (CLASS_SETS)
    image_size: int | None = None  # input size the images were encoded at (None = the model's own)
    attention_window: int | None = None  # the adapter's attention span in patches (None = all)
    patch_scores: str = "own"  # PATCH_SCORES
    # Do patches localise? ROC AUC of the best class score, patches mostly on objects (>= half their
    # labelled pixels) vs pure background patches; 0.5 = the score says nothing about where objects
    # are (then no background threshold can work). None when the set has no background class.
    localisation_auc: float | None = None
    figures: list[str] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [
            f"PatchDis on {self.dataset} ({self.num_images} images, grid {self.grid}, background {self.background}, "
            f"classes {self.classes}): "
            f"mIoU {100 * self.miou:.2f}  pixel acc {100 * self.pixel_accuracy:.2f}"
            + (f"  localisation AUC {self.localisation_auc:.3f}" if self.localisation_auc is not None else ""),
            f"{'class':<24}{'IoU':>8}",
        ]
        lines += [f"{n:<24}{100 * v:>8.2f}" for n, v in self.iou.items() if v is not None]
        return "\n".join(lines)


@dataclass
class PatchPrediction:
    sample: SegSample
    image: Any  # PIL image
    patch_map: np.ndarray  # (rows, cols) class indices
    label: np.ndarray  # (H, W) ground truth after the background rule
    pred: np.ndarray  # (H, W) upsampled prediction
    best_scores: np.ndarray  # (rows*cols,) each patch's highest class score
    object_share: np.ndarray | None  # (rows*cols,) share of a patch's labelled pixels on objects


def patch_object_share(label: np.ndarray, grid: tuple[int, int], background: int) -> np.ndarray:
    """Share of each patch's labelled (non-255) pixels that are not background; NaN if none labelled.

    Pixels are assigned to patches the same way :func:`upsample_nearest` does (pixel centres).
    """
    rows, cols = grid
    h, w = label.shape
    r = np.minimum(((np.arange(h) + 0.5) * rows / h).astype(np.int64), rows - 1)
    c = np.minimum(((np.arange(w) + 0.5) * cols / w).astype(np.int64), cols - 1)
    patch = (r[:, None] * cols + c[None, :]).ravel()
    lab = label.ravel()
    valid = lab != IGNORE
    total = np.bincount(patch[valid], minlength=rows * cols).astype(np.float64)
    obj = np.bincount(patch[valid & (lab != background)], minlength=rows * cols).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, obj / np.maximum(total, 1), np.nan)


def separation_auc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(a random positive scores above a random negative), ties count half (ROC AUC); None if a side is empty."""
    positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if positive.size == 0 or negative.size == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    return float((ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2) / (positive.size * negative.size))


def _class_vectors(model: Any, names: list[str], prompt: str, spars: Sparsification) -> torch.Tensor:
    with torch.no_grad():
        out = model.encode_text([prompt.format(prompt_name(n)) for n in names])
    return spars(out.vectors.detach().float().cpu())


def _is_dense(model: Any) -> bool:
    from ..models.dense import DenseBaseline

    return isinstance(model, DenseBaseline)


def attributed_patches(vectors: torch.Tensor, patch_vectors: torch.Tensor) -> torch.Tensor:
    """(B, V) image vectors, (B, P, V) patch vectors -> (B, P, V): each word of the image vector placed on
    the patch with its largest patch activation (the patch max pooling took it from), zero elsewhere, so
    summing over patches gives the image vector back and ``(attributed @ text).sum(1)`` is the
    image-text score."""
    best = patch_vectors.argmax(1, keepdim=True)  # (B, 1, V)
    out = torch.zeros_like(patch_vectors)
    return out.scatter_(1, best, vectors.unsqueeze(1))


def _allowed(sample: SegSample, label: np.ndarray, scored: list[int], background: int | None, classes: str
             ) -> torch.Tensor | None:
    """Mask over ``scored`` of the classes that may take this image's patches (None = all of them):
    the sample's own candidates (merged label spaces), and with ``classes="present"`` only the classes in
    its ground truth (plus the background class when background competes as a class)."""
    keep = set(scored)
    if sample.candidates is not None:
        keep &= set(sample.candidates)
    if classes == "present":
        present = {int(c) for c in np.unique(label)} - {IGNORE}
        keep &= present | ({background} if background is not None else set())
    if keep == set(scored):
        return None
    return torch.tensor([c in keep for c in scored])


def predict_patches(
    model: Any, data: SegmentationSet, config: PatchDisConfig, on_prediction: Callable[[PatchPrediction], None]
) -> tuple[list[int], tuple[int, int] | None, int]:
    """Run the model over ``data``, calling ``on_prediction`` per image.

    Returns the scored class indices, the patch grid and the vector width (vocabulary size).
    """
    k = len(data.class_names)
    bg = data.background
    use_bg_class = bg is not None and config.background == "class"
    scored = [c for c in range(k) if c != bg or use_bg_class]
    class_vecs = _class_vectors(model, [data.class_names[c] for c in scored], config.prompt, config.sparsification)
    scored_t = torch.tensor(scored)
    grid = None
    batches = range(0, len(data.samples), config.batch_size)
    for start in tqdm(batches, desc="patchdis", disable=not config.progress, unit="batch"):
        samples = data.samples[start : start + config.batch_size]
        images = [s.load_image() for s in samples]
        with torch.no_grad(), model.backbone.at_image_size(config.image_size), \
                model.adapter.local_attention(config.attention_window):
            out = model.encode_image(images, return_patches=True)
        if out.patch_vectors is None or out.grid is None:
            raise TypeError("PatchDis needs encode_image(..., return_patches=True) to return patch_vectors and grid")
        grid = tuple(out.grid)
        if config.patch_scores == "attributed" and not _is_dense(model):
            patches = attributed_patches(config.sparsification(out.vectors.detach().float().cpu()),
                                         out.patch_vectors.detach().float().cpu())
        else:
            patches = config.sparsification(out.patch_vectors.detach().float().cpu())
        scores = patches @ class_vecs.T  # (B, P, C)
        for s, img, sc in zip(samples, images, scores):
            label = s.load_mask()
            allowed = _allowed(s, label, scored, bg if use_bg_class else None, config.classes)
            if allowed is not None:
                sc = sc.masked_fill(~allowed, -torch.inf)
            best, arg = sc.max(-1)
            cls = scored_t[arg]
            if bg is not None and config.background == "threshold":
                cls = torch.where(best < config.background_threshold, torch.tensor(bg), cls)
            patch_map = cls.numpy().reshape(grid)
            share = patch_object_share(label, grid, bg) if bg is not None else None
            if bg is not None and config.background == "ignore":
                label = np.where(label == bg, IGNORE, label)
            pred = upsample_nearest(patch_map, *label.shape)
            on_prediction(PatchPrediction(s, img, patch_map, label, pred, best.numpy(), share))
    return scored, grid, class_vecs.shape[1]


def evaluate_patchdis(
    model: Any, data: SegmentationSet, config: PatchDisConfig | None = None, out_dir: str | Path | None = None,
    model_name: str = "",
) -> PatchDisResult:
    """PatchDis mIoU of ``model`` on ``data``; with ``out_dir``, also draws ``config.figures`` pictures."""
    config = config or PatchDisConfig()
    k = len(data.class_names)
    conf = np.zeros((k, k), np.int64)
    figures: list[str] = []
    on_objects: list[np.ndarray] = []
    on_background: list[np.ndarray] = []

    def consume(p: PatchPrediction) -> None:
        nonlocal conf
        if p.label.shape != (p.image.height, p.image.width):
            raise ValueError(
                f"{data.name}/{p.sample.id}: mask is {p.label.shape[1]}x{p.label.shape[0]} but the image is "
                f"{p.image.width}x{p.image.height}"
            )
        conf += confusion_matrix(p.pred, p.label, k)
        if p.object_share is not None:
            on_objects.append(p.best_scores[p.object_share >= 0.5])
            on_background.append(p.best_scores[p.object_share == 0])
        if out_dir is not None and len(figures) < config.figures:
            from .figures import patchdis_figure

            path = Path(out_dir) / f"patchdis_{data.name}_{len(figures):02d}_{_safe(p.sample.id)}.png"
            figures.append(str(patchdis_figure(p, data.class_names, path)))

    scored, grid, dim = predict_patches(model, data, config, consume)
    scores: SegmentationScores = segmentation_scores(conf)
    result = PatchDisResult(
        dataset=data.name,
        model=model_name or model_fingerprint(model) or type(model).__name__,
        num_images=len(data.samples),
        class_names=list(data.class_names),
        scored_classes=[data.class_names[c] for c in scored],
        miou=scores.miou,
        pixel_accuracy=scores.pixel_accuracy,
        iou={n: v for n, v in zip(data.class_names, scores.iou)},
        num_pixels=scores.num_pixels,
        prompt=config.prompt,
        background=config.background if data.background is not None else "none in the set",
        sparsification=config.sparsification.describe(dim),
        grid=grid,
        classes=config.classes,
        image_size=config.image_size,
        attention_window=config.attention_window,
        patch_scores=config.patch_scores,
        localisation_auc=separation_auc(np.concatenate(on_objects), np.concatenate(on_background))
        if on_objects else None,
        figures=figures,
        protocol=data.protocol,
    )
    logger.info("PatchDis on %s: mIoU %.4f, pixel accuracy %.4f", data.name, result.miou, result.pixel_accuracy)
    return result


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:40]
