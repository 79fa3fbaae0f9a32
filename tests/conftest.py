"""Shared fixtures: tiny ChronoEdit checkpoints in the real on-disk layouts, written once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)
# The dataset check remembers files it has checked in a per-user cache: keep the tests' own.
os.environ.setdefault("CHRONOEDIT_LORA_CACHE", tempfile.mkdtemp(prefix="chronoedit-lora-test-cache-"))


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ChronoEdit-14B-Diffusers-layout checkpoint (sharded transformer + index)."""
    from chronoedit_lora.tiny import write_tiny_diffusers_checkpoint

    return write_tiny_diffusers_checkpoint(tmp_path_factory.mktemp("tiny") / "ChronoEdit-tiny-Diffusers", seed=0)


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny weights in the Wan2.1 file layout."""
    from chronoedit_lora.tiny import write_tiny_wan_checkpoint

    return write_tiny_wan_checkpoint(tmp_path_factory.mktemp("tiny") / "ChronoEdit-tiny-Wan", seed=0)


LORA_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


@pytest.fixture(scope="module")
def dit(tiny_diffusers):
    from chronoedit_lora.models.dit import load_dit

    return load_dit(tiny_diffusers / "transformer", dtype=torch.float32)[0]


@pytest.fixture(scope="module")
def random_lora(dit):
    """Rank 4, alpha 8 (scale 2, so a lost alpha shows), on every target of both blocks."""
    g = torch.Generator().manual_seed(0)
    modules = dict(dit.named_modules())
    from chronoedit_lora.lora import LoraModule

    weights = {}
    for block in range(len(dit.blocks)):
        for target in LORA_TARGETS:
            layer = modules[f"blocks.{block}.{target}"]
            weights[f"blocks.{block}.{target}"] = LoraModule(
                torch.randn(4, layer.in_features, generator=g) * 0.1, torch.randn(layer.out_features, 4, generator=g) * 0.1, 8.0)
    return weights


@pytest.fixture(scope="module")
def float32_model(tmp_path_factory):
    """The tiny model stored in float32, so a merged copy of it is not rounded to bf16."""
    from chronoedit_lora.tiny import write_tiny_diffusers_checkpoint

    return write_tiny_diffusers_checkpoint(tmp_path_factory.mktemp("f32") / "tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def distill_like(random_lora, tmp_path_factory):
    """A rank-4 LoRA on every linear layer of the tiny DiT, standing in for the distill LoRA (base_loras)."""
    from chronoedit_lora.lora import save_lora

    return save_lora(random_lora, tmp_path_factory.mktemp("distill") / "distill.safetensors")


@pytest.fixture(scope="session")
def input_image() -> Image.Image:
    """A 32x32 RGB test image with structure (gradients + a square), deterministic."""
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([x * 8, y * 8, ((x // 8 + y // 8) % 2) * 255], axis=-1).astype(np.uint8)
    rgb[8:20, 10:22] = (250, 40, 40)
    return Image.fromarray(rgb)
