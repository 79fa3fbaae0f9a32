"""Held-out pairs encoded once (latents, y, CLIP, umT5 and fixed noise) and edited with any LoRA.

One encoding serves every checkpoint: the flow-matching loss (:mod:`.quantile_loss`) and the
edit both start from it, since the training clip's conditioning (CLIP of the input, y from the
input followed by black frames, the prompt's umT5 embedding) is the edit's at inference for that
clip length (see :func:`~chronoedit_lora.train.loop.inputs.encode_clip`). A trajectory row is edited in
the temporal-reasoning mode throughout, as the training sample grids do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..data.metadata import TRAJECTORY
from ..pipeline import EDIT_LATENTS, ChronoEditPipeline
from ..step_cache import Calibration, StepCache, StepCacheSpec
from ..train.loop.inputs import encode_clip
from ..video import tensor_to_pil


@dataclass
class HeldOutPair:
    """One held-out row: its encoded clip, the noise of each loss timestep, and its images."""

    inputs: dict[str, torch.Tensor]
    noises: list[torch.Tensor]
    source: Image.Image
    target: Image.Image
    prompt: str
    kind: str
    row: int


@dataclass(frozen=True)
class EditSettings:
    """How held-out inputs are edited (the same for every checkpoint)."""

    steps: int = 8
    cfg: float = 1.0
    shift: float | None = None
    scheduler: str | None = None
    seed: int = 0
    negative_prompt: str = ""
    batched_guidance: bool = True
    step_cache: StepCacheSpec | None = None  # edits cached, and scored against uncached ones too
    cache_calibration: Calibration | None = None


@torch.no_grad()
def encode_pairs(pipe: ChronoEditPipeline, items: list[dict], timesteps: int, seed: int = 0) -> list[HeldOutPair]:
    """Encode dataset items (:class:`~chronoedit_lora.data.EditPairDataset`) once, with ``timesteps``
    noise tensors each, drawn from one generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for item in items:
        inputs = encode_clip(pipe, item["video"], item["prompt"])
        noises = [torch.randn(inputs["input_latents"].shape, generator=generator) for _ in range(timesteps)]
        pairs.append(HeldOutPair(inputs, noises, tensor_to_pil(item["video"][:, 0]), tensor_to_pil(item["video"][:, -1]),
                                 item["prompt"], item["kind"], item["row"]))
    return pairs


def reasoning_steps(pair: HeldOutPair, settings: EditSettings) -> int:
    """A trajectory row is edited in the temporal-reasoning mode throughout, a pair row without it."""
    return settings.steps if pair.kind == TRAJECTORY else 0


@torch.no_grad()
def edit_pair(pipe: ChronoEditPipeline, pair: HeldOutPair, settings: EditSettings,
              negative: torch.Tensor | None, step_cache: StepCache | None = None) -> Image.Image:
    """The edit of ``pair``'s input with the DiT as it is now (``negative``: the negative prompt's
    embedding when cfg > 1, else None; ``step_cache``: this edit's, see :mod:`chronoedit_lora.step_cache`)."""
    latents, _ = pipe.denoise(pair.inputs["context"], negative, pair.inputs["clip_feature"], pair.inputs["y"],
                              settings.seed, settings.steps, settings.cfg, settings.shift, reasoning_steps(pair, settings),
                              settings.scheduler, settings.batched_guidance, progress=False, step_cache=step_cache)
    edit_latents = latents[:, :, EDIT_LATENTS] if latents.shape[2] > 2 else latents
    return tensor_to_pil(pipe.decode(edit_latents)[0, :, -1])


def negative_embedding(pipe: ChronoEditPipeline, settings: EditSettings) -> torch.Tensor | None:
    """The negative prompt's umT5 embedding, encoded once, if guidance uses it (cfg > 1)."""
    return pipe.encode_prompt(settings.negative_prompt) if settings.cfg > 1.0 else None
