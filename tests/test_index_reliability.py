"""Issue 12, index part: one writer at a time (two real processes), unique ids across adds, damaged files
(seeded byte-flip fuzzing of every index file: no crash, no silently different result), idempotent
deletes, stale temp cleaning, readers that see other processes' commits, no Milvus address from a file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lexvla.index import ModelRecord, SparseIndex
from lexvla.index.store import CorruptIndexError
from lexvla.vocab import Vocabulary

V, N = 300, 90
SRC = str(Path(__file__).parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def docs(n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((n, V), dtype=np.float32)
    for i in range(n):
        idx = rng.choice(V, 12, replace=False)
        out[i, idx] = rng.random(12) + 0.1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def make(path: Path, shards: int = 3) -> SparseIndex:
    vocab = Vocabulary([f"w{i}" for i in range(V)], list(range(V)))
    index = SparseIndex.create(path, vocab, ModelRecord("raw", "fp", vocab.fingerprint(), V))
    d = docs()
    for part in np.array_split(np.arange(N), shards):
        index.add(d[part], [f"doc{i}" for i in part])
    index.sync()
    return index


def results(path: Path) -> list:
    with SparseIndex.open(path) as index:
        hits = index.search_vectors(docs(6, seed=9), k=7)
    return [[(h.id, round(h.score, 6)) for h in q] for q in hits]


def cli(*argv: str) -> subprocess.CompletedProcess:
    """``lexvla ARGV`` in this process (the other writer is a real second process)."""
    import contextlib
    import io

    from lexvla.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


# ------------------------------------------------------------------------------------ single writer
_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from lexvla.index import SparseIndex
    index = SparseIndex.open(sys.argv[1])
    with index.writing():
        index.add(np.eye(1, 300, 5, dtype=np.float32), ["from-writer"])
        print("writing", flush=True)
        sys.stdin.readline()  # hold the lock until the test says so
""")


def test_second_writer_is_refused_while_readers_keep_working(tmp_path: Path) -> None:
    make(tmp_path).close()
    before = results(tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert writer.stdout.readline().strip() == "writing"
        # A delete during an add used to report success and be silently undone by the add's commit.
        refused = cli("index", "delete", str(tmp_path), "doc3")
        assert refused.returncode == 2, refused.stderr
        assert f"being written by process {writer.pid}" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert results(tmp_path) == before  # readers are not blocked
    finally:
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(60) == 0
    done = cli("index", "delete", str(tmp_path), "doc3", "from-writer")
    assert done.returncode == 0, done.stderr
    with SparseIndex.open(tmp_path) as index:
        live = index.store("images").live_ids()
    assert "doc3" not in live and "from-writer" not in live and len(live) == N - 1


def test_delete_is_idempotent_and_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    make(tmp_path).close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "images" / f".shard-000009.data.npy.{dead.pid}.tmp"
    stale.write_bytes(b"half a file")
    first = cli("index", "delete", str(tmp_path), "doc1", "doc2")
    again = cli("index", "delete", str(tmp_path), "doc1", "doc2")
    assert first.returncode == 0 and again.returncode == 0, again.stderr
    assert "deleted 0 item(s)" in again.stdout and "2 deleted before" in again.stdout
    assert not stale.exists()
    typo = cli("index", "delete", str(tmp_path), "no-such-id")
    assert typo.returncode == 2 and "no-such-id" in typo.stderr


def test_a_reader_sees_commits_of_another_process(tmp_path: Path) -> None:
    make(tmp_path).close()
    reader = SparseIndex.open(tmp_path)
    hits = reader.search_vectors(docs()[4], k=1)[0]
    assert hits[0].id == "doc4"
    assert cli("index", "delete", str(tmp_path), "doc4").returncode == 0
    hits = reader.search_vectors(docs()[4], k=3)[0]
    assert "doc4" not in [h.id for h in hits]
    assert reader.store("images").row_of("doc4") is None  # what the web app's download route checks


# ------------------------------------------------------------------------------------ damaged files
_FUZZ = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from test_index_reliability import results
    from lexvla.index.store import CorruptIndexError
    pristine, work, _ = Path(sys.argv[1]), Path(sys.argv[2]), None
    reference = results(pristine)
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file() and p.name != ".writer.lock")
    out = []
    for rel in files:
        for seed in range(3):
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, work)
            path = work / rel
            raw = bytearray(path.read_bytes())
            rng = np.random.default_rng([seed, len(str(rel))])
            for pos in rng.choice(len(raw), size=min(len(raw), int(rng.integers(16, 65))), replace=False):
                raw[pos] ^= int(rng.integers(1, 256))
            path.write_bytes(bytes(raw))
            try:
                got = results(work)
                outcome = "same" if got == reference else "DIFFERENT"
            except CorruptIndexError as err:
                outcome = "refused" if str(rel.name) in str(err) else f"UNNAMED {err}"
            except Exception as err:
                outcome = f"OTHER {type(err).__name__}: {err}"
            out.append([str(rel), seed, outcome])
    print(json.dumps(out))
""")


def test_byte_flips_in_every_index_file_never_crash_or_change_results(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    make(pristine).close()
    results(pristine)  # lets the backend write its postings, so they are fuzzed too
    # One child process for all cases: a SIGSEGV in scipy or numpy shows as its exit code.
    proc = subprocess.run([sys.executable, "-c", _FUZZ, str(pristine), str(tmp_path / "work"),
                           str(Path(__file__).parent)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, f"the reader crashed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    cases = json.loads(proc.stdout)
    files = {c[0] for c in cases}
    assert {"index.json", "vocab.json", "images/manifest.json", "images/shard-000000.indptr.npy",
            "images/shard-000001.indices.npy", "images/shard-000002.items.jsonl",
            "images/exact.postings.indices.npy", "images/exact.json"} <= files
    bad = [c for c in cases if c[2] not in ("same", "refused")]
    assert not bad, bad
    # Damage to the store is refused; damage to a backend's derived files is repaired (same results).
    assert all(c[2] == "refused" for c in cases if "shard-" in c[0] or c[0].endswith("manifest.json"))
    assert all(c[2] == "same" for c in cases if "exact" in c[0])


def test_bounds_are_checked_even_when_the_checksums_are_rewritten(tmp_path: Path) -> None:
    """A lowered nnz in manifest.json used to change results silently."""
    from lexvla.index.store import json_digest

    make(tmp_path).close()
    path = tmp_path / "images" / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"][1]["nnz"] -= 5
    data.pop("checksum")
    data["checksum"] = json_digest(data)
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptIndexError, match="shard-000001"):
        results(tmp_path)


# ------------------------------------------------------------------------------------ ids across adds
def test_ids_are_unique_across_adds_and_duplicates_are_named(tmp_path: Path, tiny_model) -> None:
    from lexvla.index import build_index

    for folder, colour in (("more", (255, 0, 0)), ("more2", (0, 0, 255))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), colour).save(tmp_path / folder / "103.png")
    idx = tmp_path / "idx"
    build_index(tiny_model, images=tmp_path / "more", out=idx, progress=False)
    report = build_index(tiny_model, images=tmp_path / "more2", out=idx, progress=False)
    assert report.images_added == 1 and report.images_already_indexed == 0 and not report.skipped
    again = build_index(tiny_model, images=tmp_path / "more2", out=idx, progress=False)
    assert again.images_added == 0 and again.images_already_indexed == 1
    with SparseIndex.open(idx) as index:
        ids = sorted(index.store("images").live_ids())
    assert ids == ["103.png", "more2/103.png"]
    # A manifest that reuses an id for a different file: reported by name, not counted as indexed.
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "more2/103.png", "id": "103.png"}) + "\n")
    clash = build_index(tiny_model, images=tmp_path / "list.jsonl", out=idx, progress=False)
    assert clash.images_already_indexed == 0 and clash.images_added == 0
    assert [s.id for s in clash.skipped] == ["103.png"] and "duplicate id" in clash.skipped[0].reason


# ------------------------------------------------------------------------------------ Milvus address
def test_a_milvus_address_read_from_the_index_is_never_connected_to(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("pymilvus")
    from lexvla.index.core import INDEX_FILE
    from lexvla.index.store import json_digest

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    make(tmp_path).close()
    meta = json.loads((tmp_path / INDEX_FILE).read_text())
    meta.pop("checksum")
    meta["backend"] = "milvus"
    meta["backend_options"] = {"milvus": {"uri": f"http://127.0.0.1:{port}"}}
    meta["checksum"] = json_digest(meta)  # an attacker can write a consistent file
    (tmp_path / INDEX_FILE).write_text(json.dumps(meta))
    monkeypatch.delenv("LEXVLA_INDEX_URI", raising=False)
    with SparseIndex.open(tmp_path) as index, pytest.raises(ValueError, match="--uri"):
        index.search_vectors(docs(1), k=3)
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody knocked
    listener.close()


def test_stores_written_before_checksums_still_open(tmp_path: Path) -> None:
    make(tmp_path).close()
    reference = results(tmp_path)
    path = tmp_path / "images" / "manifest.json"
    data = json.loads(path.read_text())
    data.pop("checksum")
    for shard in data["shards"]:
        shard.pop("digests")
        shard.pop("sha256")
    path.write_text(json.dumps(data))
    assert results(tmp_path) == reference
