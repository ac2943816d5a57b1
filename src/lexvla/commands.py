"""Small model commands: ``lexvla models``, ``lexvla encode`` (top words of images / texts)."""

from __future__ import annotations

import argparse
import json

from ._cli import add_model_argument


def _models(args: argparse.Namespace) -> int:
    from .models import get_config, list_models
    from .models.zoo import find_trained, weights_status

    rows = []
    for name in list_models():
        cfg = get_config(name)
        status = weights_status(cfg)
        trained = find_trained(name)  # a trained default (lexvla demo saves one) that create_model loads
        rows.append({"name": name, "backbone": cfg.backbone.name, "backbone_weights": cfg.backbone.source,
                     "llm_weights": cfg.text.source, "weights": status,
                     "trained": None if trained is None else str(trained)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        w = r["weights"]
        print(f"{r['name']:30s} backbone {r['backbone']} <- {r['backbone_weights']} ({w['backbone']})\n"
              f"{'':30s} llm <- {r['llm_weights']} ({w['text']})\n"
              + (f"{'':30s} trained: yes, {r['trained']} (loaded by --model {r['name']})" if r["trained"] else
                 f"{'':30s} trained: no (random adapter; lexvla demo / lexvla train, or a checkpoint as --model)"))
    return 0


def _encode(args: argparse.Namespace) -> int:
    import torch

    model = args.model.build()
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
    p = subparsers.add_parser("models", help="list the model zoo: architecture, weight source, weights present, "
                                             "trained")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models)
    p = subparsers.add_parser("encode", help="top words of images and/or texts")
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    add_model_argument(p)
    p.add_argument("-k", type=int, default=15, help="words to show")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_encode)
