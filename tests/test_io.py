"""lexvla.io: atomic writes, folder replacement with crash recovery, stale temp cleaning, the writer lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lexvla.io import (
    LockedError,
    WriterLock,
    atomic_dir,
    atomic_path,
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    clean_stale_tmp,
    recover_dir,
    replace_dir,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_writes_leave_no_temp(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "héllo")
    atomic_write_json(tmp_path / "b.json", {"x": 1}, indent=1)
    atomic_save_npy(tmp_path / "c.npy", np.arange(4, dtype=np.int32))
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    assert np.load(tmp_path / "c.npy").tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.npy"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def boom(f) -> None:
        f.write(b'{"v": ')
        raise RuntimeError("killed mid-write")

    from lexvla.io import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_path_for_libraries_that_write_a_path(tmp_path: Path) -> None:
    target = tmp_path / "w.safetensors"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and str(os.getpid()) in tmp.name
        tmp.write_bytes(b"abc")
    assert target.read_bytes() == b"abc"


def test_replace_dir_recovers_a_kill_between_its_renames(tmp_path: Path) -> None:
    model = tmp_path / "model"
    with atomic_dir(model) as d:
        (d / "w").write_text("1")
    # A kill between ``model -> model.old`` and ``staged -> model`` leaves only model.old (+ the staging).
    os.replace(model, tmp_path / "model.old")
    (tmp_path / f".model.{_dead_pid()}.tmp").mkdir()
    recover_dir(model)
    assert (model / "w").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # A kill after both renames leaves model.old beside model: the next save must not fail on it.
    (tmp_path / "model.old").mkdir()
    (tmp_path / "model.old" / "junk").write_text("x")
    with atomic_dir(model) as d:
        (d / "w").write_text("2")
    assert (model / "w").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replace_dir_over_an_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old-file").write_text("x")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "new-file").write_text("y")
    replace_dir(staged, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new-file"]


def test_clean_stale_tmp_removes_only_dead_writers(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = [tmp_path / f".shard.npy.{dead}.tmp", tmp_path / f".manifest.json.tmp-{dead}",
             tmp_path / f".seismic-tmp-{dead}.index.seismic"]
    for p in stale:
        p.write_text("half")
    mine = tmp_path / f".x.{os.getpid()}.tmp"
    mine.write_text("in progress")
    keep = tmp_path / "data.tmp"
    keep.write_text("not a temp of ours")
    removed = clean_stale_tmp(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert mine.exists() and keep.exists()


_HOLDER = textwrap.dedent("""
    import sys, time
    from lexvla.io import WriterLock
    with WriterLock(sys.argv[1], what="index"):
        print("locked", flush=True)
        time.sleep(30)
""")


def test_writer_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=rf"process {holder.pid}\b"), WriterLock(tmp_path, what="index"):
            pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the lock of the killed holder: no stale lock to clean by hand.
    t0 = time.monotonic()
    with WriterLock(tmp_path, what="index", timeout=5):
        assert WriterLock(tmp_path).holder() == os.getpid()
    assert time.monotonic() - t0 < 5


def test_writer_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    with WriterLock(tmp_path), WriterLock(tmp_path):
        pass
    with WriterLock(tmp_path):
        pass


def test_save_pretrained_survives_a_kill_between_its_renames(tmp_path: Path, tiny_model) -> None:
    """Issue 12.4: a stale model.old (kill between the renames) used to break every later save."""
    import lexvla

    out = tmp_path / "model"
    tiny_model.save_pretrained(out)
    os.replace(out, tmp_path / "model.old")  # the state a kill between the two renames leaves
    (tmp_path / "model.tmp").mkdir()  # and a staging folder of the older naming
    tiny_model.save_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (tmp_path / "model.old").mkdir()  # a kill after both renames, before the old copy was removed
    (tmp_path / "model.old" / "config.json").write_text("{}")
    tiny_model.save_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert lexvla.load(out).fingerprint() == tiny_model.fingerprint()


_CACHE_BUILDER = textwrap.dedent("""
    import sys, time, torch
    from lexvla.data import TextVectorCache
    def slow(captions):
        print("computing", flush=True)
        time.sleep(2)
        return torch.ones(len(captions), 3)
    TextVectorCache(sys.argv[1], ["a red circle", "teal"], slow, text_key="k")
""")


def test_a_shared_cache_is_built_by_one_process_the_other_waits_and_reuses_it(tmp_path: Path) -> None:
    import torch

    from lexvla.data import TextVectorCache

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    builder = subprocess.Popen([sys.executable, "-c", _CACHE_BUILDER, str(tmp_path)], stdout=subprocess.PIPE,
                               text=True, env=env)
    assert builder.stdout.readline().strip() == "computing"
    calls: list[list[str]] = []

    def fast(captions: list[str]) -> torch.Tensor:
        calls.append(captions)
        return torch.zeros(len(captions), 3)

    cache = TextVectorCache(tmp_path, ["a red circle", "teal"], fast, text_key="k")
    assert builder.wait(60) == 0
    assert calls == []  # it waited for the other builder and reused its cache
    assert cache.vectors(["teal"]).tolist() == [[1.0, 1.0, 1.0]]
