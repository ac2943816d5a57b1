"""Debian-packaged data sets (Fashion-MNIST, OpenClipart) from generated .deb fixtures."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from lexvla.data.clipart import CLIPART_PACKAGE, clean_title, fetch_clipart
from lexvla.data.fashion import CLASSES, FASHION_PACKAGE, fetch_fashion_mnist, read_idx
from lexvla.data.fetch import PinnedPackage, extract_deb


def make_deb(path, files: dict[str, bytes]) -> None:
    """An ar archive with debian-binary, control.tar.xz and data.tar.xz, as dpkg-deb builds it."""
    def tar_xz(entries: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"./control": b"Package: x\n"})),
               ("data.tar.xz", tar_xz({f"./{k}": v for k, v in files.items()}))]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, data in members:
            f.write(f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode())
            f.write(data + (b"\n" if len(data) % 2 else b""))


def pin(pkg: PinnedPackage, path) -> PinnedPackage:
    data = path.read_bytes()
    return PinnedPackage(pkg.registry, pkg.name, pkg.version, hashlib.sha256(data).hexdigest(), len(data))


def idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_deb(tmp_path):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    prefix = "usr/share/datasets/fashion-mnist/"
    files = {prefix + "t10k-images-idx3-ubyte.gz": idx(imgs), prefix + "t10k-labels-idx1-ubyte.gz": idx(labels),
             prefix + "train-images-idx3-ubyte.gz": idx(imgs[:5]), prefix + "train-labels-idx1-ubyte.gz": idx(labels[:5])}
    src = tmp_path / "src"
    src.mkdir()
    make_deb(src / FASHION_PACKAGE.filename, files)
    package = pin(FASHION_PACKAGE, src / FASHION_PACKAGE.filename)
    rep = fetch_fashion_mnist(("test",), root=tmp_path / "fm", source_dir=src, downloads=tmp_path / "dl",
                              package=package, progress=False)
    assert rep.counts == {"test": 30} and not rep.up_to_date
    assert np.array_equal(read_idx(tmp_path / "fm" / "idx" / "t10k-images-idx3-ubyte.gz"), imgs)
    row = json.loads((tmp_path / "fm" / "test" / "pairs.jsonl").read_text().splitlines()[3])
    assert row["key"] == CLASSES[3] and row["caption"] == f"a photo of a {CLASSES[3]}"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fm" / "test" / row["image"])), imgs[3])
    again = fetch_fashion_mnist(("test",), root=tmp_path / "fm", source_dir=src, downloads=tmp_path / "dl",
                                package=package, progress=False)
    assert again.up_to_date

    from lexvla.eval.retrieval_data import RetrievalDataConfig, load_retrieval_set

    rs = load_retrieval_set("fashion-mnist", RetrievalDataConfig(root=tmp_path / "fm", split="test"))
    assert len(rs.image_paths) == 30 and rs.texts[0] == "a photo of a t-shirt" and len(rs.texts) == 10


def test_extract_deb_is_staged(tmp_path):
    make_deb(tmp_path / "x.deb", {"usr/share/a/b.txt": b"hello", "usr/share/other.txt": b"no"})
    out = extract_deb(tmp_path / "x.deb", tmp_path / "out", "usr/share/a/")
    assert (out / "b.txt").read_bytes() == b"hello" and not (out / "other.txt").exists()
    with pytest.raises(ValueError, match="not a Debian package"):
        extract_deb(tmp_path / "out" / "b.txt", tmp_path / "o2", "")


def test_clean_title():
    assert clean_title("Soft Blue Couch") == "soft blue couch"
    assert clean_title("Aircraft3") == "aircraft"
    assert clean_title("flamingSoccerBall") == "flaming soccer ball"
    assert clean_title("ice cream cone scoop and 2") == "ice cream cone scoop"
    assert clean_title("Lemon SVG theme") is None  # collection name
    assert clean_title("Pesca") is None  # Italian
    assert clean_title("pansement") is None  # French
    assert clean_title("Mañana") is None
    assert clean_title("card", shared=40) is None  # shared by a whole collection


def _titled_png(title: str, colour: tuple[int, int, int]) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (20, 10), (*colour, 255)), (10, 5))
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_clipart_from_deb(tmp_path):
    prefix = "usr/share/openclipart/png/"
    titles = ["Red Apple", "Blue Car", "Lemon SVG theme", "Pesca", "Green Tree", "Yellow Bus", "Old Clock"]
    files = {f"{prefix}food/fruit/item_{i}.png": _titled_png(t, (30 * i, 100, 200)) for i, t in enumerate(titles)}
    src = tmp_path / "src"
    src.mkdir()
    make_deb(src / CLIPART_PACKAGE.filename, files)
    package = pin(CLIPART_PACKAGE, src / CLIPART_PACKAGE.filename)
    rep = fetch_clipart(root=tmp_path / "ca", size=32, source_dir=src, downloads=tmp_path / "dl",
                        package=package, progress=False)
    assert rep.files == 7 and rep.kept == 5 and rep.dropped["title"] == 2
    rows = [json.loads(x) for x in (tmp_path / "ca" / "pairs.jsonl").read_text().splitlines()]
    apple = next(r for r in rows if r["name"] == "red apple")
    assert apple["caption"] == ["red apple", "a clip art of red apple", "red apple: food, fruit"]
    with Image.open(tmp_path / "ca" / apple["image"]) as im:
        assert im.mode == "RGB" and im.size == (32, 32) and im.getpixel((0, 0)) == (255, 255, 255)
    assert fetch_clipart(root=tmp_path / "ca", size=32, source_dir=src, downloads=tmp_path / "dl",
                         package=package, progress=False).up_to_date

    from lexvla.train.config import DataSection
    from lexvla.train.data import SourceContext, build_source

    train = build_source(DataSection(source="clipart", options={"root": str(tmp_path / "ca")}),
                         SourceContext(0, 1, 0, None))
    assert len(train) == 3 * sum(1 for r in rows if r["split"] == "train")
