"""``lexvla data`` subcommands, run through their own register() on a fresh parser."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from lexvla.data.cli import register


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def manifest(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 60, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    rows = [{"image": f"{i}.png", "caption": f"grey {i}"} for i in range(3)]
    rows += [{"image": "bad.png", "caption": "bad"}, {"image": "0.png", "caption": ""}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_data_check_reports_skips(manifest, capsys):
    assert run(["data", "check", "--manifest", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "unreadable_image: 1 (e.g. bad.png#0)" in out and "empty_caption: 1" in out
    assert "3 usable pairs" in out


def test_data_cache_with_tiny_backbone(manifest, tmp_path, capsys):
    argv = ["data", "cache", "--manifest", str(manifest), "--model", "lexvla-tiny", "--out", str(tmp_path / "c")]
    assert run(argv) == 0
    first = capsys.readouterr().out
    assert "3 images" in first and "computed 3, reused 0" in first
    assert run(argv) == 0
    assert "computed 0, reused 3" in capsys.readouterr().out
    bench = ["data", "bench-cache", "--manifest", str(manifest), "--model", "lexvla-tiny", "--limit", "3"]
    assert run(bench) == 0
    out = capsys.readouterr().out
    assert "backbone every epoch: 3 pairs" in out and "cached epoch 1" in out


def test_data_easyvqa_writes_manifest_and_masks(tmp_path, capsys):
    pytest.importorskip("easy_vqa")
    assert run(["data", "easyvqa", "--split", "test", "--out", str(tmp_path)]) == 0
    assert "test:" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "test" / "pairs.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == summary["test"]["images"] == summary["test"]["recovery"]["kept"]
    assert (tmp_path / "test" / "masks" / "class_names.txt").read_text().startswith("background\n")
    from lexvla.data import ManifestSource

    src = ManifestSource(tmp_path / "test" / "pairs.jsonl", id_key="id")
    assert len(src) == len(rows) * len(rows[0]["caption"]) and src.stats.skipped == 0
