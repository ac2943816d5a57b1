"""Schedules of the step shared by the trainers: the learning rate's warm-up + cosine, a weight's ramp-up.

:class:`WarmupCosine` is the LR multiplier of the LexVLA trainer (``lexvla.train.optim``) and of the CAL
trainer (``lexvla.cal.train``, floor 0.1); :class:`RampUp` is the regulariser weights' schedule in
``lexvla.losses``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """lr multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> ``floor`` at ``total``
    (``cosine=False``: constant 1 after the warm-up)."""

    warmup: int
    total: int
    floor: float = 0.0
    cosine: bool = True

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class RampUp:
    """Weight that grows quadratically from 0 to ``final`` over ``steps`` steps, then stays."""

    final: float
    steps: int = 0

    def __call__(self, step: int) -> float:
        if self.steps <= 0 or step >= self.steps:
            return self.final
        return self.final * (max(step, 0) / self.steps) ** 2
