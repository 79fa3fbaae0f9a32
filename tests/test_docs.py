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


def test_readme_layout_lists_every_module():
    """README "Layout" names each module of the package once, with a description, and no others."""
    root = DOCS.parent
    text = (root / "README.md").read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    listed, folders = {}, []
    for line in block.splitlines():
        if not line.strip() or not line.startswith("  "):
            continue
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        name, _, description = line.strip().partition(" ")
        folders[depth:] = []
        if name.endswith("/"):
            folders.append(name)
        else:
            path = "chronoedit_lora/" + "".join(folders) + name
            assert path not in listed, path
            assert description.strip(), f"{path} has no description"
            listed[path] = description
    modules = {str(p.relative_to(root)) for p in (root / "chronoedit_lora").rglob("*.py") if p.name != "__init__.py"}
    assert set(listed) == modules, (sorted(modules - set(listed)), sorted(set(listed) - modules))
