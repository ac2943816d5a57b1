"""Seismic parameter sweep: build time, index size, batched queries/s and recall@10 against exact.

Uses the same generated collection and store as ``bench/search_bench.py`` (same ``--work``,
``--workload``, ``--stats``, ``--n-docs``, ``--n-queries``), so its exact top-10 is reused as the truth.
Build parameters (``--n-postings``, ``--max-fraction``, ``--summary-energy``, ``--centroid-fraction``,
``--nknn``) each combination cost one build; search parameters (``--query-cut``, ``--heap-factor``,
``--candidates``: rows asked of Seismic and re-scored exactly from the store, ``--n-knn``: kNN-graph
neighbours, only on builds with a graph) are swept on every built index. The defaults of
``SeismicOptions`` are chosen from this table (docs/search.md).

    python bench/seismic_sweep.py --n-docs 1000000 --workload stats --stats bench/results/vector_stats_embedded_top64.json \
        --n-postings 100,200,400 --query-cut 10,20,64 --heap-factor 0.8,0.9,1.0 --out bench/results/seismic_sweep.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from search_bench import embedded_vocab_size, prepare_sparse, recall_at, workload_specs

from lexvla.index import SparseIndex
from lexvla.index.backends import create_backend
from lexvla.index.synthetic import VectorStats

logger = logging.getLogger("seismic_sweep")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=1_000_000)
    ap.add_argument("--workload", choices=("zipf", "stats"), default="zipf")
    ap.add_argument("--stats", type=Path, default=None)
    ap.add_argument("--doc-words", type=int, default=300)
    ap.add_argument("--query-words", type=int, default=30)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--n-postings", default="50,100,200,400")
    ap.add_argument("--query-cut", default="5,10,20,0", help="0: every query word")
    ap.add_argument("--heap-factor", default="0.8,0.9,1.0")
    ap.add_argument("--max-fraction", default="1.5", help="a list keeps at most n_postings x this")
    ap.add_argument("--summary-energy", default="0.4")
    ap.add_argument("--centroid-fraction", default="0.1")
    ap.add_argument("--nknn", default="0", help="kNN-graph neighbours per document (0: no graph)")
    ap.add_argument("--candidates", default="0", help="rows asked of Seismic, re-scored exactly (0: k)")
    ap.add_argument("--n-knn", default="0", help="graph neighbours added at search (builds with a graph only)")
    ap.add_argument("--threads", type=int, default=0, help="Rayon threads (0: every core)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lexvla-search-bench"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/seismic_sweep.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    if args.dim:
        dim = args.dim
    elif args.workload == "stats" and args.stats is not None:
        dim = VectorStats.load(args.stats).dim
    else:
        dim, _ = embedded_vocab_size()
    args.work.mkdir(parents=True, exist_ok=True)
    _, _, wtag = workload_specs(args)
    tag = f"n{args.n_docs}_v{dim}_{wtag}_q{args.n_queries}"
    index_dir = args.work / f"index_n{args.n_docs}_v{dim}_{wtag}"
    args.words = 6
    docs, queries, store_info = prepare_sparse(args, dim, tag, index_dir)
    truth_file = args.work / f"truth_{tag}.npy"
    with SparseIndex.open(index_dir, backend="exact") as index:  # the reference: truth and its speed, this run
        b = index.backend("images")
        b.search(queries[:20], args.k)
        t0 = time.perf_counter()
        found = [c.rows for c in b.search(queries, args.k)]
        exact_qps = queries.shape[0] / (time.perf_counter() - t0)
    if not truth_file.is_file():
        np.save(truth_file, np.stack([np.pad(f[:args.k], (0, args.k - len(f[:args.k])), constant_values=-1)
                                      for f in found]))
    truth = np.load(truth_file)
    rows = []
    store = SparseIndex.open(index_dir).store("images")
    builds = list(itertools.product(_ints(args.n_postings), _floats(args.max_fraction),
                                    _floats(args.summary_energy), _floats(args.centroid_fraction), _ints(args.nknn)))
    for n_postings, max_fraction, energy, centroids, nknn in builds:
        opts = {"n_postings": n_postings, "max_fraction": max_fraction, "summary_energy": energy,
                "centroid_fraction": centroids, "nknn": nknn, "num_threads": args.threads}
        backend = create_backend("seismic", store, opts)
        t0 = time.perf_counter()
        c0 = time.process_time()
        backend.sync()
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        size = backend.disk_bytes()
        searches = itertools.product(_ints(args.query_cut), _floats(args.heap_factor), _ints(args.candidates),
                                     _ints(args.n_knn) if nknn else [0])
        for cut, hf, cand, n_knn in searches:
            backend.options.query_cut = cut or None
            backend.options.heap_factor = hf
            backend.options.candidates = cand
            backend.options.n_knn = n_knn
            backend.search(queries[:20], args.k)  # warm
            t0 = time.perf_counter()
            found = backend.search(queries, args.k)
            qps = queries.shape[0] / (time.perf_counter() - t0)
            r = {"n_postings": n_postings, "max_fraction": max_fraction, "summary_energy": energy,
                 "centroid_fraction": centroids, "nknn": nknn, "query_cut": cut or "all", "heap_factor": hf,
                 "candidates": cand or args.k, "n_knn": n_knn, "build_s": build_s, "build_cpu_s": build_cpu,
                 "bytes_per_item": size / docs.shape[0], "batched_qps": qps,
                 "recall@10": recall_at([c.rows for c in found], truth, args.k), "loadavg": os.getloadavg()[0]}
            logger.info("%s", r)
            rows.append(r)
        backend.close()
        # the next build starts from nothing (the state file would otherwise say "up to date" for other options)
        for f in (store.directory / "seismic.json", store.directory / "seismic.index.seismic"):
            f.unlink(missing_ok=True)
        meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "n_docs": args.n_docs, "workload": args.workload, "stats": str(args.stats) if args.stats else None,
                "V": dim, "n_queries": args.n_queries, "threads": args.threads, "cores": os.cpu_count(),
                "exact_batched_qps": exact_qps}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"exact backend, batched: {exact_qps:.0f} queries/s")
    print("| n_postings | max_fraction | summary_energy | centroid_fraction | nknn | query_cut | heap_factor | "
          "candidates | n_knn | build (s) | bytes / item | queries/s, batched | recall@10 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n_postings']} | {r['max_fraction']} | {r['summary_energy']} | {r['centroid_fraction']} | "
              f"{r['nknn']} | {r['query_cut']} | {r['heap_factor']} | {r['candidates']} | {r['n_knn']} | "
              f"{r['build_s']:.1f} | {r['bytes_per_item']:,.0f} | {r['batched_qps']:.0f} | {r['recall@10']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
