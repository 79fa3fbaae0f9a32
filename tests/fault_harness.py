"""Run ``chronoedit-lora train`` and SIGKILL it at a chosen moment (test harness, not kit code).

    python -m tests.fault_harness MOMENT STEP -- TRAIN ARGS...

MOMENT: ``step`` (after optimizer step STEP, before anything of it is saved), ``checkpoint-folder``
(checkpoint STEP fully written, not yet renamed into place), ``checkpoint-file`` (its optimizer.pt
half-way: the temporary file written, not renamed), ``step-lora`` (checkpoint STEP in place, its
lora-stepNNNNNN.safetensors being written).
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(moment: str, step: int) -> None:
    import chronoedit_lora.files as files
    import chronoedit_lora.lora.io as lora_io
    import chronoedit_lora.train.state.checkpoint as checkpoint
    import chronoedit_lora.train.state.logs as logs

    tag = f"{step:06d}"
    if moment == "step":
        log_step = logs.TrainingLog.step
        logs.TrainingLog.step = lambda self, s, *a, **k: die() if s == step else log_step(self, s, *a, **k)
    elif moment == "checkpoint-folder":
        replace = checkpoint.replace_folder
        checkpoint.replace_folder = lambda staging, final: die() if final.name.endswith(tag) else replace(staging, final)
    else:
        def doomed(path: Path) -> bool:
            if moment == "checkpoint-file":
                return path.name == "optimizer.pt" and tag in path.parent.name
            return path.name == f"lora-step{tag}.safetensors"

        real = files.atomic_path

        @contextmanager
        def atomic_path(path):
            with real(path) as tmp:
                yield tmp
                if doomed(Path(path)):
                    die()  # the temporary file is written; the rename never happens

        files.atomic_path = lora_io.atomic_path = atomic_path


if __name__ == "__main__":
    moment, step, separator, *train_args = sys.argv[1:]
    assert separator == "--"
    install(moment, int(step))
    from chronoedit_lora.cli import main

    sys.exit(main(["train", *train_args]))
