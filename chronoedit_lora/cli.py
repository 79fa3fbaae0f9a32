"""``chronoedit-lora`` command line: one subcommand per module in ``chronoedit_lora.commands``."""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import os
import sys

from .errors import ChronoEditError

# subcommand -> module in chronoedit_lora.commands exposing add_arguments(parser) and run(args)
COMMANDS = {
    "make-tiny": "make_tiny",
    "model": "model",
    "edit": "edit",
    "train": "train",
    "lora": "lora",
    "dataset": "dataset",
    "cache": "cache",
    "export": "export",
    "eval": "eval",
    "ui": "ui",
    "calibrate-cache": "calibrate_cache",
}
# commands that accept free-form `--key value` settings after their own flags
OPEN_ENDED = {"train", "cache"}
# OS errors that the machine, not the kit, causes: one line naming the file instead of a traceback
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                      errno.ENOENT, errno.ESTALE}
DEBUG_VARIABLE = "CHRONOEDIT_LORA_DEBUG"  # set to 1 to see the traceback behind any error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something and its help text does not already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default in ("", [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chronoedit-lora",
        description="Train and use ChronoEdit-14B LoRAs on DiffSynth-Studio 2.x.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"chronoedit_lora.commands.{module_name}")
        doc = (module.__doc__ or "").strip().splitlines()[0]
        command = sub.add_parser(name, help=doc, description=module.__doc__, allow_abbrev=False,
                                 formatter_class=HelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = ""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        command = args.command
        if extra and args.command not in OPEN_ENDED:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return (args.run(args, extra) if args.command in OPEN_ENDED else args.run(args)) or 0
    except ChronoEditError as exc:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        print(f"chronoedit-lora {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if os.environ.get(DEBUG_VARIABLE) or exc.errno not in ENVIRONMENT_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"chronoedit-lora {command}: error: {where}{exc.strerror} (set {DEBUG_VARIABLE}=1 for the traceback).",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        report_unraisable, sys.unraisablehook = sys.unraisablehook, _ignore_unraisable
    # Ctrl-C. Leaving the except block freed the traceback, and the frames it held are finalized now,
    # not at exit, so that "interrupted." is the last line: an open progress bar prints its closing line;
    # a bar the signal caught half-built (inside tqdm's constructor) raises from its finalizer, an error
    # not worth a traceback when the command is stopping because the user asked it to.
    gc.collect()
    sys.unraisablehook = report_unraisable
    print(f"\nchronoedit-lora{' ' + command if command else ''}: interrupted.", file=sys.stderr)
    return 130


def _ignore_unraisable(unraisable: "sys.UnraisableHookArgs") -> None:
    """Drops an error raised by a finalizer while an interrupted command stops."""


if __name__ == "__main__":
    sys.exit(main())
