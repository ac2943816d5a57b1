"""`lexvla demo`: class-balanced batches, and a smoke run of the whole pipeline on lexvla-tiny."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import pytest

from lexvla.data.easyvqa import COLOURS, SHAPES, EasyVQAConfig, EasyVQADataset, EasyVQARecord, RecoveryStats
from lexvla.data.sampling import BalancedEasyVQA
from lexvla.demo import DemoConfig, register, run_demo


def _fake_dataset(per_class: dict[tuple[str, str], int]) -> EasyVQADataset:
    """Records only (no image is decoded by the ordering logic)."""
    cfg = EasyVQAConfig()
    records, i = [], 0
    for (colour, shape), n in per_class.items():
        for _ in range(n):
            caps = tuple(t.format(colour=colour, shape=shape) for t in cfg.templates)
            records.append(EasyVQARecord(i, f"/nonexistent/{i}.png", colour, shape, caps, "train"))
            i += 1
    return EasyVQADataset(records, RecoveryStats("train"), cfg, "train", caption_mode="first")


def test_balanced_batches_have_distinct_classes_and_use_every_image():
    classes = [(c, s) for c in COLOURS[:4] for s in SHAPES]  # 12 classes
    ds = _fake_dataset({cls: 3 + k % 4 for k, cls in enumerate(classes)})
    src = BalancedEasyVQA(ds, batch_size=12, batches=30, seed=1)
    assert len(src) == 12 * 30
    label = {r.key: (r.colour, r.shape) for r in ds.records}
    for b in range(30):
        block = [label[src.pair_record(b * 12 + j).image_id] for j in range(12)]
        assert len(set(block)) == 12, f"batch {b} repeats a class: {Counter(block).most_common(2)}"
    used = Counter(src.pair_record(i).image_id for i in range(len(src)))
    assert set(used) == set(label), "every image is drawn"
    # Without replacement within a class: counts of one class's images differ by at most one.
    for cls in classes:
        counts = [used[k] for k, v in label.items() if v == cls]
        assert max(counts) - min(counts) <= 1
    # Captions name the image's class; the order is fixed by the seed.
    rec = src.pair_record(5)
    colour, shape = label[rec.image_id]
    assert colour in rec.caption and shape in rec.caption
    again = BalancedEasyVQA(ds, batch_size=12, batches=30, seed=1)
    assert again.pair_records() == src.pair_records()
    assert BalancedEasyVQA(ds, 12, 30, seed=2).pair_records() != src.pair_records()


def test_balanced_batch_larger_than_the_classes_is_refused():
    ds = _fake_dataset({("red", "circle"): 2, ("blue", "circle"): 2})
    with pytest.raises(ValueError, match="exceeds the 2 colour x shape classes"):
        BalancedEasyVQA(ds, batch_size=3, batches=1)


def test_demo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match="train_images"):
        DemoConfig(train_images=0)
    with pytest.raises(ValueError, match="data"):
        DemoConfig(data="mnist")


def test_register_adds_the_demo_command():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--model", "lexvla-tiny", "--steps", "3", "--train-images", "40",
                              "--test-images", "20", "--batch-size", "4", "--out", "x", "--retrain"])
    assert (args.model, args.steps, args.train_images, args.test_images, args.batch_size, args.out, args.retrain) == (
        "lexvla-tiny", 3, 40, 20, 4, "x", True)
    assert callable(args.func)
    assert parser.parse_args(["demo"]).train_images == DemoConfig().train_images
    args = parser.parse_args(["demo", "--train-collages", "500", "--patchdis-image-size", "224"])
    assert (args.train_collages, args.patchdis_image_size) == (500, 224)


def test_demo_smoke_on_tiny_model(tmp_path):
    """The whole pipeline on the tiny random model and the easy-vqa preset: train LexVLA and the dense
    baseline, evaluate both, report; a rerun reuses the trained checkpoints."""
    cfg = DemoConfig(model="lexvla-tiny", data="easy-vqa", steps=2, batch_size=4, train_images=30, test_images=16,
                     collages=4, output_dir=str(tmp_path / "report"), cache_dir=str(tmp_path / "cache"), examples=2,
                     progress=False, patchdis_image_size=112)
    first = run_demo(cfg)
    assert first.trained_now
    report = tmp_path / "report"
    page = (report / "index.html").read_text()
    for png in ("curves.png", "image_words.png", "caption_words.png", "recall_vs_words.png", "overused.png",
                "collage_maps.png", "patch_words.png"):
        assert (report / png).stat().st_size > 1000, png
        assert f'src="{png}"' in page
    assert "I→T R@1" in page and "dense" in page
    row = first.retrieval["easy-vqa test"]
    for kind in ("lexvla", "dense"):
        assert row[kind]["images"] == 16
        for d in (row[kind]["i2t"], row[kind]["t2i"]):
            assert 0.0 <= d["R@1"] <= d["R@5"] <= d["R@10"] <= 1.0
    assert row["dense"]["words"]["image"] == 32  # the tiny LLM's width: dense
    assert 0.0 <= first.patchdis["lexvla"] <= 1.0 and 0.0 <= first.patchdis["dense"] <= 1.0
    assert 0.0 <= first.patchdis["lexvla_present"] <= 1.0 and 0.0 <= first.patchdis["dense_present"] <= 1.0
    assert first.patchdis["grid"] == [8, 8]  # 112 px on the 56 px tiny model: the 4x4 grid scaled
    assert first.overused_before and 0.0 <= first.top5_share["mean"] <= 1.0
    saved = json.loads((report / "results.json").read_text())
    assert saved["retrieval"] == first.retrieval

    second = run_demo(cfg)
    assert not second.trained_now, "the trained checkpoints are reused"
    assert second.retrieval == first.retrieval
