"""A pinned training run (torchtune-style recipe test): the tiny checkpoint, 4 example pairs at
32x32, fp32, seed 0, 8 steps. The logged losses and the final LoRA's norm are compared with
stored numbers, so a change that alters the training math fails here even if the loss still falls.

If a change is *meant* to alter the math (another loss weighting, noise draw, data order, LoRA
init...), regenerate the numbers and say so in the commit message:

    python -m tests.test_loss_curve

prints the new ``EXPECTED_LOSSES`` and ``EXPECTED_LORA_NORM`` to paste here.
"""

from __future__ import annotations

import csv
import math
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

# The losses are logged with 6 significant digits; fp32 on CPU repeats a run to ~1e-7.
RTOL = 1e-5
EXPECTED_LOSSES = [1.26019, 2.76837, 2.64312, 2.22058, 0.133238, 0.0292226, 0.194378, 0.486648]
EXPECTED_LORA_NORM = 8.974132432494901


def pinned_run(model: Path, workdir: Path) -> tuple[list[float], float]:
    """Train the pinned run; returns the 8 logged losses and the Frobenius norm of every LoRA factor."""
    from chronoedit_lora.train.loop.trainer import train

    from .test_train import make_subset, tiny_config

    (workdir / "data").mkdir(parents=True, exist_ok=True)
    dataset = make_subset(workdir / "data", 4)
    result = train(tiny_config(model, dataset, workdir / "run", max_steps=8, save_every=100, warmup_steps=2))
    with (workdir / "run" / "logs" / "metrics.csv").open() as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    factors = [t.double() for k, t in load_file(str(result.lora)).items() if ".lora_" in k]
    return losses, math.sqrt(sum(t.square().sum().item() for t in factors))


def test_training_matches_the_pinned_loss_curve(tiny_diffusers, tmp_path):
    losses, norm = pinned_run(tiny_diffusers, tmp_path)
    assert len(losses) == 8
    for step, (got, expected) in enumerate(zip(losses, EXPECTED_LOSSES), start=1):
        assert math.isclose(got, expected, rel_tol=RTOL), f"step {step}: loss {got!r}, pinned {expected!r}"
    assert math.isclose(norm, EXPECTED_LORA_NORM, rel_tol=RTOL), (norm, EXPECTED_LORA_NORM)


if __name__ == "__main__":  # regenerate the pinned numbers
    torch.set_num_threads(2)
    from chronoedit_lora.tiny import write_tiny_diffusers_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_diffusers_checkpoint(Path(tmp) / "tiny", seed=0)
        losses, norm = pinned_run(model, Path(tmp) / "work")
    print(f"EXPECTED_LOSSES = {losses!r}\nEXPECTED_LORA_NORM = {norm!r}", file=sys.stdout)
