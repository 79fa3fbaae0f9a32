"""A local web app: edit, compare LoRAs, watch and start training runs, browse datasets (the model loads once).

Listens on 127.0.0.1 unless --host says otherwise, which needs --auth. Only the folders given
(--runs, --loras, --datasets and the edit --history) can be read through it.
"""

from __future__ import annotations

import argparse

from ..step_cache import read_calibration
from ..offload import MODES as OFFLOAD_MODES
from .model_args import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--runs", help="folder of training runs (the Runs tab; the Train tab writes runs here)")
    parser.add_argument("--loras", help="folder of LoRA files to choose from")
    parser.add_argument("--datasets", help="folder of datasets (metadata.csv files) for the Dataset and Train tabs")
    parser.add_argument("--history", default="outputs/ui-history",
                        help="where each edit is saved with its settings (settings.json)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; anything but a loopback address needs --auth")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--auth", metavar="USER:PASSWORD|TOKEN",
                        help="require a login: USER:PASSWORD, or a TOKEN entered as the password (any user name)")
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload accepted, in MB")
    parser.add_argument("--offload", choices=OFFLOAD_MODES, default="auto",
                        help="where the weights live on a GPU (as for edit)")
    parser.add_argument("--prompt-enhancer", metavar="MODULE:CALLABLE",
                        help="offer to rewrite instructions first: f(image, instruction) -> str")
    parser.add_argument("--cache-calibration", metavar="JSON",
                        help="the step cache's calibration (from calibrate-cache), for the step-cache control's mag")


def run(args: argparse.Namespace) -> int:
    from ..ui.app import serve

    if args.cache_calibration:
        read_calibration(args.cache_calibration)  # a bad file is one line before the model loads

    serve(args)
    return 0
