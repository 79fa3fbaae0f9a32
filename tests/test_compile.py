"""Compiled DiT blocks (regional torch.compile) give the eager results, in edits and in training."""

from __future__ import annotations

import csv

import pytest
import torch

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.lora import load_lora
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.train.loop.trainer import train

from .test_train import make_subset, tiny_config

# fp32 on CPU: the compiled kernels fuse and reorder float ops, nothing more.
TOLERANCE = 1e-5


@pytest.mark.slow
def test_compiled_edit_equals_eager(tiny_diffusers, input_image):
    settings = dict(prompt="Make it night.", steps=2, cfg=4.0, height=32, width=32, progress=False)
    eager = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    compiled = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, compile=True)
    assert all(type(block).__name__ == "OptimizedModule" or hasattr(block, "_compiled_call_impl")
               for block in compiled.dit.blocks)
    difference = (compiled(input_image, **settings).video - eager(input_image, **settings).video).abs().max().item()
    assert difference <= TOLERANCE, difference


@pytest.mark.slow
def test_compiled_training_equals_eager(tiny_diffusers, tmp_path):
    dataset = make_subset(tmp_path / "data", 2)
    common = dict(max_steps=2, save_every=100, seed=4)
    eager = train(tiny_config(tiny_diffusers, dataset, tmp_path / "eager", **common))
    compiled = train(tiny_config(tiny_diffusers, dataset, tmp_path / "compiled", compile=True, **common))
    losses = [[float(r["loss"]) for r in csv.DictReader((tmp_path / run / "logs" / "metrics.csv").open())]
              for run in ("eager", "compiled")]
    assert losses[0] == pytest.approx(losses[1], rel=TOLERANCE)
    # AdamW's first steps are lr * g / (|g| + eps): for a gradient element near eps (1e-8) a float
    # reordering of 1e-10 in g moves that element's step by about 1e-3 of lr, so the LoRA weights
    # are compared to 1% of one step (lr 5e-3), not to the forward's 1e-5.
    a, b = load_lora(eager.lora)[0], load_lora(compiled.lora)[0]
    difference = max((a[k].up - b[k].up).abs().max().item() for k in a)
    assert difference <= 0.01 * 5e-3 and max(a[k].up.abs().max().item() for k in a) > 1e-4, difference


def test_compile_with_block_offload_is_refused(tiny_diffusers):
    with pytest.raises(ChronoEditError, match="--compile cannot be combined with --offload blocks"):
        ChronoEditPipeline.from_pretrained(tiny_diffusers, offload="blocks", compile=True)
