"""Two-stage LLaVA-style training of a :class:`~lexvla.cal.vlm.SmallVLM`, with or without CAL.

Stage "pretrain" trains the projector only (LLM frozen); stage "finetune" trains the projector and LoRA
adapters. Accelerate places the model and does backward/clipping; checkpoints hold only the trained
weights (safetensors), the optimiser state (safetensors + JSON) and the step, so a run resumes exactly
where it stopped (the batch order is a pure function of seed and step). Metrics go to ``metrics.jsonl``.
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
from typing import Any

import torch
from tqdm.auto import tqdm

from lexvla.cal.data import VLMExample, format_target
from lexvla.cal.loss import CALConfig, CALLoss, CALOutput
from lexvla.cal.vlm import SmallVLM

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")


@dataclass
class TrainConfig:
    """One training stage.

    cal: re-weight the loss with CAL (``cal_config``) or train with plain mean cross-entropy.
    lr: peak learning rate (linear warm-up over ``warmup_steps``, then cosine to 10% of it).
    save_every: checkpoint every n steps (0 = only at the end); ``keep_checkpoints`` newest are kept.
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

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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


# ------------------------------------------------------------------------------------ checkpoints
def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, slot in state["state"].items():
        for key, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars["state"].setdefault(str(idx), {})[key] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, slot in scalars["state"].items():
        state.setdefault(int(idx), {}).update(slot)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(path: Path, model: SmallVLM, optimizer: torch.optim.Optimizer, step: int,
                    config: TrainConfig) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tensors, scalars = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, tmp / "optimizer.safetensors")
    state = {"step": step, "optimizer": scalars, "train_config": dataclasses.asdict(config)}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.replace(path)
    return path


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def _prune(output_dir: Path, keep: int) -> None:
    import shutil

    ckpts = sorted((output_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------- training
def train_stage(model: SmallVLM, examples: Sequence[VLMExample], features: dict[str, torch.Tensor],
                config: TrainConfig, output_dir: str | Path, resume: bool = True,
                blurred_features: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train one stage; with ``resume`` continue from the newest checkpoint in ``output_dir``.
    ``blurred_features`` (backbone tokens of the blurred images) are needed by CAL's "blur" condition."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    if not examples:
        raise ValueError("no training examples")
    needs_blur = config.cal and config.cal_config.condition == "blur"
    if needs_blur and blurred_features is None:
        raise ValueError("CAL condition 'blur' needs blurred_features (see lexvla.cal.data.compute_features)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.set_stage(config.stage)
    start = 0
    ckpt = latest_checkpoint(output_dir) if resume else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if ckpt is not None:
        from safetensors.torch import load_file as _load

        model.load_trainable(_load(ckpt / "trainable.safetensors"))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        optimizer.load_state_dict(_unflatten_optimizer(load_file(ckpt / "optimizer.safetensors"),
                                                       state["optimizer"]))
        start = int(state["step"])
        logger.info("resuming %s from %s (step %d)", config.stage, ckpt, start)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, optimizer = accelerator.prepare(model, optimizer)
    vlm: SmallVLM = accelerator.unwrap_model(model)
    loss_fn = CALLoss(config.cal_config, enabled=config.cal)
    metrics = (output_dir / "metrics.jsonl").open("a")
    t0, last = time.time(), float("nan")
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not config.progress,
               desc=f"{config.stage}{' +CAL' if config.cal else ''}")
    for step in bar:
        t_step = time.time()
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        batch = [examples[i] for i in batch_indices(len(examples), config.batch_size, step, config.seed)]
        tokens, feats = make_batch(vlm, batch, features)
        blurred = make_batch(vlm, batch, blurred_features)[1] if needs_blur else None
        out: CALOutput = loss_fn(vlm.logits, vlm.multimodal_inputs(tokens, feats, blurred))
        accelerator.backward(out.loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last = float(out.loss.detach())
        if not math.isfinite(last):
            raise FloatingPointError(f"non-finite loss at step {step} of stage {config.stage}")
        bar.set_postfix(loss=f"{last:.3f}")
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            record = {"stage": config.stage, "cal": config.cal, "step": step + 1, "loss": last,
                      "ce": float(out.ce_loss), "lr": config.lr_at(step), "sec_per_step": time.time() - t_step,
                      "tokens": out.num_tokens}
            if out.logit_diff is not None:
                v = out.valid
                record.update(weight_mean=float(out.weights[v].mean()), diff_mean=float(out.logit_diff[v].mean()))
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save_checkpoint(output_dir / "checkpoints" / f"step-{step + 1}", vlm, optimizer, step + 1, config)
            _prune(output_dir, config.keep_checkpoints)
    metrics.close()
    final = save_checkpoint(output_dir / "checkpoints" / f"step-{config.steps}", vlm, optimizer, config.steps, config)
    _prune(output_dir, config.keep_checkpoints)
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
