"""Pictures: PatchDis maps (paper Figure 3 style) and recall-vs-sparsity curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .patchdis import PatchPrediction


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _colours(k: int) -> np.ndarray:
    """A fixed colour per class index (VOC's bit-interleaved palette), so pictures are comparable."""
    out = np.zeros((k, 3), np.uint8)
    for i in range(k):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def _overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    colour = palette[np.clip(label, 0, len(palette) - 1)].astype(np.float32)
    out = image.astype(np.float32).copy()
    shown = label != 255
    out[shown] = (1 - alpha) * out[shown] + alpha * colour[shown]
    return out.astype(np.uint8)


def patchdis_figure(pred: PatchPrediction, class_names: Sequence[str], path: str | Path) -> Path:
    """Image | predicted patch classes over the image | ground truth, with a legend of the classes shown."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(pred.image.convert("RGB"))
    palette = _colours(max(len(class_names), 1))
    fig, axes = plt.subplots(1, 3, figsize=(12, 5.6))
    rows, cols = pred.patch_map.shape
    panels = [(image, "image"), (_overlay(image, pred.pred, palette), f"PatchDis prediction ({rows}x{cols} patches)"),
              (_overlay(image, pred.label, palette), "ground truth (grey = ignored)")]
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    ignored = pred.label == 255
    if ignored.any():
        axes[2].imshow(np.ma.masked_where(~ignored, ignored), cmap="Greys", alpha=0.35, vmin=0, vmax=1.5)
    h, w = image.shape[:2]
    for r in range(1, rows):  # the patch grid on the prediction panel
        axes[1].axhline(r * h / rows - 0.5, color="white", lw=0.4, alpha=0.6)
    for c in range(1, cols):
        axes[1].axvline(c * w / cols - 0.5, color="white", lw=0.4, alpha=0.6)
    # One legend per panel: the ground truth's classes, and the prediction's largest classes by area (a
    # 14x14 grid can predict dozens; a shared legend of all of them hides the picture). A predicted class
    # that is in the ground truth is marked, so a reader sees at once which objects were named.
    truth = [int(i) for i in np.unique(pred.label) if i != 255 and i < len(class_names)]
    ids, counts = np.unique(pred.pred[pred.label != 255], return_counts=True)
    order = [(int(i), int(n)) for n, i in sorted(zip(counts, ids), reverse=True) if i < len(class_names)]
    total = max(sum(n for _, n in order), 1)
    top = order[:8]
    for ax, entries in ((axes[1], [(i, f"{'* ' if i in truth else ''}{class_names[i]} ({100 * n / total:.0f}%)")
                                    for i, n in top]
                         + ([(-1, f"{len(order) - len(top)} more classes")] if len(order) > len(top) else [])),
                        (axes[2], [(i, class_names[i]) for i in truth])):
        handles = [Patch(color=palette[i] / 255.0 if i >= 0 else "white", label=label[:38]) for i, label in entries]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=1, fontsize=7.5,
                  frameon=False)
    axes[1].set_title(f"PatchDis prediction ({rows}x{cols} patches; * = in the ground truth;\n"
                      "share of scored pixels)", fontsize=9)
    fig.suptitle(pred.sample.id, fontsize=10)
    fig.tight_layout(rect=(0, 0.0, 1, 0.95))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def sparsity_plot(points: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """R@1 (both directions) against the mean number of active words, one line per sweep kind."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"threshold": "o-", "topk": "s--", "none": "D"}
    for kind in sorted({p["mode"] for p in points}):
        pts = sorted((p for p in points if p["mode"] == kind), key=lambda p: p["active_words"])
        x = [max(p["active_words"], 1e-3) for p in pts]
        for direction, colour in (("image_to_text", "tab:blue"), ("text_to_image", "tab:orange")):
            ax.plot(x, [100 * p[direction]["R@1"] for p in pts], styles.get(kind, "x-"), color=colour,
                    label=f"{direction.replace('_to_', '->').replace('image', 'I').replace('text', 'T')} R@1 ({kind})",
                    ms=4)
    ax.set_xscale("log")
    ax.set_xlabel("mean active words per vector (images and texts)")
    ax.set_ylabel("R@1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or "recall vs sparsity", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
