"""Search benchmark: sparse lexical backends vs a dense exact baseline on a synthetic collection.

Workloads (``--workload``):
- ``zipf``: ``--doc-words`` active words per document (``--query-words`` per query), words drawn without
  replacement with Zipf-distributed frequencies (p(rank r) ~ 1 / r**s), log-normal weights;
- ``stats``: shaped like a real model's vectors, from a statistics file measured by
  ``bench/vector_stats.py`` (``--stats FILE``): active words per vector, weight profile and document
  frequencies by rank of documents (images) and queries (captions), see lexvla.index.synthetic.
V is read from the embedded model's vocabulary when the tokenizer is available offline, else 22,600
(or the statistics file's V). Dense baseline: faiss-cpu IndexFlatIP over random unit vectors of
``--dense-dim`` (512, a CLIP embedding).

Per backend: build time (store write + backend build), bytes per item on disk, time to open an
index and answer its first query, queries/s one at a time and batched, recall@10 against the exact
backend. ``--profile-exact`` also splits the exact backend's time (postings gather, score
accumulation, top-k, re-scoring + explanations) and compares it with the memory-bandwidth bound.
Results are appended to a JSON file after each backend (so a run can be resumed with ``--backends``)
and printed as a markdown table.

    python bench/search_bench.py --n-docs 1000000 --workload zipf --out bench/results/search_1m_zipf.json
    python bench/search_bench.py --n-docs 1000000 --workload stats --stats bench/results/vector_stats_embedded.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lexvla.index import ModelRecord, SparseIndex, Sparsification
from lexvla.index.backends import create_backend
from lexvla.index.synthetic import VectorStats, generate, measure_side, zipf_sparse
from lexvla.vocab import Vocabulary

logger = logging.getLogger("search_bench")
DEFAULT_V = 22600


def embedded_vocab_size() -> tuple[int, str]:
    """V of the embedded model's vocabulary (needs only its tokenizer), else the documented 22,600."""
    try:
        from lexvla.models import get_config
        from lexvla.models.text import load_tokenizer
        from lexvla.vocab import build_vocabulary

        cfg = get_config("lexvla-embedded")
        vocab = build_vocabulary(load_tokenizer(cfg.text.tokenizer), cfg.vocab)
        return len(vocab), "lexvla-embedded vocabulary"
    except Exception as err:  # noqa: BLE001 - any failure: fall back to the documented size
        logger.warning("could not read the embedded vocabulary (%s); using V=%d", err, DEFAULT_V)
        return DEFAULT_V, "default"


def cached_collection(work: Path, name: str, n: int, dim: int, spec: dict, seed: int) -> sp.csr_matrix:
    """Generate (or reuse from ``work``) ``n`` vectors of workload ``spec``."""
    files = {a: work / f"{name}.{a}.npy" for a in ("indptr", "indices", "data")}
    tag = work / f"{name}.json"
    want = {"n": n, "dim": dim, "seed": seed, **spec}
    if tag.is_file() and json.loads(tag.read_text()) == want:
        a = {k: np.load(p) for k, p in files.items()}
        return sp.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=(n, dim))
    t0 = time.perf_counter()
    if spec["workload"] == "zipf":
        m = zipf_sparse(n, dim, spec["active"], spec["zipf"], seed)
    else:
        stats = VectorStats.load(spec["stats"])
        m = generate(getattr(stats, spec["side"]), n, dim, seed)
    for k, p in files.items():
        np.save(p, getattr(m, k))
    tag.write_text(json.dumps(want))
    logger.info("generated %s: %d x %d, %.1f active on average, in %.0fs", name, n, dim, m.nnz / n,
                time.perf_counter() - t0)
    return m


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def time_queries(search, queries: sp.csr_matrix, k: int, n_single: int) -> dict:
    t0 = time.perf_counter()
    batched = search(queries, k)
    t_batch = time.perf_counter() - t0
    n_single = min(n_single, queries.shape[0])
    t0 = time.perf_counter()
    for i in range(n_single):
        search(queries[i:i + 1], k)
    t_single = time.perf_counter() - t0
    return {"batched_qps": queries.shape[0] / t_batch, "single_qps": n_single / t_single,
            "results": batched}


def recall_at(found: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def run_sparse(name: str, args: argparse.Namespace, docs: sp.csr_matrix, queries: sp.csr_matrix,
               index_dir: Path, store_info: dict, options: dict) -> dict:
    index = SparseIndex.open(index_dir, backend=name, backend_options=options)
    store = index.store("images")
    backend = create_backend(name, store, index.backend_options | ({"collection": f"bench_{name}"}
                                                                   if name == "milvus" else {}))
    t0 = time.perf_counter()
    backend.sync()
    build = time.perf_counter() - t0
    logger.info("%s: backend built in %.1fs", name, build)
    timing = time_queries(backend.search, queries, args.k, args.single_queries)
    extra: dict = {"describe": backend.describe()}
    extra_bytes = backend.disk_bytes()
    backend.close()
    index.close()
    # Opening an index as `lexvla search` / the web app do: sync() loads what a search reads; then the
    # first query (explained) should cost what any other does.
    t0 = time.perf_counter()
    index = SparseIndex.open(index_dir, backend=name, backend_options=options)
    index.sync()
    extra["open_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.search_vectors(queries[:1], k=args.k, words=args.words)
    extra["first_query_ms"] = (time.perf_counter() - t0) * 1000
    n = min(args.single_queries, queries.shape[0])
    t0 = time.perf_counter()
    for i in range(1, n + 1):  # explained search end to end (re-score + words), one at a time
        index.search_vectors(queries[i:i + 1], k=args.k, words=args.words)
    extra["explained_single_qps"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    index.search_vectors(queries, k=args.k, words=args.words)
    extra["explained_batched_qps"] = queries.shape[0] / (time.perf_counter() - t0)
    index.close()
    return {"backend": name, "options": {k: v for k, v in options.items() if k != "token"},
            "build_s": store_info["store_write_s"] + build, "backend_build_s": build,
            "bytes_per_item": (store_info["store_bytes"] + extra_bytes) / docs.shape[0],
            "backend_bytes_per_item": extra_bytes / docs.shape[0],
            "single_qps": timing["single_qps"], "batched_qps": timing["batched_qps"],
            "found": [c.rows for c in timing["results"]], **extra}


def memory_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Streaming read bandwidth (GB/s, best of 3, every core: torch's threaded sum over a float32 array)."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def profile_exact(index_dir: Path, queries: sp.csr_matrix, k: int, n: int, words: int) -> dict:
    """Where the exact backend's time goes, one query at a time on one thread, and the bandwidth bound."""
    # (explained search = accumulate + top-k + the rest: Python glue, exact re-scoring, explanations)
    from lexvla.index.backends.base import dense_topk

    index = SparseIndex.open(index_dir, backend="exact", backend_options={"threads": 1})
    index.sync()
    backend = index.backend("images")
    postings = backend._postings
    lengths = np.diff(postings.indptr)
    n = min(n, queries.shape[0])
    t = {"accumulate": 0.0, "topk": 0.0}
    touched = 0
    for i in range(n):
        s, e = queries.indptr[i], queries.indptr[i + 1]
        terms, w = queries.indices[s:e], queries.data[s:e].astype(np.float32)
        touched += int(lengths[terms].sum())
        t1 = time.perf_counter()
        scores = backend._scores(terms, w)  # the in-place accumulation over the postings
        t2 = time.perf_counter()
        dense_topk(scores, k)
        t3 = time.perf_counter()
        t["accumulate"] += t2 - t1
        t["topk"] += t3 - t2
    t0 = time.perf_counter()
    for i in range(n):
        backend.search(queries[i:i + 1], k)
    t_backend = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        index.search_vectors(queries[i:i + 1], k=k, words=words)
    t_full = time.perf_counter() - t0
    index.close()
    bw = memory_bandwidth_gbs()
    per_query = touched / n
    # A query must read each posting it touches once: int32 document id + float32 weight = 8 bytes.
    bound_qps = bw * 1e9 / (8 * per_query)
    out = {"queries": n, "postings_per_query": per_query, "bandwidth_GBps": bw, "bandwidth_bound_qps": bound_qps,
           "backend_qps_1thread": n / t_backend, "explained_qps_1thread": n / t_full,
           "ns_per_posting": t_backend / (touched or 1) * 1e9,
           "share": {"accumulate": t["accumulate"] / t_full, "topk": t["topk"] / t_full,
                     "python + rescoring + explanations": (t_full - sum(t.values())) / t_full},
           "accumulate_ns_per_posting": t["accumulate"] / (touched or 1) * 1e9,
           "rescoring_and_explanations_ms": (t_full - t_backend) / n * 1000}
    logger.info("exact profile: %s", out)
    return out


def run_faiss(args: argparse.Namespace, n: int, n_queries: int, work: Path) -> dict:
    import faiss
    import torch

    d = args.dense_dim
    gen = torch.Generator().manual_seed(7)
    index = faiss.IndexFlatIP(d)
    t_build = 0.0
    for start in range(0, n, 100_000):
        x = torch.randn(min(100_000, n - start), d, generator=gen)
        x = (x / x.norm(dim=1, keepdim=True)).numpy()
        t0 = time.perf_counter()
        index.add(x)
        t_build += time.perf_counter() - t0
    q = torch.randn(n_queries, d, generator=gen)
    q = (q / q.norm(dim=1, keepdim=True)).numpy()
    nbytes = index.ntotal * d * 4  # what faiss.write_index stores, without writing 2 GB at 1M
    t0 = time.perf_counter()
    index.search(q, args.k)
    batched = n_queries / (time.perf_counter() - t0)
    n_single = min(args.single_queries, n_queries)
    t0 = time.perf_counter()
    for i in range(n_single):
        index.search(q[i:i + 1], args.k)
    single = n_single / (time.perf_counter() - t0)
    return {"backend": f"faiss IndexFlatIP (dense {d}-d)", "build_s": t_build, "bytes_per_item": nbytes / n,
            "single_qps": single, "batched_qps": batched, "recall@10": 1.0, "threads": faiss.omp_get_max_threads()}


def markdown(results: list[dict]) -> str:
    lines = ["| backend | build (s) | bytes / item | queries/s, one at a time | queries/s, batched | recall@10 "
             "| open + first query (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        first = f"{r['open_s']:.2f} + {r['first_query_ms'] / 1000:.3f}" if "open_s" in r else ""
        lines.append(f"| {r['backend']} | {r['build_s']:.1f} | {r['bytes_per_item']:,.0f} | {r['single_qps']:.1f} "
                     f"| {r['batched_qps']:.1f} | {r['recall@10']:.3f} | {first} |")
    return "\n".join(lines)


def workload_specs(args: argparse.Namespace) -> tuple[dict, dict, str]:
    if args.workload == "zipf":
        return ({"workload": "zipf", "active": args.doc_words, "zipf": args.zipf},
                {"workload": "zipf", "active": args.query_words, "zipf": args.zipf},
                f"zipf_a{args.doc_words}_q{args.query_words}_z{args.zipf}")
    if args.stats is None:
        raise SystemExit("--workload stats needs --stats FILE (written by bench/vector_stats.py)")
    path = str(args.stats.resolve())
    return ({"workload": "stats", "stats": path, "side": "docs"},
            {"workload": "stats", "stats": path, "side": "queries"}, f"stats_{args.stats.stem}")


def prepare_sparse(args: argparse.Namespace, dim: int, tag: str, index_dir: Path
                   ) -> tuple[sp.csr_matrix, sp.csr_matrix, dict]:
    """Generate (or reuse) the documents and queries, and write the shared store once."""
    doc_spec, query_spec, _ = workload_specs(args)
    docs = cached_collection(args.work, f"docs_{tag}", args.n_docs, dim, doc_spec, seed=1)
    queries = cached_collection(args.work, f"queries_{tag}", args.n_queries, dim, query_spec, seed=2)
    logger.info("V=%d; docs %s nnz=%d; queries %s nnz=%d", dim, docs.shape, docs.nnz, queries.shape, queries.nnz)
    info_file = index_dir / "bench-store.json"
    if info_file.is_file():
        store_info = json.loads(info_file.read_text())
    else:
        shutil.rmtree(index_dir, ignore_errors=True)
        vocab = Vocabulary([f"w{i}" for i in range(dim)], list(range(dim)), source="synthetic")
        index = SparseIndex.create(index_dir, vocab, ModelRecord("synthetic", "synthetic", vocab.fingerprint(), dim),
                                   Sparsification.none())
        t0 = time.perf_counter()
        for start in range(0, args.n_docs, 100_000):
            stop = min(start + 100_000, args.n_docs)
            index.add(docs[start:stop], [str(i) for i in range(start, stop)])
        store_info = {"store_write_s": time.perf_counter() - t0, "store_bytes": index.store("images").disk_bytes()}
        index.close()
        info_file.write_text(json.dumps(store_info))
    logger.info("store: %s", store_info)
    return docs, queries, store_info


def measured_workload(docs: sp.csr_matrix, queries: sp.csr_matrix) -> dict:
    """The generated collection's own statistics (what the table's workload really was)."""
    sample = docs[:min(docs.shape[0], 50_000)]
    return {"docs": measure_side(sample).summary(docs.shape[1]), "queries": measure_side(queries).summary(docs.shape[1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=1_000_000)
    ap.add_argument("--workload", choices=("zipf", "stats"), default="zipf")
    ap.add_argument("--stats", type=Path, default=None, help="--workload stats: a bench/vector_stats.py file")
    ap.add_argument("--doc-words", type=int, default=300, help="zipf: active words per document")
    ap.add_argument("--query-words", type=int, default=30, help="zipf: active words per query")
    ap.add_argument("--zipf", type=float, default=1.0, help="zipf: exponent s of word frequencies")
    ap.add_argument("--n-queries", type=int, default=1000, help="queries for the batched timing and recall")
    ap.add_argument("--single-queries", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--dim", type=int, default=None, help="vocabulary size (default: the stats file's or the "
                                                           "embedded model's)")
    ap.add_argument("--dense-dim", type=int, default=512)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--words", type=int, default=6, help="explanation words built per hit (the web page's 6)")
    ap.add_argument("--backends", default="exact,seismic,faiss", help="comma-separated; also milvus")
    ap.add_argument("--seismic-options", default="{}", help="JSON of SeismicOptions fields")
    ap.add_argument("--exact-options", default="{}", help="JSON of ExactOptions fields")
    ap.add_argument("--milvus-options", default="{}", help="JSON of MilvusOptions fields")
    ap.add_argument("--profile-exact", action="store_true", help="split the exact backend's time")
    ap.add_argument("--prepare-only", action="store_true", help="generate the collection and write the store, "
                                                                  "then stop (to keep the timed run short)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lexvla-search-bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/search_bench.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    if args.dim:
        dim, dim_source = args.dim, "--dim"
    elif args.workload == "stats" and args.stats is not None:
        dim, dim_source = VectorStats.load(args.stats).dim, str(args.stats)
    else:
        dim, dim_source = embedded_vocab_size()
    args.work.mkdir(parents=True, exist_ok=True)
    _, _, wtag = workload_specs(args)
    tag = f"n{args.n_docs}_v{dim}_{wtag}_q{args.n_queries}"
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    sparse_needed = any(n != "faiss" for n in names)
    docs = queries = store_info = None
    index_dir = args.work / f"index_n{args.n_docs}_v{dim}_{wtag}"
    truth_file = args.work / f"truth_{tag}.npy"
    results = json.loads(args.out.read_text())["results"] if args.out.is_file() else []
    extra_meta: dict = {}
    if sparse_needed:
        docs, queries, store_info = prepare_sparse(args, dim, tag, index_dir)
        if args.prepare_only:
            return 0
        extra_meta["measured_workload"] = measured_workload(docs, queries)
        logger.info("workload: %s", extra_meta["measured_workload"])

    logger.info("V=%d (%s); load average before the backends: %s", dim, dim_source, os.getloadavg())
    for name in names:
        gc.collect()
        t0 = time.perf_counter()
        try:
            if name == "faiss":
                r = run_faiss(args, args.n_docs, args.n_queries, args.work)
            else:
                options = json.loads(getattr(args, f"{name}_options", "{}") or "{}")
                r = run_sparse(name, args, docs, queries, index_dir, store_info, options)
                found = r.pop("found")
                if name == "exact":
                    np.save(truth_file, np.stack([np.pad(f[:args.k], (0, args.k - len(f[:args.k])),
                                                         constant_values=-1) for f in found]))
                    if args.profile_exact:
                        r["profile"] = profile_exact(index_dir, queries, args.k, args.single_queries, args.words)
                truth = np.load(truth_file)
                r["recall@10"] = recall_at(found, truth, args.k)
        except Exception as err:  # noqa: BLE001 - record the failure and go on with the next backend
            logger.exception("%s failed", name)
            r = {"backend": name, "error": f"{type(err).__name__}: {err}"}
        r["wall_s"] = time.perf_counter() - t0
        r["loadavg_after"] = os.getloadavg()  # the machine is shared: say how busy it was
        logger.info("%s: %s", name, r)
        results = [x for x in results if x.get("backend") != r["backend"]] + [r]
        meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
                           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
                "V": dim, "V_source": dim_source, "n_docs": args.n_docs, "workload": args.workload,
                "stats": str(args.stats) if args.stats else None, "doc_words": args.doc_words,
                "query_words": args.query_words, "n_queries": args.n_queries,
                "single_queries": args.single_queries, "zipf": args.zipf, **extra_meta}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    ok = [r for r in results if "error" not in r]
    print(markdown(ok))
    for r in results:
        if "error" in r:
            print(f"{r['backend']}: FAILED {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
