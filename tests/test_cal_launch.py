"""CAL training (``lexvla cal train``) under the launchers of docs/training.md, two CPU processes (gloo).

A tiny random SmallVLM (the one of test_cal_vlm) is saved once and every run starts from it with
``--init``. Checked as for LexVLA: world size 2 recorded; per-step losses equal one process on the same
global batch (``per_sequence`` smoothing: the official ``flattened`` window runs over each rank's batch);
disjoint shares that make up the single-process batch; one writer per checkpoint; resume after SIGKILL
of rank 1 gives the uninterrupted run's weights; a misconfigured launch fails with the clear message.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_cal_vlm import make_vlm, tiny_config
from test_train_launch import ENV, ROOT, kill_rank, launcher, run, write_manifest

STEPS, EVERY = 10, 2


def cal_cmd(kind: str, manifest: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return [*launcher(kind), "lexvla", "cal", "train", "--manifest", str(manifest), "--init", str(init),
            "--steps", str(STEPS), "--batch-size", "4", "--save-every", str(EVERY), "--log-every", "1",
            "--smoothing", "per_sequence", "--log-samples", "--out", str(out), *extra]


def records(out: Path, name: str = "metrics.jsonl") -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / name).read_text().splitlines())}


@pytest.fixture(scope="module")
def cal_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lexvla.models.backbones import create_backbone
    from lexvla.models.text import load_tokenizer

    root = tmp_path_factory.mktemp("cal-launch")
    manifest = write_manifest(root, n=8)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({"image": str(root / r["image"]), "caption": r["caption"]}) + "\n"
                                for r in rows))
    cfg = tiny_config()
    init = make_vlm((load_tokenizer(cfg.tokenizer), create_backbone(cfg.backbone))).save_pretrained(root / "init")
    out = {"root": root, "manifest": manifest, "init": init}
    for kind in ("single", "torchrun"):
        done = run(cal_cmd(kind, manifest, init, root / kind, "--no-resume"))
        assert done.returncode == 0, f"{kind}: {done.stderr[-4000:]}"
        out[kind] = (root / kind, done)
    return out


def test_cal_world_size_losses_and_shares(cal_runs: dict) -> None:
    one, two = records(cal_runs["single"][0]), records(cal_runs["torchrun"][0])
    print("\n| step | CAL, 1 process | CAL, 2 processes (torchrun) |\n|---|---|---|")  # docs/training.md
    for step in sorted(one):
        print(f"| {step} | {one[step]['loss']:.9g} | {two[step]['loss']:.9g} |")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    assert {r["world_size"] for r in one.values()} == {1} and {r["world_size"] for r in two.values()} == {2}
    for step in range(1, 4):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-6), step
        assert two[step]["tokens"] == one[step]["tokens"]
    s1, s2 = records(cal_runs["single"][0], "samples.jsonl"), records(cal_runs["torchrun"][0], "samples.jsonl")
    for step in range(1, STEPS + 1):
        r0, r1 = s2[step]["ranks"]
        assert len(r0) == len(r1) == 2 and not set(r0) & set(r1) and r0 + r1 == s1[step]["ranks"][0]
    ckpt = json.loads((cal_runs["torchrun"][0] / "checkpoints" / f"step-{STEPS}" / "trainer.json").read_text())
    assert "distributed setup: rank 0/2" in cal_runs["torchrun"][1].stdout
    assert ckpt["world_size"] == 2 and ckpt["setup"]["backend"] == "gloo" and ckpt["writer"]["rank"] == 0


def test_cal_one_writer_and_rotation(cal_runs: dict) -> None:
    folder = cal_runs["torchrun"][0] / "checkpoints"
    assert {p.name for p in folder.iterdir()} == {f"step-{STEPS - EVERY}", f"step-{STEPS}"}  # keep 2
    for ckpt in folder.iterdir():
        assert json.loads((ckpt / "trainer.json").read_text())["writer"]["rank"] == 0
        assert (ckpt / "rng-rank1.safetensors").is_file() and (ckpt / "trainable.safetensors").is_file()


def test_cal_resume_after_sigkill_of_one_rank_is_exact(cal_runs: dict) -> None:
    root = cal_runs["root"]
    out = root / "killed"
    cmd = cal_cmd("torchrun", cal_runs["manifest"], cal_runs["init"], out)
    proc = subprocess.Popen([*cmd, "--no-resume"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT)
    target = out / "checkpoints" / f"step-{EVERY}" / "trainer.json"
    deadline = time.time() + 300
    while not target.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    kill_rank(proc, 1)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (out / "checkpoints" / f"step-{STEPS}").exists()
    done = run(cmd)  # --resume is the default of `lexvla cal train`
    assert done.returncode == 0, done.stderr[-4000:]
    ref = load_file(cal_runs["torchrun"][0] / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors")
    got = load_file(out / "checkpoints" / f"step-{STEPS}" / "trainable.safetensors")
    differ = {k: float((ref[k] - got[k]).abs().max()) for k in ref if not torch.equal(ref[k], got[k])}
    assert not differ, f"weights differ after resume: {differ}"
    assert records(out, "samples.jsonl") == records(cal_runs["torchrun"][0], "samples.jsonl")
    assert [r["loss"] for r in records(out).values()] == [r["loss"] for r in records(cal_runs["torchrun"][0]).values()]


def test_cal_accelerate_launch_and_misconfiguration(cal_runs: dict, tmp_path: Path) -> None:
    m, init = cal_runs["manifest"], cal_runs["init"]
    done = run(cal_cmd("accelerate", m, init, tmp_path / "acc", "--no-resume"))
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = records(cal_runs["single"][0]), records(tmp_path / "acc")
    assert {r["world_size"] for r in two.values()} == {2}
    for step in range(1, 4):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-6)
    bad = run(cal_cmd("accelerate-cpu", m, init, tmp_path / "bad"))
    assert bad.returncode != 0
    assert "lexvla: error: `accelerate launch --cpu --num_processes N` started a single process" in bad.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
