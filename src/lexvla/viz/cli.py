"""``lexvla explain image.jpg [--text "..."] [--model M] [--out dir]``: pictures + an HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._cli import add_model_argument


def _explain(args: argparse.Namespace) -> int:
    import torch

    from .explain import explain_image, render_explanation

    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(f"image file not found: {image}")
    out_dir = Path(args.out) if args.out else Path(f"{image.stem}-explain")
    model = args.model.build()
    with torch.no_grad(), model.backbone.at_image_size(args.image_size):
        expl = explain_image(model, image, args.text, top_words=args.words, patch_k=max(1, args.patch_words),
                             model_name=str(args.model))
    files = render_explanation(expl, out_dir, words_per_patch=args.patch_words)
    print(f"{image}: {expl.active_words} active words; top: " + ", ".join(w for w, _ in expl.words[:10]))
    for t in expl.texts:
        print(f"  \"{t.text}\": score {t.score:.4f}; shared: "
              + ", ".join(f"{w} {c:.4g}" for w, c in t.shared_words[:5]))
    for path in [files.word_cloud, files.patch_words, *files.heatmaps, files.json, files.html]:
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("explain", help="word cloud, patch words and text heat maps of an image (PNG + HTML)")
    p.add_argument("image", help="image file")
    p.add_argument("--text", action="append", default=[], help="a text whose patch heat map to draw (repeatable)")
    add_model_argument(p)
    p.add_argument("--out", default=None, help="output folder (default: <image stem>-explain)")
    p.add_argument("--words", type=int, default=60, help="words in the word cloud")
    p.add_argument("--patch-words", type=int, default=1, help="words shown per patch")
    p.add_argument("--image-size", type=int, default=None,
                   help="encode at this size, grid scaled to keep the trained patch stride (more, smaller-in-"
                        "the-picture patches; default: the model's own size)")
    p.set_defaults(func=_explain)
