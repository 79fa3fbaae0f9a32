"""bench/adapter_sizes.py: its counts on the 14B shapes equal the hand formulas, and on the tiny model
the parameters the trainer really trains."""

from __future__ import annotations

import pytest
import torch

from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS
from chronoedit_lora.train.objective.adapter_config import peft_config
from chronoedit_lora.train.loop.config import load_config

from .bench_scripts import load_bench


def test_14b_counts_equal_the_hand_formulas():
    dim, ffn, blocks, rank = CHRONOEDIT_14B_KWARGS["dim"], CHRONOEDIT_14B_KWARGS["ffn_dim"], 40, 32
    # per block: q, k, v, o of both attentions (dim -> dim), ffn.0 (dim -> ffn), ffn.2 (ffn -> dim)
    shapes = [(dim, dim)] * 8 + [(ffn, dim), (dim, ffn)]
    lora = blocks * sum(rank * (out + inp) for out, inp in shapes)
    dora = lora + blocks * sum(out for out, _ in shapes)  # one magnitude per output row
    bench = load_bench("adapter_sizes")
    counts = {kind: bench.adapter_parameters(CHRONOEDIT_14B_KWARGS, {"adapter": kind, "rank": "32", "alpha": "32"})
              for kind in ("lora", "dora", "loha")}
    assert counts == {"lora": lora, "dora": dora, "loha": 2 * lora}  # LoHa: two LoRA-shaped pairs
    assert lora == 153_354_240


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_tiny_counts_equal_the_trained_parameters(tiny_diffusers, kind):
    from chronoedit_lora.models.dit import inspect_dit
    from chronoedit_lora.pipeline import ChronoEditPipeline
    from chronoedit_lora.train.objective.lora_module import LoraTrainingModule

    overrides = {"adapter": kind, "rank": "4", "alpha": "4"}
    counted = load_bench("adapter_sizes").adapter_parameters(inspect_dit(tiny_diffusers / "transformer").kwargs, overrides)
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, encoders=False)
    config = load_config(None, overrides)
    trained = LoraTrainingModule(pipe, config.rank, config.alpha, config.targets, adapter=peft_config(config))
    assert counted == sum(p.numel() for p in trained.lora_parameters()) > 0
    assert counted == sum(p.numel() for p in trained.dit.parameters() if p.requires_grad)  # exactly what trains
