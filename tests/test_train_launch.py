"""LexVLA training under the launchers of docs/training.md, with two CPU processes (gloo).

Every run is a fresh process tree started exactly as the docs say (``python -m lexvla.train``,
``torchrun --standalone --nproc_per_node 2 -m lexvla.train``, ``accelerate launch --multi_gpu
--num_processes 2 -m lexvla.train``) on ``lexvla-tiny`` with ``src/lexvla/configs/tiny.yaml`` and a small
generated manifest. Checked: world size 2 recorded; the first steps' losses equal one process on the
same global batch; the ranks' samples are disjoint and together the single-process batch; one writer
per checkpoint; resume after SIGKILL of rank 1 gives the uninterrupted run's weights; a misconfigured
launch fails with the one clear message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "lexvla" / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent
STEPS, EVERY = 6, 2
FIRST = 3  # steps whose losses must match one process to 1e-6
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "gray": (128, 128, 128)}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
for _k in [k for k in ENV if k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           or k.startswith("ACCELERATE_")]:
    del ENV[_k]


def write_manifest(folder: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        shape = ("circle", "square")[(i // 4) % 2]
        im = Image.new("RGB", (32, 32), (245, 245, 245))
        d = ImageDraw.Draw(im)
        (d.ellipse if shape == "circle" else d.rectangle)((3 + i % 5, 4 + i % 3, 27, 26), fill=COLOURS[name])
        im.save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {name} {shape}", "id": f"pair-{i}"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_shards(folder: Path, manifest: Path, n_shards: int = 4) -> list[str]:
    """The manifest's pairs as WebDataset tar shards (``<key>.png`` + ``<key>.txt``)."""
    import io
    import tarfile

    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    paths = []
    for k in range(n_shards):
        path = folder / f"shard-{k}.tar"
        with tarfile.open(path, "w") as tar:
            for r in rows[k::n_shards]:
                for suffix, data in (("png", (folder / r["image"]).read_bytes()), ("txt", r["caption"].encode())):
                    info = tarfile.TarInfo(f"{r['id']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(kind: str) -> list[str]:
    """The launch commands of docs/training.md."""
    if kind == "single":
        return [sys.executable, "-m"]
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m"]
    if kind == "accelerate":
        return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port()), "-m"]
    if kind == "accelerate-cpu":  # the misconfiguration: --cpu starts one process
        return [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "-m"]
    raise ValueError(kind)


def train_cmd(kind: str, manifest: Path, out: Path, *extra: str) -> list[str]:
    overrides = ["data.source=manifest", "data.options=" + json.dumps({"manifest": str(manifest)}), "data.batch_size=8",
                 f"steps={STEPS}", f"checkpoint_every={EVERY}", "keep_checkpoints=10", "log_every=1",
                 "validation.dataset=null", "tensorboard=false", "progress=false", "log_samples=true"]
    return [*launcher(kind), "lexvla.train", "-v", "--config", str(TINY), *overrides, *extra, "--out", str(out)]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return done


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def kill_rank(proc: subprocess.Popen, rank: int) -> None:
    """SIGKILL the training process of ``rank`` among the launcher's children."""
    import psutil

    victims = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "lexvla" in " ".join(child.cmdline()):
                victims.append(child)
        except psutil.Error:  # a helper process that just ended
            continue
    assert len(victims) == 1, f"rank {rank} not found (the run ended before it could be killed?)"
    victims[0].send_signal(signal.SIGKILL)


def samples(out: Path) -> dict[int, list[list[str]]]:
    """step -> per rank, the sample ids of that step (all micro-batches)."""
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {r["step"]: [[i for micro in rank for i in micro] for rank in r["ranks"]] for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("launch")
    manifest = write_manifest(root)
    out = {"root": root, "manifest": manifest}
    for kind in ("single", "torchrun"):
        done = run(train_cmd(kind, manifest, root / kind))
        assert done.returncode == 0, f"{kind}: {done.stderr[-4000:]}"
        out[kind] = (root / kind, done)
    return out


def test_world_size_is_recorded(runs: dict) -> None:
    for kind, world in (("single", 1), ("torchrun", 2)):
        folder, done = runs[kind]
        setup = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
        assert setup["event"] == "setup" and setup["world_size"] == world
        assert setup["backend"] == ("gloo" if world == 2 else "none") and setup["device"].startswith("cpu")
        assert setup["global_batch"] == 8 and setup["per_device_batch"] == 8 // world
        ckpt = json.loads((folder / "checkpoints" / f"step-{STEPS:08d}" / "trainer.json").read_text())
        assert ckpt["world_size"] == world and ckpt["setup"]["world_size"] == world
        assert json.loads((folder / "result.json").read_text())["setup"]["world_size"] == world
        assert f"distributed setup: rank 0/{world}" in done.stdout  # the setup is printed


def test_two_processes_match_one(runs: dict) -> None:
    one, two = losses(runs["single"][0]), losses(runs["torchrun"][0])
    print("\n| step | 1 process | 2 processes (torchrun) |\n|---|---|---|")  # docs/training.md's table
    for step in sorted(one):
        print(f"| {step} | {one[step]:.9g} | {two[step]:.9g} |")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in range(1, FIRST + 1):
        assert two[step] == pytest.approx(one[step], abs=1e-6), f"step {step}: {two[step]} vs {one[step]}"


def test_ranks_draw_disjoint_shares_of_the_global_batch(runs: dict) -> None:
    one, two = samples(runs["single"][0]), samples(runs["torchrun"][0])
    seen: list[str] = []
    for step in range(1, STEPS + 1):
        r0, r1 = two[step]
        assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)
        assert sorted(r0 + r1) == sorted(one[step][0])  # together: the single-process batch
        seen += r0 + r1
    assert len(set(seen[:24])) == 24  # the first epoch (3 steps of 8) sees every pair once


def test_webdataset_shards_are_dealt_to_ranks(runs: dict) -> None:
    """4 tar shards, 2 ranks: each rank streams its own 2 shards; one epoch = every pair once."""
    root = runs["root"]
    shards = write_shards(root, runs["manifest"])
    out = root / "shards"
    cmd = [*launcher("torchrun"), "lexvla.train", "--config", str(TINY), "data.source=shards",
           "data.options=" + json.dumps({"shards": shards}), "data.batch_size=8", "steps=3", "checkpoint_every=0",
           "validation.dataset=null", "tensorboard=false", "progress=false", "log_samples=true", "--out", str(out)]
    done = run(cmd)
    assert done.returncode == 0, done.stderr[-4000:]
    per_step = samples(out)
    epoch = [i for step in (1, 2, 3) for rank in per_step[step] for i in rank]
    assert sorted(epoch) == sorted(f"pair-{i}" for i in range(24))  # each pair once across ranks
    for step in (1, 2, 3):
        r0, r1 = per_step[step]
        assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)
        # rank r reads shards r and r + 2: pair i lives in shard i % 4
        assert {int(i.split("-")[1]) % 4 for i in r0} <= {0, 2} and {int(i.split("-")[1]) % 4 for i in r1} <= {1, 3}


def test_one_writer_per_checkpoint(runs: dict) -> None:
    folder, done = runs["torchrun"]
    written = [line for line in done.stderr.splitlines() if "lexvla.checkpoint: checkpoint" in line]  # -v
    assert len(written) == STEPS // EVERY and all("written by rank 0" in line for line in written)
    for step in range(EVERY, STEPS + 1, EVERY):
        ckpt = folder / "checkpoints" / f"step-{step:08d}"
        state = json.loads((ckpt / "trainer.json").read_text())
        assert state["writer"]["rank"] == 0
        assert {p.name for p in ckpt.glob("rng-rank*.safetensors")} == {"rng-rank0.safetensors",
                                                                        "rng-rank1.safetensors"}
        rng0, rng1 = (load_file(ckpt / f"rng-rank{r}.safetensors")["torch"] for r in (0, 1))
        assert not torch.equal(rng0, rng1)  # each rank's own stream (seed + rank), not rank 0's twice
    assert not [p for p in (folder / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left


def test_resume_after_sigkill_of_one_rank_is_exact(runs: dict) -> None:
    root, manifest = runs["root"], runs["manifest"]
    out = root / "killed"
    cmd = train_cmd("torchrun", manifest, out)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    target = out / "checkpoints" / f"step-{EVERY:08d}" / "trainer.json"
    deadline = time.time() + 300
    while not target.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_rank(proc, 1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the launcher must report the killed rank"
    assert target.is_file() and not (out / "model").exists()

    done = run([*cmd, "--resume"])
    assert done.returncode == 0, done.stderr[-4000:]
    ref = load_file(runs["torchrun"][0] / "model" / "model.safetensors")
    got = load_file(out / "model" / "model.safetensors")
    differ = {k: float((ref[k] - got[k]).abs().max()) for k in ref if not torch.equal(ref[k], got[k])}
    assert not differ, f"weights differ after resume (max abs difference): {differ}"
    assert losses(out) == losses(runs["torchrun"][0])
    assert samples(out) == samples(runs["torchrun"][0])  # the same pairs, step by step, on the same ranks


def test_accelerate_launch_with_grad_accum_matches_one_process(runs: dict) -> None:
    """accelerate launch, 2 processes x 2 micro-batches of 2 pairs: one contrastive batch of 8 per step
    (cached embeddings under DDP), the single process's batch-8 losses and samples."""
    root, manifest = runs["root"], runs["manifest"]
    out = root / "accelerate"
    done = run(train_cmd("accelerate", manifest, out, "data.batch_size=4", "grad_accum=2"))
    assert done.returncode == 0, done.stderr[-4000:]
    setup = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["world_size"] == 2 and setup["launcher"] == "accelerate" and setup["backend"] == "gloo"
    assert setup["per_device_batch"] == 2 and setup["grad_accum"] == 2 and setup["contrastive_batch"] == 8
    one, two = losses(runs["single"][0]), losses(out)
    print("\naccelerate launch, 2 processes, grad_accum 2:", " ".join(f"{two[s]:.9g}" for s in sorted(two)))
    for step in range(1, FIRST + 1):
        assert two[step] == pytest.approx(one[step], abs=1e-6)
    ids_one, ids_two = samples(runs["single"][0]), samples(out)
    for step in range(1, STEPS + 1):
        r0, r1 = ids_two[step]
        assert len(r0) == len(r1) == 4 and not set(r0) & set(r1) and sorted(r0 + r1) == sorted(ids_one[step][0])


def test_misconfigured_launches_fail_clearly(runs: dict, tmp_path: Path) -> None:
    manifest = runs["manifest"]
    done = run(train_cmd("accelerate-cpu", manifest, tmp_path / "a"))
    assert done.returncode != 0
    assert "`accelerate launch --cpu --num_processes N` started a single process" in done.stderr
    # N processes announced, none started beside this one (no rendezvous address)
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    bad = subprocess.run(train_cmd("single", manifest, tmp_path / "b"), env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2
    assert "lexvla train: error: WORLD_SIZE=2 (rank 0) says 2 processes, but the process group could not be " \
           "initialised" in bad.stderr
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_docs_show_these_commands() -> None:
    docs = (ROOT / "docs" / "training.md").read_text()
    for needle in ("torchrun --standalone --nproc_per_node 2 -m lexvla.train",
                   "accelerate launch --multi_gpu --num_processes 2", "srun"):
        assert needle in docs, needle
    assert shutil.which("torchrun", path=str(BIN)) and shutil.which("accelerate", path=str(BIN))
