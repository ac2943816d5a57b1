"""What each step of the web app's text-search path costs, in process (no HTTP), on an index.

Times (median of --repeat runs, milliseconds): encoding one query vs a batch of --batch queries per
text, with 1 and 2 torch threads; the exact fast encode path's rewrites added one at a time (the
prior computed once, LoRA merged, prompt prefix cached; rounds interleaved so load changes hit every
variant alike); the index search with explanations of every shared word vs only the
6 shown; and the whole service call with a cold vs a cached query vector.

    python bench/web_steps.py idx/ --model lexvla-embedded --json bench/results/web_steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

QUERIES = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a gray rectangle",
           "a purple shape", "an orange triangle", "a teal square"]


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def fast_encode_steps(model, texts: list[str], repeat: int) -> dict:
    """Median ms of one query and of a batch for each fast-path variant, rounds interleaved."""
    from lexvla.models.text_fast import FastTextEncoder

    # cumulative: each row adds one rewrite (the prior, when the model has one, is computed once in all)
    variants = {"plain (training path)": None,
                "+ prior once": FastTextEncoder(model.text, merge_lora=False, prefix_cache=False),
                "+ LoRA merged": FastTextEncoder(model.text, merge_lora=True, prefix_cache=False),
                "+ prompt prefix cached (served)": FastTextEncoder(model.text)}

    def encode(fast, batch):
        if fast is None:
            return model.encode_text(batch, batch_size=len(batch)).vectors
        return model.mapper.text(fast.scores(batch))

    times: dict = {(name, n): [] for name in variants for n in (1, len(texts))}
    ref = {n: encode(None, texts[:n]) for n in (1, len(texts))}
    for _ in range(repeat):
        for name, fast in variants.items():
            for n in (1, len(texts)):
                t0 = time.perf_counter()
                v = encode(fast, texts[:n])
                times[(name, n)].append((time.perf_counter() - t0) * 1000)
                assert (v - ref[n]).abs().max().item() <= 1e-5, name  # the same vectors, to float rounding
    return {name: {"one_query_ms": round(statistics.median(times[(name, 1)]), 2),
                   f"batch_of_{len(texts)}_ms": round(statistics.median(times[(name, len(texts))]), 2)}
            for name in variants}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index")
    ap.add_argument("--model", default="lexvla-embedded")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("-k", type=int, default=24)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from lexvla.index import SparseIndex
    from lexvla.models import create_model
    from lexvla.web import SearchService, WebConfig

    index = SparseIndex.open(args.index)
    model = create_model(args.model).eval()
    texts = QUERIES[:args.batch]
    out: dict = {"index": args.index, "model": args.model, "k": args.k, "loadavg_before": os.getloadavg()}
    with torch.inference_mode():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model.encode_text(texts[:1])  # warm
            one = median_ms(lambda: model.encode_text(texts[:1]), args.repeat)
            batch = median_ms(lambda: model.encode_text(texts, batch_size=len(texts)), args.repeat)
            out[f"encode_{threads}thread"] = {"one_query_ms": one, f"batch_of_{len(texts)}_ms": batch,
                                              "per_query_in_batch_ms": round(batch / len(texts), 2)}
        torch.set_num_threads(1)
        out["fast_encode_1thread"] = fast_encode_steps(model, texts, max(args.repeat, 15))
        q = index.prepare_queries(model.encode_text(texts[:1]).vectors)
    index.sync()
    out["search_all_words_ms"] = median_ms(lambda: index.search_vectors(q, args.k), args.repeat)
    out["search_shown_words_ms"] = median_ms(lambda: index.search_vectors(q, args.k, words=6), args.repeat)
    hits = index.search_vectors(q, args.k)[0]
    out["shared_words_per_hit_mean"] = round(sum(h.explanation.n_shared for h in hits) / max(len(hits), 1), 1)
    svc = SearchService(model, index, WebConfig(default_k=args.k, query_cache=512, torch_threads=1))
    try:
        n = [0]

        def cold():
            n[0] += 1
            svc.search_text(f"a red circle {n[0]}")

        out["service_cold_query_ms"] = median_ms(cold, args.repeat)
        svc.search_text("a red circle")
        out["service_cached_query_ms"] = median_ms(lambda: svc.search_text("a red circle"), args.repeat)
    finally:
        svc.close()
        index.close()
    out["loadavg_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
