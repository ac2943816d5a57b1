"""lexvla.checkpoint: the one checkpoint writer of the LexVLA and CAL trainers (single process here; the
two-process writer is checked by tests/test_train_launch.py and tests/test_cal_launch.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lexvla.checkpoint import (
    CheckpointWriter,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    restore_checkpoint,
)


def _optimizer() -> tuple[torch.nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    return layer, opt


def _model_writer(layer: torch.nn.Module):
    return lambda folder: save_file({k: v.detach().contiguous() for k, v in layer.state_dict().items()},
                                    Path(folder) / "weights.safetensors")


def test_rotation_keeps_the_newest_and_a_failed_save_leaves_them(tmp_path: Path) -> None:
    layer, opt = _optimizer()
    writer = CheckpointWriter(tmp_path, keep=2, width=0)
    for step in (1, 2, 3):
        writer.save(step, _model_writer(layer), opt, {"epoch": 0})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]

    def broken(folder: Path) -> None:  # a save that dies half-way (the old CAL saver deleted first)
        (folder / "partial").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        writer.save(4, broken, opt, {})
    with pytest.raises(RuntimeError):
        writer.save(3, broken, opt, {})  # over an existing step: the old one must survive
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert latest_checkpoint(tmp_path).name == "step-3"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left
    state = read_trainer_state(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and state["world_size"] == 1 and state["writer"]["rank"] == 0


def test_restore_gives_back_optimizer_and_rng(tmp_path: Path) -> None:
    layer, opt = _optimizer()
    torch.manual_seed(7)
    path = CheckpointWriter(tmp_path, keep=1).save(5, _model_writer(layer), opt, {"epoch": 1})
    assert path.name == "step-00000005"
    expected = torch.rand(3)
    fresh = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    torch.manual_seed(123)
    state = restore_checkpoint(path, fresh)
    assert torch.equal(torch.rand(3), expected)  # the RNG continues where the save left it
    assert state["epoch"] == 1 and state["step"] == 5
    a, b = opt.state_dict(), fresh.state_dict()
    for idx, entry in a["state"].items():
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][idx][k]))
    assert json.loads((path / "optimizer.json").read_text())["param_groups"][0]["lr"] == 1e-2
