"""Fashion-MNIST (Debian ``dataset-fashion-mnist``, MIT) as a zero-shot classification check.

70,000 28 px greyscale product photos (60k train, 10k test) of 10 classes. ``lexvla data fetch
fashion-mnist`` fetches the pinned .deb, unpacks its idx files and writes the test images (and, with
``--splits train,test``, the train images) as PNGs plus a ``pairs.jsonl`` manifest (caption
``a photo of a {class}``, key = the class). As a retrieval set (``--dataset fashion-mnist``) the texts
are the 10 class prompts, so image->text R@1 is zero-shot top-1 accuracy.
"""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .._assets import AssetNotFoundError, cache_dir
from ..io import WriterLock, atomic_write, atomic_write_json
from .fetch import PinnedPackage, extract_deb, fetch_package

logger = logging.getLogger(__name__)

FASHION_PACKAGE = PinnedPackage("debian", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
                                "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0", 30900652, "MIT")
PREFIX = "usr/share/datasets/fashion-mnist/"
CLASSES: tuple[str, ...] = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                            "bag", "ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
PROMPT = "a photo of a {}"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format, gzip or raw) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} bytes (truncated?)")
    return arr.reshape(shape)


def fashion_root(root: str | Path | None = None) -> Path:
    return Path(root).expanduser() if root is not None else cache_dir("data", "fashion-mnist")


@dataclass
class FashionReport:
    root: Path
    counts: dict[str, int]
    up_to_date: bool


def fetch_fashion_mnist(splits: tuple[str, ...] = ("test",), root: str | Path | None = None,
                        source_dir: str | Path | None = None, downloads: str | Path | None = None,
                        package: PinnedPackage = FASHION_PACKAGE, progress: bool = True) -> FashionReport:
    """Fetch the .deb, unpack the idx files and write ``<split>/images/*.png`` + ``<split>/pairs.jsonl``."""
    from tqdm.auto import tqdm

    from .records import write_manifest

    bad = [s for s in splits if s not in FILES]
    if bad or not splits:
        raise ValueError(f"fashion-mnist splits must be among {sorted(FILES)}, got {list(splits)}")
    root = fashion_root(root)
    counts, fresh = {}, False
    with WriterLock(root, what="fashion-mnist data"):
        deb = fetch_package(package, Path(downloads) if downloads else None, Path(source_dir) if source_dir else None)
        raw = extract_deb(deb, root / "idx", PREFIX)
        for split in splits:
            folder = root / split
            if (folder / "pairs.jsonl").is_file():
                counts[split] = len((folder / "pairs.jsonl").read_text().splitlines())
                continue
            fresh = True
            images, labels = (read_idx(raw / name) for name in FILES[split])
            if len(images) != len(labels):
                raise ValueError(f"{raw}: {len(images)} images but {len(labels)} labels in {split}")
            rows = []
            for i in tqdm(range(len(images)), desc=f"fashion-mnist {split}", disable=not progress, unit="img"):
                path = folder / "images" / f"{i:05d}.png"
                if not path.is_file():
                    buf = io.BytesIO()
                    Image.fromarray(images[i], "L").save(buf, format="PNG")
                    atomic_write(path, buf.getvalue(), fsync=False)
                name = CLASSES[int(labels[i])]
                rows.append({"id": f"fashion-{split}-{i:05d}", "image": f"images/{i:05d}.png",
                             "caption": PROMPT.format(name), "key": name, "split": split, "label": int(labels[i])})
            write_manifest(folder / "pairs.jsonl", rows)
            counts[split] = len(rows)
        atomic_write_json(root / "classes.json", list(CLASSES))
    return FashionReport(root, counts, not fresh)


def manifest_path(split: str, root: str | Path | None = None) -> Path:
    path = fashion_root(root) / split / "pairs.jsonl"
    if not path.is_file():
        extra = f" --splits {split}" if split != "test" else ""
        raise AssetNotFoundError(f"fashion-mnist {split} is not prepared ({path} is missing); run: lexvla data "
                                 f"fetch fashion-mnist{extra}")
    return path
