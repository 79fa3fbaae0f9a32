"""Shared check: a LoRA file loaded by diffusers vs fused into our DiT gives the same transformer output."""

from __future__ import annotations

from pathlib import Path

import torch

from chronoedit_lora.lora import fuse_lora, load_lora
from chronoedit_lora.models.dit import load_dit
from chronoedit_lora.models.rope import chronoedit_model_fn

PARITY_RTOL = 1e-4  # fp32, same weights; relative to the output scale


def diffusers_and_ours(model_dir: Path, lora_path: Path, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(diffusers output with the LoRA, our output with it fused, our output without it) on random inputs."""
    from diffusers import ChronoEditPipeline as ReferencePipeline

    reference = ReferencePipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    reference.load_lora_weights(str(lora_path))
    base = load_dit(model_dir / "transformer", dtype=torch.float32)[0]
    ours = load_dit(model_dir / "transformer", dtype=torch.float32)[0]
    fuse_lora(ours, load_lora(lora_path)[0])
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    context, clip = torch.randn(1, 512, 32, generator=g), torch.randn(1, 257, 1280, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        expected = reference.transformer(torch.cat([x, y], 1), t, context, clip, return_dict=False)[0]
        got, without = (chronoedit_model_fn(m, x, t, context=context, clip_feature=clip, y=y) for m in (ours, base))
    return expected, got, without
