"""The one command-line grammar shared by every ``lexvla`` subcommand (imports nothing heavy).

- ``--model NAME_OR_PATH [key=value ...]``: a zoo name or checkpoint folder, then dotted config overrides
  (values are JSON where they parse: ``backbone.grid=2``, ``text.lora=null``; else plain strings).
  Put positional arguments before ``--model``: everything after it up to the next option belongs to it.
- ``--out``: where a command writes (never ``--output`` / ``--output-dir``).
- ``--help`` shows every option's default (:class:`HelpFormatter`).
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def parse_value(text: str) -> Any:
    """``key=value`` values: JSON where it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass(frozen=True)
class ModelSpec:
    """A model as the command line names it: ``NAME_OR_PATH [key=value ...]``; ``str()`` gives that
    spelling back (an index records it, so later commands rebuild the same model)."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, words: str | list[str] | ModelSpec) -> ModelSpec:
        if isinstance(words, ModelSpec):
            return words
        words = shlex.split(words) if isinstance(words, str) else list(words)
        if not words:
            raise ValueError("--model needs a zoo name or a checkpoint folder")
        name, *rest = words
        if "=" in name:
            raise ValueError(f"--model: the first word must be a zoo name or checkpoint folder, got {name!r}")
        path = Path(name).expanduser()
        if path.is_dir():
            name = str(path.resolve())  # recorded in indexes: must not depend on the working directory
        overrides = []
        for item in rest:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--model {name}: {item!r} is not key=value (put positional arguments "
                                 f"before --model)")
            overrides.append((key.strip(), parse_value(value)))
        return cls(name, tuple(overrides))

    def __str__(self) -> str:
        parts = [self.name] + [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in self.overrides]
        return shlex.join(parts)

    def build(self) -> Any:
        """The model in eval mode (``lexvla.create_model(name, **overrides)``)."""
        from lexvla.models import create_model

        model = create_model(self.name, **dict(self.overrides))
        return model.eval() if hasattr(model, "eval") else model


class _ModelAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        try:
            setattr(namespace, self.dest, ModelSpec.parse(values))
        except ValueError as err:
            parser.error(str(err))


def add_model_argument(p: argparse.ArgumentParser, default: str | None = "lexvla-embedded",
                       required: bool = False, help: str = "zoo name (see: lexvla models) or checkpoint folder") -> None:
    """``--model NAME_OR_PATH [key=value ...]``; ``args.model`` is a :class:`ModelSpec` (or None)."""
    p.add_argument("--model", nargs="+", action=_ModelAction, metavar=("NAME_OR_PATH", "KEY=VALUE"),
                   default=None if default is None else ModelSpec(default), required=required,
                   help=help + "; then dotted config overrides, e.g. backbone.grid=2 (zoo names only)")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless the help text already names it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        shown = str(default).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`; subcommand parsers inherit it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _add_action(self, action: argparse.Action) -> argparse.Action:
        if action.help is None and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "default: %(default)s"  # argparse prints no help line at all for help=None
        return super()._add_action(action)
