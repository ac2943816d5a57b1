"""The ``lexvla`` command. Each feature area registers its own subcommands (``register(subparsers)``).

``lexvla --help`` imports none of them (the table below carries each command's one-line help), and
``lexvla CMD ...`` imports only the module that owns CMD: torch, transformers and friends load only for
commands that need them. ``build_parser()`` (no argument) registers everything, for tests and docs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from lexvla._cli import Parser

# command -> (module with ``register(subparsers)``, one-line help); the order is that of ``lexvla --help``.
# tests/test_cli_docs.py checks that each module registers these commands with this help.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("lexvla.commands", "list the model zoo: architecture, weight source, weights present, trained"),
    "encode": ("lexvla.commands", "top words of images and/or texts"),
    "demo": ("lexvla.demo", "train LexVLA and a dense baseline on emoji on the CPU and write a report"),
    "data": ("lexvla.data.cli", "datasets: fetch (emoji, ...), easy-vqa, source checks, feature caches"),
    "train": ("lexvla.train.cli", "train LexVLA (one process, or under accelerate launch / torchrun)"),
    "eval": ("lexvla.eval.cli", "zero-shot retrieval, PatchDis, sparsity analysis"),
    "index": ("lexvla.index.cli", "build and manage a sparse lexical index"),
    "search": ("lexvla.index.cli", "search an index by text or by image, with explanations"),
    "explain": ("lexvla.viz.cli", "word cloud, patch words and text heat maps of an image (PNG + HTML)"),
    "serve": ("lexvla.web.cli", "local web app: explained image search over an index"),
    "cal": ("lexvla.cal.cli", "CAL: contrastive-alignment token re-weighting for VLM training"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command registered, or (``command`` given) only that command's module
    imported and the other commands as help-only entries."""
    parser = Parser(prog="lexvla", description="Interpretable lexical vision-language models.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v info, -vv debug and tracebacks (default: warnings only)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = list(dict.fromkeys(m for m, _ in COMMANDS.values()))
    if command is not None:
        modules = [COMMANDS[command][0]] if command in COMMANDS else []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and (name == err.name or name.startswith(err.name + ".")):  # area not in this build
                continue
            raise
        module.register(subparsers)
    for cmd, (_, text) in COMMANDS.items():
        if cmd not in subparsers.choices:
            subparsers.add_parser(cmd, help=text, add_help=False)  # listed in --help; parsed when chosen
    return parser


def quiet_libraries() -> None:
    """One output policy for every command: the project's own logging (``-v``) and nothing else —
    no transformers / hub progress bars, advisory messages or deprecation warnings from dependencies."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        for module in ("transformers", "peft", "huggingface_hub", "accelerate", "torch"):
            warnings.filterwarnings("ignore", category=category, module=module)


def configure_logging(verbose: int) -> None:
    """The log-level policy: warnings by default, -v info, -vv debug (every command, every area)."""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if verbose < 2:  # the project's own warnings (e.g. an untrained model) as one line, like its errors
        warnings.formatwarning = lambda message, category, *_args, **_kw: f"lexvla: warning: {message}\n"


def _command_of(argv: list[str]) -> str | None:
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet_libraries()  # before any command module imports transformers / the hub client
    parser = build_parser(_command_of(argv) or "")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lexvla.io import LockedError

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
