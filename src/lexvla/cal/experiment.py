"""The label-noise experiment (the paper's Figure 3) on easy-vqa, sized for a 2-core CPU.

Stage 1 (projector pre-training on captions recovered from easy-vqa's questions, clean) runs once with
and once without CAL; stage 2 (LoRA + projector on VQA answers, a fraction replaced by a wrong answer of
the same kind) runs for every noise rate from the matching stage-1 model. Accuracy is closed-set (the
highest-scoring of easy-vqa's 13 answers) on clean test questions.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lexvla.cal.data import (
    EASYVQA_ANSWER_KINDS,
    VLMExample,
    answer_kind,
    compute_features,
    easy_vqa_examples,
    inject_label_noise,
)
from lexvla.cal.loss import CALConfig
from lexvla.cal.train import TrainConfig, evaluate_vqa, train_stage
from lexvla.cal.vlm import SmallVLM, VLMConfig

logger = logging.getLogger(__name__)

_SHAPES = "circle|rectangle|triangle"
# "what color is the circle?" also names the shape, "what is the red shape?" also names the colour
_COLOUR_Q = re.compile(rf"^what (?:colou?r is the|is the colou?r of the) (?:shape|(?P<s>{_SHAPES}))\?$")
_SHAPE_Q = re.compile(r"^what (?:shape (?:is in the image|does the image contain|is present)|is the (?P<c>\w+) shape)\?$")


@dataclass
class ExperimentConfig:
    """Sizes chosen so the six runs fit ~30 minutes on 2 shared CPU cores (see docs/cal.md).

    llm_layers: SmolLM2-135M truncated to its first k of 30 decoder layers (+ final norm and tied head).
    image_tokens: the 4 x 4 VGG grid average-pooled to this many tokens.
    threads: torch intra-op threads; 1 is faster than 2 when other processes share the cores.
    """

    noise_rates: tuple[float, ...] = (0.0, 0.2, 0.4)
    # Answer kinds kept (of "yesno", "colour", "shape"). The yes/no questions (75% of easy-vqa) hinge on
    # negations ("is there not a ...?") that a 2-layer LM does not learn in this budget, and a blind model
    # answers 65% of them from the question alone; colour/shape questions can only be answered from the
    # image (blind baseline ~1/8 and ~1/3).
    answer_kinds: tuple[str, ...] = ("colour", "shape")
    train_images: int = 1000
    questions_per_image: int = 3
    test_images: int = 300
    test_questions_per_image: int = 2
    llm: str = "embedded:smollm2"
    llm_layers: int | None = 2
    image_tokens: int = 4
    prompt: str = "Image:<image>\nQ: {question}\nA:"
    pretrain_steps: int = 20
    finetune_steps: int = 120
    batch_size: int = 8
    pretrain_lr: float = 3e-3
    finetune_lr: float = 3e-3
    cal: CALConfig = dataclasses.field(default_factory=CALConfig)
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.cal, dict):
            self.cal = CALConfig(**self.cal)
        self.noise_rates = tuple(float(r) for r in self.noise_rates)
        if not self.noise_rates or any(not 0 <= r < 1 for r in self.noise_rates):
            raise ValueError(f"noise_rates must be in [0, 1), got {self.noise_rates}")
        self.answer_kinds = tuple(self.answer_kinds)
        unknown = set(self.answer_kinds) - set(EASYVQA_ANSWER_KINDS)
        if not self.answer_kinds or unknown:
            raise ValueError(f"answer_kinds must be among {sorted(EASYVQA_ANSWER_KINDS)}, got {self.answer_kinds}")


def caption_examples(examples: list[VLMExample]) -> list[VLMExample]:
    """One clean caption "a {colour} {shape}" per image whose colour and shape some question names."""
    colour: dict[str, str] = {}
    shape: dict[str, str] = {}
    for ex in examples:
        q = (ex.question or "").lower()
        if m := _COLOUR_Q.match(q):
            colour[ex.image] = ex.target
            if m.group("s"):
                shape[ex.image] = m.group("s")
        elif m := _SHAPE_Q.match(q):
            shape[ex.image] = ex.target
            if m.group("c"):
                colour[ex.image] = m.group("c")
    images = sorted(set(colour) & set(shape))
    return [VLMExample(img, f"a {colour[img]} {shape[img]}") for img in images]


def question_only_accuracy(train: list[VLMExample], test: list[VLMExample]) -> float:
    """Blind baseline: the most common training answer for the same question text (else overall)."""
    by_q: dict[str, Counter] = {}
    for ex in train:
        by_q.setdefault(ex.question or "", Counter())[ex.target] += 1
    overall = Counter(ex.target for ex in train).most_common(1)[0][0]
    hits = [(by_q[ex.question].most_common(1)[0][0] if ex.question in by_q else overall) == ex.target for ex in test]
    return sum(hits) / len(hits)


@torch.no_grad()
def answer_logit_diffs(model: SmallVLM, examples: list[VLMExample], features: dict[str, torch.Tensor],
                       limit: int = 256) -> dict[str, float]:
    """Mean raw logit difference (with - without image) of the *training* answer token, for clean and
    for noisy training examples: what CAL's weights see at the end of training."""
    from lexvla.cal.inspect import token_correlations

    sums: dict[str, list[float]] = {"clean": [], "noisy": []}
    chosen = list(examples[:limit])
    for i in range(0, len(chosen), 64):
        chunk = chosen[i:i + 64]
        feats = torch.stack([features[ex.image] for ex in chunk]).float()
        rows = token_correlations(model, feats, [ex.target for ex in chunk], question=[ex.question for ex in chunk])
        for ex, row in zip(chunk, rows, strict=True):
            sums["noisy" if ex.noisy else "clean"].append(row.logit_diff[0])
    return {k: (sum(v) / len(v) if v else float("nan")) for k, v in sums.items()}


def run_experiment(config: ExperimentConfig, output_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Run all stage-1/stage-2 trainings and evaluations; writes results.json, results.md and
    accuracy_vs_noise.png into ``output_dir`` (results.json after every run, so a cut run keeps its
    finished rows)."""
    from lexvla.models.backbones import create_backbone
    from lexvla.models.text import load_causal_lm

    torch.set_num_threads(config.threads)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    train_qa = easy_vqa_examples("train", config.train_images, None, seed=config.seed)
    captions = caption_examples(train_qa)
    rng_subset = __import__("random").Random(config.seed)
    by_img: dict[str, list[VLMExample]] = {}
    for ex in train_qa:
        by_img.setdefault(ex.image, []).append(ex)
    kinds = set(config.answer_kinds)
    for img in by_img:
        by_img[img] = [ex for ex in by_img[img] if answer_kind(ex.target) in kinds]
    train = [ex for img in sorted(by_img) for ex in rng_subset.sample(by_img[img], min(config.questions_per_image,
                                                                                       len(by_img[img])))]
    test = [ex for ex in easy_vqa_examples("test", config.test_images, None, seed=config.seed + 1)
            if answer_kind(ex.target) in kinds]
    test = [ex for img in sorted({e.image for e in test})
            for ex in [e for e in test if e.image == img][:config.test_questions_per_image]]
    # all 13 answers stay candidates: the model must also pick the right kind of answer
    answers = sorted({a for values in EASYVQA_ANSWER_KINDS.values() for a in values})
    kind_of = {a: k for k, values in EASYVQA_ANSWER_KINDS.items() for a in values}

    vlm_cfg = VLMConfig(llm=config.llm, llm_layers=config.llm_layers, image_tokens=config.image_tokens,
                        prompt=config.prompt)
    llm, tokenizer = load_causal_lm(config.llm)
    backbone = create_backbone(vlm_cfg.backbone)
    t0 = time.time()
    features = compute_features(backbone, [ex.image for ex in train_qa + test], cache=out / "features")
    feature_seconds = time.time() - t0
    logger.info("data: %d train QA, %d captions, %d test QA; features in %.0fs", len(train), len(captions),
                len(test), feature_seconds)

    def new_model() -> SmallVLM:
        torch.manual_seed(config.seed)  # identical projector/LoRA init for the runs being compared
        return SmallVLM(vlm_cfg, llm=copy.deepcopy(llm), tokenizer=tokenizer, backbone=backbone)

    results: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "data": {"train_questions": len(train), "train_images": len(by_img), "captions": len(captions),
                 "test_questions": len(test), "test_images": len({ex.image for ex in test})},
        "question_only_accuracy": question_only_accuracy(train, test),
        "feature_seconds": feature_seconds,
        "runs": [],
    }
    stage1: dict[bool, Path] = {}
    for cal in (False, True):
        model = new_model()
        tc = TrainConfig(stage="pretrain", cal=cal, cal_config=config.cal, steps=config.pretrain_steps,
                         batch_size=config.batch_size, lr=config.pretrain_lr, warmup_steps=5, seed=config.seed,
                         log_every=5, progress=progress)
        res = train_stage(model, captions, features, tc, out / f"stage1-{'cal' if cal else 'plain'}")
        stage1[cal] = res.checkpoint
        results[f"stage1_{'cal' if cal else 'plain'}_seconds"] = res.seconds
    for rate in config.noise_rates:
        noisy = inject_label_noise(train, rate, seed=config.seed)
        for cal in (False, True):
            model = new_model()
            from safetensors.torch import load_file

            model.load_trainable(load_file(stage1[cal] / "trainable.safetensors"))
            tc = TrainConfig(stage="finetune", cal=cal, cal_config=config.cal, steps=config.finetune_steps,
                             batch_size=config.batch_size, lr=config.finetune_lr, warmup_steps=10,
                             seed=config.seed, log_every=10, progress=progress)
            run_dir = out / f"noise{rate:.1f}-{'cal' if cal else 'plain'}"
            res = train_stage(model, noisy, features, tc, run_dir)
            ev = evaluate_vqa(model, test, features, answers, kind_of=kind_of)
            diffs = answer_logit_diffs(model, noisy, features) if rate > 0 else {}
            row = {"noise": rate, "cal": cal, "accuracy": ev.accuracy, "by_kind": ev.by_kind, "n_test": ev.n,
                   "final_loss": res.final_loss, "train_seconds": res.seconds,
                   "noisy_examples": sum(ex.noisy for ex in noisy), "answer_logit_diff": diffs,
                   "checkpoint": str(res.checkpoint)}
            results["runs"].append(row)
            logger.info("noise %.1f cal=%s: accuracy %.3f (%.0fs)", rate, cal, ev.accuracy, res.seconds)
            results["total_seconds"] = time.time() - t_start
            (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out)
    return results


def write_report(results: dict[str, Any], out: Path) -> None:
    """results.md (table) and accuracy_vs_noise.png from a results dict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    rates = sorted({r["noise"] for r in runs})
    acc = {(r["noise"], r["cal"]): r for r in runs}
    lines = ["| label noise | accuracy, plain CE | accuracy, CAL | CAL - plain |", "|---|---|---|---|"]
    for rate in rates:
        a, b = acc.get((rate, False)), acc.get((rate, True))
        fa = f"{a['accuracy']:.3f}" if a else "-"
        fb = f"{b['accuracy']:.3f}" if b else "-"
        d = f"{b['accuracy'] - a['accuracy']:+.3f}" if a and b else "-"
        lines.append(f"| {rate:.0%} | {fa} | {fb} | {d} |")
    lines.append(f"\nQuestion-only (blind) baseline: {results['question_only_accuracy']:.3f}; "
                 f"total wall time {results.get('total_seconds', 0) / 60:.1f} min.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for cal, style, label in ((False, "o--", "plain CE"), (True, "s-", "CAL")):
        xs = [r for r in rates if (r, cal) in acc]
        ax.plot([100 * x for x in xs], [acc[(x, cal)]["accuracy"] for x in xs], style, label=label)
    ax.axhline(results["question_only_accuracy"], color="gray", lw=0.8, ls=":", label="question-only baseline")
    ax.set_xlabel("label noise (% of answers replaced)")
    ax.set_ylabel("clean test accuracy")
    ax.set_title("easy-vqa, small VLM (SmolLM2 + VGG16-BN)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_noise.png")
    plt.close(fig)
