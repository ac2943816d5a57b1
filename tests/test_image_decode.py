"""Issue 12.9-12.11: one image decoder for every path (file, bytes, upload, tar member) with a pixel cap,
EXIF orientation, and one clear ImageLoadError naming the input for every failure."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lexvla import ImageLoadError, load_image
from lexvla.data.sources import TarShardSource, decode_image
from lexvla.preprocess import decode_image as core_decode


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width x height (a few hundred bytes: the pixels are never there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bomb(side: int = 65000) -> bytes:
    """A small real JPEG whose frame header is patched to claim side x side pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5: sof + 9] = struct.pack(">HH", side, side)
    return bytes(raw)


BOMBS = {"png-30000": png_bomb(), "jpeg-65000": jpeg_bomb()}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_a_bomb_is_refused_on_every_decode_path(tmp_path: Path, kind: str) -> None:
    data = BOMBS[kind]
    assert len(data) < 2000
    path = tmp_path / f"bomb.{kind.split('-')[0]}"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=rf"{path}.*(pixels|limit|bomb)"):
        load_image(path)  # file path (encode, index build, training folders)
    with pytest.raises(ImageLoadError, match="member.png"):
        decode_image(data, name="member.png")  # bytes (parquet / HF sources)
    with pytest.raises(ImageLoadError, match="<stream>"):
        core_decode(io.BytesIO(data))  # a file object with no name: named plainly, not by its repr

    from lexvla.web.service import UploadError, WebConfig, decode_upload

    with pytest.raises(UploadError) as err:  # web upload
        decode_upload(data, WebConfig())
    assert err.value.status == 413

    shard = tmp_path / "s.tar"  # tar member (WebDataset shards: training and index build)
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("k1.png", data), ("k1.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    src = TarShardSource([str(shard)], name="bombs")
    items = list(src.iter_all())
    assert len(items) == 1 and not hasattr(items[0], "image")
    assert sum(src.stats.counts.values()) == 1


def test_index_build_skips_a_bomb_and_names_it(tmp_path: Path, tiny_model) -> None:
    from lexvla.index import build_index

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bomb.png").write_bytes(png_bomb())
    Image.new("RGB", (24, 24), (0, 200, 0)).save(tmp_path / "imgs" / "ok.png")
    report = build_index(tiny_model, images=tmp_path / "imgs", out=tmp_path / "idx", progress=False)
    assert report.images_added == 1
    assert [s.id for s in report.skipped] == ["bomb.png"] and "limit" in report.skipped[0].reason


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    upright = Image.new("RGB", (40, 20), (255, 0, 0))
    upright.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote (20 x 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": undoes the ROTATE_90 above
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    for img in (load_image(path), decode_image(path.read_bytes(), name="phone.jpg")):
        assert img.size == (40, 20)
        arr = np.asarray(img, dtype=np.int32)
        assert arr[10, 5, 0] > 200 and arr[10, 5, 2] < 60  # red on the left, as a browser shows it
        assert arr[10, 35, 2] > 200 and arr[10, 35, 0] < 60


def test_nan_float_tiff_is_an_error_not_a_black_image(tmp_path: Path) -> None:
    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    arr[3, 3] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(arr, mode="F").save(path)
    with pytest.raises(ImageLoadError, match=rf"{path}.*NaN"):
        load_image(path)


@pytest.mark.parametrize("payload", [b"", b"not an image at all", png_bomb(8, 8)[:40], jpeg_bomb(16)[:-200]])
def test_every_decode_failure_is_one_clear_error(payload: bytes) -> None:
    with pytest.raises(ImageLoadError, match="cannot read image x.bin") as err:
        decode_image(payload, name="x.bin")
    assert "object at 0x" not in str(err.value)  # never an object repr (issue 12.12)
