"""Pair sources (manifest, tar shards, HF datasets), skip accounting, collate and loaders."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from lexvla.data import (
    EpochSampler,
    HFDatasetSource,
    ManifestSource,
    Pair,
    PairCollator,
    Skipped,
    SkipStats,
    TarShardSource,
    build_dataloader,
    expand_shards,
)
from lexvla.preprocess import ImagePreprocessor


def png_bytes(colour=(200, 30, 30), size=(12, 10), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


BROKEN = b"\xff\xd8\xff\xe0 this is not really a jpeg"


# ------------------------------------------------------------------------------------------ manifest
@pytest.fixture
def manifest_dir(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    (tmp_path / "img" / "b.jpg").write_bytes(png_bytes((0, 0, 255), fmt="JPEG"))
    (tmp_path / "img" / "bad.jpg").write_bytes(BROKEN)
    return tmp_path


def test_jsonl_manifest_counts_bad_images_and_empty_captions(manifest_dir):
    rows = [
        {"image": "img/a.png", "caption": "a red square"},
        {"image": "img/bad.jpg", "caption": "a broken file"},
        {"image": "img/missing.png", "caption": "no such file"},
        {"image": "img/b.jpg", "caption": "   "},
        {"image": "img/b.jpg", "caption": ["a blue square", "", "blue"]},
    ]
    path = manifest_dir / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    src = ManifestSource(path)
    # empty captions are counted when the manifest is read; pair ids number captions per image
    assert src.stats.counts == Counter({"empty_caption": 2})
    assert src.stats.examples["empty_caption"] == ["img/b.jpg#0", "img/b.jpg#2"]
    assert [r.id for r in src.pair_records()] == ["img/a.png#0", "img/bad.jpg#0", "img/missing.png#0",
                                                  "img/b.jpg#1", "img/b.jpg#3"]
    items = list(src)
    pairs = [i for i in items if isinstance(i, Pair)]
    assert [p.caption for p in pairs] == ["a red square", "a blue square", "blue"]
    assert pairs[0].image.mode == "RGB" and pairs[0].image.size == (12, 10)
    assert {p.image_id for p in pairs[1:]} == {"img/b.jpg"}
    assert [(s.id, s.reason) for s in items if isinstance(s, Skipped)] == [
        ("img/bad.jpg#0", "unreadable_image"), ("img/missing.png#0", "unreadable_image")]
    assert src.stats.seen == 7 and src.stats.yielded == 3 and src.stats.skipped == 4
    report = src.stats.report()
    assert "unreadable_image: 2" in report and "img/bad.jpg#0" in report and "empty_caption: 2" in report


def test_csv_manifest_with_id_column_and_image_root(manifest_dir):
    path = manifest_dir / "list.csv"
    path.write_text("key,file,text\nk1,a.png,red\nk2,bad.jpg,broken\nk3,b.jpg,\n")
    src = ManifestSource(path, image_root=manifest_dir / "img", image_key="file", caption_key="text", id_key="key")
    assert len(src) == 2 and src.stats.counts["empty_caption"] == 1
    got = [src[i] for i in range(len(src))]
    assert isinstance(got[0], Pair) and got[0].id == "k1"
    assert got[1] == Skipped("k2", "unreadable_image")
    with pytest.raises(ValueError, match="no 'image' field"):
        ManifestSource(path)
    dup = manifest_dir / "dup.csv"
    dup.write_text("key,file,text\nk1,a.png,red\nk1,b.jpg,blue\n")
    with pytest.raises(ValueError, match="occurs twice"):
        ManifestSource(dup, image_key="file", caption_key="text", id_key="key")


def test_collate_and_loader_with_model_preprocess(manifest_dir):
    rows = [{"image": "img/a.png", "caption": "red"}, {"image": "img/bad.jpg", "caption": "x"},
            {"image": "img/b.jpg", "caption": "blue"}]
    path = manifest_dir / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    src = ManifestSource(path)
    loader = build_dataloader(src, batch_size=3, preprocess=ImagePreprocessor(image_size=16), shuffle=False)
    (batch,) = list(loader)
    assert batch.pixels.shape == (2, 3, 16, 16) and batch.features is None
    assert batch.captions == ["red", "blue"] and len(batch) == 2
    assert batch.skipped == [Skipped("img/bad.jpg#0", "unreadable_image")]
    totals = SkipStats(source="main")
    totals.add(batch.skipped)
    assert totals.counts["unreadable_image"] == 1
    raw = PairCollator()([src[0], src[1]])
    assert raw.images is not None and raw.pixels is None and len(raw) == 1
    assert len(PairCollator()([src[1]])) == 0  # a batch of skips only is empty, not an error


def test_skips_made_in_workers_are_merged_from_log_dir(manifest_dir, tmp_path):
    path = manifest_dir / "w.jsonl"
    path.write_text("\n".join(json.dumps({"image": f"img/{n}", "caption": "c"})
                              for n in ["a.png", "bad.jpg", "b.jpg", "bad.jpg"]))
    log_dir = tmp_path / "skips"
    src = ManifestSource(path, log_dir=str(log_dir))
    loader = build_dataloader(src, batch_size=1, num_workers=2, shuffle=False)
    n_good = sum(len(b) for b in loader)
    merged = SkipStats.from_dir(log_dir, source=src.stats.source)
    assert n_good == 2 and merged.counts["unreadable_image"] == 2
    assert sorted(merged.examples["unreadable_image"]) == ["img/bad.jpg#0", "img/bad.jpg#1"]


# ---------------------------------------------------------------------------------------- tar shards
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, n_shards: int, per_shard: int) -> tuple[list[str], set[str], dict[str, str]]:
    """Shards of jpg+txt / png+json samples, with one bad sample of each kind in some shards."""
    good, bad = set(), {}
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:03d}{i:04d}"
                if i % 2:
                    _add(tar, f"{key}.jpg", png_bytes((i * 20 % 255, s * 40 % 255, 9), fmt="JPEG"))
                    _add(tar, f"{key}.txt", f"caption {key}".encode())
                else:
                    _add(tar, f"{key}.png", png_bytes())
                    _add(tar, f"{key}.json", json.dumps({"caption": f"caption {key}", "w": 12}).encode())
                good.add(key)
            if s == 1:
                _add(tar, "bad1.jpg", BROKEN)
                _add(tar, "bad1.txt", b"fine caption")
                _add(tar, "bad2.jpg", png_bytes())
                _add(tar, "bad2.txt", b" \n")
                _add(tar, "bad3.jpg", png_bytes())
                bad.update({"bad1": "unreadable_image", "bad2": "empty_caption", "bad3": "no_caption_member"})
            if s == 2:
                _add(tar, "bad4.txt", b"caption without image")
                bad["bad4"] = "no_image_member"
    return [str(folder / f"shard-{s:03d}.tar") for s in range(n_shards)], good, bad


def _read_all(shards, world: int, workers: int) -> tuple[Counter, Counter]:
    """(how often each good id came, how often each (skipped id, reason) came)."""
    ids, skipped = Counter(), Counter()
    for rank in range(world):
        src = TarShardSource(shards, rank=rank, world_size=world)
        for batch in build_dataloader(src, batch_size=3, num_workers=workers):
            ids.update(batch.ids)
            skipped.update((s.id, s.reason) for s in batch.skipped)
            assert all(c == f"caption {i}" for c, i in zip(batch.captions, batch.ids, strict=True))
            assert all(im.mode == "RGB" for im in batch.images or [])  # None: every sample skipped
    return ids, skipped


@pytest.mark.parametrize("n_shards", [5, 3])  # 5 >= 2x2 readers: whole shards; 3 < 4: sample-level split
def test_tar_shards_split_over_2_ranks_x_2_workers_exactly_once(tmp_path, n_shards):
    shards, good, bad = write_shards(tmp_path, n_shards=n_shards, per_shard=7)
    ids, skipped = _read_all(shards, world=2, workers=2)
    assert set(ids) == good and max(ids.values()) == 1
    assert skipped == Counter(bad.items())  # every bad sample reported once, with its reason


def test_tar_source_stats_brace_pattern_and_repeat(tmp_path):
    shards, good, bad = write_shards(tmp_path, n_shards=3, per_shard=4)
    src = TarShardSource(str(tmp_path / "shard-{000..002}.tar"), name="toy")
    assert src.shards == shards
    items = list(src)
    assert src.stats.seen == len(good) + len(bad) and src.stats.yielded == len(good)
    assert src.stats.counts == Counter(bad.values())
    assert {i.id for i in items if isinstance(i, Pair)} == good
    png_pair = next(i for i in items if isinstance(i, Pair) and int(i.id) % 2 == 0)  # even keys are PNGs
    assert png_pair.image.getpixel((0, 0)) == (200, 30, 30) and png_pair.image.size == (12, 10)
    quiet = TarShardSource(shards, yield_skips=False)
    assert all(isinstance(i, Pair) for i in quiet) and quiet.stats.skipped == len(bad)
    looping = TarShardSource(shards, repeat=True, shuffle_shards=True, seed=3)
    first_two_epochs = [i.id for i in itertools.islice(looping, 2 * len(items))]
    assert Counter(first_two_epochs) == Counter({i.id: 2 for i in items})


def test_truncated_shard_is_counted_not_fatal(tmp_path):
    shards, good, _ = write_shards(tmp_path, n_shards=1, per_shard=6)
    with open(shards[0], "rb") as f:
        data = f.read()
    with open(shards[0], "wb") as f:
        f.write(data[: len(data) // 2])
    src = TarShardSource(shards)
    got = [i for i in src if isinstance(i, Pair)]
    assert 0 < len(got) < len(good) and src.stats.counts["unreadable_shard"] == 1


def test_expand_shards():
    assert expand_shards("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert expand_shards("x-{1..2}-{0..1}.tar") == ["x-1-0.tar", "x-1-1.tar", "x-2-0.tar", "x-2-1.tar"]
    assert expand_shards("a.tar,b.tar") == ["a.tar", "b.tar"]
    with pytest.raises(ValueError, match="empty"):
        expand_shards("{5..1}.tar")
    with pytest.raises(ValueError, match="rank"):
        TarShardSource(["a.tar"], rank=2, world_size=2)


# -------------------------------------------------------------------------------------- HF datasets
def test_hf_dataset_source_columns_and_skips(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "p.png").write_bytes(png_bytes((1, 2, 3)))
    ds = datasets.Dataset.from_dict({
        "img": [{"bytes": png_bytes(), "path": None}, {"bytes": BROKEN, "path": "broken.jpg"},
                {"bytes": png_bytes((0, 255, 0)), "path": None}, {"bytes": png_bytes(), "path": None}],
        "sentences": [["red one", "red two"], ["broken"], [""], ["fourth"]],
        "uid": ["u0", "u1", "u2", "u3"],
    }).cast_column("img", datasets.Image())
    src = HFDatasetSource(ds, image_column="img", caption_column="sentences", id_column="uid", name="toy")
    assert [r.id for r in src.pair_records()] == ["u0#0", "u0#1", "u1", "u3"]
    assert src.stats.counts == Counter({"empty_caption": 1})
    items = list(src)
    assert [(i.id, i.caption) for i in items if isinstance(i, Pair)] == [
        ("u0#0", "red one"), ("u0#1", "red two"), ("u3", "fourth")]
    assert items[2] == Skipped("u1", "unreadable_image")
    assert items[0].image_id == items[1].image_id == "u0"

    by_path = datasets.Dataset.from_dict({"file": ["p.png", "nope.png"], "caption": ["a", "b"]})
    src2 = HFDatasetSource(by_path, image_column="file", image_root=tmp_path)
    assert isinstance(src2[0], Pair) and src2[0].image.getpixel((0, 0)) == (1, 2, 3)
    assert src2[1] == Skipped("1#0", "unreadable_image")
    with pytest.raises(ValueError, match="no column 'text'"):
        HFDatasetSource(by_path, image_column="file", caption_column="text")
    by_path.save_to_disk(str(tmp_path / "saved"))
    assert len(HFDatasetSource(str(tmp_path / "saved"), image_column="file", image_root=tmp_path)) == 2


# ------------------------------------------------------------------------------------------ sampler
def test_epoch_sampler_is_deterministic_rank_split_and_resumable():
    a = EpochSampler(10, seed=1, rank=0, world_size=2)
    b = EpochSampler(10, seed=1, rank=1, world_size=2)
    assert sorted(list(a) + list(b)) == list(range(10))
    assert list(a) == list(EpochSampler(10, seed=1, rank=0, world_size=2))
    order = list(a)
    a.set_epoch(1)
    assert list(a) != order
    full = list(a)
    a.set_start(3)
    assert list(a) == full[3:] and len(a) == 2
    odd = [list(EpochSampler(7, shuffle=False, rank=r, world_size=3)) for r in range(3)]
    assert [len(o) for o in odd] == [3, 3, 3] and set(sum(odd, [])) == set(range(7))
    assert torch.is_tensor(torch.tensor(odd))
