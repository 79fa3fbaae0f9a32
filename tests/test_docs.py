"""The generated reference matches the code; the tutorial only uses commands that exist."""

from __future__ import annotations

import re
from pathlib import Path

from chronoedit_lora.cli import build_parser
from chronoedit_lora.reference import _subparsers, render

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_reference_is_up_to_date():
    assert (DOCS / "reference.md").read_text() == render(), \
        "docs/reference.md is stale: run python -m chronoedit_lora.reference > docs/reference.md"


def test_tutorial_commands_exist():
    commands = _subparsers(build_parser())
    text = (DOCS / "tutorial_style_lora.md").read_text()
    used = re.findall(r"chronoedit-lora ([a-z-]+)(?: ([a-z]+))?", text)
    assert used
    for command, action in used:
        assert command in commands, command
        nested = _subparsers(commands[command])
        if nested and action:
            assert action in nested, (command, action)
