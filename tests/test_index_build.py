"""Building an index from a (tiny random) model: images + captions, unreadable images, resume after an
interruption, refusal of another model, text->image and image->text search, and the CLI."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lexvla
from lexvla.index import ModelMismatchError, SparseIndex, build_index
from lexvla.index.cli import register

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 40, 160)}
CAPTIONS = ["a red square", "a green circle", "a blue triangle", "a yellow star", "a black cat"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return lexvla.create_model("lexvla-tiny").eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (name, rgb) in enumerate(COLOURS.items()):
        arr = np.clip(np.array(rgb) + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(images / ("sub" if i % 2 else ".") / f"{name}.png")
    (images / "broken.png").write_bytes(b"not an image")
    captions = root / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    return images, captions


def reference_vectors(index: SparseIndex, model, images) -> dict[str, np.ndarray]:
    """Dense reference: the model's vectors sparsified like the index, by image id."""
    s = index.sparsify_settings
    out = {}
    for path in sorted(images.rglob("*.png")):
        if path.name == "broken.png":
            continue
        with torch.no_grad():
            v = model.encode_image([lexvla.load_image(path)]).sparsify(s.threshold, s.topk).vectors
        out[path.relative_to(images).as_posix()] = v[0].numpy()
    return out


def test_build_search_and_explain(tmp_path, model, data):
    images, captions = data
    report = build_index(model, images=images, captions=captions, out=tmp_path / "idx", batch_size=3,
                         progress=False)
    assert report.images_added == len(COLOURS) and report.captions_added == len(CAPTIONS)
    assert report.n_skipped == 1 and report.skipped[0].path.endswith("broken.png")
    with SparseIndex.open(tmp_path / "idx") as index:
        assert index.model_record.fingerprint == model.fingerprint()
        ref = reference_vectors(index, model, images)
        ids = sorted(ref)
        dense = np.stack([ref[i] for i in ids])
        # text -> images: same ranking and scores as the dense reference
        hits = index.search_text(model, "a red square", k=4)[0]
        with torch.no_grad():
            q = model.encode_text(["a red square"]).sparsify(index.sparsify_settings.threshold).vectors[0].numpy()
        scores = dense @ q
        top = np.argsort(-scores)[:4]
        assert [h.id for h in hits] == [ids[j] for j in top]
        for h, j in zip(hits, top):
            assert h.score == pytest.approx(float(scores[j]), rel=1e-4)
            assert sum(w.contribution for w in h.explanation.words) == pytest.approx(h.score, rel=1e-9)
            assert h.metadata["path"].endswith(h.id)
        # image -> images finds the image itself first; image -> texts returns captions
        self_hit = index.search_image(model, images / "sub" / "green.png", k=3)[0]
        assert self_hit[0].id == "sub/green.png"
        text_hits = index.search_image(model, images / "red.png", k=len(CAPTIONS), collection="texts")[0]
        assert sorted(h.metadata["text"] for h in text_hits) == sorted(CAPTIONS)
        assert all(h.explanation.words for h in text_hits)


def test_resume_after_interrupt(tmp_path, model, data):
    images, _ = data

    def stop_after_two(collection, done, total):
        if done >= 4:
            raise KeyboardInterrupt  # what Ctrl-C after the second batch does

    with pytest.raises(KeyboardInterrupt):
        build_index(model, images=images, out=tmp_path / "idx", batch_size=2, progress=False,
                    on_batch=stop_after_two)
    with SparseIndex.open(tmp_path / "idx") as index:
        assert len(index.store().manifest.shards) == 2  # both finished batches are committed
        committed = index.store().n_alive
    report = build_index(model, images=images, out=tmp_path / "idx", batch_size=2, progress=False)
    assert report.images_already_indexed == committed
    assert report.images_added == len(COLOURS) - committed
    once = build_index(model, images=images, out=tmp_path / "once", batch_size=100, progress=False)
    assert once.images_added == len(COLOURS)
    with SparseIndex.open(tmp_path / "idx") as resumed, SparseIndex.open(tmp_path / "once") as single:
        a, b = resumed.store(), single.store()
        assert sorted(a.ids()) == sorted(b.ids())
        rows_b = {i: r for r, i in enumerate(b.ids())}
        ma, mb = a.matrix().toarray(), b.matrix().toarray()
        for r, item_id in enumerate(a.ids()):
            np.testing.assert_allclose(ma[r], mb[rows_b[item_id]], rtol=1e-4, atol=1e-6)


def test_other_model_is_refused(tmp_path, model, data):
    images, _ = data
    build_index(model, images=[images / "red.png"], out=tmp_path / "idx", progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in other.parameters() if p.requires_grad).add_(0.5)  # "trained further"
    assert other.fingerprint() != model.fingerprint()
    with SparseIndex.open(tmp_path / "idx") as index, pytest.raises(ModelMismatchError, match="built with model"):
        index.search_text(other, "a red square")
    with pytest.raises(ModelMismatchError):
        build_index(other, images=[images / "blue.png"], out=tmp_path / "idx", progress=False)


def test_build_from_tar_shards(tmp_path, model, data):
    """WebDataset-style shards: images and their captions are indexed; a broken sample is reported."""
    import io
    import tarfile

    images, _ = data
    shard = tmp_path / "pairs-000.tar"
    with tarfile.open(shard, "w") as tar:
        def put(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for name in ("red", "blue", "yellow"):
            path = next(images.rglob(f"{name}.png"))
            put(f"{name}.png", path.read_bytes())
            put(f"{name}.txt", f"a {name} square".encode())
        put("broken.png", b"not an image")
        put("broken.txt", b"a broken picture")
    report = build_index(model, out=tmp_path / "idx", shards=str(shard), batch_size=2, progress=False)
    assert report.images_added == 3 and report.captions_added == 3 and report.n_skipped == 1
    again = build_index(model, out=tmp_path / "idx", shards=str(shard), batch_size=2, progress=False)
    assert again.images_added == 0 and again.images_already_indexed == 3
    with SparseIndex.open(tmp_path / "idx") as index:
        hits = index.search_image(model, images / "blue.png", k=3, collection="texts")[0]
        assert {h.metadata["text"] for h in hits} == {"a red square", "a blue square", "a yellow square"}
        assert index.search_image(model, images / "blue.png", k=1)[0][0].id == "blue"


def run_cli(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="lexvla")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_build_search_add_delete_info(tmp_path, data, capsys):
    images, captions = data
    idx = str(tmp_path / "idx")
    listing = images / "first.txt"  # a manifest: paths relative to it, which are also the ids
    listing.write_text("\n".join(p.name for p in sorted(images.glob("*.png"))[:3]))
    out = run_cli(["index", "build", "--model", "lexvla-tiny", "--images", str(listing), "--captions",
                   str(captions), "--out", idx, "--no-progress", "--json"], capsys)
    report = json.loads(out)
    assert report["images_added"] + report["n_skipped"] == 3
    res = json.loads(run_cli(["search", idx, "a blue triangle", "-k", "2", "--json"], capsys))
    assert list(res["results"]) == ["images"] and 1 <= len(res["results"]["images"]) <= 2
    for h in res["results"]["images"]:
        assert sum(w["contribution"] for w in h["words"]) == pytest.approx(h["score"], rel=1e-9)
    text = run_cli(["search", idx, "--image", str(images / "red.png"), "--target", "texts", "-k", "3"], capsys)
    assert text.splitlines()[0].lstrip().startswith("1 ") and "captions:" in text
    run_cli(["index", "add", idx, "--images", str(images), "--no-progress"], capsys)  # model from the index
    info = json.loads(run_cli(["index", "info", idx, "--json"], capsys))
    assert info["collections"]["images"]["items"] == len(COLOURS)
    assert info["model"]["name"] == "lexvla-tiny"
    run_cli(["index", "delete", idx, "red.png"], capsys)
    res = json.loads(run_cli(["search", idx, "--image", str(images / "red.png"), "-k", "10", "--json"], capsys))
    assert set(res["results"]) == {"images", "texts"}  # an image query also searches the captions
    assert "red.png" not in {h["id"] for h in res["results"]["images"]}
    assert len(res["results"]["texts"]) == len(CAPTIONS)
    assert "items" in run_cli(["index", "info", idx], capsys)
