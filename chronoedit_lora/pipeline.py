"""The ChronoEdit edit pipeline: an image and an instruction in, the edited image out.

ChronoEdit treats an edit as a short video whose first frame is the input image and whose last
frame is the edit. The steps read top to bottom, as in diffusers' pipelines; the model work is
DiffSynth's (its Wan text/CLIP/VAE units, its flow-matching scheduler, its model function), with
ChronoEdit's temporal-skip RoPE applied around the DiT call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffsynth.diffusion.flow_match import FlowMatchScheduler
from diffsynth.pipelines.wan_video import (
    WanVideoPipeline,
    WanVideoUnit_ImageEmbedderCLIP,
    WanVideoUnit_ImageEmbedderVAE,
    WanVideoUnit_PromptEmbedder,
)
from PIL import Image
from tqdm.auto import tqdm

from .errors import ChronoEditError
from .models.components import LoadedComponents, load_components
from .models.rope import chronoedit_model_fn
from .video import EDIT_FRAMES, REASONING_FRAMES, SIZE_MULTIPLE, default_size, tensor_to_pil


@dataclass
class EditResult:
    """The edited image, every decoded frame (reasoning frames first, if any) and the float clip."""

    image: Image.Image
    frames: list[Image.Image]
    video: torch.Tensor  # (1, 3, T, H, W) in [-1, 1]


def sampling_scheduler(steps: int, shift: float) -> FlowMatchScheduler:
    """DiffSynth's Wan flow-matching schedule for ``steps`` denoising steps (sigmas 1 -> 0, shifted)."""
    scheduler = FlowMatchScheduler("Wan")
    scheduler.set_timesteps(steps, shift=shift)
    return scheduler


class ChronoEditPipeline:
    """Edit images with ChronoEdit through DiffSynth's Wan building blocks."""

    def __init__(self, components: LoadedComponents, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 rope: str = "skip", sequence_parallel: bool = False):
        self.components = components
        self.device = torch.device(device)
        self.dtype = dtype
        self.rope = rope
        self.sequence_parallel = sequence_parallel
        # DiffSynth's units read models and settings from a WanVideoPipeline; we hand them ours.
        self.core = WanVideoPipeline(device=str(self.device), torch_dtype=dtype)
        self.core.dit = components.dit
        self.core.text_encoder = components.text_encoder
        self.core.image_encoder = components.image_encoder
        self.core.vae = components.vae
        self.core.tokenizer = components.tokenizer
        if sequence_parallel:  # DiffSynth swaps in xfuser's Ulysses attention (see parallel.py)
            self.core.enable_usp()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                        rope: str = "skip", sequence_parallel: bool = False, encoders: bool = True,
                        with_dit: bool = True, fp8_base: bool = False, dit_device: str | torch.device | None = None,
                        **overrides: str | Path | None) -> "ChronoEditPipeline":
        """Load the components from ``model_dir`` (diffusers or Wan layout) plus overrides
        (``encoders=False``: the DiT only, for training from cached conditioning; ``with_dit=False``:
        the encoders only, for filling that cache; ``fp8_base``: the DiT blocks' linear weights in
        float8, see :mod:`chronoedit_lora.models.fp8`; ``dit_device``: the DiT's device if not ``device``)."""
        if sequence_parallel:
            from .parallel import start_sequence_parallel

            device = start_sequence_parallel()
        components = load_components(model_dir, dtype=dtype, device=device, encoders=encoders, with_dit=with_dit,
                                     fp8_base=fp8_base, dit_device=dit_device, **overrides)
        return cls(components, device, dtype, rope, sequence_parallel)

    @property
    def dit(self):
        return self.components.dit

    def load_lora(self, path: str | Path, scale: float = 1.0, fuse: bool = True):
        """Apply a LoRA file to the DiT (checked first: a mismatch lists what does not fit, NaN/inf
        weights name their layers).

        Fused by default (no cost per step). ``fuse=False`` returns an :class:`UnfusedLora` whose
        ``scale`` can be changed, or which can be removed, without reloading the base model.
        fp8 base weights cannot absorb a LoRA, so there it must be unfused.
        """
        from .lora import UnfusedLora, check_finite, check_lora_matches, fuse_lora, load_lora
        from .models.fp8 import uses_fp8

        if fuse and uses_fp8(self.dit):
            raise ChronoEditError(f"LoRA {path}: the DiT holds fp8 base weights, which a fused LoRA would round "
                                  "away; load it with fuse=False (the edit command does this itself with --fp8-base).")

        weights, _ = load_lora(path)
        check_finite(weights, str(path))
        check_lora_matches(weights, self.dit, str(path))
        if not fuse:
            return UnfusedLora(self.dit, weights, scale)
        fuse_lora(self.dit, weights, scale)
        return None

    # -- conditioning -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """umT5 embeddings (1, 512, text_dim), zero past the prompt's tokens."""
        return WanVideoUnit_PromptEmbedder().encode_prompt(self.core, prompt).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """CLIP penultimate-layer features of the input image (1, 257, 1280)."""
        width, height = image.size
        return WanVideoUnit_ImageEmbedderCLIP().process(self.core, image, None, height, width)["clip_feature"]

    @torch.no_grad()
    def condition_latents(self, image: Image.Image, num_frames: int) -> torch.Tensor:
        """y = [mask with ones on latent 0 (4 ch), VAE(input image followed by black frames) (16 ch)]."""
        width, height = image.size
        return WanVideoUnit_ImageEmbedderVAE().process(
            self.core, image, None, num_frames, height, width, tiled=False, tile_size=None, tile_stride=None
        )["y"]

    # -- sampling -----------------------------------------------------------------------------
    def predict_velocity(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, clip_feature: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One DiT evaluation with ChronoEdit's temporal positions."""
        out = chronoedit_model_fn(
            self.dit, latents.to(self.dtype), timestep.to(self.dtype).reshape(1),
            skip_len=self.components.temporal_skip_len, rope=self.rope,
            context=context, clip_feature=clip_feature, y=y, use_unified_sequence_parallel=self.sequence_parallel,
        )
        return out.float()

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 50,
        cfg: float = 5.0,
        shift: float = 5.0,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        temporal_reasoning_steps: int = 0,
        progress: bool = True,
    ) -> EditResult:
        """Edit ``image`` following ``prompt``; returns the last frame as the edited image."""
        image = image.convert("RGB")
        if height is None or width is None:
            width, height = default_size(*image.size)
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(f"height and width must be multiples of {SIZE_MULTIPLE}, got {height}x{width}")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        reasoning = temporal_reasoning_steps > 0
        num_frames = REASONING_FRAMES if reasoning else EDIT_FRAMES

        context = self.encode_prompt(prompt)
        context_neg = self.encode_prompt(negative_prompt) if cfg > 1.0 else None
        clip_feature = self.encode_image(image)
        y = self.condition_latents(image, num_frames)

        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, y.shape[1] - 4, y.shape[2], height // 8, width // 8)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

        scheduler = sampling_scheduler(steps, shift)
        reasoning_clip = None  # x0 estimate of the full reasoning clip when it is cut to [input, edit]
        denoised = latents
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="editing", disable=not progress)):
            if reasoning and i == temporal_reasoning_steps:
                reasoning_clip = denoised
                latents, y = latents[:, :, [0, -1]], y[:, :, [0, -1]]
            velocity = self.predict_velocity(latents, t, context, clip_feature, y)
            if context_neg is not None:
                uncond = self.predict_velocity(latents, t, context_neg, clip_feature, y)
                velocity = uncond + cfg * (velocity - uncond)
            denoised = latents - scheduler.sigmas[i] * velocity
            latents = scheduler.step(velocity, t, latents)

        video = self.decode(latents, reasoning_clip)
        frames = [tensor_to_pil(video[0, :, i]) for i in range(video.shape[2])]
        return EditResult(image=frames[-1], frames=frames, video=video)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, reasoning_clip: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to a (1, 3, T, H, W) clip in [-1, 1].

        With temporal reasoning the clip is the reasoning frames (all latents but the last: of the
        final latents if reasoning ran to the end, as diffusers does, else of the clean-clip
        estimate when the clip was cut to [input, edit]) followed by the 4 frames of the edit.
        """
        vae = self.components.vae
        if reasoning_clip is None and latents.shape[2] > 2:
            reasoning_clip, latents = latents, latents[:, :, [0, -1]]
        edit = vae.decode(latents.to(self.dtype), device=self.device).float()
        if reasoning_clip is None:
            return edit
        reasoning = vae.decode(reasoning_clip[:, :, :-1].to(self.dtype), device=self.device).float()
        return torch.cat([reasoning, edit[:, :, 1:]], dim=2)
