"""Generate docs/reference.md (every CLI command and training setting) from the code itself.

    python -m chronoedit_lora.reference > docs/reference.md

tests/test_docs.py fails when the committed file is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing

from .cli import build_parser
from .train.loop.config import TrainConfig

WIDTH = "100"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subcommands here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    sections = []
    for name, sub in _subparsers(parser).items():
        nested = _subparsers(sub)
        if nested:
            sections += _commands(sub, f"{prefix} {name}")
        else:
            sections.append(f"### `{prefix} {name}`\n\n```text\n{sub.format_help().rstrip()}\n```\n")
    return sections


def _settings() -> str:
    hints = typing.get_type_hints(TrainConfig)
    helps = TrainConfig.field_help()
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "").replace(" | ", " or ")
        rows.append(f"| `{f.name}` | {kind} | `{default!r}` | {helps.get(f.name, '')} |")
    return "\n".join(rows)


def render() -> str:
    os.environ["COLUMNS"] = WIDTH  # argparse wraps help to the terminal width; fix it
    parser = build_parser()
    parser.prog = "chronoedit-lora"
    return "\n".join([
        "# Reference",
        "",
        "Generated from the code by `python -m chronoedit_lora.reference > docs/reference.md`; do not edit by hand.",
        "",
        "## Commands",
        "",
        *_commands(parser, "chronoedit-lora"),
        "## Training settings",
        "",
        "Keys of a training config (`configs/*.toml`); each can also be given as `--key value` to",
        "`chronoedit-lora train`, `scripts/train.py` and `chronoedit-lora cache`.",
        "",
        _settings(),
        "",
    ])


if __name__ == "__main__":
    print(render(), end="")
