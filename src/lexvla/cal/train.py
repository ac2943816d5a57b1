"""Two-stage LLaVA-style training of a :class:`~lexvla.cal.vlm.SmallVLM`, with or without CAL.

Stage "pretrain" trains the projector only (LLM frozen); stage "finetune" trains the projector and LoRA
adapters. The distributed setup, the checkpoints (trained weights + optimiser state in safetensors, every
rank's RNG, rotation) and the warm-up + cosine schedule are the LexVLA trainer's (``lexvla.distributed``,
``lexvla.checkpoint``, ``lexvla.schedule``); a run resumes exactly where it stopped (the batch order is a
pure function of seed and step). Metrics go to ``metrics.jsonl`` (rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lexvla.cal.data import VLMExample, format_target
from lexvla.cal.loss import CALConfig, CALLoss, CALOutput
from lexvla.cal.vlm import SmallVLM
from lexvla.checkpoint import CheckpointWriter, latest_checkpoint, restore_checkpoint
from lexvla.distributed import (
    all_reduce_grads,
    all_reduce_sum,
    broadcast_from_main,
    build_accelerator,
    gather_objects,
)
from lexvla.schedule import WarmupCosine
from lexvla.train.tracking import drop_records_after

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")


@dataclass
class TrainConfig:
    """One training stage.

    cal: re-weight the loss with CAL (``cal_config``) or train with plain mean cross-entropy.
    lr: peak learning rate (linear warm-up over ``warmup_steps``, then cosine to 10% of it).
    save_every: checkpoint every n steps (0 = only at the end); ``keep_checkpoints`` newest are kept.
    batch_size: the global batch (all processes together).
    """

    stage: str = "pretrain"
    cal: bool = True
    cal_config: CALConfig = field(default_factory=CALConfig)
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    log_samples: bool = False  # rank 0 writes samples.jsonl: the example indices every rank trained on, per step

    def __post_init__(self) -> None:
        if isinstance(self.cal_config, dict):
            self.cal_config = CALConfig(**self.cal_config)
        if self.stage not in STAGES:
            raise ValueError(f"TrainConfig.stage must be one of {STAGES}, got {self.stage!r}")
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("TrainConfig: warmup_steps and save_every must be >= 0, keep_checkpoints >= 1")

    def schedule(self) -> WarmupCosine:
        """The learning-rate multiplier: the LexVLA trainer's warm-up + cosine, floor 10%."""
        return WarmupCosine(self.warmup_steps, self.steps, floor=0.1)

    def lr_at(self, step: int) -> float:
        return self.lr * self.schedule()(step)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    output_dir: Path
    checkpoint: Path


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of batch ``step``: consecutive slices of per-epoch seeded permutations (resumable)."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out += perm[offset:offset + take].tolist()
        pos += take
    return out


def make_batch(model: SmallVLM, examples: Sequence[VLMExample], features: dict[str, torch.Tensor]):
    """Token batch + stacked backbone features of a list of examples."""
    prompts = [model.vqa_prompts([ex.question])[0] if ex.question is not None else model.config.caption_prompt
               for ex in examples]
    tokens = model.tokenize(prompts, [format_target(ex.target) for ex in examples])
    try:
        feats = torch.stack([features[ex.image] for ex in examples]).float()
    except KeyError as err:
        raise KeyError(f"no precomputed backbone features for image {err.args[0]}") from None
    return tokens, feats


# ---------------------------------------------------------------------------------------- training
CHECKPOINT_WIDTH = 0  # CAL checkpoints are named step-<N> (docs/cal.md, --init runs/s1/checkpoints/step-20)


def rank_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global batch (the ranks' shares, in rank order, are the batch)."""
    if len(indices) % world:
        raise ValueError(f"TrainConfig.batch_size {len(indices)} (the global batch) must be divisible by the "
                         f"number of processes {world}")
    per = len(indices) // world
    return indices[rank * per:(rank + 1) * per]


def global_token_mean(out: CALOutput, cal: bool, eps: float) -> tuple[torch.Tensor, float, float]:
    """The loss of the global batch from this rank's share: (what to backpropagate, loss value, plain CE).

    CAL normalises the weighted CE sum by the sum of the weights (plain CE: by the token count); across
    processes both sums must be the global ones, so this rank's loss is rescaled by local / global
    normaliser. The ranks' gradients then *add up* to the single-process gradient (they are all-reduced
    with a sum, see :func:`lexvla.distributed.all_reduce_grads`). In one process the scale is exactly 1.
    """
    extra = eps if cal else 0.0
    local_norm = out.weights[out.valid].sum().float()
    norm = all_reduce_sum(local_norm) + extra
    scale = (local_norm + extra) / norm
    loss = out.loss * scale
    n_local = out.valid.sum().float()
    ce = all_reduce_sum(out.ce_loss.detach() * n_local) / all_reduce_sum(n_local)
    return loss, float(all_reduce_sum(loss.detach())), float(ce)


def train_stage(model: SmallVLM, examples: Sequence[VLMExample], features: dict[str, torch.Tensor],
                config: TrainConfig, output_dir: str | Path, resume: bool = True,
                blurred_features: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train one stage; with ``resume`` continue from the newest checkpoint in ``output_dir``.
    ``blurred_features`` (backbone tokens of the blurred images) are needed by CAL's "blur" condition.

    Several processes (``torchrun --nproc_per_node N -m lexvla.cal train ...``): ``config.batch_size`` is
    the global batch, each rank trains on its contiguous share, the loss is normalised over the global
    batch's tokens and the gradients are summed over ranks, so the step equals one process on the whole
    batch (smoothing ``flattened`` excepted at the rank boundary: its window runs over each rank's
    flattened batch, as in the official multi-GPU code). Rank 0 logs and writes checkpoints."""
    from safetensors.torch import load_file

    if not examples:
        raise ValueError("no training examples")
    needs_blur = config.cal and config.cal_config.condition == "blur"
    if needs_blur and blurred_features is None:
        raise ValueError("CAL condition 'blur' needs blurred_features (see lexvla.cal.data.compute_features)")
    acc, setup = build_accelerator()
    rank, world = setup.rank, setup.world_size
    main = rank == 0
    if config.batch_size % world:
        raise ValueError(f"TrainConfig.batch_size {config.batch_size} (the global batch) must be divisible by "
                         f"the number of processes {world}")
    output_dir = Path(output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    model.set_stage(config.stage)
    start = 0
    ckpt = latest_checkpoint(output_dir) if resume else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = config.schedule()
    record_setup = {**setup.to_dict(), "per_device_batch": config.batch_size // world,
                    "global_batch": config.batch_size, "grad_accum": 1}
    if main:
        logger.info("distributed setup: %s; batch %d per device, %d global", setup.describe(),
                    config.batch_size // world, config.batch_size)
    if ckpt is not None:
        model.load_trainable(load_file(ckpt / "trainable.safetensors"))
        start = int(restore_checkpoint(ckpt, optimizer, rank=rank)["step"])
        logger.info("resuming %s from %s (step %d)", config.stage, ckpt, start)
    # The model is called through its own methods (logits / multimodal_inputs), not a DDP wrapper's
    # forward: gradients are summed over ranks explicitly after backward.
    vlm: SmallVLM = model.to(acc.device)
    broadcast_from_main(params)  # every rank starts from rank 0's weights, as DDP would make it
    writer = CheckpointWriter(output_dir, config.keep_checkpoints, barrier=acc.wait_for_everyone,
                              width=CHECKPOINT_WIDTH)
    state = {"train_config": dataclasses.asdict(config), "setup": record_setup}

    def save(step: int) -> Path:
        return writer.save(step, vlm.save_pretrained, optimizer, state)

    loss_fn = CALLoss(config.cal_config, enabled=config.cal)
    if main and ckpt is not None:  # records the killed run wrote after its last checkpoint
        for name in ("metrics.jsonl", "samples.jsonl"):
            drop_records_after(output_dir / name, start)
    metrics = (output_dir / "metrics.jsonl").open("a") if main else None
    t0, last = time.time(), float("nan")
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not (config.progress and main),
               desc=f"{config.stage}{' +CAL' if config.cal else ''}")
    for step in bar:
        t_step = time.time()
        lr = config.lr * schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = rank_slice(batch_indices(len(examples), config.batch_size, step, config.seed), rank, world)
        batch = [examples[i] for i in mine]
        if config.log_samples:
            shares = gather_objects(mine)  # collective: every rank sends its indices
            if main:
                with (output_dir / "samples.jsonl").open("a") as f:
                    f.write(json.dumps({"step": step + 1, "ranks": shares}) + "\n")
        tokens, feats = make_batch(vlm, batch, features)
        blurred = make_batch(vlm, batch, blurred_features)[1] if needs_blur else None
        out: CALOutput = loss_fn(vlm.logits, vlm.multimodal_inputs(tokens, feats.to(acc.device),
                                                                   None if blurred is None else blurred.to(acc.device)))
        loss, last, ce = global_token_mean(out, config.cal, config.cal_config.eps)
        loss.backward()
        all_reduce_grads(params)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(last):
            raise FloatingPointError(f"non-finite loss at step {step} of stage {config.stage}")
        bar.set_postfix(loss=f"{last:.3f}")
        tokens = int(all_reduce_sum(out.valid.sum()))  # collective: every rank, every step
        if metrics is not None and ((step + 1) % config.log_every == 0 or step + 1 == config.steps):
            record = {"stage": config.stage, "cal": config.cal, "step": step + 1, "loss": last,
                      "ce": ce, "lr": lr, "sec_per_step": time.time() - t_step,
                      "tokens": tokens, "world_size": world,
                      "global_batch": config.batch_size}
            if out.logit_diff is not None:
                v = out.valid
                record.update(weight_mean=float(out.weights[v].mean()), diff_mean=float(out.logit_diff[v].mean()))
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save(step + 1)
    if metrics is not None:
        metrics.close()
    final = save(config.steps)
    return TrainResult(config.steps, last, time.time() - t0, output_dir, final)


# -------------------------------------------------------------------------------------- evaluation
@dataclass
class VQAEval:
    accuracy: float
    n: int
    by_kind: dict[str, float]


@torch.no_grad()
def evaluate_vqa(model: SmallVLM, examples: Sequence[VLMExample], features: dict[str, torch.Tensor],
                 candidates: Sequence[str], batch_size: int = 64,
                 kind_of: dict[str, str] | None = None) -> VQAEval:
    """Closed-set accuracy: the candidate answer whose first token scores highest after the prompt.
    ``kind_of`` maps an answer to its kind for a per-kind breakdown."""
    model.eval()
    cands = [format_target(c) for c in candidates]
    correct: list[bool] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        feats = torch.stack([features[ex.image] for ex in chunk]).float()
        scores = model.answer_scores([ex.question or "" for ex in chunk], feats, cands)
        pred = scores.argmax(-1).tolist()
        correct += [candidates[p] == (ex.clean_target or ex.target) for p, ex in zip(pred, chunk, strict=True)]
    by_kind: dict[str, list[bool]] = {}
    if kind_of:
        for ok, ex in zip(correct, examples, strict=True):
            by_kind.setdefault(kind_of.get(ex.target, "other"), []).append(ok)
    model.train()
    return VQAEval(sum(correct) / max(1, len(correct)), len(correct),
                   {k: sum(v) / len(v) for k, v in by_kind.items()})
