"""Turn a batch of edit pairs or trajectories into the DiT's training inputs (no gradients through encoders)."""

from __future__ import annotations

import torch

from ...pipeline import ChronoEditPipeline
from ...video import VAE_TIME_FACTOR, tensor_to_pil
from .cache import VAE_SCALE

# One VAE pass over the target and condition clips (a batch of 2) halves the per-op overhead, which
# is most of a small clip's encoding; a large clip's passes are compute-bound, and batching them
# only doubles the VAE's activation memory. Measured with the real Wan2.1 VAE, one thread, batched
# vs two passes: 0.68x at 32x32, 0.84x at 64x64, 1.07-1.10x at 128x128 (the tiny and mid bench sizes).
BATCHED_VAE_MAX_PIXELS = 64 * 64
# The change map (change_weight): a latent cell (8 x 8 pixels) counts as changed when the mean
# absolute difference of its pixels from the input frame's exceeds CHANGE_THRESHOLD of the pixel
# range (0.04: about 10 of 255 levels, above JPEG noise); the 0/1 map is then feathered outward:
# each cell takes the larger of its own value and the mean of its CHANGE_BLUR x CHANGE_BLUR box, so
# changed cells count fully and the cells next to an edit partly.
CHANGE_THRESHOLD = 0.04
CHANGE_BLUR = 3


def change_map(video: torch.Tensor) -> torch.Tensor:
    """Where the clip (3, T, H, W) in [-1, 1] differs from its input frame, per latent cell: (1, 1, F, H/8, W/8)
    in [0, 1]. Latent frame 0 (the input) is 0; latent k, which packs frames 4k-3 .. 4k, takes the
    largest of their differences (a pair: the edited image's; a trajectory: frame by frame)."""
    difference = (video.float() - video[:, :1].float()).abs().mean(0) / 2  # (T, H, W), a fraction of the range
    cells = torch.nn.functional.avg_pool2d(difference[:, None], VAE_SCALE)[:, 0]
    frames = [cells[:1]] + [cells[start:start + VAE_TIME_FACTOR].amax(0, keepdim=True)
                            for start in range(1, len(cells), VAE_TIME_FACTOR)]
    changed = (torch.cat(frames) > CHANGE_THRESHOLD).float()[:, None]
    blurred = torch.nn.functional.avg_pool2d(changed, CHANGE_BLUR, stride=1, padding=CHANGE_BLUR // 2,
                                             count_include_pad=False)
    return torch.maximum(changed, blurred)[:, 0][None, None]


def training_inputs(pipe: ChronoEditPipeline, video: torch.Tensor, prompt: str) -> dict[str, torch.Tensor]:
    """:func:`encode_clip` plus the clip's :func:`change_map` (what the cache stores per pair)."""
    return {**encode_clip(pipe, video, prompt), "change": change_map(video).to(pipe.dtype)}


@torch.no_grad()
def encode_clip(pipe: ChronoEditPipeline, video: torch.Tensor, prompt: str) -> dict[str, torch.Tensor]:
    """Inputs of one training clip: its latents, the y conditioning, CLIP features, umT5 embeddings.

    ``video`` (3, T, H, W) in [-1, 1] is a pair's clip [src, tgt, tgt, tgt, tgt] (T = 5, 2 latents)
    or a trajectory's 29 frames (8 latents). The conditioning is the edit's at inference for that
    clip length: CLIP of the source, and y = [mask with ones on latent 0, VAE(source followed by
    T - 1 zero frames)], as DiffSynth's ``WanVideoUnit_ImageEmbedderVAE`` builds it (equal to it,
    tested), so a trajectory is conditioned exactly as the temporal-reasoning mode is. Small clips
    go through the VAE with their condition clip as one batch of 2 (see ``BATCHED_VAE_MAX_PIXELS``).
    """
    source = tensor_to_pil(video[:, 0])
    condition_clip = torch.cat([video[:, :1], torch.zeros_like(video[:, 1:])], dim=1)
    clips = torch.stack([video, condition_clip]).to(pipe.dtype)
    pipe.placement.use("vae")
    vae = pipe.components.vae
    if video.shape[-2] * video.shape[-1] <= BATCHED_VAE_MAX_PIXELS:
        latents, condition = vae.single_encode(clips, pipe.device)
    else:
        latents, condition = (vae.single_encode(clip[None], pipe.device)[0] for clip in clips)
    mask = torch.zeros_like(condition[:4])
    mask[:, 0] = 1  # the first latent frame is given
    return {
        "input_latents": latents[None].to(pipe.dtype),
        "y": torch.cat([mask, condition])[None].to(pipe.dtype),
        "clip_feature": pipe.encode_image(source),
        "context": pipe.encode_prompt(prompt),
    }


def collate_inputs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-item inputs (same kind and bucket, so same shapes) into a batch (one item: as it is)."""
    if len(items) == 1:
        return items[0]
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


class PairInputs:
    """Training inputs of dataset item ``i``: encoded now, or read from the conditioning cache.

    In two halves, so the file work can run ahead on another thread (:mod:`.prefetch`):
    :meth:`read` decodes the item (uncached) or reads its cache entry, on the CPU;
    :meth:`inputs` encodes it, or moves the cached tensors to the device.
    """

    def __init__(self, pipe: ChronoEditPipeline, dataset, cache=None):
        self.pipe, self.dataset, self.cache = pipe, dataset, cache
        self._keys: dict[int, str] = {}

    def read(self, index: int) -> dict:
        if self.cache is None:
            return self.dataset[index]
        pair_index = index % len(self.dataset.pairs)
        if pair_index not in self._keys:
            self._keys[pair_index] = self.cache.key(self.dataset, pair_index)
        return self.cache.get(self._keys[pair_index])

    def inputs(self, read: dict) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return training_inputs(self.pipe, read["video"], read["prompt"])
        return {k: v.to(self.pipe.device, self.pipe.dtype) for k, v in read.items()}
