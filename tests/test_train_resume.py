"""End to end on lexvla-tiny: a short training run, and exact resume after SIGKILL.

The data is a small JSONL manifest of drawn shapes (plus one unreadable image and one empty caption, which
must be skipped and counted). The reference run trains in this process; a second run in a subprocess is
killed with SIGKILL after its second checkpoint and resumed with ``--resume``; its final trained weights,
optimiser state and per-step losses must equal the reference bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from lexvla.train import TrainResult, load_config, train

STEPS, EVERY = 8, 2
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def _write_data(folder: Path) -> Path:
    rows = []
    for i in range(18):
        name = list(COLOURS)[i % 3]
        shape = ("circle", "square")[(i // 3) % 2]
        im = Image.new("RGB", (32, 32), (245, 245, 245))
        d = ImageDraw.Draw(im)
        box = (4 + i % 5, 4 + i % 4, 26, 27)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[name])
        im.save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {name} {shape}"})
    (folder / "broken.png").write_bytes(b"not a png")
    rows.append({"image": "broken.png", "caption": "a broken picture"})
    rows.append({"image": "0.png", "caption": "   "})
    manifest = folder / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("train")
    manifest = _write_data(root)
    cfg = {
        # dropout makes the result depend on the restored RNG state as well
        "model": {"name": "lexvla-tiny", "overrides": {"adapter.dropout": 0.2}},
        "data": {"source": "manifest", "options": {"manifest": str(manifest)}, "batch_size": 4},
        "optim": {"lr": {"adapter": 1e-2, "visual_codebook": 1e-2, "lora": 1e-2, "temperature": 1e-2},
                  "warmup_steps": 3},
        "loss": {"regulariser": "overuse", "ramp_steps": 5, "image_weight": 0.1, "text_weight": 0.1},
        "steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 20, "log_every": 1,
        "tensorboard": True, "progress": False, "seed": 3,
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # The reference runs in a fresh process too: all three runs then start from the same process state
    # (a long-lived test process can differ in memory layout, which CPU BLAS kernels may notice).
    done = subprocess.run(_cmd(path, root / "ref"), env=_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = TrainResult(**json.loads((root / "ref" / "result.json").read_text()))
    return root, path, ref


_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _cmd(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lexvla.train", "--config", str(config), "--out", str(out)]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_training_run_outputs(setup, shared_model) -> None:
    import lexvla

    root, _, ref = setup
    out = root / "ref"
    # batches that met the unreadable image are one pair short
    assert ref.steps == STEPS and ref.samples_seen + ref.skipped == 4 * STEPS
    assert ref.pairs_per_second > 0
    # the unreadable image and the empty caption are counted, never dropped silently
    assert ref.skipped >= 1 and "unreadable_image" in ref.skip_report and "empty_caption" in ref.skip_report
    # one total: the count printed and saved agrees with the report (read-time skips included)
    reported = int(re.search(r"(\d+) skipped", ref.skip_report.splitlines()[0]).group(1))
    assert ref.skipped_reading >= 1 and ref.skipped + ref.skipped_reading == reported
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert any((out / "tensorboard").iterdir())
    model = lexvla.load(ref.model_dir)
    trained, init = model.trainable_state_dict(), shared_model[1]  # same architecture, same initial weights
    assert set(trained) == set(init)
    assert not torch.equal(trained["visual_codebook"], init["visual_codebook"])
    # the last checkpoint's model folder holds the same weights (it loads the same way)
    ckpt = load_file(Path(ref.checkpoint) / "model" / "model.safetensors")
    for k, v in ckpt.items():
        assert torch.equal(v, trained[k])


def test_resume_after_sigkill_is_exact(setup) -> None:
    root, path, _ = setup
    run = root / "killed"
    cmd = _cmd(path, run)
    proc = subprocess.Popen(cmd, env=_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run / "checkpoints" / f"step-{2 * EVERY:08d}" / "trainer.json"
    deadline = time.time() + 300
    while not target.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-2000:]}"
    assert target.is_file()
    assert not (run / "model").exists()  # the killed run never finished

    done = subprocess.run([*cmd, "--resume"], env=_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trained {STEPS} steps" in done.stdout

    ref, resumed = root / "ref", run
    a = load_file(ref / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert set(a) == set(b)
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"weights differ after resume (max abs difference): {differ}"
    final = f"step-{STEPS:08d}"
    oa = load_file(ref / "checkpoints" / final / "optimizer.safetensors")
    ob = load_file(resumed / "checkpoints" / final / "optimizer.safetensors")
    assert set(oa) == set(ob) and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert (json.loads((ref / "checkpoints" / final / "scheduler.json").read_text())
            == json.loads((resumed / "checkpoints" / final / "scheduler.json").read_text()))
    # the metrics log reads like one uninterrupted run with the same losses
    assert _losses(resumed) == _losses(ref)


@pytest.fixture(scope="module")
def shared_model():
    """One tiny model for the short runs below, reset to its initial weights before each."""
    import lexvla

    model = lexvla.create_model("lexvla-tiny")
    # trainable_state_dict() shares storage with the parameters: copy, or training changes the snapshot
    return model, {k: v.clone() for k, v in model.trainable_state_dict().items()}


def _short_cfg(root: Path, name: str, data: dict) -> object:
    cfg = {"model": {"name": "lexvla-tiny"}, "data": {"batch_size": 4, **data}, "steps": 3, "log_every": 1,
           "tensorboard": False, "progress": False, "output_dir": str(root / name)}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.items()])


def test_feature_cache_gives_the_same_training(setup, shared_model) -> None:
    """Cached backbone features (float32) must train exactly like running the backbone every step."""
    root, _, _ = setup
    model, init = shared_model
    clean = root / "clean.jsonl"
    rows = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows if r["image"] != "broken.png" and r["caption"].strip()))
    source = {"source": "manifest", "options": {"manifest": str(clean)}}
    model.load_trained(init)
    plain = train(_short_cfg(root, "plain", source), model=model)
    model.load_trained(init)
    cached = train(_short_cfg(root, "cached", {**source, "feature_cache": str(root / "cache"),
                                               "cache_dtype": "float32"}), model=model)
    assert any((root / "cache").iterdir())
    a, b = _losses(root / "plain"), _losses(root / "cached")
    assert sorted(a) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert plain.pairs_per_second > 0 and cached.pairs_per_second > 0


def test_tar_shards_stream(setup, shared_model) -> None:
    """WebDataset-style shards (the CC-12M format): streamed, bad samples counted, steps as configured."""
    import tarfile

    root, _, _ = setup
    model, init = shared_model
    shards = []
    for s in range(2):
        path = root / f"shard-{s}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * 6, s * 6 + 6):
                tar.add(root / f"{i}.png", arcname=f"{i:05d}.png")
                cap = root / f"cap{i}.txt"
                cap.write_text("" if i == 7 else f"picture number {i}")
                tar.add(cap, arcname=f"{i:05d}.txt")
        shards.append(str(path))
    model.load_trained(init)
    result = train(_short_cfg(root, "shards", {"source": "shards", "options": {"shards": shards}}), model=model)
    assert result.steps == 3 and result.samples_seen + result.skipped == 12
    assert result.skipped == 1 and "empty_caption" in result.skip_report
