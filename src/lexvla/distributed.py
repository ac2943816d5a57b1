"""Where this process stands in a distributed job (decided in one place), and the gathers the losses use.

:func:`build_accelerator` is the one entry point of the LexVLA and CAL trainers. It reads the launcher's
environment (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` from torchrun, ``accelerate launch --multi_gpu`` or
``srun`` + torchrun; ``PMI_SIZE``/``OMPI_COMM_WORLD_SIZE`` from mpirun) and the devices present, and picks
the backend: CUDA present -> one GPU per process and NCCL, no GPU -> the CPU and gloo. No flag is needed
for a CPU job of several processes. When the environment says N > 1 processes but no process group of N
comes up, it raises :class:`DistributedSetupError` with one message naming what was found and what to run,
instead of training N unaware copies of the same model on the same data.

The gathers (:func:`gather`, :func:`all_reduce_sum`) need only ``torch.distributed`` and are the identity
in a single process, so one loss code path serves both (``lexvla.losses``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Launchers' names for "how many processes" / "which one am I", most specific first.
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")

LAUNCH_HELP = ("launch several processes with `torchrun --nproc_per_node N -m lexvla.train ...` or "
               "`accelerate launch --multi_gpu --num_processes N -m lexvla.train ...` (docs/training.md; "
               "on a machine without GPUs both run gloo on the CPU)")


class DistributedSetupError(ValueError):
    """The launch environment and the process group disagree (e.g. N processes announced, none joined)."""


def _env_int(environ: Mapping[str, str], names: Sequence[str]) -> tuple[str, int] | None:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return name, int(value)
            except ValueError:
                raise DistributedSetupError(f"environment variable {name}={value!r} is not an integer") from None
    return None


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher announced (before any process group exists)."""

    world_size: int
    rank: int
    local_rank: int
    launcher: str  # torchrun | accelerate | mpirun | slurm | single
    source: str  # the variable the world size came from ("" for a single process)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv:
        env = os.environ if environ is None else environ
        world = _env_int(env, _WORLD_VARS)
        if world is None or world[1] <= 1:
            return cls(1, 0, 0, _launcher(env), world[0] if world else "")
        rank = _env_int(env, _RANK_VARS)
        if rank is None:
            raise DistributedSetupError(
                f"{world[0]}={world[1]} says {world[1]} processes, but no RANK is set, so this process cannot "
                f"know which one it is; {LAUNCH_HELP}")
        local = _env_int(env, _LOCAL_RANK_VARS)
        if not 0 <= rank[1] < world[1]:
            raise DistributedSetupError(f"{rank[0]}={rank[1]} is outside {world[0]}={world[1]}")
        return cls(world[1], rank[1], local[1] if local else rank[1], _launcher(env), world[0])


def _launcher(env: Mapping[str, str]) -> str:
    if any(k.startswith("ACCELERATE_") for k in env):
        return "accelerate"  # accelerate launch exports its settings as ACCELERATE_* (then runs torchrun's agent)
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpirun"
    if "SLURM_PROCID" in env:
        return "slurm"
    return "single"


def check_launch(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch environment, or :class:`DistributedSetupError` for the launches known to go wrong."""
    env = os.environ if environ is None else environ
    launch = LaunchEnv.from_environ(env)
    if (launch.world_size == 1 and str(env.get("ACCELERATE_USE_CPU", "")).lower() == "true"
            and env.get("MASTER_ADDR") and not launch.source):
        # `accelerate launch --cpu --num_processes N` (N > 1) runs the script once and only exports
        # MASTER_ADDR/PORT: Accelerate expects mpirun to start the N CPU processes.
        raise DistributedSetupError(
            "`accelerate launch --cpu --num_processes N` started a single process (Accelerate starts several CPU "
            "processes only through mpirun, and WORLD_SIZE is not set); training it would not be the N-process "
            f"run asked for. Drop --cpu: {LAUNCH_HELP}")
    return launch


@dataclass(frozen=True)
class DistributedSetup:
    """The run as it is: recorded in ``trainer.json``, the metrics log and the first log line."""

    world_size: int
    rank: int
    local_rank: int
    device: str
    backend: str  # gloo | nccl | ... | none (single process)
    distributed_type: str  # Accelerate's name (NO, MULTI_CPU, MULTI_GPU, FSDP, ...)
    launcher: str
    mixed_precision: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}) on {self.device}, backend "
                f"{self.backend}, {self.distributed_type} via {self.launcher}, precision {self.mixed_precision}")


def build_accelerator(mixed_precision: str = "no", force_cpu: bool = False, kwargs_handlers: Sequence[Any] = ()
                      ) -> tuple[Any, DistributedSetup]:
    """An ``accelerate.Accelerator`` whose process group matches the launch environment, and its setup.

    Device: a GPU per process when CUDA is present (NCCL), else the CPU (gloo); ``force_cpu`` keeps a GPU
    machine on the CPU.
    """
    from accelerate import Accelerator

    launch = check_launch()
    use_cpu = force_cpu or not torch.cuda.is_available()
    try:
        acc = Accelerator(mixed_precision=mixed_precision, cpu=use_cpu, kwargs_handlers=list(kwargs_handlers))
    except (RuntimeError, ValueError, OSError) as err:
        if launch.world_size == 1:
            raise
        raise DistributedSetupError(
            f"{launch.source}={launch.world_size} (rank {launch.rank}) says {launch.world_size} processes, but the "
            f"process group could not be initialised ({'gloo' if use_cpu else 'nccl'}): {err}. {LAUNCH_HELP}"
        ) from err
    if acc.num_processes != launch.world_size or (launch.world_size > 1 and not dist.is_initialized()):
        raise DistributedSetupError(
            f"{launch.source or 'the environment'} says {launch.world_size} processes but the process group has "
            f"{acc.num_processes} (distributed type {acc.distributed_type}); refusing to train "
            f"{launch.world_size} independent copies. {LAUNCH_HELP}")
    backend = acc.state.backend if acc.num_processes > 1 else None
    setup = DistributedSetup(
        world_size=acc.num_processes, rank=acc.process_index, local_rank=acc.local_process_index,
        device=str(acc.device), backend=str(backend or "none"),
        distributed_type=str(acc.distributed_type).split(".")[-1], launcher=launch.launcher,
        mixed_precision=str(acc.mixed_precision))
    return acc, setup


# ------------------------------------------------------------------------------------------- gathers
def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_sizes(n: int, device: torch.device, world: int) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """all_gather for tensors whose first dimension differs per rank (padded to the largest)."""
    top = max(sizes)
    pad = x.new_zeros((top - x.shape[0], *x.shape[1:]))
    padded = torch.cat([x, pad]) if pad.shape[0] else x.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, sizes, strict=True)]


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradient of each rank's slice over all ranks
    and hands it to the owner (all-reduce, which every backend has, then slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat(_all_gather_padded(x.detach(), list(sizes)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


@dataclass
class Gathered:
    """The global batch as this rank sees it."""

    vectors: torch.Tensor  # (N, ...) every rank's rows in rank order
    offset: int  # first row of this rank's rows in ``vectors``
    count: int  # this rank's rows
    total: int  # N


def gather(x: torch.Tensor, with_grad: bool) -> Gathered:
    """Rows of every rank in rank order (ranks may hold different numbers of rows).

    ``with_grad=False``: other ranks' rows are constants, this rank's rows keep their autograd history.
    ``with_grad=True``: the gradients that every rank's copy of this rank's rows receives are summed back
    here (what a loss that scores only local rows against the gathered batch needs).
    """
    rank, world = dist_info()
    if world == 1:
        return Gathered(x, 0, x.shape[0], x.shape[0])
    sizes = _gather_sizes(x.shape[0], x.device, world)
    offset = sum(sizes[:rank])
    if with_grad:
        full = _GatherWithGrad.apply(x, tuple(sizes), rank)
    else:
        parts = _all_gather_padded(x.detach(), sizes)
        parts[rank] = x
        full = torch.cat(parts)
    return Gathered(full, offset, x.shape[0], sum(sizes))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a (detached) tensor; ``x`` itself in a single process."""
    _, world = dist_info()
    if world == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in value (exactly: ``x - x.detach()`` is 0), its gradient times ``factor``."""
    if factor == 1:
        return x
    return x + (factor - 1) * (x - x.detach())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; in memory only, for the wire), in rank order."""
    _, world = dist_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks (one flat buffer per call): for a trainer whose loss is
    already normalised over the global batch and whose model is not wrapped in DDP."""
    _, world = dist_info()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    start = 0
    for g in grads:
        g.copy_(flat[start:start + g.numel()].view_as(g))
        start += g.numel()


def broadcast_from_main(tensors: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values into every rank's tensors (what DDP does when it wraps a model)."""
    _, world = dist_info()
    if world == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)
