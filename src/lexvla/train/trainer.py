"""The training loop: one code path for one CPU, one GPU and DDP over N processes (Hugging Face Accelerate).

Launch with ``lexvla train --config run.yaml`` (one process) or ``torchrun --nproc_per_node N -m
lexvla.train --config run.yaml`` / ``accelerate launch --multi_gpu --num_processes N -m lexvla.train ...``
(several; :func:`lexvla.distributed.build_accelerator` picks gloo on the CPU, NCCL on GPUs).
``data.batch_size`` is the global batch of one micro-step; the contrastive loss is computed over all of it
(gathered inside :class:`lexvla.losses.LexVLALoss`), and with ``grad_accum`` = K over the K micro-batches
of a step together (cached embeddings, :func:`_accumulated_step`). Rank 0 logs and writes; every rank
takes part in the collective parts (gathers, checkpoints' RNG states, barriers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..checkpoint import CheckpointWriter, latest_checkpoint, restore_checkpoint
from ..distributed import DistributedSetup, build_accelerator, gather_objects
from ..losses import LexVLALoss, LossOutput
from .config import TrainConfig
from .data import TrainStream
from .optim import build_optimizer, build_scheduler
from .tracking import MetricsLogger, drop_records_after

logger = logging.getLogger(__name__)


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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TrainResult:
    """What a run produced. ``model_dir`` loads with ``lexvla.load``; throughput excludes the first step."""

    output_dir: str
    model_dir: str
    checkpoint: str
    steps: int
    samples_seen: int
    seconds: float
    pairs_per_second: float
    # pairs per CPU-second of this process (all its threads): comparable across runs on a busy machine
    pairs_per_cpu_second: float
    final_metrics: dict[str, float] = field(default_factory=dict)
    validation: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # samples drawn into batches but unusable (samples_seen + skipped = pairs drawn)
    skipped_reading: int = 0  # samples the source dropped while reading its data (before any batch)
    skip_report: str = ""
    resumed_from: str | None = None
    setup: dict[str, Any] = field(default_factory=dict)  # world size, rank, device, backend, batches, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(cfg: TrainConfig) -> Any:
    """The model named in the config: a zoo name with overrides, or a saved checkpoint folder."""
    from ..models import create_model

    overrides = dict(cfg.model.overrides)
    if cfg.gradient_checkpointing is not None:
        overrides["text.gradient_checkpointing"] = cfg.gradient_checkpointing
    path = Path(cfg.model.name)
    if path.is_dir():
        if overrides:
            raise ValueError("model.overrides / gradient_checkpointing apply to zoo names, not to the saved "
                             f"model {path} (it is restored as saved)")
        from ..models import load

        model = load(path)
    else:
        from ..models.lexvla import UntrainedModelWarning

        with warnings.catch_warnings():  # an untrained model is what a trainer starts from
            warnings.simplefilter("ignore", UntrainedModelWarning)
            model = create_model(cfg.model.name, **overrides)
    model.image_trained = True  # trained from here on: validation encodes must not warn
    if getattr(model.config.text, "gradient_checkpointing", False) and model.text.trainable:
        # Reentrant checkpointing only backpropagates into LoRA when the embeddings' output needs grad.
        model.text.llm.enable_input_require_grads()
    return model.train()


def _accelerator(cfg: TrainConfig) -> tuple[Any, DistributedSetup]:
    from accelerate.utils import DistributedDataParallelKwargs

    # broadcast_buffers=False: the frozen text codebook is a (V x D) buffer that never changes; DDP would
    # otherwise re-broadcast it before every forward pass.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return build_accelerator(cfg.mixed_precision, force_cpu=cfg.cpu, kwargs_handlers=[ddp])


def run_description(cfg: TrainConfig, setup: DistributedSetup) -> dict[str, Any]:
    """What a run is, as recorded in trainer.json, metrics.jsonl and result.json."""
    per_device = cfg.data.batch_size // setup.world_size
    return {**setup.to_dict(), "per_device_batch": per_device, "global_batch": cfg.data.batch_size,
            "grad_accum": cfg.grad_accum, "contrastive_batch": cfg.data.batch_size * cfg.grad_accum,
            "local_loss": cfg.loss.local_loss}


def _resolve_resume(resume: str | bool | None, output_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume is True or resume == "auto":
        found = latest_checkpoint(output_dir)
        if found is None:
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
        return found
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint folder")
    return path


def _sparsity(vectors: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Mean number of words above the model's inference threshold (the paper's 1/sqrt(V)); none: all."""
    return (vectors.detach() > (threshold or 0.0)).sum(-1).float().mean()


def describe_run(description: dict[str, Any]) -> str:
    """The setup line every run prints: world size, rank, device, backend, batches, precision."""
    d = description
    return (f"distributed setup: rank {d['rank']}/{d['world_size']} (local {d['local_rank']}) on {d['device']}, "
            f"backend {d['backend']}, {d['distributed_type']} via {d['launcher']}, precision {d['mixed_precision']}; "
            f"batch {d['per_device_batch']} per device, {d['global_batch']} global, grad_accum {d['grad_accum']} "
            f"(contrastive batch {d['contrastive_batch']})")


def train(cfg: TrainConfig, resume: str | bool | None = None, model: Any = None,
          on_setup: Any = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; ``resume`` = a checkpoint folder, or True/"auto" for the
    newest one in ``cfg.output_dir`` (a fresh start when there is none). ``on_setup(description)`` is
    called on rank 0 once the distributed setup is known (the CLI prints it).

    ``model``: an already built LexVLA to train in place (saves loading it again, e.g. in the demo);
    ``cfg.model`` is then only recorded. It must be the same model on every process.
    """
    from accelerate.utils import set_seed

    start_time = time.perf_counter()
    acc, setup = _accelerator(cfg)
    if setup.distributed_type == "FSDP":
        # rank-0 checkpointing and validation would wait forever for the other ranks' shards
        raise ValueError("FSDP is not supported by lexvla.train yet (checkpoints and validation need the full "
                         "state dict gathered on every rank); launch without --use_fsdp: DDP (docs/training.md)")
    out_dir = Path(cfg.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "train_config.json")
    acc.wait_for_everyone()
    set_seed(cfg.seed)  # identical initialisation on every rank
    model = build_model(cfg) if model is None else model.train()
    model.image_trained = True  # its image side is trained from here on (no untrained-model warning)
    stream = TrainStream(cfg.data, model, acc, cfg.seed, progress=cfg.progress,
                         log_dir=str(out_dir / "skips") if acc.is_main_process else None)
    description = run_description(cfg, setup)
    if acc.is_main_process:
        logger.info(describe_run(description))
        if on_setup is not None:
            on_setup(description)
    total_steps = _total_steps(cfg, stream)
    optimizer, groups = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    for g in groups:
        logger.info("param group %-24s %10d params  lr %.2e  wd %.3g", g.name, g.params, g.lr, g.weight_decay)
    loss_fn = LexVLALoss(cfg.loss.regulariser, cfg.loss.image_weight, cfg.loss.text_weight, cfg.loss.ramp_steps,
                         local_loss=cfg.loss.local_loss)
    model, optimizer = acc.prepare(model, optimizer)  # the scheduler is stepped by hand: once per step
    core = acc.unwrap_model(model)
    threshold = core.sparsification.threshold_for(len(core.vocab))  # the model's inference threshold
    max_log_scale = math.log(cfg.optim.max_logit_scale)

    state = TrainerState(world_size=acc.num_processes)
    resumed = _resolve_resume(resume, out_dir)
    if resumed is not None:
        core.load_trained(load_file(resumed / "model" / "model.safetensors"))
        saved = restore_checkpoint(resumed, optimizer, scheduler, getattr(acc, "scaler", None),
                                   rank=acc.process_index)
        state = TrainerState.from_dict(saved)
        state.world_size = acc.num_processes
        stream.seek(state.epoch, state.batches_in_epoch)
        # the saved count is the sum over ranks: carry it on one rank so the next sum stays right
        stream.skipped = state.skipped if acc.is_main_process else 0
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resumed, state.step, state.epoch,
                    state.batches_in_epoch)
    else:
        set_seed(cfg.seed + acc.process_index)  # per-rank dropout streams
    writer = _Checkpoints(acc, out_dir, cfg.keep_checkpoints, description)
    tracker = MetricsLogger(out_dir, enabled=acc.is_main_process, tensorboard=cfg.tensorboard,
                            resume_step=state.step if resumed is not None else None)
    tracker.record({"step": state.step, "event": "setup", **description,
                    "resumed_from": str(resumed) if resumed else None})
    samples_log = _samples_log(out_dir, state.step if resumed else None) \
        if cfg.log_samples and acc.is_main_process else None
    validator = _Validator(cfg) if cfg.validation.dataset else None
    progress = _progress(cfg, acc, total_steps, state.step)

    step_seconds: list[float] = []
    step_cpu: list[float] = []
    step_pairs: list[int] = []
    window: dict[str, list[float]] = {}
    last_ckpt: Path | None = None
    metrics: dict[str, float] = {}
    model.train()
    while state.step < total_steps:
        t0, c0 = time.perf_counter(), time.process_time()
        micro = []
        for _ in range(cfg.grad_accum):
            batch, text_vectors = stream.next()
            micro.append((batch.to(acc.device), text_vectors))
        if cfg.log_samples:
            ids = gather_objects([list(b.ids) for b, _ in micro])  # collective: every rank sends its ids
            if samples_log is not None:
                samples_log.write(json.dumps({"step": state.step + 1, "ranks": ids}) + "\n")
                samples_log.flush()
        if cfg.grad_accum == 1:
            res, image, text = _plain_step(acc, model, loss_fn, *micro[0], state.step)
        else:
            res, image, text = _accumulated_step(acc, model, loss_fn, micro, state.step)
        pairs = res.global_batch
        sums = {"loss": res.value, **{f"loss/{k}": v for k, v in res.terms.items()},
                "words/image": _sparsity(image, threshold), "words/text": _sparsity(text, threshold)}
        grad_norm = None
        if cfg.optim.grad_clip:
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            core.logit_scale.clamp_(0.0, max_log_scale)
        state.step += 1
        state.samples_seen += pairs
        state.epoch, state.batches_in_epoch = stream.epoch, stream.batches_in_epoch
        step_seconds.append(time.perf_counter() - t0)
        step_cpu.append(time.process_time() - c0)
        step_pairs.append(pairs)

        # words/* are per-process means: average them over ranks; the loss terms are global already.
        for k in ("words/image", "words/text"):
            sums[k] = acc.reduce(sums[k].reshape(1), reduction="mean")[0]
        metrics = {k: float(v) for k, v in sums.items()}
        metrics.update({"temperature": float(1.0 / core.logit_scale.detach().exp()), "pairs": pairs,
                        "pairs_per_s": pairs / step_seconds[-1], "epoch": state.epoch})
        metrics.update({f"weight/{k}": w for k, w in res.weights.items() if k != "contrastive"})
        metrics.update({f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        if cfg.log_every and (state.step % cfg.log_every == 0 or state.step == total_steps):
            tracker.log(state.step, {k: sum(v) / len(v) for k, v in window.items()})
            window.clear()
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", T=f"{metrics['temperature']:.4f}",
                             words=f"{metrics['words/image']:.0f}/{metrics['words/text']:.0f}",
                             pairs_s=f"{metrics['pairs_per_s']:.1f}", refresh=False)

        if validator is not None and cfg.validation.every and state.step % cfg.validation.every == 0:
            validator.run(acc, core, state.step, tracker)
            model.train()
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            last_ckpt = writer.save(state.step, model, optimizer, scheduler, _global_state(acc, state, stream))
    progress.close()
    if samples_log is not None:
        samples_log.close()

    if validator is not None and (not cfg.validation.every or state.step % cfg.validation.every):
        validator.run(acc, core, state.step, tracker)
    if last_ckpt is None or not last_ckpt.name.endswith(f"{state.step:08d}"):
        last_ckpt = writer.save(state.step, model, optimizer, scheduler, _global_state(acc, state, stream))
    model_dir = out_dir / "model"
    if acc.is_main_process:
        core.save_pretrained(model_dir)
    skipped = _global_state(acc, state, stream).skipped
    report = stream.stats.report()
    if skipped or stream.read_skips:
        # one total that agrees with the report below it: read-time skips are part of it
        logger.warning("skipped %d unusable samples (%d while reading the data, %d in batches):\n%s",
                       skipped + stream.read_skips, stream.read_skips, skipped, report)
    # The first step of a process pays for warm-up (allocations, lazy inits); leave it out when we can.
    timed = slice(1, None) if len(step_seconds) > 1 else slice(None)
    seconds, cpu = sum(step_seconds[timed]), sum(step_cpu[timed])
    result = TrainResult(
        output_dir=str(out_dir), model_dir=str(model_dir), checkpoint=str(last_ckpt), steps=state.step,
        samples_seen=state.samples_seen, seconds=time.perf_counter() - start_time,
        pairs_per_second=sum(step_pairs[timed]) / seconds if seconds > 0 else 0.0,
        pairs_per_cpu_second=sum(step_pairs[timed]) / cpu if cpu > 0 else 0.0,
        final_metrics=metrics, validation=validator.history if validator else [], skipped=skipped,
        skipped_reading=stream.read_skips, skip_report=report,
        resumed_from=str(resumed) if resumed else None, setup=description,
    )
    if acc.is_main_process:
        (out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
    tracker.close()
    acc.wait_for_everyone()
    return result


def _samples_log(out_dir: Path, resume_step: int | None) -> Any:
    """``samples.jsonl`` for appending (on resume without what the killed run wrote after the checkpoint)."""
    path = out_dir / "samples.jsonl"
    if resume_step is None:
        return path.open("w")
    drop_records_after(path, resume_step)
    return path.open("a")


def _forward(model: Any, batch: Any, text_vectors: torch.Tensor | None) -> Any:
    return model(texts=None if text_vectors is not None else batch.captions, pixels=batch.pixels,
                 features=batch.features, text_vectors=text_vectors)


def _plain_step(acc: Any, model: Any, loss_fn: LexVLALoss, batch: Any, text_vectors: torch.Tensor | None,
                step: int) -> tuple[LossOutput, torch.Tensor, torch.Tensor]:
    """One micro-batch per step: forward, loss on the gathered batch, backward."""
    with acc.autocast():
        out = _forward(model, batch, text_vectors)
        image, text = out.image.vectors.float(), out.text.vectors.float()
        res = loss_fn(image, text, out.logit_scale.float(), step)
    acc.backward(res.loss)
    return res, image.detach(), text.detach()


class _RNG:
    """CPU (and current CUDA device) RNG state, to replay a forward pass with the same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _accumulated_step(acc: Any, model: Any, loss_fn: LexVLALoss, micro: list[tuple[Any, torch.Tensor | None]],
                      step: int) -> tuple[LossOutput, torch.Tensor, torch.Tensor]:
    """K micro-batches as ONE contrastive batch (GradCache, Gao et al. 2021).

    1. every micro-batch is encoded without an autograd graph and its lexical vectors are kept;
    2. the loss of the whole step's batch (all micro-batches of all ranks, gathered by the loss) is
       computed on those cached vectors and differentiated with respect to them;
    3. every micro-batch is encoded again, now with its graph (same RNG state, so the same dropout), and
       ``<vectors, cached gradient>`` is backpropagated: the parameters get exactly the gradient of the
       big batch while only one micro-batch's activations are alive at a time.
    Costs one extra forward pass per micro-batch; memory is that of one micro-batch plus the cached
    vectors and their gradients (2 sides x 2 x K x per-device batch x V floats).
    """
    states, images, texts = [], [], []
    with torch.no_grad():
        for batch, text_vectors in micro:
            states.append(_RNG(acc.device))
            with acc.autocast():
                out = _forward(model, batch, text_vectors)
            images.append(out.image.vectors.float())
            texts.append(out.text.vectors.float())
            scale = out.logit_scale.float()
    after = _RNG(acc.device)
    image = torch.cat(images).requires_grad_(True)
    text = torch.cat(texts).requires_grad_(True)
    scale = scale.detach().requires_grad_(True)
    res = loss_fn(image, text, scale, step)
    res.loss.backward()  # float32 on the cached vectors: no loss scaling needed here
    start = 0
    for k, ((batch, text_vectors), rng) in enumerate(zip(micro, states, strict=True)):
        rng.restore()
        rows = slice(start, start + len(batch))
        start += len(batch)
        with contextlib.nullcontext() if k == len(micro) - 1 else acc.no_sync(model):
            with acc.autocast():
                out = _forward(model, batch, text_vectors)
                surrogate = ((out.image.vectors.float() * image.grad[rows]).sum()
                             + (out.text.vectors.float() * text.grad[rows]).sum()
                             + out.logit_scale.float() * scale.grad / len(micro))
            acc.backward(surrogate)
    after.restore()
    return res, image.detach(), text.detach()


class _Checkpoints:
    """The trainer's side of :class:`lexvla.checkpoint.CheckpointWriter`: LexVLA's model folder."""

    def __init__(self, acc: Any, out_dir: Path, keep: int, description: dict[str, Any]) -> None:
        self.acc = acc
        self.writer = CheckpointWriter(out_dir, keep, barrier=acc.wait_for_everyone)
        self.description = description

    def save(self, step: int, model: Any, optimizer: Any, scheduler: Any, state: TrainerState) -> Path:
        acc = self.acc
        core = acc.unwrap_model(model)
        return self.writer.save(step, lambda folder: core.save_pretrained(folder / "model"), optimizer,
                                {**state.to_dict(), "setup": self.description}, scheduler=scheduler,
                                grad_scaler=getattr(acc, "scaler", None))


def _total_steps(cfg: TrainConfig, stream: TrainStream) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_epoch = stream.batches_per_epoch
    if per_epoch is None:
        raise ValueError(f"data.source {cfg.data.source!r} streams without end: set steps, not epochs")
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def _global_state(acc: Any, state: TrainerState, stream: TrainStream) -> TrainerState:
    """The state to save: the skip count summed over processes (the position is rank 0's, and every
    rank's position is the same unless a rank met a wholly skipped batch)."""
    skipped = torch.tensor([float(stream.skipped)], device=acc.device)
    state.skipped = int(acc.reduce(skipped, reduction="sum")[0])
    return state


def _progress(cfg: TrainConfig, acc: Any, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and acc.is_main_process))


class _Validator:
    """Zero-shot retrieval on a registered retrieval set with ``lexvla.eval`` (main process only)."""

    def __init__(self, cfg: TrainConfig) -> None:
        from ..eval.retrieval import RetrievalConfig
        from ..eval.retrieval_data import RetrievalDataConfig, load_retrieval_set

        v = cfg.validation
        try:
            data_cfg = RetrievalDataConfig(**v.options)
        except TypeError as err:
            raise ValueError(f"validation.options: {err}") from None
        self.data = load_retrieval_set(v.dataset, data_cfg)
        self.config = RetrievalConfig(sparsification=v.sparsification, batch_size=v.batch_size, cache=False,
                                      progress=False)
        self.history: list[dict[str, Any]] = []

    def run(self, acc: Any, model: Any, step: int, tracker: MetricsLogger) -> None:
        from ..eval.retrieval import evaluate_retrieval

        if acc.is_main_process:
            model.eval()
            with torch.no_grad():
                result = evaluate_retrieval(model, self.data, self.config, model_name=f"step-{step}")
            metrics = {f"val/i2t_R@{k}": r for k, r in result.image_to_text.recall.items()}
            metrics.update({f"val/t2i_R@{k}": r for k, r in result.text_to_image.recall.items()})
            metrics.update({f"val/words_{side}": n for side, n in result.active_words.items()})
            tracker.log(step, metrics)
            self.history.append({"step": step, **metrics})
            logger.info("validation at step %d:\n%s", step, result.table())
        acc.wait_for_everyone()
