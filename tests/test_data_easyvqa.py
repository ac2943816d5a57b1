"""easy-vqa as an image-text set: label recovery from questions, captions, exact shape masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from lexvla.data import COLOURS, SHAPES, EasyVQAConfig, analyse_shape_pixels, load_easyvqa, write_masks
from lexvla.data.easyvqa import PALETTE, mask_class_names, recover_labels, shape_from_mask

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def test_split():
    return load_easyvqa("test")


# --------------------------------------------------------------------------------------- recovery
def _plain_image(tmp_path, name: str, colour: str, shape: str) -> str:
    img = Image.new("RGB", (64, 64), (240, 238, 250))
    draw = ImageDraw.Draw(img)
    box = (20, 18, 44, 42)
    fill = PALETTE[colour]
    {"circle": lambda: draw.ellipse(box, fill=fill), "rectangle": lambda: draw.rectangle(box, fill=fill),
     "triangle": lambda: draw.polygon([(20, 42), (44, 42), (32, 18)], fill=fill)}[shape]()
    path = tmp_path / f"{name}.png"
    img.save(path)
    return str(path)


def test_recovery_rules_on_synthetic_questions(tmp_path):
    qa = [
        # image 0: direct answers
        ("what color is the shape?", "red", 0), ("what shape is in the image?", "circle", 0),
        # image 1: colour named in the question, shape by a positive yes/no and a negated "no"
        ("what is the blue shape?", "triangle", 1), ("is there not a triangle?", "no", 1),
        # image 2: colour only by elimination (7 colours ruled out, negations flipped), shape named
        *[(f"is there not a {c} shape in the image?", "yes", 2) for c in COLOURS if c != "teal"],
        ("what color is the rectangle?", "teal", 99),  # about an image that has no file
        ("is there a rectangle?", "yes", 2),
        # image 3: conflicting colours
        ("what color is the shape?", "red", 3), ("does the image contain a green shape?", "yes", 3),
        ("what shape does the image contain?", "circle", 3),
        # image 4: shape unknown (only one shape ruled out)
        ("what color is the shape?", "gray", 4), ("is no circle present?", "yes", 4),
    ]
    labels = {0: ("red", "circle"), 1: ("blue", "triangle"), 2: ("teal", "rectangle"), 3: ("red", "circle"),
              4: ("gray", "rectangle")}
    paths = {i: _plain_image(tmp_path, str(i), *cs) for i, cs in labels.items()}
    q, a, ids = zip(*qa, strict=True)
    records, stats = recover_labels(q, a, ids, paths, EasyVQAConfig(), "train")
    got = {r.image_id: (r.colour, r.shape) for r in records}
    assert got == {0: ("red", "circle"), 1: ("blue", "triangle"), 2: ("teal", "rectangle")}
    assert stats.total == 6 and stats.kept == 3 and stats.by_elimination == 1
    assert dict(stats.dropped) == {"colour_conflict": 1, "shape_unknown": 1, "missing_image": 1}
    assert stats.examples["colour_conflict"] == [3] and stats.examples["missing_image"] == [99]

    no_elim, stats2 = recover_labels(q, a, ids, paths, EasyVQAConfig(use_elimination=False), "train")
    assert 2 not in {r.image_id for r in no_elim} and stats2.dropped["colour_unknown"] == 1

    # pixel fallback labels image 4's shape from its mask
    fb, stats3 = recover_labels(q, a, ids, paths, EasyVQAConfig(pixel_fallback=True), "train")
    assert {r.image_id: (r.colour, r.shape) for r in fb}[4] == ("gray", "rectangle")
    assert stats3.from_pixels == 1


def test_pixel_check_drops_a_label_that_contradicts_the_pixels(tmp_path):
    paths = {0: _plain_image(tmp_path, "0", "green", "circle")}
    q, a, ids = ["what color is the circle?"], ["red"], [0]
    records, stats = recover_labels(q, a, ids, paths, EasyVQAConfig(), "train")
    assert records == [] and stats.dropped["pixel_colour_mismatch"] == 1
    records, _ = recover_labels(q, a, ids, paths, EasyVQAConfig(check_pixels=False), "train")
    assert [(r.colour, r.shape) for r in records] == [("red", "circle")]


def test_real_splits_counts_and_disjoint_train_val(test_split):
    rec = test_split.recovery
    assert rec.total == 1000
    assert rec.kept + sum(rec.dropped.values()) == rec.total
    assert rec.kept == len(test_split.records) > 800  # most images have recoverable labels
    assert set(rec.dropped) <= {"colour_unknown", "shape_unknown", "colour_conflict", "shape_conflict"}
    fast = EasyVQAConfig(check_pixels=False)  # reading 4,000 images adds seconds; the test split checks pixels
    train, val = load_easyvqa("train", fast), load_easyvqa("val", fast)
    t_ids, v_ids = {r.image_id for r in train.records}, {r.image_id for r in val.records}
    assert not t_ids & v_ids
    assert len(t_ids) + len(v_ids) == train.recovery.kept > 3500
    assert len(v_ids) == round(0.1 * train.recovery.kept)
    again = load_easyvqa("val", EasyVQAConfig(check_pixels=False, use_elimination=True))
    assert {r.image_id for r in again.records} == v_ids  # deterministic
    other_seed = load_easyvqa("val", EasyVQAConfig(check_pixels=False, seed=1))
    assert {r.image_id for r in other_seed.records} != v_ids
    assert {(r.colour, r.shape) for r in train.records} == {(c, s) for c in COLOURS for s in SHAPES}


def test_captions_name_colour_and_shape(test_split):
    templates = test_split.config.templates
    assert len(templates) >= 4
    for r in test_split.records[:50]:
        assert len(set(r.captions)) == len(templates)
        for cap in r.captions:
            words = cap.split()
            assert r.colour in words and r.shape in words
            others = (set(COLOURS) | set(SHAPES)) - {r.colour, r.shape}
            assert not others & set(words)
    assert len(test_split) == len(test_split.records) * len(templates)
    pair = test_split[3]
    assert pair.caption in test_split.records[0].captions and pair.image.size == (64, 64)
    assert len(load_easyvqa("test", caption_mode="first")) == len(test_split.records)
    head = test_split.head(5)
    assert head.records == test_split.records[:5] and len(head) == 5 * len(templates)
    assert head.recovery is test_split.recovery
    with pytest.raises(ValueError, match="caption template"):
        EasyVQAConfig(templates=("a {colour} thing",))


# ------------------------------------------------------------------------------------------ masks
def test_mask_is_exact_on_a_drawn_shape():
    """Hard-edged shape: mask == drawn pixels. Anti-aliased (4x supersampled): mask == coverage > 1/2."""
    bg, fg = (235, 240, 232), PALETTE["brown"]
    hard = Image.new("RGB", (64, 64), bg)
    ImageDraw.Draw(hard).polygon([(5, 50), (40, 60), (30, 8)], fill=fg)
    truth = np.all(np.asarray(hard) == fg, axis=-1)
    np.testing.assert_array_equal(analyse_shape_pixels(hard).mask, truth.astype(np.uint8))

    big = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(big).ellipse((37, 50, 181, 203), fill=255)
    coverage = np.asarray(big, dtype=np.float64).reshape(64, 4, 64, 4).mean(axis=(1, 3)) / 255.0
    rgb = np.asarray(bg) * (1 - coverage[..., None]) + np.asarray(fg) * coverage[..., None]
    px = analyse_shape_pixels(rgb.round().astype(np.uint8))
    assert px.background == bg and px.foreground == fg and px.nearest_colour() == "brown"
    decided = np.abs(coverage - 0.5) > 0.02  # rounding to uint8 cannot flip these
    np.testing.assert_array_equal(px.mask[decided], (coverage > 0.5)[decided].astype(np.uint8))
    assert shape_from_mask(px.mask) == "circle"
    with pytest.raises(ValueError, match="no shape"):
        analyse_shape_pixels(Image.new("RGB", (8, 8), bg))


def test_masks_of_real_images(test_split):
    for r in test_split.records[:40]:
        arr = np.asarray(r.image())
        px = r.pixels()
        exact_fg = np.all(arr == px.foreground, axis=-1)
        exact_bg = np.all(arr == px.background, axis=-1)
        assert (px.mask[exact_fg] == 1).all() and (px.mask[exact_bg] == 0).all()
        # pixels of neither colour are anti-aliased edges: on the background-shape line, next to the shape
        edge = ~exact_fg & ~exact_bg
        fg, bg = np.asarray(px.foreground, float), np.asarray(px.background, float)
        on_line = bg + px.alpha[..., None] * (fg - bg)
        assert np.abs(arr[edge] - on_line[edge]).max() < 12
        # (a triangle's thin tip has no pure pixel: its anti-aliased pixels reach 3 pixels beyond)
        assert (ndimage.distance_transform_cdt(~exact_fg, metric="chessboard")[edge] <= 3).all()
        assert ndimage.label(px.mask, structure=np.ones((3, 3)))[1] == 1  # one connected shape
        assert px.nearest_colour() == r.colour
        assert shape_from_mask(px.mask) == r.shape


def test_write_masks(tmp_path, test_split):
    small = load_easyvqa("test")
    small.records = small.records[:6]
    out = write_masks(small, tmp_path / "masks", label="shape")
    names = (tmp_path / "masks" / "class_names.txt").read_text().split("\n")[:-1]
    assert names == list(mask_class_names("shape")) == ["background", *SHAPES] and out.count == 6
    for r in small.records:
        m = np.asarray(Image.open(tmp_path / "masks" / f"{r.key}.png"))
        assert set(np.unique(m)) == {0, names.index(r.shape)}
        np.testing.assert_array_equal(m > 0, r.mask() == 1)
    lines = (tmp_path / "masks" / "index.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert mask_class_names("colour_shape")[1] == f"{COLOURS[0]} {SHAPES[0]}"
