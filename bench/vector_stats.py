"""Measure what a model's lexical vectors look like, for the search benchmark's realistic workload.

Reads the vectors stored in an index (``images/`` = documents, ``texts/`` = queries; i.e. what the
model emitted, sparsified as the index stores them), or generates the Zipf workload, and writes a
:class:`lexvla.index.synthetic.VectorStats` JSON: active words per vector, weight concentration (top-16
share, weight profile) and document frequencies by rank. ``bench/search_bench.py --stats FILE`` then
generates collections of any size with those statistics. Re-run after retraining the model.

    lexvla index build --model lexvla-embedded --images photos/ --captions captions.txt --out idx/
    python bench/vector_stats.py --index idx/ --out bench/results/vector_stats_embedded.json
    python bench/vector_stats.py --zipf --out bench/results/vector_stats_zipf.json   # the old workload
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import scipy.sparse as sp

from lexvla.index import SparseIndex
from lexvla.index.synthetic import VectorStats, measure, zipf_sparse


def sparsify_topk(m: sp.csr_matrix, topk: int | None) -> sp.csr_matrix:
    if topk is None:
        return m
    from lexvla.sparsification import Sparsification

    return Sparsification(topk=topk)(m)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--index", type=Path, help="an index built with the model (images = docs, texts = queries)")
    src.add_argument("--zipf", action="store_true", help="measure the Zipf workload instead")
    ap.add_argument("--topk", type=int, default=None, help="also cut every vector to its top-k words first")
    ap.add_argument("--dim", type=int, default=22600, help="--zipf: vocabulary size")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.zipf:
        docs = zipf_sparse(20_000, args.dim, 300, 1.0, seed=1)
        queries = zipf_sparse(2_000, args.dim, 30, 1.0, seed=2)
        source = {"workload": "zipf", "doc_words": 300, "query_words": 30, "zipf_s": 1.0}
    else:
        with SparseIndex.open(args.index) as index:
            if not index.has_collection("texts"):
                raise SystemExit(f"{args.index} has no caption collection (texts/): build it with --captions")
            docs, queries = index.store("images").matrix(), index.store("texts").matrix()
            rec = index.model_record
            source = {"workload": "model", "index": str(args.index), "model": rec.name, "fingerprint": rec.fingerprint,
                      "sparsify": index.sparsify_settings.to_dict()}
    if args.topk is not None:
        docs, queries = sparsify_topk(docs, args.topk), sparsify_topk(queries, args.topk)
        source["topk"] = args.topk
    stats: VectorStats = measure(docs, queries, source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(args.out)
    print(json.dumps({"source": source, "docs": stats.docs.summary(stats.dim),
                      "queries": stats.queries.summary(stats.dim)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
