"""What the drop-ins share: the kit command they translate to (printed, then run), refusals, and
finding the files the original scripts would have downloaded, on this machine only."""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ChronoEditError

PRINTED = "equivalent chronoedit-lora command:"  # the line before the printed command
DIFFSYNTH_MODELS = Path("models")  # DiffSynth's download folder: ./models/<model_id>/<file>
# DiffSynth 1.x's WanVideoPipeline.from_pretrained redirects these files to one model id each
# (redirect_common_files), so that is where an earlier run of the original scripts put them.
DIFFSYNTH_REDIRECTS = {
    "models_t5_umt5-xxl-enc-bf16.pth": "Wan-AI/Wan2.1-T2V-1.3B",
    "Wan2.1_VAE.pth": "Wan-AI/Wan2.1-T2V-1.3B",
    "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth": "Wan-AI/Wan2.1-I2V-14B-480P",
}
# and fetches the umT5 tokenizer from here (tokenizer_config's default)
DIFFSYNTH_TOKENIZER = ("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl")


@dataclass
class KitCommand:
    """``chronoedit-lora ARGV`` with environment variables, and notes on what the translation changed."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    launcher: str = "chronoedit-lora"  # or e.g. "torchrun --nproc_per_node 8 scripts/infer.py" (argv[0] implied)

    def shell(self) -> str:
        """The command as a shell line."""
        env = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        argv = self.argv if self.launcher == "chronoedit-lora" else self.argv[1:]
        return " ".join([*env, self.launcher, shlex.join(argv)])


def refuse(flag: str, reason: str) -> ChronoEditError:
    """The error for an original flag the kit has no equivalent of."""
    return ChronoEditError(f"{flag} has no equivalent in chronoedit-lora: {reason}")


def run_translated(prog: str, translate: Callable[[list[str]], KitCommand], argv: Sequence[str] | None = None) -> int:
    """Translate the original flags, print the kit command (on the first process only) and run it."""
    from ..cli import main

    try:
        command = translate(list(sys.argv[1:] if argv is None else argv))
    except ChronoEditError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        for note in command.notes:
            print(f"{prog}: note: {note}")
        print(f"{prog}: {PRINTED}\n  {command.shell()}", flush=True)
    os.environ.update(command.env)
    return main(command.argv)


def original_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser that, like the kit's, does not guess abbreviated flags."""
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)


def local_model(value: str, flag: str) -> str:
    """A local folder for ``value``: the folder itself, else the Hugging Face cache's copy of the repo
    ``value`` names; nothing is downloaded."""
    if Path(value).exists():
        return value
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(value, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        pass
    name = value.rstrip("/").rsplit("/", 1)[-1]
    raise ChronoEditError(f"{flag} {value}: no such folder, and not in the Hugging Face cache (nothing is downloaded). "
                          f"Download it, e.g. `hf download {value} --local-dir checkpoints/{name}`, and pass "
                          f"{flag} checkpoints/{name}.")


def diffsynth_files(model_id: str, pattern: str, flag: str) -> list[str]:
    """The local files DiffSynth would load for ``model_id:pattern`` (``./models/<model_id>/<pattern>``,
    a glob, or where DiffSynth 1.x redirects that file); missing: an error saying where to put them."""
    ids = [model_id] + [redirect for name, redirect in DIFFSYNTH_REDIRECTS.items()
                        if name == pattern and redirect != model_id]
    for candidate in ids:
        found = sorted(glob.glob(str(DIFFSYNTH_MODELS / candidate / pattern)))
        if found:
            return found
    places = " or ".join(str(DIFFSYNTH_MODELS / candidate / pattern) for candidate in ids)
    raise ChronoEditError(f"{flag} {model_id}:{pattern}: not found (nothing is downloaded). Put the file at {places} "
                          f"(relative to this folder, {Path.cwd()}), e.g. `hf download {model_id} {pattern} "
                          f"--local-dir {DIFFSYNTH_MODELS / model_id}`.")


def diffsynth_tokenizer(model_ids: Sequence[str]) -> str:
    """The umT5 tokenizer folder DiffSynth uses (its default model id's, else one of ``model_ids``')."""
    default_id, folder = DIFFSYNTH_TOKENIZER
    candidates = [DIFFSYNTH_MODELS / model_id / folder for model_id in dict.fromkeys([default_id, *model_ids])]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    raise ChronoEditError(f"the umT5 tokenizer was not found (nothing is downloaded): put the {folder}/ folder at "
                          f"{candidates[0]} (DiffSynth's default), e.g. `hf download {default_id} --include "
                          f"'{folder}/*' --local-dir {DIFFSYNTH_MODELS / default_id}`; also looked in "
                          + ", ".join(map(str, candidates[1:])) + ".")
