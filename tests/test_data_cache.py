"""Feature and text caches: round trip, reuse without recomputation, resume after a crash."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lexvla.data import (
    CachedPairDataset,
    CacheKey,
    ManifestSource,
    TarShardSource,
    TextVectorCache,
    build_dataloader,
    build_feature_cache,
)
from lexvla.data.cache import ArrayStore, backbone_fingerprint
from lexvla.preprocess import ImagePreprocessor

PREP = ImagePreprocessor(image_size=16)


class CountingBackbone:
    """A real (tiny, random) conv patch extractor that counts its calls; optionally dies after n calls."""

    def __init__(self, die_after: int | None = None) -> None:
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, kernel_size=4, stride=4)
        self.calls = 0
        self.images = 0
        self.die_after = die_after

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images += len(pixels)
        return self.conv(pixels).flatten(2).transpose(1, 2)  # (B, 16, 6)


def _make_manifest(tmp_path, n: int = 10, bad: int | None = 3):
    (tmp_path / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        path = tmp_path / "img" / f"{i}.png"
        if i == bad:
            path.write_bytes(b"not an image")
        else:
            rng = np.random.default_rng(i)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
        rows.append({"image": f"img/{i}.png", "caption": [f"picture {i}", f"image number {i}"]})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return ManifestSource(tmp_path / "m.jsonl")


def test_feature_cache_round_trip_and_reuse(tmp_path):
    src = _make_manifest(tmp_path)
    fn = CountingBackbone()
    res = build_feature_cache(tmp_path / "cache", src, fn, PREP, backbone="rand-conv", preprocessing="16px",
                              batch_size=4)
    store = res.store
    assert res.computed_rows == 9 and fn.images == 9  # one row per readable image, not per caption
    assert store.row_shape == (16, 6) and store.key.numpy_dtype == np.float16
    assert res.skips.counts == {"unreadable_image": 2}  # both captions of the unreadable image
    assert res.skips.seen == 20 and res.skips.yielded == 18
    # rows equal a direct computation (float16 storage)
    for i in (0, 5, 9):
        expected = fn(PREP([Image.open(tmp_path / "img" / f"{i}.png")]))[0]
        np.testing.assert_allclose(store.get(f"img/{i}.png").astype(np.float32), expected.detach().numpy(),
                                   rtol=2e-3, atol=2e-3)
    assert isinstance(store.get("img/0.png"), np.memmap)

    # second pass: the function is never called (it would raise)
    again = build_feature_cache(tmp_path / "cache", src, CountingBackbone(die_after=0), PREP,
                                backbone="rand-conv", preprocessing="16px")
    assert again.computed_rows == 0 and again.store.folder == store.folder
    # another backbone or preprocessing gets its own folder
    other = build_feature_cache(tmp_path / "cache", src, CountingBackbone(), PREP, backbone="rand-conv",
                                preprocessing="32px", dtype="float32")
    assert other.store.folder != store.folder and other.computed_rows == 9
    assert other.store.get("img/0.png").dtype == np.float32

    # the cached dataset serves (features, caption, id) for every pair with a cached image
    ds = CachedPairDataset(ArrayStore(store.folder))
    assert len(ds) == 18 and ds.stats.skipped == 0
    item = ds[3]
    assert item.caption == "image number 1" and item.id == "img/1.png#1" and item.features.dtype == torch.float16
    batch = next(iter(build_dataloader(ds, batch_size=5, shuffle=True, seed=0)))
    assert batch.features.shape == (5, 16, 6) and batch.pixels is None and len(batch.captions) == 5
    assert batch.features.dtype == torch.float32
    torch.testing.assert_close(batch.features[0], ds[ds.records.index(next(
        r for r in ds.records if r.id == batch.ids[0]))].features.float())
    # explicit pairs whose image is not cached are counted, not silently dropped
    ds2 = CachedPairDataset(store, pairs=src.pair_records())
    assert len(ds2) == 18 and ds2.stats.counts == {"not_in_cache": 2}


def test_feature_cache_resumes_after_a_crash(tmp_path):
    src = _make_manifest(tmp_path, n=12, bad=None)
    row_bytes = 16 * 6 * 2
    dying = CountingBackbone(die_after=2)  # 2 batches of 2 = 4 rows, chunks of 3 rows: 1 chunk committed
    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(tmp_path / "c", src, dying, PREP, backbone="b", preprocessing="p", batch_size=2,
                            chunk_bytes=3 * row_bytes)
    folder = next((tmp_path / "c").iterdir())
    assert not (folder / "index.json").exists() and (folder / "chunk-000000.json").exists()
    fresh = CountingBackbone()
    res = build_feature_cache(tmp_path / "c", src, fresh, PREP, backbone="b", preprocessing="p", batch_size=2,
                              chunk_bytes=3 * row_bytes)
    assert res.reused_rows == 3 and res.computed_rows == 9 and fresh.images == 9
    reference = build_feature_cache(tmp_path / "ref", src, CountingBackbone(), PREP, backbone="b",
                                    preprocessing="p", batch_size=5)
    assert sorted(res.store.ids) == sorted(reference.store.ids) and len(res.store) == 12
    for i in res.store.ids:
        np.testing.assert_array_equal(res.store.get(i), reference.store.get(i))
    assert len(CachedPairDataset(res.store)) == 24  # pair records survived the crash too


def test_feature_cache_from_streamed_tar_shards(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i in range(5):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buf, format="PNG")
            for name, data in ((f"{i:03d}.png", buf.getvalue()), (f"{i:03d}.txt", f"red {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    # a training stream of rank 1 of 2 that repeats endlessly: the cache still reads every sample, once
    src = TarShardSource([str(tmp_path / "s.tar")], rank=1, world_size=2, repeat=True)
    res = build_feature_cache(tmp_path / "c", src, CountingBackbone(), PREP, backbone="b", preprocessing="p")
    ds = CachedPairDataset(res.store)
    assert len(ds) == 5 and {ds[i].caption for i in range(5)} == {f"red {i}" for i in range(5)}


def test_text_vector_cache(tmp_path):
    seen: list[str] = []

    def text_fn(captions: list[str]) -> torch.Tensor:
        seen.extend(captions)
        return torch.tensor([[len(c), c.count("a"), 1.0] for c in captions])

    caps = ["a red circle", "a blue square", "a red circle", "teal"]
    cache = TextVectorCache(tmp_path, caps, text_fn, text_key="frozen-llm", batch_size=2)
    assert sorted(seen) == sorted(set(caps))
    vec = cache.vectors(["teal", "a red circle"])
    assert vec.tolist() == [[4.0, 1.0, 1.0], [12.0, 1.0, 1.0]]
    seen.clear()
    TextVectorCache(tmp_path, caps, text_fn, text_key="frozen-llm")
    assert seen == []
    with pytest.raises(KeyError, match="not in cache"):
        cache.vectors(["unknown caption"])


def test_cache_key_and_backbone_fingerprint():
    with pytest.raises(ValueError, match="dtype"):
        CacheKey("b", "p", "d", dtype="int8")
    with pytest.raises(ValueError, match="backbone"):
        CacheKey("", "p", "d")
    assert CacheKey("b", "p", "d").digest() != CacheKey("b", "p", "e").digest()
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # BN has a 0-dim int buffer
    fp = backbone_fingerprint(a)
    assert fp == backbone_fingerprint(a)
    with torch.no_grad():
        a[0].weight[0, 0] += 1
    assert backbone_fingerprint(a) != fp
    a[1].num_batches_tracked += 1
    assert len({fp, backbone_fingerprint(a)}) == 2


def test_cached_features_feed_the_model_like_raw_pixels(tmp_path, tiny_model):
    """easy-vqa -> feature cache with the model's own backbone -> batches -> same lexical vectors."""
    pytest.importorskip("easy_vqa")
    from lexvla.data import load_easyvqa

    ds = load_easyvqa("test", caption_mode="first")
    ds.records, ds._index = ds.records[:6], ds._index[:6]
    res = build_feature_cache(tmp_path, ds, tiny_model.image_features, tiny_model.preprocess,
                              backbone=backbone_fingerprint(tiny_model.backbone),
                              preprocessing=repr(tiny_model.preprocess), dtype="float32")
    cached = next(iter(build_dataloader(CachedPairDataset(res.store), batch_size=6, shuffle=False)))
    raw = next(iter(build_dataloader(ds, batch_size=6, preprocess=tiny_model.preprocess, shuffle=False)))
    assert cached.ids == raw.ids and cached.captions == raw.captions
    with torch.no_grad():
        a = tiny_model.encode_image_features(cached.features).vectors
        b = tiny_model.encode_image(raw.pixels).vectors
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
