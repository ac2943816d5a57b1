"""``lexvla train --config run.yaml [key=value ...] [--resume [PATH]]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._cli import Parser, add_model_argument


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train

    overrides = list(args.overrides)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume steps=5`: argparse gave the first override to --resume's optional value
        overrides.insert(0, args.resume)
        args.resume = "auto"
    cfg = load_config(args.config, overrides)
    if args.model is not None:  # --model NAME_OR_PATH [key=value ...] replaces the config's model section
        cfg.model.name, cfg.model.overrides = args.model.name, dict(args.model.overrides)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .trainer import describe_run

    result = train(cfg, resume=args.resume, on_setup=lambda d: print(describe_run(d), flush=True))
    from accelerate import PartialState

    if PartialState().is_main_process:
        last = result.final_metrics
        print(f"trained {result.steps} steps, {result.samples_seen} pairs, {result.pairs_per_second:.1f} pairs/s; "
              f"loss {last.get('loss', float('nan')):.4f}")
        for v in result.validation[-1:]:
            print("validation: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items() if k != "step"))
        if result.skipped:
            print(f"skipped {result.skipped} unusable samples (see the log)")
        print(f"model: {result.model_dir}\ncheckpoint: {result.checkpoint}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="training YAML (see src/lexvla/configs/); defaults apply without one")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. steps=100 data.batch_size=32 optim.lr.adapter=3e-4")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint folder, or (no value) from the newest in the output dir")
    p.add_argument("--out", dest="output_dir", help="run folder (overrides the config's output_dir)")
    add_model_argument(p, default=None, help="model to train instead of the config's model.name: zoo name or "
                                             "checkpoint folder")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train LexVLA (one process, or under accelerate launch / torchrun)")
    add_arguments(p)
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m lexvla.train`` (same arguments as ``lexvla train``)."""
    from ..cli import configure_logging, quiet_libraries

    parser = Parser(prog="lexvla-train", description="Train LexVLA.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from ..distributed import DistributedSetupError, LaunchEnv

    try:
        rank = LaunchEnv.from_environ().rank
    except DistributedSetupError:
        rank = 0  # reported with its message by train()
    quiet_libraries()
    configure_logging(args.verbose if rank == 0 else 0)  # `lexvla train`'s policy; one log for the run: rank 0's
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, KeyError, DistributedSetupError) as err:
        if args.verbose > 1:
            raise
        print(f"lexvla train: error: {err}", file=sys.stderr)
        return 2
