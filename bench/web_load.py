"""Bounded concurrent load on the web app's text search, over loopback.

Starts ``lexvla serve INDEX --model M`` on 127.0.0.1 (a free port) in a child process, or targets a
running server with ``--url``; sends a fixed number of ``GET /api/search`` requests from a fixed
number of client threads (queries cycled from a fixed list), after a short warm-up; reports
requests/s and latency percentiles (client-side, whole HTTP round trip) and the server's own
search time.

    python bench/web_load.py idx/ --model lexvla-embedded --requests 400 --concurrency 8
    python bench/web_load.py idx/ --model M --build-from images/   # build the index first if missing
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

QUERIES = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle", "a gray rectangle",
    "a purple shape", "an orange triangle", "a teal square", "a brown circle on white", "a black rectangle",
    "a person", "a cat sitting", "a building", "a red shape", "a small blue triangle", "a large green circle",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, model: str, port: int, log: Path, extra: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lexvla.cli", "serve", index, "--model", model, "--host", "127.0.0.1",
           "--port", str(port), *(extra or [])]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            return httpx.get(f"{url}/api/info", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.25)
    raise SystemExit(f"no answer from {url} within {timeout:.0f} s")


def query_text(i: int, unique: bool) -> str:
    """The i-th query; with ``unique`` every request is a new text (no query-vector cache hits)."""
    return f"{QUERIES[i % len(QUERIES)]} {i}" if unique else QUERIES[i % len(QUERIES)]


def run_load(url: str, n_requests: int, concurrency: int, k: int, warmup: int, unique: bool = False,
             info_probe: bool = False, offset: int = 0) -> dict:
    """``offset``: first query number (runs against one server use disjoint numbers, so --unique stays unique)."""
    with httpx.Client(timeout=60) as c:
        for i in range(warmup):
            c.get(f"{url}/api/search", params={"q": query_text(-1 - i - offset, unique), "k": k}).raise_for_status()
    info_ms: list[float] = []
    info_errors = [0]
    stop = threading.Event()

    def probe() -> None:  # /api/info while the searches run: must not wait behind them
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.get(f"{url}/api/info").raise_for_status()
                except httpx.HTTPError:
                    info_errors[0] += 1
                info_ms.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.02)
    latencies = np.zeros(n_requests)
    server_ms = np.zeros(n_requests)
    status = np.zeros(n_requests, dtype=int)
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=60) as c:  # one keep-alive connection per client thread
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = c.get(f"{url}/api/search", params={"q": query_text(offset + i, unique), "k": k})
                    status[i] = r.status_code
                    if r.status_code == 200:
                        server_ms[i] = r.json()["took_ms"]
                except httpx.HTTPError:
                    status[i] = -1
                latencies[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    prober = threading.Thread(target=probe) if info_probe else None
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if prober:
        prober.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    if prober:
        prober.join()
    ok = status == 200
    ms = latencies * 1000
    return {"requests": n_requests, "concurrency": concurrency, "k": k, "errors": int((~ok).sum()),
            "seconds": round(wall, 3), "requests_per_s": round(n_requests / wall, 2),
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1), "p95": round(float(np.percentile(ms, 95)), 1),
                           "p99": round(float(np.percentile(ms, 99)), 1), "max": round(float(ms.max()), 1)},
            "server_search_ms_p50": round(float(np.median(server_ms[ok])), 1) if ok.any() else None,
            "unique_queries": unique,
            **({"info_probe": {"requests": len(info_ms), "errors": info_errors[0],
                               "p50_ms": round(float(np.percentile(info_ms, 50)), 1),
                               "p95_ms": round(float(np.percentile(info_ms, 95)), 1),
                               "max_ms": round(float(np.max(info_ms)), 1)}} if info_probe and info_ms else {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("index", nargs="?", help="index folder to serve (not needed with --url)")
    p.add_argument("--model", default="lexvla-embedded")
    p.add_argument("--url", default=None, help="an already running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--build-from", default=None, help="build the index from this image folder if it is missing")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--concurrency-list", default=None,
                   help="several runs against one server, e.g. 1,8,32 (overrides --concurrency)")
    p.add_argument("--unique", action="store_true", help="a new query text per request (defeats the query cache)")
    p.add_argument("--info-probe", action="store_true", help="also time GET /api/info during the load")
    p.add_argument("--serve-args", default="", help="extra `lexvla serve` arguments, e.g. '--torch-threads 2'")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")

    proc, log = None, None
    url = args.url
    if url is None:
        if not args.index:
            p.error("give an index folder or --url")
        if args.build_from and not (Path(args.index) / "index.json").is_file():
            import lexvla
            from lexvla.index import build_index

            t0 = time.perf_counter()
            build_index(lexvla.create_model(args.model).eval(), args.build_from, out=args.index)
            print(f"built {args.index} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(args.index) / "web_load_server.log"
        proc = start_server(args.index, args.model, port, log, args.serve_args.split())
    try:
        info = wait_ready(url, proc, 300, log)
        levels = [int(c) for c in args.concurrency_list.split(",")] if args.concurrency_list else [args.concurrency]
        runs = [run_load(url, args.requests, c, args.k, args.warmup, args.unique, args.info_probe,
                         offset=j * (args.requests + args.warmup)) for j, c in enumerate(levels)]
        result = {"info": info, "serve_args": args.serve_args, "loadavg_after": os.getloadavg(),
                  **(runs[0] if len(runs) == 1 else {"runs": runs, "errors": sum(r["errors"] for r in runs)})}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
