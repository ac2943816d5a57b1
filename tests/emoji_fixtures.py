"""Tiny stand-ins for the three emoji npm packages, shaped like the real ones (member paths, code
spellings, openmoji.json fields), built from generated RGBA drawings. Used by the emoji and collage tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from lexvla.data.emoji import FLUENT_PACKAGE, NOTO_PACKAGE, OPENMOJI_PACKAGE
from lexvla.data.fetch import PinnedPackage


def _entry(hexcode: str, name: str, tags: str, group: str, subgroup: str, base: str = "") -> dict:
    return {"emoji": "", "hexcode": hexcode, "group": group, "subgroups": subgroup, "annotation": name,
            "tags": tags, "openmoji_tags": "", "skintone": 1 if base else "", "skintone_combination": "",
            "skintone_base_emoji": "", "skintone_base_hexcode": base, "unicode": 1, "order": 1}


def catalogue_rows(n_plain: int = 60) -> list[dict]:
    rows = [_entry(f"{0x1F600 + i:X}", f"face number {i}", f"face, thing{i}", "smileys-emotion", "face-smiling")
            for i in range(n_plain)]
    rows += [
        _entry("1F426", "bird", "bird, animal", "animals-nature", "animal-bird"),
        _entry("1F41F", "fish", "fish, sea", "animals-nature", "animal-marine"),
        _entry("1F44B", "waving hand", "hand, wave, waving", "people-body", "hand-fingers-open"),
        *[_entry(f"1F44B-{t}", f"waving hand: tone {k}", "", "people-body", "hand-fingers-open", "1F44B")
          for k, t in enumerate(("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"))],
        _entry("0023-FE0F-20E3", "keycap: #", "keycap", "symbols", "keycap"),
        _entry("2764-FE0F", "red heart", "heart, love", "smileys-emotion", "heart"),
        _entry("1F1E9-1F1EA", "flag: Germany", "flag", "flags", "country-flag"),
        _entry("1F1EB-1F1F7", "flag: France", "flag", "flags", "country-flag"),
        _entry("1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", "flag: England", "flag, gbeng", "flags",
               "subdivision-flag"),
        _entry("1F3FB", "light skin tone", "skin tone", "component", "skin-tone"),
    ]
    return rows


def drawing(i: int, size: int) -> Image.Image:
    """An anti-aliased disc of a colour of its own on a transparent canvas (alpha has a soft band)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = size * (0.3 + 0.15 * ((i * 7) % 5) / 4)
    d = np.sqrt((xx - size / 2) ** 2 + (yy - size / 2) ** 2)
    alpha = np.clip(r - d + 0.5, 0, 1)
    rgb = np.array([(i * 53) % 256, (i * 97 + 80) % 256, (i * 31 + 160) % 256], np.float32)
    arr = np.zeros((size, size, 4), np.uint8)
    arr[..., :3] = rgb
    arr[..., 3] = np.round(alpha * 255).astype(np.uint8)
    return Image.fromarray(arr, "RGBA")


def _svg(i: int) -> bytes:
    colour = f"#{(i * 53) % 256:02x}{(i * 97 + 80) % 256:02x}{(i * 31 + 160) % 256:02x}"
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72" width="72" height="72">'
            f'<circle cx="36" cy="36" r="{14 + i % 12}" fill="{colour}" stroke="#000" stroke-width="2"/></svg>').encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def noto_name(code: str) -> str:
    """emoji-datasource spelling: lower-case, leading zeros kept, FE0F where the real package has it."""
    return code.lower()


def fluent_name(code: str) -> str:
    """lobehub spelling: lower-case, tag sequences joined by '_' and without their E007F."""
    parts = code.lower().split("-")
    if parts[0] == "1f3f4" and len(parts) > 2 and parts[-1] == "e007f":
        return parts[0] + "-" + "_".join(parts[1:-1])
    return "-".join(parts)


def build_packages(folder: Path, rows: list[dict] | None = None, extra_svgs: int = 0) -> dict[str, PinnedPackage]:
    """Write the three fixture tarballs into ``folder``; returns pins for ``fetch_emoji(packages=...)``."""
    rows = rows if rows is not None else catalogue_rows()
    folder.mkdir(parents=True, exist_ok=True)
    pins = {}
    codes = [r["hexcode"] for r in rows]
    for pkg, style in ((OPENMOJI_PACKAGE, "openmoji"), (NOTO_PACKAGE, "noto"), (FLUENT_PACKAGE, "fluent")):
        path = folder / pkg.filename
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w") as tar:  # mtime 0: the same bytes (and pin) every build
            if style == "openmoji":
                all_rows = rows + [_entry(f"E{0x100 + k:03X}", f"extra {k}", "extra", "extras-openmoji", "objects")
                                   for k in range(extra_svgs)]
                _add(tar, "package/data/openmoji.json", json.dumps(all_rows).encode())
                for i, r in enumerate(all_rows):
                    _add(tar, f"package/color/svg/{r['hexcode']}.svg", _svg(i))
            elif style == "noto":
                _add(tar, "package/emoji.json", json.dumps(
                    [{"unified": c, "name": r["annotation"].upper()} for c, r in zip(codes, rows)]).encode())
                for i, c in enumerate(codes):
                    _add(tar, f"package/img/google/64/{noto_name(c)}.png", _png(drawing(i, 64)))
            else:
                for i, c in enumerate(codes):
                    if i % 10 == 9:  # Fluent lacks some emoji, as the real package does
                        continue
                    _add(tar, f"package/assets/{fluent_name(c.replace('-FE0F', ''))}.webp", _png(drawing(i, 96), "WEBP"))
        data = path.read_bytes()
        pins[style if style != "openmoji" else "openmoji"] = PinnedPackage(
            "npm", pkg.name, pkg.version, hashlib.sha256(data).hexdigest(), len(data))
    pins["names"] = pins["openmoji"]
    return pins


def prepare(base: Path, size: int = 48):
    """Build the fixture packages under ``base`` and prepare all three styles (returns root, pins, report)."""
    from lexvla.data.emoji import PrepareSettings, fetch_emoji

    pins = build_packages(base / "packages")
    root = base / "prepared"
    report = fetch_emoji(("noto", "fluent", "openmoji"), root=root, settings=PrepareSettings(size=size),
                         source_dir=base / "packages", downloads=base / "downloads", progress=False, packages=pins)
    return root, pins, report
