"""Emoji data set: code normalisation, concept splits across styles, resumable fetch, registrations.

Runs on generated fixture packages (tests/emoji_fixtures.py), never the real npm tarballs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emoji_fixtures import build_packages
from lexvla.data.emoji import (
    CONCEPT_SPLITS,
    EmojiConfig,
    PrepareSettings,
    build_catalogue,
    concept_split,
    fetch_emoji,
    load_emoji,
    normalize_code,
    read_style,
    strip_skin_tones,
)

pytest.importorskip("cairosvg")

STYLES = ("noto", "fluent", "openmoji")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("emoji")
    pins = build_packages(base / "packages")
    root = base / "prepared"
    report = fetch_emoji(STYLES, root=root, settings=PrepareSettings(size=48), source_dir=base / "packages",
                         downloads=base / "downloads", progress=False, packages=pins)
    return base, pins, root, report


def test_normalize_code_spellings():
    assert normalize_code("0023-fe0f-20e3") == "23-20E3"
    assert normalize_code("0023-FE0F-20E3") == normalize_code("23-20e3")
    assert normalize_code("2764-FE0F") == "2764"
    # lobehub: underscores and no terminator; emoji-datasource: dashes and E007F
    assert normalize_code("1f3f4-e0067_e0062_e0065_e006e_e0067") == "1F3F4-E0067-E0062-E0065-E006E-E0067-E007F"
    assert normalize_code("1f3f4-e0067-e0062-e0065-e006e-e0067-e007f") == "1F3F4-E0067-E0062-E0065-E006E-E0067-E007F"
    assert normalize_code("1f3f4") == "1F3F4"  # a plain black flag is not a tag sequence
    assert strip_skin_tones("1F44B-1F3FD") == "1F44B"
    with pytest.raises(ValueError, match="not an emoji code"):
        normalize_code("smile")


def test_skin_tones_take_base_keywords_and_concept():
    from emoji_fixtures import catalogue_rows

    cat = build_catalogue(catalogue_rows())
    tone = cat["1F44B-1F3FD"]
    assert tone.concept == "1F44B" and tone.keywords == ("hand", "wave", "waving")
    assert tone.name == "waving hand: tone 2"


def test_join_rate_per_style(prepared):
    _, _, _, report = prepared
    for style in STYLES:
        r = report.styles[style]
        assert r.images > 50
        assert r.join_rate >= 0.99, (style, r.unmatched)
        assert r.skipped["component"] == 1  # the skin-tone swatch is not an object


def test_split_is_by_concept_across_styles(prepared):
    _, _, root, _ = prepared
    split_of: dict[str, set[str]] = {}
    styles_of: dict[str, set[str]] = {}
    for style in STYLES:
        for im, splits in read_style(root, style):
            own = {s for s in splits if s in (*CONCEPT_SPLITS, "flags")}
            assert len(own) == 1, (im.id, splits)
            split_of.setdefault(im.concept, set()).update(own)
            styles_of.setdefault(im.concept, set()).add(style)
    assert all(len(s) == 1 for s in split_of.values()), {c: s for c, s in split_of.items() if len(s) > 1}
    assert {next(iter(s)) for s in split_of.values()} == {"train", "val", "test", "flags"}
    assert any(len(s) == 3 for s in styles_of.values())
    # skin-tone variants share their base's split; flags are only in 'flags'
    assert split_of["1F44B"] == {concept_split("1F44B")}
    assert split_of["1F1E9-1F1EA"] == {"flags"}
    assert split_of["1F3F4-E0067-E0062-E0065-E006E-E0067-E007F"] == {"flags"}


def test_held_out_subgroups_and_cross_style(prepared):
    _, _, root, _ = prepared
    held = load_emoji("all", "subgroups-test", root=str(root), caption_mode="first")
    assert {im.subgroup for im in held.images} == {"animal-bird", "animal-marine"}
    train = load_emoji("all", "subgroups-train", root=str(root))
    assert not {im.concept for im in train.images} & {im.concept for im in held.images}
    cross_train = load_emoji("all", "cross-train", root=str(root))
    cross_test = load_emoji("all", "cross-test", root=str(root))
    assert {im.style for im in cross_train.images} == {"noto", "openmoji"}
    assert {im.style for im in cross_test.images} == {"fluent"}


def test_images_are_composited_and_resized_once(prepared):
    from PIL import Image

    _, _, root, _ = prepared
    im, _ = read_style(root, "fluent")[0]
    with Image.open(im.image) as rgb, Image.open(im.rgba) as rgba:
        assert rgb.mode == "RGB" and rgb.size == (48, 48)
        assert rgba.mode == "RGBA" and rgba.size == (48, 48)
        assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent corner -> plain background


def test_captions_are_configurable(prepared):
    _, _, root, _ = prepared
    ds = load_emoji("noto", "all", root=str(root))
    rec = next(r for r in ds.pair_records() if r.image_id == "noto/1F44B")
    caps = [r.caption for r in ds.pair_records() if r.image_id == "noto/1F44B"]
    assert caps == ["waving hand", "an emoji of waving hand", "waving hand: hand, wave, waving"]
    assert rec.key == "1F44B"
    custom = load_emoji("noto", "all", root=str(root), captions=("a picture of {name}",), caption_mode="first")
    assert custom.pair_record(0).caption.startswith("a picture of ")
    with pytest.raises(ValueError, match="caption"):
        EmojiConfig(captions=("no placeholder",))


def test_second_fetch_does_nothing(prepared):
    base, pins, root, _ = prepared
    again = fetch_emoji(STYLES, root=root, settings=PrepareSettings(size=48), source_dir=base / "packages",
                        downloads=base / "downloads", progress=False, packages=pins)
    assert again.up_to_date
    assert all(r.prepared == 0 for r in again.styles.values())


def test_pin_mismatch_is_a_clear_error(tmp_path, prepared):
    import dataclasses

    base, pins, _, _ = prepared
    bad = dict(pins, noto=dataclasses.replace(pins["noto"], sha256="0" * 64))
    with pytest.raises(ValueError, match="does not match the pinned"):
        fetch_emoji(("noto",), root=tmp_path / "r", source_dir=base / "packages", downloads=tmp_path / "dl",
                    progress=False, packages=bad)


_KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from emoji_fixtures import build_packages
from lexvla.data.emoji import PrepareSettings, fetch_emoji
base = Path({base!r})
pins = build_packages(base / "packages", extra_svgs=400)
print("ready", flush=True)
fetch_emoji(("openmoji",), root=base / "prepared", settings=PrepareSettings(size=160),
            source_dir=base / "packages", downloads=base / "dl", progress=False, packages=pins)
"""


def test_killed_fetch_resumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    code = _KILLED_RUN.format(tests=str(Path(__file__).parent), base=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    images = tmp_path / "prepared" / "openmoji" / "images"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if images.is_dir() and len(list(images.glob("*.png"))) >= 30:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the fetch finished before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(images.glob("*.png")))
    assert not (tmp_path / "prepared" / "openmoji" / "pairs.jsonl").exists()

    from emoji_fixtures import build_packages as rebuild

    pins = rebuild(tmp_path / "packages", extra_svgs=400)
    report = fetch_emoji(("openmoji",), root=tmp_path / "prepared", settings=PrepareSettings(size=160),
                         source_dir=tmp_path / "packages", downloads=tmp_path / "dl", progress=False, packages=pins)
    r = report.styles["openmoji"]
    assert r.reused >= done_before - 1  # the image being written at the kill may be redone
    assert r.reused + r.prepared == r.images > done_before
    leftovers = [p for p in (tmp_path / "prepared" / "openmoji").rglob(".*.tmp")]
    assert not leftovers


def test_registered_for_training_and_retrieval(prepared, monkeypatch):
    from lexvla.eval.retrieval_data import RetrievalDataConfig, load_retrieval_set
    from lexvla.train.config import DataSection
    from lexvla.train.data import SourceContext, build_source

    _, _, root, _ = prepared
    src = build_source(DataSection(source="emoji-noto", options={"split": "train", "root": str(root)}),
                       SourceContext(0, 1, 0, None))
    pair = src[0]
    assert pair.image.size == (48, 48) and pair.caption
    monkeypatch.setenv("LEXVLA_CACHE", str(root.parent / "cache"))
    (root.parent / "cache" / "data").mkdir(parents=True, exist_ok=True)
    link = root.parent / "cache" / "data" / "emoji"
    if not link.exists():
        link.symlink_to(root)
    rs = load_retrieval_set("emoji-noto", RetrievalDataConfig(split="test"))
    assert len(rs.texts) == len(set(rs.image_keys.tolist()))  # one text per concept
    assert all(t.startswith("an emoji of ") for t in rs.texts)


def test_missing_svg_renderer_is_a_clear_error(tmp_path, prepared, monkeypatch):
    from lexvla._assets import AssetNotFoundError

    base, pins, _, _ = prepared
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # as if it were not installed
    with pytest.raises(AssetNotFoundError, match="--styles noto,fluent"):
        fetch_emoji(("openmoji",), root=tmp_path / "r", source_dir=base / "packages", downloads=tmp_path / "dl",
                    progress=False, packages=pins)


def test_openmoji_extras_do_not_duplicate_unicode_names():
    from emoji_fixtures import _entry, catalogue_rows

    rows = catalogue_rows() + [_entry("E0A1", "bird", "bird", "extras-openmoji", "animals-nature"),
                               _entry("E0A2", "blue bird", "bird", "extras-openmoji", "animals-nature")]
    cat = build_catalogue(rows)
    assert cat["E0A1"].group == "duplicate-name"  # skipped when preparing, counted under that reason
    assert cat["E0A2"].name == "blue bird" and cat["1F426"].name == "bird"
