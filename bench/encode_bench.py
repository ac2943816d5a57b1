"""Encode speed of a LexVLA model on this machine: images/s and texts/s, plus parameter counts per part.

    python bench/encode_bench.py --model lexvla-embedded --n 128 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lexvla


def parameter_counts(model: lexvla.LexVLA) -> dict[str, int]:
    def count(prefix: str) -> int:
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    return {
        "backbone (frozen)": count("backbone."),
        "adapter (trained)": count("adapter."),
        "visual codebook (trained)": model.visual_codebook.numel(),
        "LLM (frozen)": sum(p.numel() for n, p in model.text.llm.named_parameters() if "lora_" not in n),
        "LoRA (trained)": sum(p.numel() for n, p in model.text.llm.named_parameters() if "lora_" in n),
        "text codebook (frozen buffer)": model.text.codebook.numel(),
        "temperature (trained)": model.logit_scale.numel(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lexvla-embedded")
    ap.add_argument("--n", type=int, default=128, help="images and texts to encode")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import easy_vqa

    model = lexvla.create_model(args.model).eval()
    paths = sorted(easy_vqa.get_test_image_paths().values())[: args.n]
    captions = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "triangle")]
    texts = [f"{captions[i % len(captions)]} number {i}" for i in range(args.n)]
    with torch.no_grad():
        model.encode_image(paths[:4])  # warm-up
        model.encode_text(texts[:4])
        t = time.perf_counter()
        model.encode_image(paths, batch_size=args.batch_size)
        image_s = time.perf_counter() - t
        t = time.perf_counter()
        model.encode_text(texts, batch_size=args.batch_size)
        text_s = time.perf_counter() - t
    print(json.dumps({
        "model": args.model, "vocabulary": len(model.vocab), "threads": torch.get_num_threads(),
        "images_per_s": round(len(paths) / image_s, 1), "texts_per_s": round(len(texts) / text_s, 1),
        "parameters": parameter_counts(model),
    }, indent=1))


if __name__ == "__main__":
    main()
