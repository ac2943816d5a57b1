"""Figure plumbing shared by the pictures: pyplot-free figures (thread-safe in the web server)."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from ..preprocess import ImageInput, load_image

# Where a picture goes: a file name, or a binary file object (e.g. io.BytesIO for the web app).
FigureTarget = str | Path | IO[bytes]


def new_figure(width_in: float, height_in: float, dpi: int = 100) -> Figure:
    """A matplotlib figure that is not registered with pyplot (no global state, no GUI backend)."""
    return Figure(figsize=(width_in, height_in), dpi=dpi)


def save_figure(fig: Figure, target: FigureTarget, dpi: int = 100) -> None:
    """Save as PNG (parent folders created); the figure is not reused afterwards."""
    if isinstance(target, (str, Path)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", dpi=dpi, facecolor="white")


def as_image(image: ImageInput | np.ndarray) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 array as an RGB PIL image."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be HxWx3, got shape {image.shape}")
        return Image.fromarray(image.astype(np.uint8))
    return load_image(image)


def display_size(image: Image.Image, long_side: int) -> tuple[int, int]:
    """(width, height) scaling the image so its long side is ``long_side`` pixels, aspect kept."""
    w, h = image.size
    s = long_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def check_grid(grid: tuple[int, int], n_patches: int, what: str = "patch values") -> tuple[int, int]:
    rows, cols = int(grid[0]), int(grid[1])
    if rows < 1 or cols < 1 or rows * cols != n_patches:
        raise ValueError(f"{what}: grid {rows}x{cols} does not match {n_patches} patches")
    return rows, cols
