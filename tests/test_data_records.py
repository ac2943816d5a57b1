"""One pairs manifest, read the same way by training, evaluation, index building and CAL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lexvla.data.records import PairRecord, read_manifest, write_manifest


@pytest.fixture
def manifest(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows = [
        {"id": "a", "image": "0.png", "caption": ["a dark square", "dark"], "key": "dark", "split": "test"},
        {"id": "b", "image": "1.png", "caption": "a grey square", "key": "grey", "split": ["train", "test"],
         "colour": "grey"},
        {"image": "2.png", "caption": "a light square", "split": "train"},
        {"image": "2.png", "caption": "light"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_manifest_fields_and_ids(manifest):
    recs = read_manifest(manifest)
    assert [r.id for r in recs] == ["a#0", "a#1", "b", "2.png#0", "2.png#1"]
    b = recs[2]
    assert b.key == "grey" and b.split == ("train", "test") and b.meta == {"colour": "grey"}
    assert b.image == str(manifest.parent / "1.png") and b.image_id == "1.png" and b.match_key == "grey"
    assert [r.id for r in read_manifest(manifest, split="test")] == ["a#0", "a#1", "b"]


def test_round_trip_and_record_dict(tmp_path, manifest):
    recs = read_manifest(manifest)
    out = write_manifest(tmp_path / "out" / "again.jsonl", recs)
    again = read_manifest(out, image_root=manifest.parent)
    assert [(r.id, r.caption, r.key, r.split, r.meta) for r in again] == [(r.id, r.caption, r.key, r.split, r.meta) for r in recs]
    assert PairRecord.from_dict(recs[2].to_dict()) == recs[2]


def test_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "caption": "ok"}\n{"caption": "no image"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a record has no 'image'"):
        read_manifest(bad)
    bad.write_text('{"image": "x.png", "caption": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_manifest(bad)
    bad.write_text('{"id": "x", "image": "x.png", "caption": "ok"}\n{"id": "x", "image": "y.png", "caption": "b"}\n')
    with pytest.raises(ValueError, match="occurs twice"):
        read_manifest(bad)


def test_every_consumer_reads_the_same_manifest(manifest):
    from lexvla.cal.data import read_manifest as cal_manifest
    from lexvla.data import ManifestSource
    from lexvla.eval.retrieval_data import RetrievalDataConfig, load_retrieval_set
    from lexvla.index.build import collect_images, read_captions

    ids = [r.id for r in read_manifest(manifest)]
    train = ManifestSource(manifest, id_key="id")
    assert [r.id for r in train.pair_records()] == ids
    rs = load_retrieval_set("manifest", RetrievalDataConfig(annotations=manifest, split="train"))
    assert len(rs.image_paths) == 2 and rs.texts == ["a grey square", "a light square"]  # rows of split train
    rs_all = load_retrieval_set("manifest", RetrievalDataConfig(annotations=manifest, split="test"))
    assert rs_all.texts == ["a dark square", "dark", "a grey square"]
    assert [c.id for c in read_captions(manifest)] == ids
    assert [i.id for i in collect_images(manifest)] == ["a", "b", "2.png"]
    assert [e.target for e in cal_manifest(manifest)] == [r.caption for r in read_manifest(manifest)]


def test_contact_sheet_spreads_over_images(tmp_path, manifest):
    from lexvla.data.sheet import contact_sheet, spread

    recs = read_manifest(manifest)
    picked = spread(recs, 2)
    assert [r.image_id for r in picked] == ["0.png", "2.png"]  # first and last image, first caption each
    out = contact_sheet([(Image.open(r.image), r.caption) for r in picked], tmp_path / "s.png", cols=2, tile=32)
    with Image.open(out) as im:
        assert im.size == (2 * 32 + 3 * 4, 32 + 30 + 4)
