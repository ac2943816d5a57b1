"""Masked emoji collages: masks follow the pasted alpha exactly, splits stay apart, draws are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from emoji_fixtures import prepare
from lexvla.data.collages import IGNORE, CollageConfig, CollageSet

pytest.importorskip("cairosvg")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("collage-emoji"))[0]


def _config(root, **kw):
    base = {"split": "train", "count": 12, "size": 96, "root": str(root)}
    return CollageConfig(**(base | kw))


def test_masks_match_pasted_alpha_exactly(root):
    cs = CollageSet(_config(root))
    for i in range(len(cs)):
        c = cs[i]
        size = c.mask.shape[0]
        # top-most covering object per pixel, scanning from the last paste down (independent of the
        # forward overwrite the generator uses)
        expected = np.zeros((size, size), np.int64)
        decided = np.zeros((size, size), bool)
        for p in reversed(c.placements):
            a = np.zeros((size, size), np.int64)
            h, w = p.alpha.shape
            a[p.top:p.top + h, p.left:p.left + w] = p.alpha
            fresh = (a > 0) & ~decided
            expected[fresh & (a == 255)] = p.label
            expected[fresh & (a < 255)] = IGNORE
            decided |= a > 0
        assert np.array_equal(c.mask.astype(np.int64), expected), c.id
        assert 2 <= len(c.placements) <= 4
        assert len({p.label for p in c.placements}) == len(c.placements)  # distinct concepts
        # labelled pixels show exactly the object's colour (it is opaque and on top there)
        top = c.placements[-1]
        im = next(x for ims in cs.by_concept.values() for x in ims if x.id == top.image_id)
        h = top.alpha.shape[0]
        obj = cs._cutout(im).convert("RGBa").resize((h, h), Image.LANCZOS).convert("RGBA")
        obj = np.asarray(obj)
        sel = obj[..., 3] == 255
        window = c.image[top.top:top.top + h, top.left:top.left + h]
        assert np.array_equal(window[sel], obj[..., :3][sel])
        for p in c.placements:
            assert 0.3 * size - 1 <= p.alpha.shape[0] <= 0.6 * size + 1


def test_train_and_test_concepts_apart(root):
    train = CollageSet(_config(root, split="train"))
    test = CollageSet(_config(root, split="test"))
    assert train.concepts and test.concepts
    assert not set(train.concepts) & set(test.concepts)


def test_deterministic_from_seed(root):
    a = CollageSet(_config(root))[5]
    b = CollageSet(_config(root, count=40))[5]  # does not depend on how many are drawn
    c = CollageSet(_config(root, seed=1))[5]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)
    kinds = {CollageSet(_config(root))[i].background for i in range(12)}
    assert kinds == {"plain", "gradient", "photo"}


def test_registered_for_patchdis(root):
    from lexvla.eval.segmentation_data import SegDataConfig, load_segmentation_set

    full = load_segmentation_set("emoji-collages", SegDataConfig(root=root, split="train"))
    assert len(full.samples) == 500  # drawn lazily
    ds = load_segmentation_set("emoji-collages", SegDataConfig(root=root, split="train", limit=3))
    s = ds.samples[0]
    mask = s.load_mask()
    assert s.load_image().size == (224, 224) and mask.shape == (224, 224)
    assert set(np.unique(mask)) <= set(range(len(ds.class_names))) | {IGNORE}
    assert ds.class_names[0] == "background" and ds.background == 0


def test_write_masks_folder(root, tmp_path):
    from lexvla.data.records import read_manifest
    from lexvla.eval.segmentation_data import SegDataConfig, load_segmentation_set

    out = CollageSet(_config(root, count=3)).write(tmp_path / "c")
    ds = load_segmentation_set("masks-folder", SegDataConfig(root=out))
    assert len(ds.samples) == 3
    assert np.array_equal(ds.samples[0].load_mask(), CollageSet(_config(root, count=3))[0].mask)
    assert len(read_manifest(out / "pairs.jsonl")) == 3
