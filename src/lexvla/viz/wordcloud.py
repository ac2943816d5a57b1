"""Deterministic word clouds of lexical vectors (no extra dependency).

Layout: words are placed largest first; font size is proportional to the word's weight (relative to
the heaviest word). Each word goes to the first free spot on a discrete spiral out from the centre;
an occupancy mask with a summed-area table makes "is this rectangle free" one vectorised test for all
candidate positions at once. A word that fits nowhere is shrunk step by step and dropped below
``min_font``. There is no randomness, so the same words always give the same picture.

Words are rendered with Pillow (the layout's metrics and the drawing then come from the same font, so
boxes never overlap) and shown on a matplotlib axes, which lets the cloud sit inside larger figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._common import FigureTarget, new_figure, save_figure

WordWeights = Sequence[tuple[str, float]] | Mapping[str, float]

_FONT_FILE = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"


@lru_cache(maxsize=256)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_FONT_FILE), size)


@dataclass(frozen=True)
class WordCloudConfig:
    """Size and look of a word cloud (pixels)."""

    width: int = 800
    height: int = 400
    max_words: int = 60
    max_font: int | None = None  # default: what lets all words fill about half the canvas
    min_font: int = 9
    margin: int = 2  # free pixels kept around every word
    background: str = "white"
    colormap: str = "viridis"  # colour by weight: heavy words dark, light ones bright
    stride: int = 3  # pixels between candidate positions

    def __post_init__(self) -> None:
        if self.width < 32 or self.height < 32:
            raise ValueError(f"word cloud must be at least 32x32 pixels, got {self.width}x{self.height}")
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.min_font < 4:
            raise ValueError(f"min_font must be >= 4, got {self.min_font}")
        if self.max_font is not None and self.max_font < self.min_font:
            raise ValueError(f"max_font ({self.max_font}) must be >= min_font ({self.min_font})")


@dataclass(frozen=True)
class PlacedWord:
    word: str
    weight: float
    font_size: int
    x: int  # top-left corner of the word's box, pixels
    y: int
    box_width: int
    box_height: int


@dataclass
class WordCloudLayout:
    """Placed words (largest first) and the ones that did not fit."""

    width: int
    height: int
    words: list[PlacedWord] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def normalise_word_weights(words_weights: WordWeights, max_words: int | None = None) -> list[tuple[str, float]]:
    """Pairs sorted by weight (heaviest first, ties by word), zero/negative weights and blanks dropped."""
    items = list(words_weights.items()) if isinstance(words_weights, Mapping) else list(words_weights)
    cleaned: list[tuple[str, float]] = []
    for item in items:
        if len(item) != 2:
            raise ValueError(f"word weights must be (word, weight) pairs, got {item!r}")
        word, weight = str(item[0]).strip(), float(item[1])
        if not np.isfinite(weight):
            raise ValueError(f"weight of {word!r} is not finite: {weight}")
        if word and weight > 0:
            cleaned.append((word, weight))
    cleaned.sort(key=lambda p: (-p[1], p[0]))
    return cleaned[:max_words] if max_words is not None else cleaned


def _candidates(width: int, height: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvas points every ``stride`` pixels, ordered centre-out (by elliptic radius, then angle).

    This is a discrete spiral: it covers the whole canvas evenly, unlike a sampled Archimedean spiral
    whose points thin out far from the centre.
    """
    ys, xs = np.mgrid[0:height:stride, 0:width:stride]
    xs, ys = xs.ravel(), ys.ravel()
    dx, dy = (xs - width / 2) / width, (ys - height / 2) / height
    radius = np.round(np.hypot(dx, dy) * max(width, height) / stride)
    order = np.lexsort((np.arctan2(dy, dx), radius))
    return xs[order].astype(np.int64), ys[order].astype(np.int64)


def layout_word_cloud(words_weights: WordWeights, config: WordCloudConfig | None = None) -> WordCloudLayout:
    """Place words on a ``config.width x config.height`` canvas (see module docstring)."""
    cfg = config or WordCloudConfig()
    pairs = normalise_word_weights(words_weights, cfg.max_words)
    layout = WordCloudLayout(cfg.width, cfg.height)
    if not pairs:
        return layout
    occupied = np.zeros((cfg.height, cfg.width), dtype=np.int32)
    sat = _summed_area(occupied)
    cx, cy = _candidates(cfg.width, cfg.height, cfg.stride)
    top = pairs[0][1]
    max_font = cfg.max_font or _fitting_font(pairs, cfg)
    for word, weight in pairs:
        size = max(cfg.min_font, int(round(max_font * weight / top)))
        while size >= cfg.min_font:
            left, upper, right, lower = _font(size).getbbox(word)
            bw, bh = right - left + 2 * cfg.margin, lower - upper + 2 * cfg.margin
            if bw < cfg.width and bh < cfg.height:
                spot = _first_free(sat, cx - bw // 2, cy - bh // 2, bw, bh)
                if spot is not None:
                    x, y = spot
                    occupied[y:y + bh, x:x + bw] = 1
                    sat = _summed_area(occupied)
                    layout.words.append(PlacedWord(word, weight, size, int(x), int(y), int(bw), int(bh)))
                    break
            size = int(size * 0.8) if size > cfg.min_font else cfg.min_font - 1
        else:
            layout.dropped.append(word)
    return layout


def _fitting_font(pairs: list[tuple[str, float]], cfg: WordCloudConfig) -> int:
    """Largest font size for the heaviest word such that all words' boxes would fill about half of the
    canvas (DejaVu Sans Bold: ~0.65 em per character, ~1.2 em line height), capped at height / 3."""
    top = pairs[0][1]
    em_area = sum(0.65 * len(w) * 1.2 * (wt / top) ** 2 for w, wt in pairs)
    size = (0.5 * cfg.width * cfg.height / em_area) ** 0.5
    return int(max(cfg.min_font, min(size, cfg.height / 3)))


def _summed_area(occupied: np.ndarray) -> np.ndarray:
    sat = np.zeros((occupied.shape[0] + 1, occupied.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = occupied.cumsum(0).cumsum(1)
    return sat


def _first_free(sat: np.ndarray, xs: np.ndarray, ys: np.ndarray, w: int, h: int) -> tuple[int, int] | None:
    """First (x, y) of the candidates whose w x h rectangle is inside the canvas and entirely free,
    given the summed-area table ``sat`` of the occupancy mask."""
    height, width = sat.shape[0] - 1, sat.shape[1] - 1
    ok = (xs >= 0) & (ys >= 0) & (xs + w <= width) & (ys + h <= height)
    xs, ys = xs[ok], ys[ok]
    if len(xs) == 0:
        return None
    filled = sat[ys + h, xs + w] - sat[ys, xs + w] - sat[ys + h, xs] + sat[ys, xs]
    free = np.flatnonzero(filled == 0)
    return (int(xs[free[0]]), int(ys[free[0]])) if len(free) else None


def render_word_cloud(layout: WordCloudLayout, config: WordCloudConfig | None = None) -> Image.Image:
    """Draw a layout as an RGB image of the layout's size."""
    cfg = config or WordCloudConfig()
    img = Image.new("RGB", (layout.width, layout.height), cfg.background)
    draw = ImageDraw.Draw(img)
    cmap = matplotlib.colormaps[cfg.colormap]
    top = layout.words[0].weight if layout.words else 1.0
    for pw in layout.words:
        # Darkest colours for the heaviest words (0.0-0.75 of the map keeps the lightest ones readable).
        rgba = cmap(0.75 * (1.0 - pw.weight / top))
        color = tuple(int(round(255 * c)) for c in rgba[:3])
        font = _font(pw.font_size)
        left, upper, _, _ = font.getbbox(pw.word)
        draw.text((pw.x + cfg.margin - left, pw.y + cfg.margin - upper), pw.word, fill=color, font=font)
    return img


def draw_word_cloud(ax, words_weights: WordWeights, config: WordCloudConfig | None = None,
                    title: str | None = None) -> WordCloudLayout:
    """Draw a word cloud on a matplotlib axes; returns the layout (which words were placed where)."""
    cfg = config or WordCloudConfig()
    layout = layout_word_cloud(words_weights, cfg)
    ax.imshow(np.asarray(render_word_cloud(layout, cfg)), interpolation="antialiased")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    if not layout.words:
        ax.text(0.5, 0.5, "(no active words)", ha="center", va="center", transform=ax.transAxes, color="gray")
    return layout


def word_cloud(words_weights: WordWeights, path: FigureTarget, *, title: str | None = None,
               width: int = 800, height: int = 400, max_words: int = 60, dpi: int = 100) -> WordCloudLayout:
    """Write a PNG word cloud of ``(word, weight)`` pairs (or a ``{word: weight}`` dict) to ``path``.

    ``path`` is a file name or a binary file object. Font size is proportional to weight; the result is
    deterministic. Returns the layout (placed and dropped words).

    Example: ``word_cloud(model.top_words(model.sparsify(out), 60)[0], "cloud.png")``.
    """
    cfg = WordCloudConfig(width=width, height=height, max_words=max_words)
    extra = 0.5 if title else 0.0  # inches for the title
    fig = new_figure(width / dpi, height / dpi + extra, dpi)
    ax = fig.add_axes((0, 0, 1, height / dpi / (height / dpi + extra)))
    layout = draw_word_cloud(ax, words_weights, cfg)
    if title:
        fig.suptitle(title, y=1 - 0.1 / (height / dpi + extra), va="top")
    save_figure(fig, path, dpi)
    return layout
