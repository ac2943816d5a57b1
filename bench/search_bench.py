"""Search benchmark: sparse lexical backends vs a dense exact baseline on a synthetic collection.

Collection: ``--n-docs`` vectors over the embedded model's vocabulary (V read from its vocabulary when
the tokenizer is available offline, else 22,600) with ``--doc-words`` active words each, words drawn
without replacement with Zipf-distributed frequencies (p(rank r) ~ 1 / r**s, ranks randomly assigned to
dimensions), log-normal weights, L2-normalised. Queries: ``--query-words`` active words, same law.
Dense baseline: faiss-cpu IndexFlatIP over random unit vectors of ``--dense-dim`` (512, a CLIP embedding).

Per backend: build time (store write + backend build), bytes per item on disk, queries/s one at a time
and batched, recall@10 against the exact backend. Results are appended to a JSON file after each
backend (so a run can be resumed with ``--backends``) and printed as a markdown table.

    nohup python bench/search_bench.py --n-docs 1000000 > bench/search_bench.log 2>&1 &
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


def _first_distinct(draws: np.ndarray, active: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``active`` distinct values of ``draws`` in draw order; and which rows had enough."""
    b, m = draws.shape
    order = np.argsort(draws, axis=1, kind="stable")
    srt = np.take_along_axis(draws, order, axis=1)
    first_sorted = np.ones_like(srt, dtype=bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    first = np.zeros_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)  # first occurrence, at its draw position
    keep = first & (np.cumsum(first, axis=1) <= active)
    ok = keep.sum(axis=1) == active
    picked = np.sort(draws[ok][keep[ok]].reshape(-1, active), axis=1)
    return picked, ok


def zipf_sparse(n: int, dim: int, active: int, zipf_s: float, seed: int, chunk: int = 20000) -> sp.csr_matrix:
    """``n`` unit vectors with ``active`` distinct words each, p(word of rank r) ~ 1/r**s.

    Words are drawn with replacement and the first ``active`` distinct ones kept (successive sampling,
    i.e. weighted sampling without replacement); ranks are assigned to dimensions by a fixed random
    permutation shared by documents and queries. Weights are log-normal, then L2-normalised.
    """
    rng = np.random.default_rng(seed)
    perm = np.random.default_rng(1234).permutation(dim)
    cdf = np.cumsum(1.0 / np.arange(1, dim + 1) ** zipf_s)
    cdf /= cdf[-1]
    indices = np.empty(n * active, dtype=np.int32)
    data = np.empty(n * active, dtype=np.float32)
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        rows = np.empty((b, active), dtype=np.int64)
        todo = np.arange(b)
        m = int(2.3 * active) + 10
        while len(todo):
            draws = np.minimum(np.searchsorted(cdf, rng.random((len(todo), m))), dim - 1)
            picked, ok = _first_distinct(perm[draws], active)
            rows[todo[ok]] = picked
            todo, m = todo[~ok], m * 2  # rare rows with too few distinct words: draw more
        w = rng.lognormal(0.0, 1.0, size=(b, active)).astype(np.float32)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        indices[start * active:(start + b) * active] = rows.ravel()
        data[start * active:(start + b) * active] = w.ravel()
        if start and start % 200_000 == 0:
            logger.info("generated %d / %d vectors", start, n)
    indptr = np.arange(0, n * active + 1, active, dtype=np.int64)
    return sp.csr_matrix((data, indices, indptr), shape=(n, dim))


def cached_collection(work: Path, name: str, n: int, dim: int, active: int, zipf_s: float, seed: int
                      ) -> sp.csr_matrix:
    files = {a: work / f"{name}.{a}.npy" for a in ("indptr", "indices", "data")}
    tag = work / f"{name}.json"
    want = {"n": n, "dim": dim, "active": active, "zipf": zipf_s, "seed": seed}
    if tag.is_file() and json.loads(tag.read_text()) == want:
        a = {k: np.load(p) for k, p in files.items()}
        return sp.csr_matrix((a["data"], a["indices"], a["indptr"]), shape=(n, dim))
    t0 = time.perf_counter()
    m = zipf_sparse(n, dim, active, zipf_s, seed)
    for k, p in files.items():
        np.save(p, getattr(m, k))
    tag.write_text(json.dumps(want))
    logger.info("generated %s: %d x %d, %d active, in %.0fs", name, n, dim, active, time.perf_counter() - t0)
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
    extra: dict = {}
    extra_bytes = backend.disk_bytes()
    if name == "exact":  # explained search, one query at a time, end to end (re-score + words)
        n = min(args.single_queries, queries.shape[0])
        t0 = time.perf_counter()
        for i in range(n):
            index.search_vectors(queries[i:i + 1], k=args.k)
        extra["explained_single_qps"] = n / (time.perf_counter() - t0)
    backend.close()
    index.close()
    return {"backend": name, "options": {k: v for k, v in options.items() if k != "token"},
            "build_s": store_info["store_write_s"] + build, "backend_build_s": build,
            "bytes_per_item": (store_info["store_bytes"] + extra_bytes) / docs.shape[0],
            "backend_bytes_per_item": extra_bytes / docs.shape[0],
            "single_qps": timing["single_qps"], "batched_qps": timing["batched_qps"],
            "found": [c.rows for c in timing["results"]], **extra}


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
    path = work / "faiss.index"
    faiss.write_index(index, str(path))
    nbytes = path.stat().st_size
    path.unlink()
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
    lines = ["| backend | build (s) | bytes / item | queries/s, one at a time | queries/s, batched | recall@10 |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['backend']} | {r['build_s']:.1f} | {r['bytes_per_item']:,.0f} | {r['single_qps']:.1f} "
                     f"| {r['batched_qps']:.1f} | {r['recall@10']:.3f} |")
    return "\n".join(lines)


def prepare_sparse(args: argparse.Namespace, dim: int, tag: str, index_dir: Path
                   ) -> tuple[sp.csr_matrix, sp.csr_matrix, dict]:
    """Generate (or reuse) the documents and queries, and write the shared store once."""
    docs = cached_collection(args.work, f"docs_{tag}", args.n_docs, dim, args.doc_words, args.zipf, seed=1)
    queries = cached_collection(args.work, f"queries_{tag}_q{args.query_words}", args.n_queries, dim,
                                args.query_words, args.zipf, seed=2)
    logger.info("V=%d; docs %s nnz=%d; queries %s", dim, docs.shape, docs.nnz, queries.shape)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=1_000_000)
    ap.add_argument("--doc-words", type=int, default=300)
    ap.add_argument("--query-words", type=int, default=30)
    ap.add_argument("--n-queries", type=int, default=1000, help="queries for the batched timing and recall")
    ap.add_argument("--single-queries", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of word frequencies")
    ap.add_argument("--dim", type=int, default=None, help="vocabulary size (default: the embedded model's)")
    ap.add_argument("--dense-dim", type=int, default=512)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--backends", default="exact,seismic,milvus,faiss")
    ap.add_argument("--seismic-options", default="{}", help="JSON of SeismicOptions fields")
    ap.add_argument("--milvus-options", default="{}", help="JSON of MilvusOptions fields")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lexvla-search-bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/search_bench.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    dim, dim_source = (args.dim, "--dim") if args.dim else embedded_vocab_size()
    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"n{args.n_docs}_v{dim}_a{args.doc_words}_z{args.zipf}"
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    sparse_needed = any(n != "faiss" for n in names)
    docs = queries = store_info = None
    index_dir = args.work / f"index_{tag}"
    truth_file = args.work / f"truth_{tag}_q{args.query_words}.npy"
    if sparse_needed:
        docs, queries, store_info = prepare_sparse(args, dim, tag, index_dir)

    results = json.loads(args.out.read_text())["results"] if args.out.is_file() else []
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
                "V": dim, "V_source": dim_source, "n_docs": args.n_docs, "doc_words": args.doc_words,
                "query_words": args.query_words, "n_queries": args.n_queries,
                "single_queries": args.single_queries, "zipf": args.zipf}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    ok = [r for r in results if "error" not in r]
    print(markdown(ok))
    for r in results:
        if "error" in r:
            print(f"{r['backend']}: FAILED {r['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
