"""Training collages: only training concepts, captions that name the pasted objects, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from emoji_fixtures import prepare
from lexvla.data.collages import CollageConfig, CollageSet
from lexvla.data.emoji import concept_name
from lexvla.data.train_collages import ONE_TEMPLATE, TrainCollageConfig, emoji_with_collages, name_all

pytest.importorskip("cairosvg")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("train-collage-emoji"))[0]


def _pairs(root, **kw):
    return emoji_with_collages({"count": 8, "size": 64, **kw}, styles=("noto", "openmoji"),
                               splits=("train", "subgroups-train"), root=str(root), captions=("emoji",))


def test_only_training_concepts_and_captions_name_the_objects(root):
    ds = _pairs(root, captions="mixed")
    tc = ds.second
    test_concepts = set(CollageSet(CollageConfig(split="test", count=1, root=str(root))).concepts)
    allowed = {im.id: im for im in ds.first.images}
    modes = set()
    for i in range(len(tc)):
        c = tc.collages.draw(i, mask=False)
        ims = [allowed[p.image_id] for p in c.placements]  # KeyError: an image outside the training pairs
        assert not {im.concept for im in ims} & test_concepts
        names = [concept_name(tc.collages.by_concept[im.concept], im.concept) for im in ims]
        assert tc.names(i) == names
        caption = tc.pair_record(i).caption
        if caption == name_all(names):
            modes.add("all")
        else:
            assert caption in {ONE_TEMPLATE.format(n) for n in names}
            modes.add("one")
    assert modes == {"one", "all"}
    assert name_all(["a", "b", "c"]) == "emojis of a, b and c"


def test_concatenated_pairs_are_deterministic(root):
    ds = _pairs(root)
    n = len(ds.first)
    assert len(ds) == n + 8
    recs = ds.pair_records()
    assert len({r.image_id for r in recs[n:]}) == 8 and not {r.image_id for r in recs[n:]} & {r.image_id for r in recs[:n]}
    again = _pairs(root)
    assert [r.caption for r in again.pair_records()] == [r.caption for r in recs]
    assert np.array_equal(np.asarray(ds[n + 2].image), np.asarray(again[n + 2].image))
    assert ds[n + 2].image.size == (64, 64) and ds[n + 2].caption == recs[n + 2].caption
    assert ds.fingerprint() == again.fingerprint() != _pairs(root, seed=1).fingerprint()
    assert [r.caption for r in _pairs(root, captions="one").pair_records()[n:]] != [r.caption for r in recs[n:]]


def test_registered_training_source(root):
    from lexvla.data.sampling import register_sources
    from lexvla.train.data import TRAIN_SOURCES, SourceContext

    register_sources()
    src = TRAIN_SOURCES["emoji-heldout-collages"](
        {"styles": ["noto"], "splits": ["train"], "root": str(root), "collages": {"count": 3, "size": 64}},
        SourceContext(0, 1, 0, None))
    assert len(src) == len(src.first) + 3
    with pytest.raises(ValueError, match="captions"):
        TrainCollageConfig(captions="some")
