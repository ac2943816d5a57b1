"""Image loading and preprocessing with Pillow/numpy (no torchvision).

Every Pillow mode becomes 8-bit RGB: grayscale, palette (with transparency), RGBA/LA (composited on
white, so a transparent background does not turn black), CMYK/YCbCr/LAB, and 16-bit or float images
(rescaled by their actual range; NaN or infinite pixels are an error, not a black image).

:func:`decode_image` is the one decoder for every input path (file, bytes, upload, tar member): it
checks the pixel count from the header before decoding (decompression bombs), applies the EXIF
orientation (a phone photo is encoded upright, as a browser shows it), and turns every decode failure
into :class:`ImageLoadError` naming the input.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps

ImageInput = str | Path | Image.Image

# File suffixes treated as images when a folder is scanned (data sources, index builds, mask folders).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# Largest image decoded (width x height): 100 MP covers phone and camera photos; a 30000x30000 PNG of
# 109 KB would need 2.7 GB of RGB. Checked from the header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 100_000_000


class ImageLoadError(ValueError):
    """An input could not be read as an image; the message names it.

    ``kind``: "missing", "format" (not an image / not an accepted type), "too_large" or "broken"."""

    def __init__(self, message: str, kind: str = "broken") -> None:
        super().__init__(message)
        self.kind = kind


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("the image has NaN or infinite pixel values")
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


def decode_image(source: str | Path | bytes | IO[bytes] | Image.Image, name: str | None = None,
                 max_pixels: int | None = None, formats: Sequence[str] | None = None) -> Image.Image:
    """Decode a file path, encoded bytes or a binary file object (or convert a PIL image) to RGB.

    ``name``: how errors name the input (default: the path, else "<bytes>"). ``max_pixels``: the
    width x height limit (default :data:`MAX_IMAGE_PIXELS`). ``formats``: accepted Pillow format names
    (e.g. ``("JPEG", "PNG")``), detected from the magic bytes; None accepts any. Raises
    :class:`ImageLoadError` for every failure."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        what = name or "the image"
        img = source
    else:
        if isinstance(source, (str, Path)):
            path = Path(source)
            what = name or str(path)
            if not path.is_file():
                raise ImageLoadError(f"image file not found: {what}", "missing")
            opener: str | Path | IO[bytes] = path
        elif isinstance(source, (bytes, bytearray, memoryview)):
            what = name or "<bytes>"
            opener = io.BytesIO(bytes(source))
        else:
            what = name or str(getattr(source, "name", "") or "<stream>")
            opener = source
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(opener)  # the header only
        except Exception as err:  # noqa: BLE001 - whatever Pillow raises, the caller gets one clear error
            if isinstance(err, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
                raise ImageLoadError(f"cannot read image {what}: over the limit of {limit} pixels ({err})",
                                     "too_large") from None
            raise ImageLoadError(f"cannot read image {what}: not a readable image ({_reason(err)})",
                                 "format") from None
    w, h = img.size
    if w * h > limit:
        raise ImageLoadError(f"cannot read image {what}: {w}x{h} pixels is over the limit of {limit} pixels",
                             "too_large")
    if formats is not None and img.format not in formats:
        raise ImageLoadError(f"cannot read image {what}: type {img.format} is not accepted "
                             f"(accepted: {', '.join(formats)})", "format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # decode now, so a truncated file fails here and not in a later transform
            try:
                upright = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - a damaged EXIF block only loses the rotation
                upright = img
            rgb = to_rgb(upright if upright is not None else img)
    except Exception as err:  # noqa: BLE001 - truncated data, bad decoder state, NaN pixels, ...
        if img is not source:
            img.close()
        raise ImageLoadError(f"cannot read image {what}: {_reason(err)}") from None
    if img is not source and rgb is not img:
        img.close()  # releases a multi-frame file's handle
    return rgb


def _reason(err: BaseException) -> str:
    # Pillow names an in-memory input by its repr ("<_io.BytesIO object at 0x...>"): say "the data".
    text = re.sub(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>", "the data", str(err)).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_image(source: ImageInput) -> Image.Image:
    """Open an image file (or pass a PIL image through) as upright RGB; see :func:`decode_image`."""
    return decode_image(source)


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
