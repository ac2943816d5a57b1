"""Scale-out builds: ranks encode disjoint shards into their own parts; rank 0 merges them into one index."""

from __future__ import annotations

import argparse
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from lexvla.index import SparseIndex, build_index
from lexvla.index.cli import register
from lexvla.index.distributed import merge_indexes, part_dir, rank_shards

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 30, 210), "yellow": (230, 210, 30),
           "black": (10, 10, 10), "white": (245, 245, 245)}


def write_shards(folder, n_shards: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for s in range(n_shards):
        with tarfile.open(folder / f"pairs-{s:03d}.tar", "w") as tar:
            for name in names[s::n_shards]:
                buf = io.BytesIO()
                Image.new("RGB", (40, 40), COLOURS[name]).save(buf, format="PNG")
                for member, payload in ((f"{name}.png", buf.getvalue()), (f"{name}.txt", f"a {name} square".encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return f"{folder}/pairs-{{000..{n_shards - 1:03d}}}.tar"


def run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lexvla")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.func(args) == 0


def test_rank_shards_are_disjoint_and_cover_everything(tmp_path):
    spec = write_shards(tmp_path / "s", 5)
    parts = [rank_shards(spec, r, 2) for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 5
    with pytest.raises(ValueError, match="at least one shard per rank"):
        rank_shards(spec, 0, 6)


def test_launched_build_equals_a_single_process_build(tmp_path, tiny_model, monkeypatch):
    spec = write_shards(tmp_path / "shards", 3)
    single = tmp_path / "single"
    build_index(tiny_model, out=single, shards=spec, batch_size=2, progress=False)
    out = tmp_path / "idx"
    monkeypatch.setattr("lexvla.index.cli._load_model", lambda source, out: tiny_model)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 0 merges once every part is done
        monkeypatch.setenv("RANK", str(rank))
        run_cli(["index", "build", "--model", "lexvla-tiny", "--shards", spec, "--out", str(out), "--batch-size", "2",
                 "--no-progress"])
    assert (part_dir(out, 0) / "index.json").is_file() and (part_dir(out, 1) / "index.json").is_file()
    rng = np.random.default_rng(0)
    with SparseIndex.open(single) as a, SparseIndex.open(out) as b:
        for c in ("images", "texts"):
            assert sorted(a.store(c).ids()) == sorted(b.store(c).ids())
        queries = rng.random((4, a.dim)).astype(np.float32) * (rng.random((4, a.dim)) < 0.05)
        for ha, hb in zip(a.search_vectors(queries, k=6), b.search_vectors(queries, k=6)):
            assert [(h.id, round(h.score, 6)) for h in ha] == [(h.id, round(h.score, 6)) for h in hb]
    with pytest.raises(ValueError, match="already"):  # a part merged twice: ids are not unique
        merge_indexes([part_dir(out, 0), part_dir(out, 0)], tmp_path / "twice")
