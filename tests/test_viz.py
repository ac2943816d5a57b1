"""Pictures: word cloud layout, patch scores/heat maps, the explain page and the `lexvla explain` command."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lexvla import viz
from lexvla.outputs import LexicalOutput
from lexvla.viz.wordcloud import WordCloudConfig, layout_word_cloud


def _boxes_overlap(a, b) -> bool:
    return a.x < b.x + b.box_width and b.x < a.x + a.box_width and a.y < b.y + b.box_height and b.y < a.y + a.box_height


def test_word_cloud_layout_fits_without_overlap_and_is_deterministic():
    rng = np.random.default_rng(0)
    pairs = [(f"word{i}", float(w)) for i, w in enumerate(rng.pareto(1.5, 50) + 0.01)]
    cfg = WordCloudConfig(width=400, height=250, max_words=50)
    layout = layout_word_cloud(pairs, cfg)
    assert len(layout.words) + len(layout.dropped) == 50
    assert len(layout.words) >= 40
    for i, a in enumerate(layout.words):
        assert a.x >= 0 and a.x + a.box_width <= cfg.width and a.y >= 0 and a.y + a.box_height <= cfg.height
        for b in layout.words[i + 1:]:
            assert not _boxes_overlap(a, b), (a, b)
    # heavier words are never drawn smaller than lighter ones
    sizes = [p.font_size for p in sorted(layout.words, key=lambda p: -p.weight)]
    assert sizes == sorted(sizes, reverse=True)
    assert layout_word_cloud(pairs, cfg) == layout
    assert layout_word_cloud(dict(pairs), cfg) == layout


def test_word_cloud_png_and_input_checks():
    buf = io.BytesIO()
    layout = viz.word_cloud({"dog": 0.5, "beach": 0.3, "sand": 0.1, "zero": 0.0}, buf, width=300, height=200)
    assert [p.word for p in layout.words] == ["dog", "beach", "sand"]  # zero weights are not words
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.format == "PNG" and img.size == (300, 200)
    arr = np.asarray(img.convert("L"))
    assert (arr < 128).any()  # something was drawn
    assert layout_word_cloud([]).words == []
    with pytest.raises(ValueError, match="not finite"):
        layout_word_cloud([("dog", float("nan"))])
    with pytest.raises(ValueError, match="pairs"):
        layout_word_cloud([("dog", 1.0, 2.0)])
    with pytest.raises(ValueError, match="max_words"):
        WordCloudConfig(max_words=0)


def _patch_output(rows=2, cols=3, vocab=5, seed=0) -> LexicalOutput:
    g = torch.Generator().manual_seed(seed)
    patches = torch.nn.functional.normalize(torch.rand(1, rows * cols, vocab, generator=g), dim=-1)
    return LexicalOutput(patches.amax(1), patches, (rows, cols))


def test_text_patch_scores_are_patch_dot_text_in_grid_order():
    out = _patch_output()
    text = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
    scores = viz.text_patch_scores(out, LexicalOutput(text))
    assert scores.shape == (2, 3)
    expected = out.patch_vectors[0, :, 1].numpy().reshape(2, 3)  # row-major: patch p -> (p // cols, p % cols)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="return_patches"):
        viz.text_patch_scores(LexicalOutput(out.vectors), text)
    with pytest.raises(ValueError, match="dimensions"):
        viz.text_patch_scores(out, torch.ones(1, 7))


def test_heatmap_upsampling_peaks_where_the_patch_is():
    scores = np.zeros((4, 4), dtype=np.float32)
    scores[3, 0] = 1.0  # bottom-left patch
    heat = viz.upsample_scores(scores, (80, 40))
    assert heat.shape == (40, 80)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert x < 20 and y >= 30
    buf = io.BytesIO()
    viz.text_heatmap(Image.new("RGB", (80, 40), "gray"), scores, buf, text="a dog")
    assert Image.open(io.BytesIO(buf.getvalue())).format == "PNG"


def test_patch_words_figure_checks_the_grid():
    img = Image.new("RGB", (60, 40), "white")
    words = [[("dog", 0.5)], [("sky", 0.4)], [], [("dog", 0.2)], [("sand", 0.1)], [("sea", 0.3)]]
    buf = io.BytesIO()
    viz.patch_words_figure(img, words, (2, 3), buf, title="t")
    assert Image.open(io.BytesIO(buf.getvalue())).format == "PNG"
    with pytest.raises(ValueError, match="grid 2x2"):
        viz.patch_words_figure(img, words, (2, 2), io.BytesIO())


def test_shared_words_sum_to_the_dot_product():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(50, generator=g) * (torch.rand(50, generator=g) > 0.5)
    b = torch.rand(50, generator=g) * (torch.rand(50, generator=g) > 0.5)
    words = [f"w{i}" for i in range(50)]
    pairs = viz.shared_words(a, b, words)
    assert sum(c for _, c in pairs) == pytest.approx(float(a.double() @ b.double()), rel=1e-12)
    assert [c for _, c in pairs] == sorted((c for _, c in pairs), reverse=True)
    assert {w for w, _ in pairs} == {words[i] for i in range(50) if a[i] > 0 and b[i] > 0}


@pytest.fixture(scope="module")
def shapes_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    img = Image.new("RGB", (96, 72), (240, 240, 240))
    d = ImageDraw.Draw(img)
    d.ellipse((8, 8, 44, 44), fill=(220, 20, 20))
    d.rectangle((56, 24, 90, 66), fill=(20, 20, 200))
    img.save(path)
    return path


def test_explain_command_writes_pictures_json_and_escaped_html(shapes_image, tmp_path):
    from lexvla.viz.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "explain"
    args = parser.parse_args(["explain", str(shapes_image), "--model", "lexvla-tiny", "--out", str(out),
                              "--text", "a red circle", "--text", "<script>alert(1)</script>", "--words", "30"])
    assert args.func(args) == 0
    for name in ("input.png", "wordcloud.png", "patches.png", "heatmap-0.png", "heatmap-1.png"):
        assert Image.open(out / name).format == "PNG", name
    data = json.loads((out / "explain.json").read_text())
    rows, cols = data["grid"]
    assert len(data["patch_words"]) == rows * cols
    assert len(data["words"]) == 30
    for t in data["texts"]:
        assert sum(c for _, c in t["shared_words"]) == pytest.approx(t["score"], rel=1e-6)
        assert np.asarray(t["patch_scores"]).shape == (rows, cols)
    html = (out / "index.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    for name in ("wordcloud.png", "patches.png", "heatmap-1.png"):
        assert f'src="{name}"' in html


def test_explain_command_names_a_missing_image(tmp_path):
    from lexvla.viz.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["explain", str(tmp_path / "nope.jpg"), "--model", "lexvla-tiny"])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        args.func(args)


def test_explain_command_at_a_larger_image_size(shapes_image, tmp_path):
    from lexvla.viz.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "explain"
    args = parser.parse_args(["explain", str(shapes_image), "--model", "lexvla-tiny", "--out", str(out),
                              "--image-size", "112"])
    assert args.func(args) == 0
    data = json.loads((out / "explain.json").read_text())
    assert data["grid"] == [8, 8] and len(data["patch_words"]) == 64  # lexvla-tiny: 56 px, 4x4
