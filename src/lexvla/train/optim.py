"""AdamW with one parameter group per trained part, and the warm-up + cosine schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..schedule import WarmupCosine
from .config import PARAM_GROUPS, OptimSection

# Trained parameter name -> group. Checked in order; every trainable parameter must match one, so a new
# trainable part in the model fails loudly here instead of silently training at a default rate.
_GROUP_RULES: dict[str, Callable[[str], bool]] = {
    "lora": lambda n: "lora_" in n,
    "visual_codebook": lambda n: n == "visual_codebook",
    "temperature": lambda n: n == "logit_scale",
    "adapter": lambda n: n.startswith("adapter."),
}


def group_of(name: str) -> str:
    for group, rule in _GROUP_RULES.items():
        if rule(name):
            return group
    raise ValueError(f"trainable parameter {name!r} belongs to none of the groups {list(PARAM_GROUPS)}; "
                     "add a rule in lexvla.train.optim")


def _decays(name: str, param: nn.Parameter) -> bool:
    # Biases, norms and the scalar temperature are not decayed (as in CLIP / open_clip).
    return param.ndim >= 2 and "norm" not in name


@dataclass
class GroupSummary:
    name: str
    params: int
    tensors: int
    lr: float
    weight_decay: float


def param_groups(model: nn.Module, cfg: OptimSection) -> tuple[list[dict], list[GroupSummary]]:
    """AdamW parameter groups (named ``<group>`` / ``<group>/no_decay``) over the trainable parameters."""
    buckets: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = group_of(name)
        decay = cfg.weight_decay[group] > 0 and _decays(name, p)
        buckets.setdefault(group if decay else f"{group}/no_decay", []).append(p)
    if not buckets:
        raise ValueError("the model has no trainable parameters")
    groups, summary = [], []
    for key in sorted(buckets):
        base = key.split("/")[0]
        wd = cfg.weight_decay[base] if not key.endswith("/no_decay") else 0.0
        params = buckets[key]
        groups.append({"params": params, "lr": cfg.lr[base], "weight_decay": wd, "name": key})
        summary.append(GroupSummary(key, sum(p.numel() for p in params), len(params), cfg.lr[base], wd))
    return groups, summary


def build_optimizer(model: nn.Module, cfg: OptimSection) -> tuple[torch.optim.AdamW, list[GroupSummary]]:
    groups, summary = param_groups(model, cfg)
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps), summary


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    fn = WarmupCosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.schedule == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
