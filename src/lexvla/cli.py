"""The ``lexvla`` command. Each feature area registers its own subcommands (``register(subparsers)``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lexvla.io import LockedError

# Feature modules, each with ``register(subparsers)``; the order is the order in ``lexvla --help``.
COMMAND_MODULES = (
    "lexvla.commands",  # encode, words, models
    "lexvla.demo",
    "lexvla.data.cli",
    "lexvla.train.cli",
    "lexvla.eval.cli",
    "lexvla.index.cli",
    "lexvla.viz.cli",
    "lexvla.web.cli",
    "lexvla.cal.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lexvla", description="Interpretable lexical vision-language models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug and tracebacks)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (name == err.name or name.startswith(err.name + ".")):  # area not in this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logging.getLogger("lexvla").warning("interrupted")
        return 130
    except (FileNotFoundError, ValueError, KeyError, LockedError) as err:
        # User errors (bad paths, unknown names, unreadable images) get one clear line, no traceback.
        if args.verbose > 1:
            raise
        print(f"lexvla: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
