"""Contact sheets: a grid of a data set's images with their first caption (docs/images/data-*.png)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_write
from .records import PairRecord


def spread(records: Sequence[PairRecord], n: int) -> list[PairRecord]:
    """One record per image for ``n`` images spread evenly over the set (first caption of each)."""
    first: dict[str, PairRecord] = {}
    for r in records:
        first.setdefault(r.image_id, r)
    images = list(first.values())
    if len(images) <= n:
        return images
    return [images[int(i)] for i in np.linspace(0, len(images) - 1, n).round()]


def contact_sheet(tiles: Sequence[tuple[Image.Image, str]], out: str | Path, cols: int = 8, tile: int = 112,
                  title: str = "") -> Path:
    """Draw ``(image, caption)`` tiles in a grid with two wrapped caption lines under each; PNG at ``out``."""
    font = ImageFont.load_default(size=11)
    rows = (len(tiles) + cols - 1) // cols
    head = 22 if title else 0
    cell_h = tile + 30
    sheet = Image.new("RGB", (cols * tile + (cols + 1) * 4, head + rows * cell_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 4), title, fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    for k, (im, caption) in enumerate(tiles):
        x, y = 4 + (k % cols) * (tile + 4), head + (k // cols) * cell_h
        thumb = im.convert("RGB").resize((tile, tile), Image.BICUBIC)
        sheet.paste(thumb, (x, y))
        lines = textwrap.wrap(caption, width=max(8, tile // 6))[:2]
        for j, line in enumerate(lines):
            draw.text((x, y + tile + 2 + 12 * j), line, fill=(30, 30, 30), font=font)
    import io

    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return atomic_write(Path(out), buf.getvalue())


def mask_overlay(image: np.ndarray, mask: np.ndarray, ignore: int = 255) -> Image.Image:
    """The image with each class tinted its own colour, ignore pixels grey, background untouched."""
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 255, (256, 3)).astype(np.float32)
    out = image.astype(np.float32).copy()
    obj = (mask > 0) & (mask != ignore)
    out[obj] = 0.45 * out[obj] + 0.55 * palette[mask[obj]]
    out[mask == ignore] = 128
    return Image.fromarray(out.round().astype(np.uint8))
