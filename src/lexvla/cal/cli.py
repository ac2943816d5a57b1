"""``lexvla cal``: train a small VLM with/without CAL, inspect per-token visual correlation, run the
label-noise experiment."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _say(msg: str) -> None:
    sys.stdout.write(msg + "\n")


def _add_cal_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CAL")
    g.add_argument("--cal", action=argparse.BooleanOptionalAction, default=True, help="CAL re-weighting (default on)")
    g.add_argument("--alpha", type=float, default=1.0, help="lower clamp of the logit difference")
    g.add_argument("--beta", type=float, default=5.0, help="upper clamp of the logit difference")
    g.add_argument("--smoothing", default="flattened", help="flattened (official) | per_sequence | none")
    g.add_argument("--condition", default="remove", help="remove (official) | mask_patches | blur")
    g.add_argument("--blur-sigma", type=float, default=4.0, help="pixels, for --condition blur")


def _cal_config(args: argparse.Namespace):
    from lexvla.cal.loss import CALConfig

    return CALConfig(alpha=args.alpha, beta=args.beta, smoothing=args.smoothing, condition=args.condition,
                     blur_sigma=args.blur_sigma)


def register(subparsers) -> None:
    cal = subparsers.add_parser("cal", help="CAL: contrastive-alignment token re-weighting for VLM training")
    sub = cal.add_subparsers(dest="cal_command", metavar="CAL_COMMAND")

    t = sub.add_parser("train", help="train one stage (pretrain: projector; finetune: projector + LoRA)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="JSONL: {image, question, answer} or {image, caption} per line")
    src.add_argument("--easy-vqa", action="store_true", help="easy-vqa's train questions (pip package easy-vqa)")
    src.add_argument("--easy-vqa-captions", action="store_true",
                     help="captions 'a {colour} {shape}' recovered from easy-vqa's train questions")
    t.add_argument("--max-images", type=int, default=None, help="easy-vqa: seeded subset of images")
    t.add_argument("--questions-per-image", type=int, default=None, help="easy-vqa: questions kept per image")
    t.add_argument("--noise", type=float, default=0.0, help="easy-vqa: fraction of answers replaced by wrong ones")
    t.add_argument("--stage", choices=("pretrain", "finetune"), default="pretrain")
    t.add_argument("--init", help="start from this SmallVLM checkpoint (e.g. the stage-1 output's final step)")
    t.add_argument("--out", dest="output", required=True, help="run folder (checkpoints/, metrics.jsonl)")
    t.add_argument("--llm", default="embedded:smollm2", help="embedded:smollm2 | local folder | .gguf | random")
    t.add_argument("--llm-layers", type=int, default=None, help="keep the first k LLM layers (CPU budget)")
    t.add_argument("--image-tokens", type=int, default=4, help="image tokens in the LLM sequence (a square)")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every n steps (0: only at the end)")
    t.add_argument("--log-every", type=int, default=10, help="metrics.jsonl record every n steps")
    t.add_argument("--log-samples", action="store_true", help="samples.jsonl: each rank's example indices per step")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the newest checkpoint in --out (default on)")
    t.add_argument("--threads", type=int, default=None, help="torch threads")
    _add_cal_args(t)
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("inspect", help="per-token visual-correlation heat map of captions (HTML + PNG)")
    i.add_argument("--checkpoint", required=True, help="SmallVLM checkpoint folder")
    i.add_argument("--image", help="image file (single mode)")
    i.add_argument("--text", action="append", default=[], help="caption to score (repeat for several)")
    i.add_argument("--question", default=None, help="score the texts as answers to this question instead")
    i.add_argument("--manifest", help="batch mode: JSONL of {image, caption[, noisy]}; ranks captions by their most "
                                      "contradicted content word (with 'noisy' labels: ROC AUC)")
    i.add_argument("--top", type=int, default=20, help="batch mode: how many captions to show")
    i.add_argument("--signal", default="auto", choices=("auto", "pmi", "pmi_marginal", "logit_diff", "raw"),
                   help="finder signal (auto: pmi_marginal where reference images exist (batch mode, or "
                        "--reference), else pmi; pmi: log-prob gain from the image over CAL's 'without image' forward; "
                        "pmi_marginal: gain over the marginal of reference images; logit_diff: CAL's raw "
                        "difference, normalised); raw: CAL's unnormalised raw difference on every token (single mode)")
    i.add_argument("--reference", nargs="+", action="extend", default=[],
                   help="pmi_marginal: reference image files, or one JSONL manifest whose images are used "
                        "(batch mode default: the manifest's own images)")
    i.add_argument("--reference-images", type=int, default=16,
                   help="pmi_marginal: seeded sample of this many reference images")
    i.add_argument("--normalise", default="none", choices=("function", "median", "none"),
                   help="per-caption normalisation of the finder signal (none: picked on the caption experiment's "
                        "validation split, docs/cal.md)")
    i.add_argument("--out", dest="output", required=True, help="output prefix: PREFIX.html, PREFIX.png (batch: PREFIX.jsonl)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("experiment", help="easy-vqa label-noise experiment, with vs without CAL")
    e.add_argument("--out", dest="output", default="runs/cal-easyvqa", help="results folder")
    e.add_argument("--noise", type=float, nargs="+", default=None, help="noise rates (default 0 0.2 0.4)")
    e.add_argument("--train-images", type=int, default=None)
    e.add_argument("--test-images", type=int, default=None)
    e.add_argument("--llm-layers", type=int, default=None)
    e.add_argument("--pretrain-steps", type=int, default=None)
    e.add_argument("--finetune-steps", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--seed", type=int, default=None, help="data subset, label noise and initialisation seed")
    e.add_argument("--smoothing", default=None, help="CAL smoothing mode (default: flattened, official)")
    e.add_argument("--report-only", action="store_true", help="redraw table and plot from results.json")
    e.set_defaults(func=cmd_experiment)

    c = sub.add_parser("caption-experiment",
                       help="caption-noise experiment on emoji names + keywords (full SmolLM2 + LoRA), with vs "
                            "without CAL, and the noisy-token finder's ROC AUC")
    c.add_argument("--out", dest="output", default="runs/cal-captions-noise", help="results folder")
    c.add_argument("--concepts", default=None,
                   help="emoji-noto (default) | emoji-fluent | emoji-openmoji | emoji | a concepts JSONL | fixture")
    c.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    c.add_argument("--noise", type=float, nargs="+", default=None, help="caption noise rates (default 0 0.2 0.4)")
    c.add_argument("--n-concepts", type=int, default=None)
    c.add_argument("--train-views", type=int, default=None)
    c.add_argument("--test-views", type=int, default=None)
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=None)
    c.add_argument("--lr", type=float, default=None)
    c.add_argument("--image-tokens", type=int, default=None)
    c.add_argument("--slots-replaced", type=int, default=None,
                   help="caption noise replaces only the first K slots (default: every slot, fluent noise)")
    c.add_argument("--val-views", type=int, default=None, help="held-out views per concept in the validation split")
    c.add_argument("--llm-layers", type=int, default=None, help="default: all 30")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--bf16", action="store_true",
                   help="bfloat16 CPU autocast (2.2x faster here, but LoRA training then does not learn)")
    c.add_argument("--report-only", action="store_true", help="redraw tables and plots from results.json")
    c.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="merge these results.json (seeds run as separate processes) into OUTPUT, then report")
    c.set_defaults(func=cmd_caption_experiment)

    cal.set_defaults(func=lambda args: (cal.print_help(), 2)[1])


# ------------------------------------------------------------------------------------------ commands
def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from lexvla.cal.data import compute_features, easy_vqa_examples, inject_label_noise, read_manifest
    from lexvla.cal.train import TrainConfig, train_stage
    from lexvla.cal.vlm import SmallVLM, VLMConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.manifest:
        examples = read_manifest(args.manifest)
    elif args.easy_vqa_captions:
        from lexvla.cal.experiment import caption_examples

        examples = caption_examples(easy_vqa_examples("train", args.max_images, None, seed=args.seed))
    else:
        examples = easy_vqa_examples("train", args.max_images, args.questions_per_image, seed=args.seed)
        examples = inject_label_noise(examples, args.noise, seed=args.seed)
    torch.manual_seed(args.seed)
    if args.init:
        model = SmallVLM.from_pretrained(args.init)
    else:
        model = SmallVLM(VLMConfig(llm=args.llm, llm_layers=args.llm_layers, image_tokens=args.image_tokens))
    cfg = TrainConfig(stage=args.stage, cal=args.cal, cal_config=_cal_config(args), steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, save_every=args.save_every,
                      log_every=args.log_every, log_samples=args.log_samples)
    out = Path(args.output)
    images = [ex.image for ex in examples]
    from lexvla.distributed import build_accelerator

    acc, setup = build_accelerator()  # the same setup train_stage uses; rank 0 fills the feature cache first
    if acc.is_main_process:
        _say(f"distributed setup: {setup.describe()}; batch {args.batch_size // setup.world_size} per device, "
             f"{args.batch_size} global")
    with acc.main_process_first():
        features = compute_features(model.backbone, images, cache=out / "features")
        blurred = None
        if args.cal and args.condition == "blur":
            blurred = compute_features(model.backbone, images, cache=out / "features", blur_sigma=args.blur_sigma)
    res = train_stage(model, examples, features, cfg, out, resume=args.resume, blurred_features=blurred)
    if acc.is_main_process:
        _say(f"trained {res.steps} steps ({res.seconds:.0f}s), final loss {res.final_loss:.4f}; "
             f"checkpoint: {res.checkpoint}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lexvla.cal.finder import FinderConfig, roc_auc
    from lexvla.cal.inspect import (
        FINDER_LEGEND,
        RAW_LEGEND,
        find_noisy,
        marginal_logprobs,
        rank_captions,
        render_html,
        render_png,
        token_correlations,
    )
    from lexvla.cal.vlm import SmallVLM
    from lexvla.preprocess import load_image

    model = SmallVLM.from_pretrained(args.checkpoint)
    if args.signal == "auto":
        args.signal = "pmi_marginal" if args.manifest or args.reference else "pmi"
    finder = FinderConfig(signal=args.signal, normalise=args.normalise) if args.signal != "raw" else FinderConfig()
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if args.manifest:
        from lexvla.cal.data import compute_features, read_manifest

        records = [r for r in read_manifest(args.manifest) if r.question is None]
        if not records:
            raise ValueError(f"manifest {args.manifest} has no caption records")
        rows = [json.loads(line) for line in Path(args.manifest).read_text().splitlines() if line.strip()]
        labels = [r.get("noisy") for r in rows if "caption" in r]
        feats = compute_features(model.backbone, [r.image for r in records])
        reference = _reference(args, model, feats) if finder.signal == "pmi_marginal" else None
        ranked = rank_captions(model, [r.image for r in records], [r.target for r in records], feats, config=finder,
                               reference=reference)
        with prefix.with_suffix(".jsonl").open("w") as f:
            for idx, row, sc in ranked:
                worst = None if sc.worst_word is None else find_words(row.text)[sc.worst_word]
                f.write(json.dumps({"index": idx, "image": records[idx].image, "caption": row.text,
                                    "score": sc.score, "most_contradicted_word": worst, "ce": sc.ce,
                                    "tokens": row.tokens, "finder_scores": sc.token_scores,
                                    "logit_diffs": row.logit_diff, "noisy": labels[idx]}) + "\n")
        top = ranked[:args.top]
        notes = [f"score {sc.score:+.2f} (most contradicted: {find_words(row.text)[sc.worst_word] if sc.worst_word is not None else '-'}); "
                 f"caption CE {sc.ce:.2f}; {Path(records[idx].image).name}" for idx, row, sc in top]
        render_html([row for _, row, _ in top], prefix.with_suffix(".html"), values=[sc.token_scores for _, _, sc in top],
                    legend=FINDER_LEGEND, notes=notes, title=f"{len(top)} captions with the most contradicted words")
        for idx, row, sc in top:
            word = find_words(row.text)[sc.worst_word] if sc.worst_word is not None else "-"
            _say(f"{sc.score:+7.2f}  {word!r:14} {row.text}   [{records[idx].image}]")
        if all(isinstance(v, bool) for v in labels) and 0 < sum(labels) < len(labels):
            by_idx = {idx: sc for idx, _, sc in ranked}
            order = sorted(by_idx)
            auc = roc_auc([-by_idx[i].score for i in order], [labels[i] for i in order])
            auc_ce = roc_auc([by_idx[i].ce for i in order], [labels[i] for i in order])
            text_ce = {idx: -sum(row.logprob_text) / len(row.logprob_text) for idx, row, _ in ranked}
            auc_text = roc_auc([text_ce[i] for i in order], [labels[i] for i in order])
            _say(f"manifest labels ('noisy'): ROC AUC finder {auc:.3f}, caption CE {auc_ce:.3f}, "
                 f"text-only CE {auc_text:.3f} ({sum(labels)} of {len(labels)} noisy)")
        _say(f"wrote {prefix.with_suffix('.jsonl')} and {prefix.with_suffix('.html')}")
        return 0
    if not args.image or not args.text:
        raise ValueError("inspect needs --image and at least one --text (or --manifest for batch mode)")
    image = load_image(args.image)
    feats = model.image_features(model.preprocess([image]))
    rows = token_correlations(model, feats, [t.strip() for t in args.text], question=args.question)
    if finder.signal == "pmi_marginal" and args.signal != "raw" and not args.question:
        if not args.reference:
            raise ValueError("--signal pmi_marginal in single mode needs --reference (images or a manifest)")
        marginal = marginal_logprobs(model, _reference(args, model, None), args.text)
        for row in rows:
            row.logprob_marginal = marginal[row.text.strip()]
    title = f"{Path(args.image).name}" + (f" | Q: {args.question}" if args.question else "")
    if args.signal == "raw" or args.question:
        values, legend, label = [r.logit_diff for r in rows], RAW_LEGEND, "logit diff"
    else:
        values = [find_noisy(r, model.tokenizer, config=finder).token_scores for r in rows]
        legend, label = FINDER_LEGEND, f"finder score ({args.signal}, {args.normalise})"
    render_html(rows, prefix.with_suffix(".html"), title=title, image=image, values=values, legend=legend)
    render_png(rows, prefix.with_suffix(".png"), image=image, title=title, values=values, label=label)
    for row, vals in zip(rows, values, strict=True):
        _say("  ".join(f"{t.strip()}:{'.' if v is None else f'{v:+.2f}'}" for t, v in zip(row.tokens, vals, strict=True)))
    _say(f"wrote {prefix.with_suffix('.html')} and {prefix.with_suffix('.png')}")
    return 0


def _reference(args: argparse.Namespace, model, features):
    """Reference features for signal pmi_marginal: --reference images or manifest, else ``features``
    (batch mode: the manifest's images); a seeded sample of --reference-images."""
    from lexvla.cal.data import compute_features, read_manifest
    from lexvla.cal.inspect import reference_features

    if args.reference:
        if len(args.reference) == 1 and args.reference[0].endswith(".jsonl"):
            paths = sorted({r.image for r in read_manifest(args.reference[0])})
        else:
            paths = list(args.reference)
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"reference image not found: {missing[0]}")
        features = compute_features(model.backbone, paths)
    return reference_features(features, args.reference_images)


def find_words(text: str) -> list[str]:
    from lexvla.cal.captions import text_words

    return [w.text for w in text_words(text.strip())]


def cmd_experiment(args: argparse.Namespace) -> int:
    import dataclasses

    from lexvla.cal.experiment import ExperimentConfig, run_experiment, write_report

    out = Path(args.output)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        write_report(results, out)
        _say((out / "results.md").read_text())
        return 0
    overrides = {"noise_rates": tuple(args.noise) if args.noise else None, "train_images": args.train_images,
                 "test_images": args.test_images, "llm_layers": args.llm_layers,
                 "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                 "batch_size": args.batch_size, "threads": args.threads, "seed": args.seed}
    cfg = ExperimentConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.smoothing:
        cfg = dataclasses.replace(cfg, cal=dataclasses.replace(cfg.cal, smoothing=args.smoothing))
    run_experiment(cfg, out, progress=True)
    _say((out / "results.md").read_text())
    return 0


def cmd_caption_experiment(args: argparse.Namespace) -> int:
    from lexvla.cal.caption_experiment import (
        CaptionExperimentConfig,
        run_caption_experiment,
        write_caption_report,
    )

    out = Path(args.output)
    if args.merge:
        from lexvla.cal.caption_experiment import merge_results

        out.mkdir(parents=True, exist_ok=True)
        merged = merge_results(args.merge)
        (out / "results.json").write_text(json.dumps(merged, indent=1))
        args.report_only = True
    if args.report_only:
        write_caption_report(json.loads((out / "results.json").read_text()), out)
        _say((out / "results.md").read_text())
        return 0
    overrides = {"concepts": args.concepts, "seeds": tuple(args.seeds) if args.seeds else None,
                 "noise_rates": tuple(args.noise) if args.noise else None, "n_concepts": args.n_concepts,
                 "train_views": args.train_views, "test_views": args.test_views, "steps": args.steps,
                 "batch_size": args.batch_size, "lr": args.lr, "image_tokens": args.image_tokens,
                 "llm_layers": args.llm_layers, "threads": args.threads, "bf16": True if args.bf16 else None,
                 "slots_replaced": args.slots_replaced, "val_views": args.val_views}
    cfg = CaptionExperimentConfig(**{k: v for k, v in overrides.items() if v is not None})
    run_caption_experiment(cfg, out, progress=True)
    _say((out / "results.md").read_text())
    return 0
