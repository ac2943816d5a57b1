"""Training throughput with and without the caches, measured with the real trainer.

``python -m lexvla.train.throughput --config src/lexvla/configs/embedded-easyvqa.yaml --steps 6``

One model is built once and reset to its initial weights before every run; the settings are run in
turn, ``--repeats`` times, so that all of them meet the same machine load. Reported per setting: the
median pairs/s (wall clock) and pairs per CPU-second (this process's CPU time, all threads: the number
to compare on a shared machine), first step of each run excluded. The caches are built before the timed
runs (their build time is reported separately).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from .._cli import Parser
from ..cli import configure_logging, quiet_libraries

SETTINGS = {  # name -> (feature cache, text cache)
    "no cache": (False, False),
    "feature cache": (True, False),
    "feature + text cache": (True, True),
}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-root", default="auto", help="cache folder (auto = the project cache)")
    parser.add_argument("--out", dest="json", help="write the results (JSON) to this file")
    args = parser.parse_args(argv)
    quiet_libraries()
    configure_logging(0)  # the lexvla command's policy

    from .config import load_config
    from .trainer import build_model, train

    base = load_config(args.config, [*args.overrides, f"steps={args.steps}", "checkpoint_every=0", "log_every=0",
                                     "validation.dataset=null", "tensorboard=false", "progress=false"])
    model = build_model(base)
    if model.text.trainable:
        SETTINGS.pop("feature + text cache")  # a LoRA text side cannot be cached
    init = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    build_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats + 1):  # round 0 builds the caches and is not counted
            for name, (feat, text) in SETTINGS.items():
                cfg = load_config(args.config, [
                    *args.overrides, f"steps={args.steps if rep else 1}", "checkpoint_every=0", "log_every=0",
                    "validation.dataset=null", "tensorboard=false", "progress=false",
                    f"data.feature_cache={args.cache_root if feat else 'null'}",
                    f"data.text_cache={args.cache_root if text else 'null'}",
                    f"output_dir={Path(tmp) / f'{rep}-{len(runs[name])}'}"])
                model.load_trained(init)
                start = time.perf_counter()
                result = train(cfg, model=model)
                if rep == 0:
                    build_seconds[name] = time.perf_counter() - start
                    continue
                runs[name].append((result.pairs_per_second, result.pairs_per_cpu_second))
                print(f"{name:22s} run {rep}: {result.pairs_per_second:8.1f} pairs/s  "
                      f"{result.pairs_per_cpu_second:8.1f} pairs/CPU-s", flush=True)
    table = {name: {"pairs_per_s": statistics.median(r[0] for r in rs),
                    "pairs_per_cpu_s": statistics.median(r[1] for r in rs),
                    "setup_and_first_step_s": build_seconds[name]} for name, rs in runs.items()}
    base_rate = table["no cache"]["pairs_per_cpu_s"]
    print(f"\n{'setting':22s} {'pairs/s':>9s} {'pairs/CPU-s':>12s} {'speed-up':>9s}")
    for name, row in table.items():
        print(f"{name:22s} {row['pairs_per_s']:9.1f} {row['pairs_per_cpu_s']:12.1f} "
              f"{row['pairs_per_cpu_s'] / base_rate:8.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                               "batch_size": base.data.batch_size, "steps": args.steps,
                                               "results": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
