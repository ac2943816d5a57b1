"""Training checkpoints without pickle, written atomically.

One checkpoint is a folder ``<output>/checkpoints/step-<N>/``::

    model/                 config.json + vocab.json + model.safetensors (trained weights only):
                           ``lexvla.load(<checkpoint>/model)`` restores the model as it was at step N
    optimizer.safetensors  AdamW state tensors, keyed ``state.<param index>.<name>``
    optimizer.json         parameter groups (learning rates, betas, ...) and non-tensor state, grad scaler
    scheduler.json         the LR scheduler's state
    trainer.json           step, data position (epoch, batches done in the epoch, samples seen), world size
    rng-rank<R>.safetensors / rng-rank<R>.json   each process's torch / CUDA / numpy / python RNG states

It is written into a hidden temporary folder and renamed into place only when every file (from every
rank) is there, so a process killed at any moment leaves either the whole checkpoint or none of it.
Accelerate's ``save_state`` is not used: it pickles the optimizer and the RNG states.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_FILE = "trainer.json"


@dataclass
class TrainerState:
    """Where training stands: enough to continue the data stream exactly where it stopped."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # current epoch of the data stream
    batches_in_epoch: int = 0  # micro-batches already taken from the current epoch (per process)
    samples_seen: int = 0  # pairs in all batches so far (global)
    world_size: int = 1
    skipped: int = 0  # samples skipped so far (all processes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ optimizer
def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["plain_state"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------ rng
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ------------------------------------------------------------------------------------------ save/load
def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete step checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


class CheckpointWriter:
    """Writes one checkpoint across all processes (``accelerator`` provides rank and barriers)."""

    def __init__(self, accelerator: Any, output_dir: str | Path, keep: int) -> None:
        self.acc = accelerator
        self.root = checkpoint_root(output_dir)
        self.keep = keep

    def save(self, step: int, model: Any, optimizer: Any, scheduler: Any, state: TrainerState) -> Path:
        acc = self.acc
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that was killed
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        tensors, meta = rng_state()
        save_file(tensors, tmp / f"rng-rank{acc.process_index}.safetensors")
        _write_json(tmp / f"rng-rank{acc.process_index}.json", meta)
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(tmp / "model")
            opt_tensors, opt_meta = optimizer_to_files(optimizer.state_dict())
            scaler = getattr(acc, "scaler", None)
            opt_meta["grad_scaler"] = scaler.state_dict() if scaler is not None else None
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            _write_json(tmp / "optimizer.json", opt_meta)
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
            _write_json(tmp / TRAINER_FILE, state.to_dict())  # last: marks the folder complete
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            logger.info("checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.root.parent)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, accelerator: Any, model: Any, optimizer: Any, scheduler: Any
                    ) -> TrainerState:
    """Restore weights, optimiser, scheduler, grad scaler and this process's RNG; return the position."""
    path = Path(path)
    if not (path / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint ({TRAINER_FILE} is missing)")
    state = TrainerState(**json.loads((path / TRAINER_FILE).read_text()))
    accelerator.unwrap_model(model).load_trained(load_file(path / "model" / "model.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(optimizer_from_files(load_file(path / "optimizer.safetensors"), meta))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and meta.get("grad_scaler"):
        scaler.load_state_dict(meta["grad_scaler"])
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rank = accelerator.process_index
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(rng_file), json.loads((path / f"rng-rank{rank}.json").read_text()))
    else:
        logger.warning("%s has no RNG state for rank %d (saved with %d processes); RNG not restored",
                       path, rank, state.world_size)
    if state.world_size != accelerator.num_processes:
        logger.warning("checkpoint was written by %d processes, resuming with %d: the data order differs "
                       "from an uninterrupted run", state.world_size, accelerator.num_processes)
    return state
