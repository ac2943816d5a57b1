"""Caption-noise experiment where CAL can act: multi-token captions of concepts (emoji names + keywords),
the full 30-layer SmolLM2-135M with LoRA, and injected caption noise.

Per seed: a seeded subset of concepts; augmented training views and held-out test views of each (new
images of known concepts, :func:`lexvla.cal.captions.render_view`); captions ``"name: kw1, kw2"``; for
every noise rate, a share of the training captions gets its name and first keyword replaced by another
concept's (:func:`lexvla.cal.captions.inject_caption_noise`); one training run (projector + LoRA from
scratch, one stage) with and one without CAL. Evaluation on clean held-out views:

* retrieval: every test image against every concept name, ranked by the caption likelihood
  ``log p(" name:" | image)`` (top-1, MRR), and by the likelihood relative to the text-only prior;
* per-token: raw logit difference (CAL's signal) and PMI of clean vs injected content words on a held-out
  caption set in which half the captions are injected (fluent noise: another concept's whole caption);
* the noisy-token finder (:mod:`lexvla.cal.finder`): ROC AUC for injected captions and injected words,
  beside the caption cross-entropy with the image (the baseline detector), without it (text only: chance
  for fluent noise) and the raw minimum logit difference (the former ``inspect`` ranking). The held-out set
  has a validation split (the first ``val_views`` views of every concept) that picks the finder's variant
  (signal x normalisation) and a test split that reports it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lexvla.cal.captions import (
    CaptionExample,
    Concept,
    caption_slots,
    inject_caption_noise,
    materialise_views,
    read_concepts,
    select_concepts,
    write_fixture_concepts,
)
from lexvla.cal.data import compute_features
from lexvla.cal.finder import NORMALISATIONS, SIGNALS, FinderConfig, roc_auc, roc_curve
from lexvla.cal.inspect import reference_features, target_logprobs
from lexvla.cal.loss import CALConfig
from lexvla.cal.vlm import SmallVLM, VLMConfig

logger = logging.getLogger(__name__)


@dataclass
class CaptionExperimentConfig:
    """Sizes chosen for 2 shared CPU cores (docs/cal.md says what they cost).

    concepts: a concepts JSONL (``{"name", "keywords", "image"}``, :func:`lexvla.cal.captions.read_concepts`),
        a data set name known to ``lexvla.data`` with names and keywords (``"emoji-noto"``), or
        ``"fixture"`` (generated coloured shapes, for tests and dry runs).
    train_views / test_views: augmented views per concept for training / held-out evaluation.
    slots_replaced: caption slots an injection replaces; None (default, fluent noise): every slot, the
        caption becomes another concept's own caption; 1 = the name, 2 = name + first keyword (mixed).
    val_views: of the ``test_views`` held-out views per concept, the first ones form the validation split
        (picks the finder variant), the others the test split (reports it).
    heldout_noise: share of injected captions in each split of the finder's held-out set.
    reference_images: seeded sample of training views whose marginal is the prefix-only prediction of the
        finder signal ``pmi_marginal`` (:func:`lexvla.cal.inspect.marginal_logprobs`).
    bf16: CPU autocast to bfloat16 (weights stay float32). Off: measured here it is 2.2x faster but does not
        train (10 steps, lr 1e-3, 8 captions: loss 8.09 -> 7.97, float32 8.10 -> 4.42).
    lr: 1e-3; 3e-3 diverges with LoRA on the full 30-layer LM (loss 8.1 -> 4.6 -> 10.8 within 7 steps).
    """

    concepts: str = "emoji-noto"
    n_concepts: int = 8
    train_views: int = 8
    test_views: int = 6
    val_views: int = 2
    keywords: int = 2
    slots_replaced: int | None = None
    noise_rates: tuple[float, ...] = (0.0, 0.2, 0.4)
    seeds: tuple[int, ...] = (0, 1, 2)
    llm: str = "embedded:smollm2"
    llm_arch: dict[str, Any] = field(default_factory=dict)
    llm_layers: int | None = None
    image_tokens: int = 4
    image_size: int = 64
    caption_prompt: str = "<image>Emoji:"
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 5
    cal: CALConfig = field(default_factory=CALConfig)
    finder: FinderConfig = field(default_factory=FinderConfig)
    heldout_noise: float = 0.5
    reference_images: int = 16
    bf16: bool = False
    threads: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.cal, dict):
            self.cal = CALConfig(**self.cal)
        if isinstance(self.finder, dict):
            self.finder = FinderConfig(**self.finder)
        self.noise_rates = tuple(float(r) for r in self.noise_rates)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.noise_rates or any(not 0 <= r < 1 for r in self.noise_rates):
            raise ValueError(f"noise_rates must be in [0, 1), got {self.noise_rates}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for name in ("n_concepts", "train_views", "test_views", "steps", "batch_size", "threads", "reference_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"CaptionExperimentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.val_views < self.test_views:
            raise ValueError(f"val_views must be in [1, test_views), got {self.val_views} of {self.test_views}")
        if self.slots_replaced is not None and self.slots_replaced < 1:
            raise ValueError(f"slots_replaced must be >= 1 or None (every slot), got {self.slots_replaced}")
        if self.n_concepts < 3:
            raise ValueError("need at least 3 concepts (noise draws another concept)")
        if not 0 < self.heldout_noise < 1:
            raise ValueError(f"heldout_noise must be in (0, 1), got {self.heldout_noise}")


def load_concepts(spec: str, folder: Path) -> list[Concept]:
    """Concepts from a JSONL file, the generated fixture, or a ``lexvla.data`` data set with names and
    keywords."""
    if spec == "fixture":
        return read_concepts(write_fixture_concepts(folder / "fixture", n=40))
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" or path.is_file():
        return read_concepts(path)
    from lexvla.cal.data import dataset_concepts

    return dataset_concepts(spec)


# ------------------------------------------------------------------------------------------ scoring
def retrieval(model: SmallVLM, images: Sequence[str], truth: Sequence[str], names: Sequence[str],
              features: dict[str, torch.Tensor], prompt: str, batch_size: int = 64) -> dict[str, float]:
    """Image -> name retrieval by caption likelihood of ``" name:"`` (the colon ends the name, so "cat"
    does not win over "cat face" by being a prefix). ``pmi`` ranks by the likelihood gain over the
    text-only prior (a name's text-only likelihood does not depend on the image)."""
    texts = [f"{n}:" for n in names]
    any_feat = features[images[0]].unsqueeze(0).float()
    prior = [sum(v) for v in target_logprobs(model, any_feat.expand(len(texts), -1, -1), texts, prompt, False)]
    ranks: dict[str, list[int]] = {"likelihood": [], "pmi": []}
    pairs = [(img, t) for img in images for t in texts]  # every image x every name, scored in batches
    flat: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        feats = torch.stack([features[img] for img, _ in chunk]).float()
        flat += [sum(v) for v in target_logprobs(model, feats, [t for _, t in chunk], prompt)]
    if len(images) != len(truth):
        raise ValueError(f"{len(images)} images but {len(truth)} true names")
    for n_img, name in enumerate(truth):
        ll = flat[n_img * len(texts):(n_img + 1) * len(texts)]
        k = names.index(name)
        for key, score in (("likelihood", ll), ("pmi", [a - b for a, b in zip(ll, prior, strict=True)])):
            ranks[key].append(1 + sum(s > score[k] for s in score))
    out: dict[str, float] = {}
    for key, r in ranks.items():
        out[f"{key}_top1"] = sum(x == 1 for x in r) / len(r)
        out[f"{key}_mrr"] = sum(1 / x for x in r) / len(r)
    return out


BASELINES = ("ce", "ce_text", "min_raw_diff")
SPLITS = ("val", "test")


def finder_variants() -> list[str]:
    return [f"{sig}/{norm}" for sig in SIGNALS for norm in NORMALISATIONS]


def finder_eval(model: SmallVLM, heldout: Sequence[CaptionExample], features: dict[str, torch.Tensor],
                config: FinderConfig, split: Sequence[str] | None = None,
                reference: torch.Tensor | None = None) -> dict[str, Any]:
    """On ``heldout`` (each caption in split "val" or "test"; default all "test"): per-token signals of
    clean vs injected content words (test split), and per split the ROC AUC for injected captions and
    injected words of every finder variant (signal x normalisation) and of the baselines: the caption CE
    with the image (``ce``), without it (``ce_text``) and the raw minimum logit difference. Scores are
    oriented high = suspect; the test split's per-caption scores are kept for ROC curves."""
    from lexvla.cal.captions import token_words
    from lexvla.cal.finder import score_caption
    from lexvla.cal.inspect import score_pairs

    split = ["test"] * len(heldout) if split is None else list(split)
    if len(split) != len(heldout) or set(split) - set(SPLITS):
        raise ValueError(f"split must give one of {SPLITS} per held-out caption")
    rows = score_pairs(model, [c.image for c in heldout], [c.text for c in heldout], features, reference=reference)
    signals = [sig for sig in SIGNALS if sig != "pmi_marginal" or reference is not None]
    tok_vals: dict[str, dict[str, list[float]]] = {k: {"clean": [], "injected": [], "function": []} for k in signals}
    # per split: name -> caption scores / (word scores, word labels)
    cap_scores = {s: {} for s in SPLITS}
    word_scores: dict[str, dict[str, tuple[list[float], list[bool]]]] = {s: {} for s in SPLITS}
    labels: dict[str, list[bool]] = {s: [] for s in SPLITS}
    per_caption: list[dict[str, Any]] = []
    main_name = f"{config.signal}/{config.normalise}"
    for cap, row, part in zip(heldout, rows, split, strict=True):
        words = cap.words()
        ids, token_word = token_words(model.tokenizer, cap.text, words)
        if ids != row.token_ids:
            raise ValueError(f"caption {cap.text!r}: offset tokenisation differs from the scored tokens")
        if part == "test":
            for key in signals:
                for v, w in zip(row.signal(key), token_word, strict=True):
                    kind = "function" if w is None or not words[w].content else ("injected" if words[w].injected else "clean")
                    tok_vals[key][kind].append(v)
        labels[part].append(cap.noisy)
        nll = [-v for v in row.logprob]
        content = [w.content for w in words]
        main = None
        for sig in signals:
            for norm in NORMALISATIONS:
                sc = score_caption(row.signal(sig), token_word, content, nll, norm)
                name = f"{sig}/{norm}"
                main = sc if name == main_name else main
                cap_scores[part].setdefault(name, []).append(-sc.score)
                ws, wl = word_scores[part].setdefault(name, ([], []))
                for k, v in sc.word_scores.items():
                    ws.append(-v)
                    wl.append(words[k].injected)
        ce = sum(nll) / len(nll)
        ce_text = sum(-v for v in row.logprob_text) / len(row.logprob_text)
        for name, value in (("ce", ce), ("ce_text", ce_text), ("min_raw_diff", -min(row.logit_diff))):
            cap_scores[part].setdefault(name, []).append(value)
        # word-level baselines: a content word's NLL (its tokens summed), with and without the image
        for name, lps in (("ce", row.logprob), ("ce_text", row.logprob_text)):
            acc: dict[int, float] = {}
            for v, w in zip(lps, token_word, strict=True):
                if w is not None and words[w].content:
                    acc[w] = acc.get(w, 0.0) - v
            ws, wl = word_scores[part].setdefault(name, ([], []))
            for k, v in acc.items():
                ws.append(v)
                wl.append(words[k].injected)
        per_caption.append({"image": cap.image, "caption": cap.text, "noisy": cap.noisy, "split": part,
                            "score": None if main is None else main.score, "ce": ce, "ce_text": ce_text,
                            "worst_word": None if main is None or main.worst_word is None else words[main.worst_word].text,
                            "min_raw_diff": min(row.logit_diff)})
    mean = {k: {kind: (sum(v) / len(v) if v else float("nan")) for kind, v in d.items()} for k, d in tok_vals.items()}

    def aucs(part: str) -> tuple[dict[str, float], dict[str, float]]:
        if not labels[part]:
            return {}, {}
        return ({name: roc_auc(v, labels[part]) for name, v in cap_scores[part].items()},
                {name: roc_auc(*v) for name, v in word_scores[part].items()})

    cap_test, word_test = aucs("test")
    cap_val, word_val = aucs("val")
    return {
        "token_means": mean,
        "caption_auc": cap_test, "word_auc": word_test,
        "caption_auc_val": cap_val, "word_auc_val": word_val,
        "finder": main_name,
        "test_scores": cap_scores["test"], "test_labels": labels["test"],
        "captions": per_caption,
    }


def select_finder(runs: Sequence[dict[str, Any]]) -> str:
    """The finder variant with the highest mean validation caption AUC over ``runs`` (never the test
    split); without validation numbers, the runs' configured variant."""
    if not runs or not runs[0].get("caption_auc_val"):
        return runs[0]["finder"] if runs else f"{FinderConfig().signal}/{FinderConfig().normalise}"
    names = [n for n in finder_variants() if all(n in r["caption_auc_val"] for r in runs)]
    return max(names, key=lambda n: sum(r["caption_auc_val"][n] for r in runs) / len(runs))


# --------------------------------------------------------------------------------------------- runs
@torch.no_grad()
def match_projector_scale(model: SmallVLM, features: torch.Tensor) -> float:
    """Scale the fresh projector's last layer so its image tokens start with the RMS of the LLM's token
    embeddings (the text after them stays in distribution). Returns the factor applied."""
    emb = model.llm.get_input_embeddings().weight
    target = float(emb.float().pow(2).mean().sqrt())
    current = float(model.project(features.float()).pow(2).mean().sqrt())
    factor = target / max(current, 1e-8)
    model.projector.fc2.weight.mul_(factor)
    model.projector.fc2.bias.mul_(factor)
    return factor


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def run_caption_experiment(config: CaptionExperimentConfig, output_dir: str | Path,
                           progress: bool = False) -> dict[str, Any]:
    """All seeds x noise rates x {plain, CAL}; writes results.json after every run (a cut run keeps its
    finished rows), then results.md and the plots (:func:`write_caption_report`)."""
    from lexvla.cal.train import TrainConfig, train_stage
    from lexvla.models.backbones import create_backbone
    from lexvla.models.text import load_causal_lm

    torch.set_num_threads(config.threads)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    all_concepts = load_concepts(config.concepts, out)
    vlm_cfg = VLMConfig(llm=config.llm, llm_arch=config.llm_arch, llm_layers=config.llm_layers,
                        image_tokens=config.image_tokens, caption_prompt=config.caption_prompt)
    vlm_cfg.backbone = dataclasses.replace(vlm_cfg.backbone, image_size=config.image_size)
    llm, tokenizer = load_causal_lm(config.llm, arch=config.llm_arch)
    backbone = create_backbone(vlm_cfg.backbone)
    results: dict[str, Any] = {"config": dataclasses.asdict(config), "runs": [], "seeds": {}}
    results_file = out / "results.json"
    if results_file.is_file():  # seeds run by an earlier call with the same settings are kept (run seeds apart)
        old = json.loads(results_file.read_text())
        same = {k: v for k, v in old["config"].items() if k != "seeds"} == \
            {k: v for k, v in json.loads(json.dumps(results["config"])).items() if k != "seeds"}
        if same:
            results["runs"] = [r for r in old["runs"] if r["seed"] not in config.seeds]
            results["seeds"] = {k: v for k, v in old["seeds"].items() if int(k) not in config.seeds}
            results["earlier_seconds"] = old.get("total_seconds", 0.0) + old.get("earlier_seconds", 0.0)
        else:
            logger.warning("%s holds results of other settings: starting a new results file", results_file)
    for seed in config.seeds:
        concepts = select_concepts(all_concepts, config.n_concepts, seed=seed, keywords=config.keywords)
        train_views = materialise_views(concepts, config.train_views, out / "images", seed=10 * seed + 1,
                                        size=config.image_size)
        test_views = materialise_views(concepts, config.test_views, out / "images", seed=10 * seed + 2,
                                       size=config.image_size)
        train = [CaptionExample(p, c.name, caption_slots(c, config.keywords)) for c in concepts for p in train_views[c.name]]
        test = [CaptionExample(p, c.name, caption_slots(c, config.keywords)) for c in concepts for p in test_views[c.name]]
        # validation split: the first val_views views of every concept; each split gets exactly its share
        heldout, split = [], []
        for part, views in (("val", slice(0, config.val_views)), ("test", slice(config.val_views, None))):
            caps = [c for c in test if test_views[c.concept].index(c.image) in range(config.test_views)[views]]
            heldout += inject_caption_noise(caps, config.heldout_noise, concepts, seed=seed + (1000 if part == "val" else 2000),
                                            slots_replaced=config.slots_replaced, keywords=config.keywords)
            split += [part] * len(caps)
        seed_dir = out / f"seed{seed}"
        seed_dir.mkdir(exist_ok=True)
        with (seed_dir / "heldout.jsonl").open("w") as f:
            for c, part in zip(heldout, split, strict=True):
                image = os.path.relpath(Path(c.image).resolve(), seed_dir.resolve())  # relative to the manifest
                f.write(json.dumps({"image": image, "caption": c.text, "noisy": c.noisy, "concept": c.concept,
                                    "split": part, "source": c.source,
                                    "injected_words": [w.text for w in c.words() if w.injected and w.content]}) + "\n")
        with (seed_dir / "train.jsonl").open("w") as f:  # the clean training captions (inspect --reference)
            for c in train:
                image = os.path.relpath(Path(c.image).resolve(), seed_dir.resolve())
                f.write(json.dumps({"image": image, "caption": c.text, "concept": c.concept}) + "\n")
        t0 = time.time()
        features = compute_features(backbone, [c.image for c in train + test], cache=out / "features")
        features = {k: v.float() for k, v in features.items()}  # CPU autocast cannot stack float16 tensors
        names = [c.name for c in concepts]
        reference = reference_features({c.image: features[c.image] for c in train}, config.reference_images, seed)
        retrieval_images = [p for n in names for p in test_views[n]]
        retrieval_truth = [n for n in names for _ in test_views[n]]
        results["seeds"][str(seed)] = {"concepts": names, "train_captions": len(train), "heldout_captions": len(heldout),
                                       "heldout_noisy": sum(c.noisy for c in heldout),
                                       "feature_seconds": time.time() - t0}
        t_seed = time.time()
        for rate in config.noise_rates:
            noisy = inject_caption_noise(train, rate, concepts, seed=seed, slots_replaced=config.slots_replaced,
                                         keywords=config.keywords)
            examples = [c.to_vlm_example() for c in noisy]
            for cal in (False, True):
                torch.manual_seed(seed)  # identical projector/LoRA init for the runs being compared
                model = SmallVLM(vlm_cfg, llm=copy.deepcopy(llm), tokenizer=tokenizer, backbone=backbone)
                match_projector_scale(model, torch.stack([features[c.image] for c in train[:64]]))
                tc = TrainConfig(stage="finetune", cal=cal, cal_config=config.cal, steps=config.steps,
                                 batch_size=config.batch_size, lr=config.lr, warmup_steps=config.warmup_steps,
                                 seed=seed, log_every=5, progress=progress)
                run_dir = seed_dir / f"noise{rate:.1f}-{'cal' if cal else 'plain'}"
                load_before = os.getloadavg()[0]
                with _autocast(config.bf16):
                    res = train_stage(model, examples, features, tc, run_dir)
                    t1 = time.time()
                    ret = retrieval(model, retrieval_images, retrieval_truth, names, features, vlm_cfg.caption_prompt)
                    fnd = finder_eval(model, heldout, features, config.finder, split, reference)
                eval_seconds = time.time() - t1
                (run_dir / "heldout_scores.json").write_text(json.dumps(fnd["captions"], indent=1))
                fnd.pop("captions")
                row = {"seed": seed, "noise": rate, "cal": cal, "retrieval": ret, **fnd,
                       "noisy_train_captions": sum(c.noisy for c in noisy), "final_loss": res.final_loss,
                       "train_seconds": res.seconds, "eval_seconds": eval_seconds, "checkpoint": str(res.checkpoint),
                       "load_avg": [load_before, os.getloadavg()[0]]}
                results["runs"].append(row)
                logger.info("seed %d noise %.1f cal=%s: top1 %.3f, finder caption AUC %.3f (CE %.3f), %.0fs + %.0fs",
                            seed, rate, cal, ret["likelihood_top1"], fnd["caption_auc"][fnd["finder"]],
                            fnd["caption_auc"]["ce"], res.seconds, eval_seconds)
                results["seeds"][str(seed)]["seconds"] = time.time() - t_seed
                results["total_seconds"] = time.time() - t_start
                results_file.write_text(json.dumps(results, indent=1))
                del model
    write_caption_report(results, out)
    return results


# ------------------------------------------------------------------------------------------- report
def merge_results(files: Sequence[str | Path]) -> dict[str, Any]:
    """One results dict from several ``results.json`` of the same settings (seeds run as separate
    processes); wall times add up in ``seconds_by_file``."""
    merged: dict[str, Any] | None = None
    for f in files:
        res = json.loads(Path(f).read_text())
        if merged is None:
            merged = {**res, "runs": [], "seeds": {}, "seconds_by_file": {}}
        strip = lambda c: {k: v for k, v in c.items() if k != "seeds"}  # noqa: E731
        if strip(res["config"]) != strip(merged["config"]):
            raise ValueError(f"{f}: results of other settings than {files[0]}; cannot merge")
        seen = {r["seed"] for r in merged["runs"]}
        if seen & {r["seed"] for r in res["runs"]}:
            raise ValueError(f"{f}: seed(s) {sorted(seen & {r['seed'] for r in res['runs']})} already merged")
        merged["runs"] += res["runs"]
        merged["seeds"].update(res["seeds"])
        merged["seconds_by_file"][str(f)] = res.get("total_seconds", 0.0)
    if merged is None:
        raise ValueError("no results files to merge")
    merged["config"]["seeds"] = sorted(int(k) for k in merged["seeds"])
    merged["total_seconds"] = max(merged["seconds_by_file"].values())  # the processes ran side by side
    return merged


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def write_caption_report(results: dict[str, Any], out: Path) -> None:
    """results.md (tables: retrieval, token signals, finder AUCs; mean ± sd over seeds),
    retrieval_vs_noise.png and finder_roc.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    rates = sorted({r["noise"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})

    def cells(rate: float, cal: bool, get) -> list[float]:
        return [get(r) for r in runs if r["noise"] == rate and r["cal"] == cal]

    def fmt(vals: list[float]) -> str:
        if not vals:
            return "-"
        m, sd = _mean_sd(vals)
        return f"{m:.3f} ± {sd:.3f}" if len(vals) > 1 else f"{m:.3f}"

    lines = [f"Seeds: {', '.join(map(str, seeds))} (mean ± sd over seeds).", "",
             "Image -> name retrieval on clean held-out views (caption likelihood of ' name:'):", "",
             "| caption noise | top-1 plain | top-1 CAL | MRR plain | MRR CAL | top-1 PMI plain | top-1 PMI CAL |",
             "|---|---|---|---|---|---|---|"]
    for rate in rates:
        cols = [fmt(cells(rate, cal, lambda r, k=k: r["retrieval"][k]))
                for k in ("likelihood_top1", "likelihood_mrr", "pmi_top1") for cal in (False, True)]
        lines.append(f"| {rate:.0%} | " + " | ".join(cols) + " |")
    sigs = [k for k in ("logit_diff", "pmi", "pmi_marginal") if runs and k in runs[0]["token_means"]]
    label = {"logit_diff": "raw diff", "pmi": "PMI", "pmi_marginal": "PMI-marginal"}
    lines += ["", "Per-token signals on the test captions (content tokens; mean over tokens, then seeds):", "",
              "| caption noise | model | " + " | ".join(f"{label[k]} {kind}" for k in sigs
                                                         for kind in ("clean", "injected", "function")) + " |",
              "|---|---|" + "---|" * (3 * len(sigs))]
    for rate in rates:
        for cal in (False, True):
            vals = [fmt(cells(rate, cal, lambda r, s=s, k=k: r["token_means"][s][k]))
                    for s in sigs for k in ("clean", "injected", "function")]
            lines.append(f"| {rate:.0%} | {'CAL' if cal else 'plain'} | " + " | ".join(vals) + " |")
    finder = select_finder(runs)
    lines += ["", f"Noisy-caption detection on the test split of the held-out set, ROC AUC (finder = {finder}, "
              "picked by the validation split; CE = mean NLL of the caption with the image, text-only CE = without "
              "it):", "",
              "| caption noise | model | finder, captions | CE, captions | text-only CE, captions | min raw diff, captions "
              "| finder, words | CE, words |",
              "|---|---|---|---|---|---|---|---|"]
    for rate in rates:
        for cal in (False, True):
            vals = [fmt(cells(rate, cal, lambda r: r["caption_auc"][finder])),
                    fmt(cells(rate, cal, lambda r: r["caption_auc"]["ce"])),
                    fmt(cells(rate, cal, lambda r: r["caption_auc"].get("ce_text", float("nan")))),
                    fmt(cells(rate, cal, lambda r: r["caption_auc"]["min_raw_diff"])),
                    fmt(cells(rate, cal, lambda r: r["word_auc"][finder])),
                    fmt(cells(rate, cal, lambda r: r["word_auc"]["ce"]))]
            lines.append(f"| {rate:.0%} | {'CAL' if cal else 'plain'} | " + " | ".join(vals) + " |")
    names = sorted(runs[0]["caption_auc"]) if runs else []
    has_val = bool(runs and runs[0].get("caption_auc_val"))
    lines += ["", "Every finder variant (signal/normalisation) and baseline, all runs pooled (mean ± sd); the finder is "
              "the variant with the best validation caption AUC:", "",
              "| variant | caption AUC, validation | caption AUC, test | word AUC, validation | word AUC, test |",
              "|---|---|---|---|---|"]
    for name in names:
        def col(key: str, n: str = name) -> str:
            return fmt([r[key][n] for r in runs if n in r.get(key, {})]) if has_val or not key.endswith("val") else "-"
        mark = " (chosen)" if name == finder else ""
        lines.append(f"| {name}{mark} | {col('caption_auc_val')} | {col('caption_auc')} | {col('word_auc_val')} | "
                     f"{col('word_auc')} |")
    per_seed = ", ".join(f"seed {k}: {v.get('seconds', 0) / 60:.1f} min" for k, v in sorted(results["seeds"].items()))
    total = results.get("total_seconds", 0) + results.get("earlier_seconds", 0)
    side = " (seeds run as parallel processes: the longest)" if "seconds_by_file" in results else ""
    lines.append(f"\nWall time {total / 60:.1f} min in all{side}; training + evaluation per seed: {per_seed}.")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, key, label in ((axes[0], "likelihood_top1", "top-1 retrieval"), (axes[1], "likelihood_mrr", "MRR")):
        for cal, style, name in ((False, "o--", "plain CE"), (True, "s-", "CAL")):
            xs = [r for r in rates if cells(r, cal, lambda r_: 0)]
            means = [_mean_sd(cells(x, cal, lambda r, k=key: r["retrieval"][k]))[0] for x in xs]
            ax.plot([100 * x for x in xs], means, style, label=name)
            for x in xs:
                ys = cells(x, cal, lambda r, k=key: r["retrieval"][k])
                ax.scatter([100 * x + (1.2 if cal else -1.2)] * len(ys), ys, s=10, alpha=0.5,
                           color="C1" if cal else "C0")
        n = len(results["seeds"][str(seeds[0])]["concepts"]) if seeds else 1
        ax.axhline(1 / n if key.endswith("top1") else sum(1 / k for k in range(1, n + 1)) / n, color="gray",
                   lw=0.8, ls=":", label="chance")
        ax.set_xlabel("caption noise (% of training captions injected)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("image -> name retrieval on clean held-out views (lines: mean, dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "retrieval_vs_noise.png")
    plt.close(fig)

    def pooled(sel: list[dict[str, Any]], name: str) -> tuple[list[float], list[bool]]:
        scores, labels = [], []
        for r in sel:
            scores += r["test_scores"][name]
            labels += r["test_labels"]
        return scores, labels

    fig, ax = plt.subplots(figsize=(5.0, 4.6), dpi=120)
    curves = [(rate, cal) for rate in rates for cal in (False, True)]
    for rate, cal in curves:
        sel = [r for r in runs if r["noise"] == rate and r["cal"] == cal and "test_scores" in r]
        if not sel:
            continue
        sc, lb = pooled(sel, finder)
        ax.plot(*roc_curve(sc, lb), color=f"C{rates.index(rate)}", ls="-" if cal else "--", lw=1.2,
                label=f"finder, {rate:.0%} {'CAL' if cal else 'plain'} (AUC {roc_auc(sc, lb):.2f})")
    sel = [r for r in runs if rates and r["noise"] == rates[0] and not r["cal"] and "test_scores" in r]
    for name, ls, label in (("ce", "-", "caption CE"), ("ce_text", ":", "text-only CE")):
        if sel and name in sel[0]["test_scores"]:
            sc, lb = pooled(sel, name)
            ax.plot(*roc_curve(sc, lb), color="gray", ls=ls, lw=1,
                    label=f"{label}, {rates[0]:.0%} plain (AUC {roc_auc(sc, lb):.2f})")
    ax.plot([0, 1], [0, 1], color="k", lw=0.5, ls=":")
    ax.set_xlabel("false positive rate (clean captions flagged)")
    ax.set_ylabel("true positive rate (injected captions found)")
    ax.set_title(f"injected-caption detection ({finder}), test captions of seeds {', '.join(map(str, seeds))} pooled",
                 fontsize=7)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "finder_roc.png")
    plt.close(fig)
