"""Shared fixtures: tiny ChronoEdit checkpoints in the real on-disk layouts, written once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


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


@pytest.fixture(scope="session")
def input_image() -> Image.Image:
    """A 32x32 RGB test image with structure (gradients + a square), deterministic."""
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([x * 8, y * 8, ((x // 8 + y // 8) % 2) * 255], axis=-1).astype(np.uint8)
    rgb[8:20, 10:22] = (250, 40, 40)
    return Image.fromarray(rgb)
