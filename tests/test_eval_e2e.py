"""End-to-end evaluation runs with the tiny random model on tiny generated datasets."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import lexvla
from lexvla.eval import (
    PatchDisConfig,
    RetrievalConfig,
    RetrievalDataConfig,
    SegDataConfig,
    evaluate_patchdis,
    evaluate_retrieval,
    load_retrieval_set,
    load_segmentation_set,
    sparsity_analysis,
)
from lexvla.eval.cli import register
from lexvla.eval.encode import Sparsification, VectorCache, encode_cached
from lexvla.eval.metrics import key_positives, ranks_from_scores, recall_from_ranks
from lexvla.outputs import LexicalOutput
from test_eval_data import write_karpathy  # tests/ is on sys.path (no package)


@pytest.fixture(scope="module")
def model():
    m = lexvla.create_model("lexvla-tiny")
    return m.eval()


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LEXVLA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _colour_images(root, n=4):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")


def test_retrieval_end_to_end_matches_direct_computation(tmp_path, model, cache_root):
    write_karpathy(tmp_path, "flickr30k", n_test=4)
    data = load_retrieval_set("flickr30k", RetrievalDataConfig(root=tmp_path))
    cfg = RetrievalConfig(progress=False, batch_size=3)
    result = evaluate_retrieval(model, data, cfg)
    # the same numbers straight from the model, without the batching / caching / chunking machinery
    with torch.no_grad():
        img = model.encode_image([str(p) for p in data.image_paths]).vectors
        txt = model.encode_text(data.texts).vectors
    th = 1 / len(model.vocab) ** 0.5
    img, txt = img * (img > th), txt * (txt > th)
    ranks = ranks_from_scores(img @ txt.T, key_positives(data.image_keys, data.text_keys))
    assert result.image_to_text.recall == pytest.approx(recall_from_ranks(ranks).recall)
    assert result.sparsification["value"] == pytest.approx(th)
    assert result.num_images == 4 and result.num_texts == 20
    assert "image->text" in result.table()
    out = json.loads(result.save(tmp_path / "r.json").read_text())
    assert out["protocol"]["captions_per_image"] == 5 and out["ties"] == "pessimistic"
    assert len(list((cache_root / "eval" / "vectors").glob("*.safetensors"))) == 2


def test_second_evaluation_reads_the_cache(tmp_path, model, cache_root, monkeypatch):
    write_karpathy(tmp_path, "flickr30k", n_test=2)
    data = load_retrieval_set("flickr30k", RetrievalDataConfig(root=tmp_path))
    first = evaluate_retrieval(model, data, RetrievalConfig(progress=False))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the encoder ran although the vectors are cached")

    monkeypatch.setattr(model, "encode_image", must_not_run)
    monkeypatch.setattr(model, "encode_text", must_not_run)
    second = evaluate_retrieval(model, data, RetrievalConfig(progress=False, sparsification="topk:10"))
    assert second.num_texts == first.num_texts == 10 and second.active_words["text"] <= 10


def test_cache_is_used_and_keyed_by_inputs(tmp_path, cache_root):
    class Counting:
        """A dense 'baseline' with the encode API: counts how often it really encodes."""

        calls = 0

        def fingerprint(self):
            return "counting-v1"

        def encode_text(self, texts):
            Counting.calls += 1
            return LexicalOutput(torch.tensor([[float(len(t)), 1.0] for t in texts]))

    enc = Counting()
    cache = VectorCache.default()
    a = encode_cached(enc, "text", ["ab", "c"], cache=cache, progress=False)
    b = encode_cached(enc, "text", ["ab", "c"], cache=cache, progress=False)
    assert Counting.calls == 1 and torch.equal(a, b)
    encode_cached(enc, "text", ["ab", "cd"], cache=cache, progress=False)
    assert Counting.calls == 2
    with pytest.raises(ValueError, match="empty"):
        encode_cached(enc, "text", [], cache=None, progress=False)


def test_patchdis_end_to_end(tmp_path, model):
    folder = tmp_path / "mf"
    _colour_images(folder / "images", 3)
    (folder / "masks").mkdir()
    for i in range(3):
        m = np.zeros((30, 40), np.uint8)
        m[5:20, 10:30] = 1 + i % 2
        m[0, :] = 255
        Image.fromarray(m).save(folder / "masks" / f"{i}.png")
    (folder / "class_names.txt").write_text("background\ncat\ndog\n")
    data = load_segmentation_set("masks-folder", SegDataConfig(root=folder))
    res = evaluate_patchdis(model, data, PatchDisConfig(progress=False, figures=1), out_dir=tmp_path / "out")
    assert 0.0 <= res.miou <= 1.0 and res.grid == (4, 4)
    assert res.scored_classes == ["cat", "dog"] and res.iou["background"] is None  # background ignored
    assert 0.0 <= res.localisation_auc <= 1.0
    assert res.num_pixels == 3 * 15 * 20  # only object pixels are scored
    assert len(res.figures) == 1 and (tmp_path / "out").joinpath(res.figures[0].split("/")[-1]).is_file()
    with_bg = evaluate_patchdis(model, data, PatchDisConfig(progress=False, figures=0, background="class"))
    assert with_bg.num_pixels == 3 * 29 * 40 and "background" in with_bg.scored_classes


def test_sparsity_analysis_end_to_end(tmp_path, model, cache_root):
    write_karpathy(tmp_path, "flickr30k", n_test=3)
    data = load_retrieval_set("flickr30k", RetrievalDataConfig(root=tmp_path))
    settings = [Sparsification.none(), Sparsification(), Sparsification(None, topk=50)]
    rep = sparsity_analysis(model, data, RetrievalConfig(progress=False), settings, out_dir=tmp_path / "o")
    actives = [p["active_words"] for p in rep.points]
    assert actives[0] == len(model.vocab) and actives[2] <= 50
    assert rep.overused["text"] and {"word", "mean_activation", "active_share"} <= set(rep.overused["text"][0])
    assert rep.figure and (tmp_path / "o" / "sparsity_flickr30k.png").is_file()
    assert "FLOPS" in rep.table()


def test_cli_retrieval(tmp_path, cache_root, capsys, monkeypatch, model):
    import lexvla.eval.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda name: model)  # the fixture's tiny model: saves the load
    write_karpathy(tmp_path, "coco", n_test=3)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "retrieval", "--model", "lexvla-tiny", "--dataset", "coco", "--root",
                              str(tmp_path), "--out", str(tmp_path / "res"), "--no-progress", "--sparsify", "topk:64",
                              "--no-split-check"])
    assert args.func(args) == 0
    assert "R@1" in capsys.readouterr().out
    saved = json.loads((tmp_path / "res" / "retrieval_coco.json").read_text())
    assert saved["sparsification"] == {"spec": "topk:64", "mode": "topk", "threshold": None, "topk": 64,
                                       "value": 64.0, "default_threshold": False}
    assert saved["active_words"]["text"] <= 64


def test_patchdis_present_classes_and_image_size(tmp_path, model):
    """classes="present": an image whose ground truth holds one class gets it on every patch; image_size
    encodes on a larger grid with the same patch stride, and the model's own size comes back after."""
    folder = tmp_path / "mf"
    _colour_images(folder / "images", 2)
    (folder / "masks").mkdir()
    for i in range(2):
        m = np.zeros((30, 40), np.uint8)
        m[5:25, 5:35] = 1 + i  # image 0: cat only, image 1: dog only
        Image.fromarray(m).save(folder / "masks" / f"{i}.png")
    (folder / "class_names.txt").write_text("background\ncat\ndog\nbird\n")
    data = load_segmentation_set("masks-folder", SegDataConfig(root=folder))
    res = evaluate_patchdis(model, data, PatchDisConfig(progress=False, figures=0, classes="present"))
    assert res.pixel_accuracy == 1.0 and res.miou == 1.0 and res.classes == "present"
    assert model.backbone.cfg.image_size == 56 and model.backbone.grid == (4, 4)
    big = evaluate_patchdis(model, data, PatchDisConfig(progress=False, figures=0, image_size=112,
                                                        patch_scores="attributed", attention_window=1))
    assert big.grid == (8, 8) and big.image_size == 112 and big.patch_scores == "attributed"
    assert model.adapter.window is None
    assert model.backbone.grid == (4, 4) and model.backbone.preprocess.image_size == 56  # restored
    with pytest.raises(ValueError, match="patch stride"), model.backbone.at_image_size(100):
        pass


def test_attributed_patches_split_the_image_score():
    """Each word of the image vector sits on the patch max pooling took it from; the patch scores then
    sum to the image-text score."""
    from lexvla.eval.patchdis import attributed_patches

    g = torch.Generator().manual_seed(0)
    patches = torch.rand(2, 5, 7, generator=g)
    image = patches.amax(1)
    text = torch.rand(3, 7, generator=g)
    att = attributed_patches(image, patches)
    assert torch.allclose(att.sum(1), image)
    assert torch.allclose((att @ text.T).sum(1), image @ text.T)
    assert ((att > 0).sum(1) == 1).all()  # one patch per word
    assert torch.equal(att.argmax(1), patches.argmax(1))
