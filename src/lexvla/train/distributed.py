"""The contrastive loss across processes: every process sees the global batch.

Each process encodes its own share of the batch. The lexical vectors are gathered from every rank so
the InfoNCE negatives (and the regulariser's batch means) cover the *global* batch, as open_clip does:

- ``local_loss=False``: each process scores the whole gathered batch, its own rows carrying gradient
  (the other ranks' rows are constants here; their gradients are computed on their own ranks). Every
  rank's local vectors then get the exact gradient of the global loss; DDP *averages* parameter
  gradients, so the gradient reaching the local rows is multiplied by the world size to undo the
  average (not the loss: the temperature's gradient is complete on every rank already).
- ``local_loss=True``: each process scores only its own rows (image->all texts, text->all images,
  labels offset by its position in the gathered batch). Gradients flow back through the gather to the
  rank that owns each row (:class:`_GatherWithGrad`), so the summed per-rank losses again give the
  exact global gradient.

In both modes the optimiser sees the same gradient as a single process holding the whole batch (up to
float summation order); ``tests/test_train_distributed.py`` checks this with two gloo processes.
Ranks may hold different numbers of rows (skipped samples): sizes are gathered first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..losses import LexVLALoss, LossOutput


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
    return [p[:n] for p, n in zip(parts, sizes)]


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

    vectors: torch.Tensor  # (N, V) every rank's rows in rank order
    offset: int  # first row of this rank's rows in ``vectors``
    count: int  # this rank's rows
    total: int  # N


def gather(x: torch.Tensor, with_grad: bool) -> Gathered:
    """Rows of every rank in rank order. ``with_grad=False``: other ranks' rows are constants and this
    rank's rows keep their autograd history. ``with_grad=True``: gradients of every rank's copy of this
    rank's rows are summed back here (for the local loss)."""
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


@dataclass
class DistributedLossOutput:
    """``loss`` is what to call backward on; ``global_loss`` is the global batch's loss value (the same
    number a single process would report), ``terms``/``weights`` as in :class:`LossOutput`."""

    loss: torch.Tensor
    global_loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]
    global_batch: int


class GatheredLexVLALoss(torch.nn.Module):
    """:class:`lexvla.losses.LexVLALoss` on the global batch gathered from every process."""

    def __init__(self, loss: LexVLALoss, local_loss: bool = False) -> None:
        super().__init__()
        self.inner = loss
        self.local_loss = local_loss

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                step: int) -> DistributedLossOutput:
        _, world = dist_info()
        if not self.local_loss:
            gi = gather(_scale_grad(image, world), with_grad=False)
            gt = gather(_scale_grad(text, world), with_grad=False)
            out: LossOutput = self.inner(gi.vectors, gt.vectors, logit_scale, step)
            return DistributedLossOutput(out.loss, out.loss.detach(), out.terms, out.weights, gi.total)
        gi, gt = gather(image, with_grad=True), gather(text, with_grad=True)
        labels = torch.arange(gi.offset, gi.offset + gi.count, device=image.device)
        i2t = F.cross_entropy(logit_scale * image @ gt.vectors.T, labels, reduction="sum")
        t2i = F.cross_entropy(logit_scale * text @ gi.vectors.T, labels, reduction="sum")
        # Sum of this rank's rows / N: the ranks' losses add up to the global mean; x world for DDP's mean.
        local = 0.5 * (i2t + t2i) / gi.total
        total = local * world
        terms = {"contrastive": local.detach()}
        weights = {"contrastive": 1.0}
        reg = self.inner.regulariser
        if reg is not None:
            # Every rank computes the same regulariser on the gathered vectors; the gather's backward
            # sums the world copies of the gradient, so each rank adds 1/world of it.
            wi, wt = self.inner.image_weight(step), self.inner.text_weight(step)
            ri, rt = reg(gi.vectors), reg(gt.vectors)
            name = self.inner.name
            terms.update({f"{name}_image": ri.detach(), f"{name}_text": rt.detach()})
            weights.update({f"{name}_image": wi, f"{name}_text": wt})
            total = total + (wi * ri + wt * rt)
        contrastive = _sum_over_ranks(local.detach())
        terms["contrastive"] = contrastive
        global_loss = contrastive + sum(weights[k] * terms[k] for k in terms if k != "contrastive")
        return DistributedLossOutput(total, global_loss, terms, weights, gi.total)


def _scale_grad(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``x`` unchanged in value (exactly: ``x - x.detach()`` is 0), its gradient times ``factor``."""
    if factor == 1:
        return x
    return x + (factor - 1) * (x - x.detach())


def _sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    _, world = dist_info()
    if world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
