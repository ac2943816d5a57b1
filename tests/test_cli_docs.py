"""The command line as the docs show it: every ``lexvla ...`` command in README.md and docs/*.md parses
with the real parser (in-process, one parser for all), every (sub)command's ``--help`` renders, and
``lexvla --help`` stays fast (it imports no torch)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lexvla._cli import ModelSpec
from lexvla.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"\.\.\.|^<|^\[|\$")  # synopsis words: `...`, `<file>`, `[--opt x]`, `$VAR`


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _commands_in(text: str) -> list[tuple[int, list[str], bool]]:
    """(line, words after `lexvla`, whole) of every command in code blocks (whole commands) and inline
    code (often a reference like `lexvla serve`: checked as a synopsis)."""
    found = []
    lines = text.splitlines()
    in_block, joined, start = False, "", 0
    for n, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            if not joined:
                start = n
            joined += line.rstrip().removesuffix("\\") + " "
            if line.rstrip().endswith("\\"):
                continue
            candidates, joined, whole = [joined], "", True
        else:
            candidates, start, whole = re.findall(r"`(lexvla [^`]+)`", line), n, False
        for cand in candidates:
            cand = re.sub(r"\s#.*$", "", cand)  # trailing comment
            for part in re.split(r"\s(?:;|&&|\|\||\||>|2>&1|&)\s?", cand):
                words = part.split()
                if "-m" in words and "lexvla.train" in words:  # python -m / accelerate launch -m lexvla.train
                    words = ["lexvla", "train", *words[words.index("lexvla.train") + 1:]]
                while words and ("=" in words[0] or words[0] in ("nohup", "$", "time")):
                    words = words[1:]  # env assignments, prompts
                if len(words) > 1 and words[0] == "lexvla":
                    try:
                        found.append((start, shlex.split(" ".join(words[1:])), whole))
                    except ValueError:
                        found.append((start, words[1:], whole))
    return found


def _check(parser: argparse.ArgumentParser, words: list[str], whole: bool = True) -> str | None:
    """None if the command parses; else why not. Synopses (placeholders, or not ``whole``) are checked
    word by word: the subcommand path must exist and every --option must be one the subcommand has."""
    if whole and not any(PLACEHOLDER.search(w) for w in words) and not any("|" in w for w in words):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(words)
        except SystemExit as exit_:
            return None if exit_.code == 0 else err.getvalue().strip().splitlines()[-1]
        return None
    paths = [[]]
    node = [parser]
    for w in words:
        subs = [_subparsers(p) for p in node]
        if w.startswith("-") or not any(subs) or PLACEHOLDER.search(w):
            break
        alternatives = w.split("|")
        nxt = []
        for s in subs:
            for alt in alternatives:
                if s and alt not in s:
                    return f"no command {alt!r} (choices: {sorted(s)})"
                if s:
                    nxt.append(s[alt])
        node = nxt or node
        paths.append(alternatives)
    for p in node:
        known = {o for a in p._actions for o in a.option_strings}
        for w in words:
            for opt in re.split(r"[|/]", w.split("=")[0]):  # `--a|--b`, `--a/--b`: alternatives
                if opt.startswith("--") and opt not in known:
                    return f"unknown option {opt}"
    return None


def test_every_command_in_the_docs_parses(parser):
    failures, checked = [], 0
    for doc in DOCS:
        for line, words, whole in _commands_in(doc.read_text()):
            checked += 1
            why = _check(parser, words, whole)
            if why:
                failures.append(f"{doc.relative_to(ROOT)}:{line}: lexvla {' '.join(words)}\n    -> {why}")
    assert checked > 40, f"only {checked} commands found: is the extraction broken?"
    assert not failures, "\n".join(failures)


def test_the_docs_check_catches_a_wrong_command(parser):
    ((_, good, whole),) = _commands_in("```\nlexvla search idx/ 'a dog' -k 5\n```")
    assert whole
    assert _check(parser, good) is None
    assert "unrecognized" in _check(parser, ["search", "idx/", "--no-such-flag"])
    assert "unknown option" in _check(parser, ["eval", "retrieval", "--model", "M", "--colour", "..."])
    assert "no command" in _check(parser, ["index", "rebuild", "..."])


def test_every_subcommand_help_renders_with_defaults(parser):
    def walk(p: argparse.ArgumentParser, path: list[str]) -> int:
        text = p.format_help()
        assert "usage:" in text, path
        return 1 + sum(walk(sub, [*path, name]) for name, sub in _subparsers(p).items())

    assert walk(parser, []) > 25
    help_text = _subparsers(_subparsers(parser)["index"])["build"].format_help()
    assert "default: 32" in help_text and "--sparsify SPEC" in help_text  # --batch-size: no help, still shown


def test_the_command_table_matches_what_each_module_registers(parser):
    subs = _subparsers(parser)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in action._choices_actions}
    assert list(subs) == list(COMMANDS)
    for name, (_, text) in COMMANDS.items():
        assert helps[name] == text, name


def test_one_model_grammar_everywhere(parser):
    for words in (["encode", "a.png", "--model", "lexvla-tiny", "backbone.grid=2", "text.lora=null"],
                  ["eval", "retrieval", "--dataset", "easy-vqa", "--model", "lexvla-tiny", "mapper.margin=1.5"],
                  ["index", "build", "--out", "idx", "--images", "x", "--model", "lexvla-tiny", "backbone.grid=2"],
                  ["search", "idx", "a dog", "--model", "lexvla-tiny"], ["serve", "idx", "--model", "lexvla-tiny"],
                  ["explain", "a.png", "--model", "lexvla-tiny", "backbone.grid=1"],
                  ["train", "steps=3", "--model", "lexvla-tiny", "adapter.dropout=0.1"]):
        args = parser.parse_args(words)
        assert isinstance(args.model, ModelSpec) and args.model.name == "lexvla-tiny", words
    spec = parser.parse_args(["encode", "--model", "lexvla-tiny", "backbone.grid=2", "text.lora=null"]).model
    assert spec.overrides == (("backbone.grid", 2), ("text.lora", None))
    assert ModelSpec.parse(str(spec)) == spec  # an index records str(spec) and rebuilds from it
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["encode", "--model", "lexvla-tiny", "a.png"])  # positional after --model


def test_lexvla_help_is_fast_and_imports_no_torch():
    code = ("import sys, contextlib, io\nfrom lexvla.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_architecture_module_table_covers_every_package_and_module():
    table = (ROOT / "docs" / "architecture.md").read_text()
    src = ROOT / "src" / "lexvla"
    names = [f"{p.name}/" for p in src.iterdir() if p.is_dir() and not p.name.startswith("__")]
    names += [p.name for p in src.glob("*.py") if p.name != "__init__.py"]
    missing = [n for n in names if f"| `{n}" not in table and f"| `{n.rstrip('/')}/" not in table]
    assert not missing, f"docs/architecture.md's module table lacks {missing}"
