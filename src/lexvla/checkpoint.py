"""Training checkpoints of the LexVLA and CAL trainers: no pickle, one writer, atomic, rotated.

One checkpoint is a folder ``<output>/checkpoints/step-<N>/``. This module writes the parts every
trainer has; the trainer's ``write_model(folder)`` adds its model (LexVLA: ``model/``, CAL: the
``SmallVLM`` files at the top, so ``SmallVLM.from_pretrained(<checkpoint>)`` works)::

    optimizer.safetensors  optimiser state tensors, keyed ``state.<param index>.<name>``
    optimizer.json         parameter groups (learning rates, betas, ...), non-tensor state, grad scaler
    scheduler.json         the LR scheduler's state (when there is one)
    rng-rank<R>.safetensors / rng-rank<R>.json   every process's torch / CUDA / numpy / python RNG states
    trainer.json           step, data position, the distributed setup, the writer (written last)

Only rank 0 writes: the other ranks send it their RNG states and wait at a barrier, so a run never has
two writers of one file (and a multi-node run needs no shared file system to save). The folder is staged
by :func:`lexvla.io.atomic_dir` and renamed into place, then older checkpoints beyond ``keep`` are removed
(after the rename: a kill at any moment leaves the previous checkpoints intact). Accelerate's
``save_state`` is not used: it pickles the optimizer and the RNG states.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import dist_info, gather_objects
from .io import atomic_dir

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_FILE = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


# ----------------------------------------------------------------------------------------- the folder
def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int, width: int = 8) -> str:
    return f"step-{step:0{width}d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete step checkpoints, oldest first (staging folders of interrupted saves are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint ({TRAINER_FILE} is missing)")
    return json.loads((path / TRAINER_FILE).read_text())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))  # inside the staged folder: the folder rename is atomic


class CheckpointWriter:
    """Writes step checkpoints under ``<output_dir>/checkpoints`` and keeps the newest ``keep``.

    Call :meth:`save` on every rank (it is collective): rank 0 writes, the others send their RNG states
    and wait. ``barrier``: the trainer's barrier (``accelerator.wait_for_everyone``); ``width``: digits of
    the step in the folder name (LexVLA 8: ``step-00000040``; CAL 0: ``step-40``).
    """

    def __init__(self, output_dir: str | Path, keep: int, barrier: Callable[[], None] | None = None,
                 width: int = 8) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = checkpoint_root(output_dir)
        self.keep, self.width = keep, width
        self.barrier = barrier or (lambda: None)

    def save(self, step: int, write_model: Callable[[Path], None], optimizer: Any, trainer_state: dict[str, Any],
             scheduler: Any = None, grad_scaler: Any = None) -> Path:
        rank, world = dist_info()
        final = self.root / step_name(step, self.width)
        rngs = gather_objects(rng_state())  # collective: every rank takes part
        if rank == 0:
            with atomic_dir(final) as tmp:
                for r, (tensors, meta) in enumerate(rngs):
                    save_file(tensors, tmp / f"rng-rank{r}.safetensors")
                    _write_json(tmp / f"rng-rank{r}.json", meta)
                write_model(tmp)
                opt_tensors, opt_meta = optimizer_to_files(optimizer.state_dict())
                opt_meta["grad_scaler"] = grad_scaler.state_dict() if grad_scaler is not None else None
                save_file(opt_tensors, tmp / "optimizer.safetensors")
                _write_json(tmp / "optimizer.json", opt_meta)
                if scheduler is not None:
                    _write_json(tmp / "scheduler.json", scheduler.state_dict())
                record = {**trainer_state, "step": step, "world_size": world, "writer": {"rank": rank,
                                                                                       "pid": os.getpid()}}
                _write_json(tmp / TRAINER_FILE, record)  # last: marks the folder complete
            self._prune()
            logger.info("checkpoint %s written by rank %d (pid %d)", final, rank, os.getpid())
        self.barrier()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.root.parent)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def restore_checkpoint(path: str | Path, optimizer: Any, scheduler: Any = None, grad_scaler: Any = None,
                       rank: int | None = None) -> dict[str, Any]:
    """Restore optimiser, scheduler, grad scaler and this rank's RNG from ``path``; return ``trainer.json``.
    The model's weights are the trainer's to load (its own format)."""
    path = Path(path)
    state = read_trainer_state(path)
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(optimizer_from_files(load_file(path / "optimizer.safetensors"), meta))
    if grad_scaler is not None and meta.get("grad_scaler"):
        grad_scaler.load_state_dict(meta["grad_scaler"])
    if scheduler is not None:
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rank = dist_info()[0] if rank is None else rank
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(rng_file), json.loads((path / f"rng-rank{rank}.json").read_text()))
    else:
        logger.warning("%s has no RNG state for rank %d (saved with %d processes); RNG not restored",
                       path, rank, state.get("world_size", 1))
    world = dist_info()[1]
    if state.get("world_size", 1) != world:
        logger.warning("checkpoint was written by %d processes, resuming with %d: the data order differs "
                       "from an uninterrupted run", state.get("world_size", 1), world)
    return state
