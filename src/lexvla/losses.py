"""Training objectives: a loss is a list of named terms, each with a weight schedule.

Formulas (plain modules, also used by ``lexvla.eval.metrics`` to report their values on a set):

- :class:`ContrastiveLoss`: symmetric InfoNCE (CLIP-style) with the model's learnable temperature.
- :class:`OveruseLoss`: the paper's penalty against "false discoveries" (words that fire for everything).
- :class:`FlopsLoss`: SPLADE's FLOPs regulariser, for comparison.

Composition:

- :class:`Term`: a name, a function of the :class:`GlobalBatch`, a weight (a number or a schedule of the
  step such as :class:`RampUp`).
- :class:`CompositeLoss`: gathers the batch from every process *inside the loss* (as open_clip's
  ``ClipLoss(local_loss, gather_with_grad, rank, world_size)``), evaluates every term and sums them, so
  one process and N processes run the same code (in one process the gather is the identity).
- :class:`LexVLALoss`: InfoNCE + a registered regulariser on both sides (the paper's objective).

Across processes (every process holds its share of the global batch of N pairs):

- ``local_loss=False``: every process evaluates every term on the whole gathered batch, its own rows
  still attached to the autograd graph (the other ranks' rows are constants). The gradient reaching those
  rows is multiplied by the world size to undo DDP's gradient *averaging*; the loss itself is not scaled
  (the temperature's gradient is complete on every rank already).
- ``local_loss=True``: row terms (``Term.per_row``: InfoNCE) score only this process's rows against the
  gathered batch (labels offset by the rank's position) and are summed over ranks; gradients flow back
  through the gather to the rank that owns each row. Batch terms (regularisers of batch means) are
  computed on the gathered batch by every rank.

Both give the single-process gradient of the global batch; ``tests/test_train_distributed.py`` checks it
on two gloo processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum, dist_info, gather, scale_grad
from .schedule import RampUp

__all__ = ["REGULARISERS", "CompositeLoss", "ContrastiveLoss", "FlopsLoss", "GlobalBatch", "InfoNCETerm",
           "LexVLALoss", "LossOutput", "OveruseLoss", "RampUp", "SideTerm", "Term"]


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the batch: image i and text i are the positives.

    ``labels``: the positive column of each row when ``image``/``text`` hold only some rows of a larger
    (gathered) batch; ``reduction="sum"`` sums the rows' cross-entropies instead of averaging them.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = logit_scale * image @ text.T
        if labels is None:
            labels = torch.arange(image.shape[0], device=image.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class OveruseLoss(nn.Module):
    """``a = S.mean(0)`` per word; ``L = sum_j (a_j / sum_k a_k) * a_j^2``.

    Words activated strongly across the whole batch carry a large share *and* a large mean, so they
    are penalised most; rare, specific words almost not at all. (Form inferred from the paper's text;
    see docs/architecture.md.)
    """

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        a = vectors.abs().mean(0)
        return (a * a.pow(2)).sum() / a.sum().clamp_min(1e-12)


class FlopsLoss(nn.Module):
    """SPLADE's FLOPs regulariser: ``sum_j (mean_i |s_ij|)^2``."""

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.abs().mean(0).pow(2).sum()


REGULARISERS: dict[str, type[nn.Module] | None] = {"overuse": OveruseLoss, "flops": FlopsLoss, "none": None}


# ------------------------------------------------------------------------------------------ composition
@dataclass
class GlobalBatch:
    """What a term sees: the batch of every process, and where this process's rows are in it.

    ``image``/``text``: (N, V) all rows in rank order; ``local_image``/``local_text``: this process's rows
    (rows ``offset .. offset + count`` of the gathered ones; both carry gradient as the mode requires).
    """

    image: torch.Tensor
    text: torch.Tensor
    local_image: torch.Tensor
    local_text: torch.Tensor
    logit_scale: torch.Tensor
    offset: int
    count: int
    total: int
    local_loss: bool

    @property
    def labels(self) -> torch.Tensor:
        """Positive column of each local row in the gathered batch."""
        return torch.arange(self.offset, self.offset + self.count, device=self.local_image.device)


class InfoNCETerm(nn.Module):
    """InfoNCE as a term. Local-loss mode: this process's rows only, summed and divided by N (the ranks'
    values add up to the global mean)."""

    per_row = True

    def __init__(self) -> None:
        super().__init__()
        self.formula = ContrastiveLoss()

    def forward(self, b: GlobalBatch) -> torch.Tensor:
        if not b.local_loss:
            return self.formula(b.image, b.text, b.logit_scale)
        i2t = F.cross_entropy(b.logit_scale * b.local_image @ b.text.T, b.labels, reduction="sum")
        t2i = F.cross_entropy(b.logit_scale * b.local_text @ b.image.T, b.labels, reduction="sum")
        return 0.5 * (i2t + t2i) / b.total


class SideTerm(nn.Module):
    """A function of one side's gathered vectors (a regulariser of batch means)."""

    per_row = False

    def __init__(self, formula: nn.Module, side: str) -> None:
        super().__init__()
        if side not in ("image", "text"):
            raise ValueError(f"side must be 'image' or 'text', got {side!r}")
        self.formula, self.side = formula, side

    def forward(self, b: GlobalBatch) -> torch.Tensor:
        return self.formula(b.image if self.side == "image" else b.text)


Weight = float | Callable[[int], float]


@dataclass
class Term:
    """One named part of a loss: ``weight`` is a number or a schedule ``step -> weight``."""

    name: str
    fn: nn.Module  # GlobalBatch -> scalar; ``fn.per_row`` marks a sum over rows (see the module docs)
    weight: Weight = 1.0

    def weight_at(self, step: int) -> float:
        return float(self.weight(step)) if callable(self.weight) else float(self.weight)


@dataclass
class LossOutput:
    """``loss``: what to call backward on. ``value``: the loss of the global batch (the number a single
    process would report; equal to ``loss`` in one process). ``terms``: unweighted global values."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    value: torch.Tensor | None = None
    global_batch: int = 0


class CompositeLoss(nn.Module):
    """A weighted sum of named terms on the batch gathered from every process (rank and world size come
    from ``torch.distributed`` at each call: one process when it is not initialised)."""

    def __init__(self, terms: Sequence[Term], local_loss: bool = False) -> None:
        super().__init__()
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}")
        if not terms:
            raise ValueError("a loss needs at least one term")
        self.terms = list(terms)
        self.modules_ = nn.ModuleList([t.fn for t in terms])  # registered, so .to() reaches them
        self.local_loss = local_loss

    def gathered(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> GlobalBatch:
        _, world = dist_info()
        if self.local_loss:
            gi, gt = gather(image, with_grad=True), gather(text, with_grad=True)
        else:
            image, text = scale_grad(image, world), scale_grad(text, world)
            gi, gt = gather(image, with_grad=False), gather(text, with_grad=False)
        return GlobalBatch(gi.vectors, gt.vectors, image, text, logit_scale, gi.offset, gi.count, gi.total,
                           self.local_loss)

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, step: int = 0
                ) -> LossOutput:
        _, world = dist_info()
        b = self.gathered(image, text, logit_scale)
        total = image.new_zeros(())
        value = image.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for term in self.terms:
            w = term.weight_at(step)
            v = term.fn(b)
            if self.local_loss and getattr(term.fn, "per_row", False):
                total = total + w * world * v  # x world: DDP averages the ranks' gradients
                v = all_reduce_sum(v)
            else:
                total = total + w * v
            terms[term.name] = v.detach()
            weights[term.name] = w
            value = value + w * v.detach()
        return LossOutput(total, terms, weights, value, b.total)


class LexVLALoss(CompositeLoss):
    """InfoNCE (``contrastive``) + a ramped regulariser on both sides (``<name>_image``, ``<name>_text``)."""

    def __init__(self, regulariser: str = "overuse", image_weight: float = 1e-3, text_weight: float = 1e-3,
                 ramp_steps: int = 0, local_loss: bool = False) -> None:
        if regulariser not in REGULARISERS:
            raise ValueError(f"regulariser must be one of {sorted(REGULARISERS)}, got {regulariser!r}")
        terms = [Term("contrastive", InfoNCETerm())]
        cls = REGULARISERS[regulariser]
        if cls is not None:
            terms += [Term(f"{regulariser}_image", SideTerm(cls(), "image"), RampUp(image_weight, ramp_steps)),
                      Term(f"{regulariser}_text", SideTerm(cls(), "text"), RampUp(text_weight, ramp_steps))]
        super().__init__(terms, local_loss=local_loss)
        self.name = regulariser
