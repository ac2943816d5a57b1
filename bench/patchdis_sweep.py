"""PatchDis of trained checkpoints on the held-out emoji collages at several encode sizes and both class
protocols; one JSON line per (model, image size, class set).

    python bench/patchdis_sweep.py --model lexvla=RUN/lexvla/model --model dense=RUN/dense/model \
        --sizes 64,128,224 --collages 100 --out bench/results/patchdis_sweep.jsonl

Every model is scored by the same ``lexvla.eval.evaluate_patchdis``: LexVLA's patch vectors at the
paper's 1/sqrt(V) threshold, the dense baseline's patch embeddings unsparsified (its patch similarity
map). ``--sizes``: input sizes, the grid scaled to keep the trained patch stride
(``PatchDisConfig.image_size``; the model's own size = its training setting). Classes: ``all`` = every
test-split concept competes for every patch (the paper's protocol), ``present`` = only the concepts in the
collage's ground truth.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lexvla
from lexvla.eval import PatchDisConfig, SegDataConfig, evaluate_patchdis, load_segmentation_set
from lexvla.models.dense import DenseBaseline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="LABEL=checkpoint folder (repeatable)")
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--classes", default="all,present")
    ap.add_argument("--windows", default="none", help="adapter attention windows in patches (none = all)")
    ap.add_argument("--patch-scores", default="own", help="own,attributed")
    ap.add_argument("--collages", type=int, default=100)
    ap.add_argument("--prompt", default="an emoji of {}.")
    ap.add_argument("--figures", default=None, help="folder for two pictures per setting")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    seg = load_segmentation_set("emoji-collages", SegDataConfig(split="test", limit=args.collages))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.model:
        label, path = spec.split("=", 1)
        model = lexvla.load(path)
        model.text.keep_prefix = True
        dense = isinstance(model, DenseBaseline)
        settings = [(int(s), None if w == "none" else int(w), c, ps) for s in args.sizes.split(",")
                    for w in args.windows.split(",") for ps in args.patch_scores.split(",")
                    for c in args.classes.split(",")]
        for size, window, classes, patch_scores in settings:
            if dense and patch_scores != "own":
                continue  # a mean-pooled model's attribution is its own patch similarity
            cfg = PatchDisConfig(prompt=args.prompt, classes=classes, image_size=size, progress=False,
                                 attention_window=window, patch_scores=patch_scores, sparsification="none" if dense else "threshold",
                                 figures=2 if args.figures else 0)
            t = time.perf_counter()
            fig_dir = Path(args.figures) / f"{label}_{size}_w{window}_{patch_scores}_{classes}" if args.figures else None
            r = evaluate_patchdis(model, seg, cfg, out_dir=fig_dir, model_name=label)
            row = {"model": label, "path": path, "image_size": size, "grid": r.grid, "classes": classes,
                   "attention_window": window, "patch_scores": patch_scores, "miou": r.miou, "pixel_accuracy": r.pixel_accuracy,
                   "localisation_auc": r.localisation_auc, "num_classes": len(r.scored_classes),
                   "collages": r.num_images, "seconds": round(time.perf_counter() - t, 1), "figures": r.figures}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")

if __name__ == "__main__":
    main()
