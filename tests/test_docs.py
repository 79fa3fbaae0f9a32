"""The documentation matches the code: the generated reference, the layout list, every command and
flag the pages show, and every file and page they link to or name."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from chronoedit_lora.cli import build_parser
from chronoedit_lora.reference import _subparsers, render
from chronoedit_lora.train.loop.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.glob("*.md") if p.name != "reference.md")]
# scripts that take the `train` command's settings as --key value
TRAIN_SCRIPTS = ("scripts/train.py",)
# the original release's scripts that the pages map to the kit's commands; not files of this repository
ORIGINAL_ONLY = {"scripts/data_captioning.py", "scripts/prompt_enhancer.py"}


def test_reference_is_up_to_date():
    assert (DOCS / "reference.md").read_text() == render(), \
        "docs/reference.md is stale: run python -m chronoedit_lora.reference > docs/reference.md"


def test_layout_lists_every_module():
    """docs/layout.md names each module of the package once, with a description, and no others."""
    block = (DOCS / "layout.md").read_text().split("```")[1]
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
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "chronoedit_lora").rglob("*.py") if p.name != "__init__.py"}
    assert set(listed) == modules, (sorted(modules - set(listed)), sorted(set(listed) - modules))


def _shell_commands(text: str) -> list[list[str]]:
    """The commands in the page's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split, lexer.commenters = True, "#"
            words: list[str] = []
            for word in [*lexer, ";"]:
                if word in ("&&", ";", "|", "||", "&"):
                    commands += [words] if words else []
                    words = []
                else:
                    words.append(word)
    return commands


def _option_strings(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


TRAIN_KEYS = {f"--{field}" for field in TrainConfig.__dataclass_fields__}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_commands_and_flags_exist(page):
    """Every `chronoedit-lora COMMAND [ACTION] --flag` in a page's shell blocks exists (train and cache
    take the training settings as --key), and so does every `scripts/train.py --key`."""
    commands = _subparsers(build_parser())
    checked = 0
    for words in _shell_commands(page.read_text()):
        if "chronoedit-lora" in words:
            words = words[words.index("chronoedit-lora") + 1:]
            assert words and words[0] in commands, (page.name, words)
            parser, words = commands[words[0]], words[1:]
            nested = _subparsers(parser)
            if nested:
                assert words and words[0] in nested, (page.name, words)
                parser, words = nested[words[0]], words[1:]
            allowed = _option_strings(parser) | (TRAIN_KEYS if parser.prog.split()[-1] in ("train", "cache") else set())
        elif any(word.endswith(TRAIN_SCRIPTS) for word in words):
            allowed = _option_strings(commands["train"]) | TRAIN_KEYS
            words = words[next(i for i, w in enumerate(words) if w.endswith(TRAIN_SCRIPTS)) + 1:]
        else:
            continue
        flags = [word.split("=")[0] for word in words if word.startswith("--")]
        unknown = [flag for flag in flags if flag not in allowed]
        assert not unknown, (page.name, " ".join(words)[:200], unknown)
        checked += 1
    if page.name in ("README.md", "tutorial_style_lora.md"):
        assert checked >= 4, checked  # the check did find the pages' commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_named_files_exist(page):
    """Relative links lead to files, and the tests, benchmarks, configs and scripts a page names exist."""
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (page.parent / target).exists(), (page.name, target)
    named = set(re.findall(r"\b((?:tests|bench|scripts|configs)/[\w./-]+\.(?:py|toml|yaml|sh))\b", text))
    missing = sorted(name for name in named - ORIGINAL_ONLY if not (ROOT / name).exists())
    assert not missing, (page.name, missing)
