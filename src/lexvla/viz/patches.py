"""Patch-level pictures: the top words of every image patch, and which patches a text lights up.

Patch order is row-major over the model's ``grid`` (rows, cols): patch ``p`` covers row ``p // cols``,
column ``p % cols`` of the (squashed-to-square) model input, i.e. the same fraction of the original
image, which is what both pictures draw on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.patches import Rectangle
from PIL import Image

from ..outputs import LexicalOutput
from ..preprocess import ImageInput
from ._common import FigureTarget, as_image, check_grid, display_size, new_figure, save_figure

PatchWords = Sequence[Sequence[tuple[str, float]]]


def text_patch_scores(image: LexicalOutput, text: LexicalOutput | torch.Tensor, index: int = 0,
                      text_index: int = 0) -> np.ndarray:
    """(rows, cols) relevance of every patch of image ``index`` to text ``text_index``.

    The score of a patch is its lexical vector dotted with the text's lexical vector (both over the
    same vocabulary), the patch-level version of the image-text similarity.
    ``image`` must come from ``encode_image(..., return_patches=True)``.
    """
    if image.patch_vectors is None or image.grid is None:
        raise ValueError("image output has no patch vectors; encode with return_patches=True")
    t = text.vectors if isinstance(text, LexicalOutput) else text
    t = t.reshape(-1, t.shape[-1])[text_index]
    patches = image.patch_vectors[index]
    if patches.shape[-1] != t.shape[-1]:
        raise ValueError(f"text vector has {t.shape[-1]} dimensions, patch vectors {patches.shape[-1]}")
    scores = (patches.detach().float().cpu() @ t.detach().float().cpu()).numpy()
    rows, cols = check_grid(image.grid, scores.shape[0])
    return scores.reshape(rows, cols)


def patch_top_words(model, image: LexicalOutput, index: int = 0, k: int = 3) -> list[list[tuple[str, float]]]:
    """Top ``k`` words of every patch of image ``index`` (row-major), via ``model.top_words``."""
    if image.patch_vectors is None:
        raise ValueError("image output has no patch vectors; encode with return_patches=True")
    return model.top_words(image.patch_vectors[index], k)


def _word_colors(words: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """One colour per distinct word, in order of first appearance (deterministic)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    distinct = list(dict.fromkeys(words))
    return {w: cmap(i % 20) for i, w in enumerate(distinct)}


def draw_patch_words(ax, image: ImageInput | np.ndarray, patch_words: PatchWords, grid: tuple[int, int],
                     words_per_patch: int = 1, shade: bool = True, long_side: int = 640) -> None:
    """Draw the image with a grid and each cell's top word(s) on a matplotlib axes.

    ``patch_words[p]`` lists patch ``p``'s (word, weight) pairs, heaviest first (e.g. from
    :func:`patch_top_words`). With ``shade``, cells are tinted by their top word, so patches that share
    a word form visible regions (the paper's patch-level picture).
    """
    rows, cols = check_grid(grid, len(patch_words), "patch words")
    img = as_image(image)
    img = img.resize(display_size(img, long_side), Image.BICUBIC)
    # Data units are cells; the aspect keeps the image's own proportions.
    cell_aspect = (img.height / rows) / (img.width / cols)
    ax.imshow(np.asarray(img), extent=(0, cols, rows, 0), aspect=cell_aspect, interpolation="antialiased")
    tops = [pw[0][0] if pw else "" for pw in patch_words]
    colors = _word_colors([w for w in tops if w])
    # Font size: fit the longest label in a cell (DejaVu Sans Bold is ~0.72 em per character).
    box = ax.get_position()
    box_w_pt = box.width * ax.figure.get_figwidth() * 72
    box_h_pt = box.height * ax.figure.get_figheight() * 72
    img_w_pt = min(box_w_pt, box_h_pt * img.width / img.height)
    cell_w_pt, cell_h_pt = img_w_pt / cols, img_w_pt * img.height / img.width / rows
    for p, words in enumerate(patch_words):
        r, c = divmod(p, cols)
        if shade and tops[p]:
            ax.add_patch(Rectangle((c, r), 1, 1, color=colors[tops[p]], alpha=0.35, linewidth=0))
        labels = [w for w, _ in list(words)[:words_per_patch]]
        if not labels:
            continue
        longest = max(len(w) for w in labels)
        size = min(0.9 * cell_w_pt / (0.72 * max(longest, 3)), 0.8 * cell_h_pt / (1.25 * len(labels)), 14.0)
        size = max(size, 4.0)
        ax.text(c + 0.5, r + 0.5, "\n".join(labels), ha="center", va="center", fontsize=size, color="white",
                fontweight="bold", path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    for i in range(1, rows):
        ax.axhline(i, color="white", linewidth=0.6, alpha=0.8)
    for j in range(1, cols):
        ax.axvline(j, color="white", linewidth=0.6, alpha=0.8)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_axis_off()


def patch_words_figure(image: ImageInput | np.ndarray, patch_words: PatchWords, grid: tuple[int, int],
                       path: FigureTarget, *, words_per_patch: int = 1, title: str | None = None,
                       width_in: float = 7.0, dpi: int = 100) -> None:
    """Write a PNG of ``image`` with its ``grid`` of patches, each labelled with its top word(s).

    Example::

        out = model.encode_image([img], return_patches=True)
        patch_words_figure(img, patch_top_words(model, out, k=2), out.grid, "patches.png", words_per_patch=2)
    """
    img = as_image(image)
    aspect = img.height / img.width
    extra = 0.4 if title else 0.0
    fig = new_figure(width_in, width_in * aspect + extra, dpi)
    ax = fig.add_axes((0, 0, 1, width_in * aspect / (width_in * aspect + extra)))
    draw_patch_words(ax, img, patch_words, grid, words_per_patch)
    if title:
        fig.suptitle(title, y=1 - 0.05 / (width_in * aspect + extra), va="top")
    save_figure(fig, path, dpi)


def upsample_scores(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a (rows, cols) map to ``size`` = (width, height), as float32."""
    grid = np.asarray(scores, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"patch scores must be a (rows, cols) array, got shape {grid.shape}")
    return np.asarray(Image.fromarray(grid, mode="F").resize(size, Image.BILINEAR), dtype=np.float32)


def draw_text_heatmap(ax, image: ImageInput | np.ndarray, scores: np.ndarray, title: str | None = None,
                      alpha: float = 0.55, cmap: str = "jet", long_side: int = 640):
    """Overlay the (rows, cols) patch ``scores`` (upsampled) on the image; returns the overlay artist.

    Colours are min-max scaled per image (the picture shows *where* the text matches best, not how
    well; the scale's range is given in the colour bar of :func:`text_heatmap`).
    """
    img = as_image(image)
    img = img.resize(display_size(img, long_side), Image.BICUBIC)
    heat = upsample_scores(scores, img.size)
    ax.imshow(np.asarray(img), interpolation="antialiased")
    lo, hi = float(np.min(scores)), float(np.max(scores))
    art = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi if hi > lo else lo + 1e-9,
                    interpolation="bilinear")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return art


def text_heatmap(image: ImageInput | np.ndarray, scores: np.ndarray, path: FigureTarget, *,
                 text: str | None = None, width_in: float = 7.0, dpi: int = 100) -> None:
    """Write a PNG heat map of which patches a text lights up, over the image.

    ``scores`` is the (rows, cols) map from :func:`text_patch_scores`. ``text`` titles the picture.

    Example::

        img_out = model.encode_image([img], return_patches=True)
        txt_out = model.sparsify(model.encode_text(["a red circle"]))
        text_heatmap(img, text_patch_scores(img_out, txt_out), "heat.png", text="a red circle")
    """
    img = as_image(image)
    img_h = width_in * img.height / img.width
    top = 0.5 if text else 0.1  # inches above the picture, for the title
    fig_w, fig_h = width_in + 1.5, img_h + top + 0.1  # 1.5 in on the right for the colour bar
    fig = new_figure(fig_w, fig_h, dpi)
    ax = fig.add_axes((0.1 / fig_w, 0.1 / fig_h, width_in / fig_w, img_h / fig_h))
    art = draw_text_heatmap(ax, img, scores)
    cax = fig.add_axes(((width_in + 0.3) / fig_w, 0.15, 0.2 / fig_w, 0.7))
    fig.colorbar(art, cax=cax, label="patch · text")
    if text:
        fig.suptitle(f"“{text}”", y=1 - 0.08 / fig_h, va="top")
    save_figure(fig, path, dpi)
