"""Two query-encoder threads of one process vs one: per-query cost of the served (fast) encode, in process.

Times batches of 1, 4 and 8 texts on one thread (1 and 2 torch threads) and two batches on two threads
at once (1 torch thread each), median of 4 runs, and writes milliseconds per query as JSON.

    python bench/web_encoders.py --json bench/results/web_encoders.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lexvla-embedded")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import lexvla
    from lexvla.models.text_fast import FastTextEncoder

    model = lexvla.create_model(args.model).eval()
    fast = FastTextEncoder(model.text)
    texts = [f"a red circle {i}" for i in range(16)]

    def encode(batch: list[str], threads: int) -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            model.mapper.text(fast.scores(batch))

    def median_s(fn, reps: int = 4) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def two_at_once(b: int) -> None:
        threads = [threading.Thread(target=encode, args=(texts[i * b:(i + 1) * b], 1)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    out: dict[str, float] = {}
    for b in (1, 4, 8):
        out[f"one thread, batch {b}, 1 torch thread: ms/query"] = round(
            median_s(lambda b=b: encode(texts[:b], 1)) * 1000 / b, 1)
        out[f"one thread, batch {b}, 2 torch threads: ms/query"] = round(
            median_s(lambda b=b: encode(texts[:b], 2)) * 1000 / b, 1)
        out[f"two threads at once, batch {b} each, 1 torch thread: ms/query"] = round(
            median_s(lambda b=b: two_at_once(b)) * 1000 / (2 * b), 1)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
