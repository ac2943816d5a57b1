"""Image loading and preprocessing with Pillow/numpy (no torchvision).

Every Pillow mode becomes 8-bit RGB: grayscale, palette (with transparency), RGBA/LA (composited on
white, so a transparent background does not turn black), CMYK/YCbCr/LAB, and 16-bit or float images
(rescaled by their actual range).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageInput = str | Path | Image.Image

# File suffixes treated as images when a folder is scanned (data sources, index builds, mask folders).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageLoadError(ValueError):
    """An input could not be read as an image; the message names it."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageInput) -> Image.Image:
    """Open an image file (or pass a PIL image through) as RGB; clear error for unreadable input."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # force decoding now, so a truncated file fails here and not later
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from None


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize (squash to a square, the toy task and DINOv2 both tolerate it) and normalise."""

    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resample: int = Image.BICUBIC

    def pixels(self, image: ImageInput) -> torch.Tensor:
        img = load_image(image).resize((self.image_size, self.image_size), self.resample)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """One image or a list -> (B, 3, H, W) float tensor."""
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        return torch.stack([self.pixels(im) for im in images])
