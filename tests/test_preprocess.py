"""Every odd image mode loads as RGB; unreadable files fail with a message naming them."""

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.preprocess import ImageLoadError, ImagePreprocessor, load_image


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_odd_modes_become_rgb(tmp_path, mode):
    arr = (np.arange(32 * 24).reshape(24, 32) % 256).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16) * 257)
    ext = {"CMYK": "jpg", "YCbCr": "jpg", "F": "tiff", "I": "tiff"}.get(mode, "png")
    path = _save(img, tmp_path / f"x.{ext}")
    if mode == "I;16":
        assert Image.open(path).mode.startswith("I;16")
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (32, 24)
    x = ImagePreprocessor(16)(path)
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


def test_sixteen_bit_uses_full_range(tmp_path):
    arr = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    rgb = np.asarray(load_image(_save(Image.fromarray(arr), tmp_path / "a.png")))
    assert rgb.min() == 0 and rgb.max() == 255  # not clipped to white, not crushed to black


def test_transparent_pixels_composite_on_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgb = np.asarray(load_image(_save(img, tmp_path / "t.png")))
    assert (rgb == 255).all()
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert (np.asarray(load_image(_save(pal, tmp_path / "p.png", transparency=0))) == 255).all()


def test_truncated_and_non_image_files_are_named(tmp_path):
    good = _save(Image.new("RGB", (64, 64), (1, 2, 3)), tmp_path / "g.jpg", quality=95)
    data = good.read_bytes()
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(trunc)
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_image(txt)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_preprocess_normalises_with_model_statistics():
    pre = ImagePreprocessor(2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = pre(Image.new("RGB", (5, 5), (255, 0, 255)))
    assert torch.allclose(x[0, 0], torch.ones(2, 2)) and torch.allclose(x[0, 1], -torch.ones(2, 2))
