"""Small model commands: ``lexvla models``, ``lexvla encode`` (top words of images / texts)."""

from __future__ import annotations

import argparse
import json

import torch


def _models(args: argparse.Namespace) -> int:
    from .models import get_config, list_models

    for name in list_models():
        cfg = get_config(name)
        print(f"{name:32s} backbone={cfg.backbone.name}:{cfg.backbone.source}  llm={cfg.text.source}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from .models import create_model

    model = create_model(args.model).eval()
    with torch.no_grad():
        rows = []
        if args.images:
            out = model.sparsify(model.encode_image(args.images))
            rows += [(str(p), w, int(n)) for p, w, n in zip(args.images, model.top_words(out, args.k),
                                                             out.active_words())]
        if args.text:
            out = model.sparsify(model.encode_text(args.text))
            rows += [(t, w, int(n)) for t, w, n in zip(args.text, model.top_words(out, args.k), out.active_words())]
    if not rows:
        raise ValueError("give image paths and/or --text")
    if args.json:
        print(json.dumps([{"input": i, "active_words": n, "top_words": w} for i, w, n in rows], indent=1))
    else:
        for item, words, n in rows:
            print(f"{item}  ({n} active words)\n    " + ", ".join(f"{w} {s:.3f}" for w, s in words))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the model zoo")
    p.set_defaults(func=_models)
    p = subparsers.add_parser("encode", help="top words of images and/or texts")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p.add_argument("--model", default="lexvla-embedded", help="zoo name or checkpoint folder")
    p.add_argument("-k", type=int, default=15, help="words to show")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_encode)
