"""The ChronoEdit edit pipeline: an image and an instruction in, the edited image out.

ChronoEdit treats an edit as a short video whose first frame is the input image and whose last
frame is the edit. The steps read top to bottom, as in diffusers' pipelines; the model work is
DiffSynth's (its Wan text/CLIP/VAE units, its model function), with ChronoEdit's temporal-skip
RoPE applied around the DiT call; the sampler is the model folder's UniPC or DiffSynth's Euler
(:mod:`chronoedit_lora.sampling`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
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
from .models.context_cache import ContextCache, context_cache, dit_cache_bytes
from .step_cache import Calibration, StepCache, StepCacheSpec, check_step_cache
from .models.dit import compile_blocks
from .models.rope import chronoedit_model_fn
from .models.vae import TILE_SIZE, TILE_STRIDE, use_tiling
from .offload import MODES as OFFLOAD_MODES
from .offload import Placement, choose_mode
from .sampling import default_shift, make_sampler, read_scheduler_config, resolve_scheduler
from .video import EDIT_FRAMES, REASONING_FRAMES, SIZE_MULTIPLE, default_size, latent_tokens, tensor_to_pil


@dataclass
class EditRequest:
    """One edit: the input image, the instruction, the negative prompt and the noise seed."""

    image: Image.Image
    prompt: str
    negative_prompt: str = ""
    seed: int = 0


@dataclass
class EditResult:
    """The edited image, every decoded frame (reasoning frames first, if any) and the float clip."""

    image: Image.Image
    frames: list[Image.Image]
    video: torch.Tensor  # (1, 3, T, H, W) in [-1, 1]


EDIT_LATENTS = [0, -1]  # the latent frames temporal reasoning keeps: [input, edit]


class NonFiniteEditError(ChronoEditError):
    """An edit's latents or frames hold NaN or inf: it is refused before anything is written."""


def _refuse_non_finite(values: torch.Tensor, what: str, request: EditRequest) -> None:
    """Never turn NaN/inf into an image: clamped, they would be saved as a black picture."""
    if not torch.isfinite(values).all():
        raise NonFiniteEditError(
            f"the edit of {request.prompt[:60]!r} (seed {request.seed}) produced NaN or inf in its {what}; nothing was "
            "written for it. A LoRA scale or --cfg far too large, or float16 overflow, does this: lower them or use "
            "--dtype bfloat16/float32.")


@dataclass(frozen=True)
class VaeTiles:
    """DiffSynth's VAE tiling arguments (sizes in latent units); ``tiled=False``: one pass."""

    tiled: bool = False
    tile_size: tuple[int, int] = TILE_SIZE
    tile_stride: tuple[int, int] = TILE_STRIDE

    def kwargs(self) -> dict:
        return {"tiled": self.tiled, "tile_size": self.tile_size, "tile_stride": self.tile_stride}


class ChronoEditPipeline:
    """Edit images with ChronoEdit through DiffSynth's Wan building blocks."""

    def __init__(self, components: LoadedComponents, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 rope: str = "skip", sequence_parallel: bool = False, scheduler_config: dict | None = None,
                 offload: str = "none"):
        self.components = components
        self.scheduler_config = scheduler_config  # the model folder's scheduler/scheduler_config.json, if any
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
        # where each component's weights are during an edit (see offload.py)
        self.placement = Placement(components.modules(), self.device, offload)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                        rope: str = "skip", sequence_parallel: bool = False, encoders: bool = True,
                        with_dit: bool = True, fp8_base: bool = False, offload: str = "none",
                        compile: bool = False, dit_device: str | torch.device | None = None,
                        context_branches: int = 2, **overrides: str | Path | None) -> "ChronoEditPipeline":
        """Load the components from ``model_dir`` (diffusers or Wan layout) plus overrides
        (``encoders=False``: the DiT only, for training from cached conditioning; ``with_dit=False``:
        the encoders only, for filling that cache; ``fp8_base``: the DiT blocks' linear weights in
        float8, see :mod:`chronoedit_lora.models.fp8`; ``offload``: none, model, blocks or auto,
        see :mod:`chronoedit_lora.offload`; ``context_branches``: the guidance branches whose context K/V
        the edits will cache, which ``offload="auto"`` counts (2 with guidance, 1 without, 0 with the context
        cache off; see :func:`~chronoedit_lora.models.context_cache.guidance_branches`); ``dit_device``: the DiT's device if not ``device``, as FSDP
        training loads it into CPU RAM to shard it). ``model_dir``'s scheduler config, if any, is the default
        sampler (see :mod:`chronoedit_lora.sampling`)."""
        if offload not in OFFLOAD_MODES:
            raise ChronoEditError(f"offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}.")
        if compile and offload == "blocks":
            raise ChronoEditError("--compile cannot be combined with --offload blocks: streaming moves the blocks' "
                                  "weights between devices on every call, which a compiled block would recompile "
                                  "for; use --offload model, or drop --compile.")
        if sequence_parallel and offload not in ("none", "auto"):
            raise ChronoEditError(f"--offload {offload} cannot be combined with --sequence-parallel: every rank "
                                  "holds the whole model for its share of the sequence; use --offload none.")
        scheduler_config = read_scheduler_config(model_dir)
        if sequence_parallel:
            from .parallel import start_sequence_parallel

            device, offload = start_sequence_parallel(), "none"
        device = torch.device(device)
        offloaded = offload != "none" and device.type != "cpu"
        components = load_components(model_dir, dtype=dtype, device="cpu" if offloaded else device, encoders=encoders,
                                     with_dit=with_dit, fp8_base=fp8_base, dit_device=dit_device, **overrides)
        if offload == "auto":
            modules = components.modules()
            width, height = default_size(1280, 720)  # the official output area, as a typical edit
            offload, why = choose_mode(modules, device, tokens=latent_tokens(width, height), pixels=width * height,
                                       context_bytes=dit_cache_bytes(components.dit, context_branches, dtype))
            print(f"--offload auto: {offload} ({why})")
            if offload == "none" and offloaded:  # loaded into CPU RAM, but everything fits on the device
                for module in filter(None, modules.values()):
                    module.to(device)
        if compile and with_dit:
            if offload == "blocks":
                raise ChronoEditError("--offload auto chose blocks, which cannot be combined with --compile; "
                                      "pass --offload model, or drop --compile.")
            compile_blocks(components.dit)
        return cls(components, device, dtype, rope, sequence_parallel, scheduler_config, offload)

    @property
    def dit(self):
        return self.components.dit

    @property
    def default_scheduler(self) -> str:
        """The model folder's own scheduler (``unipc`` for ChronoEdit-14B-Diffusers), else ``euler``."""
        return resolve_scheduler(None, self.scheduler_config)

    def load_lora(self, path: str | Path, scale: float = 1.0, fuse: bool = True):
        """Apply a LoRA file to the DiT (checked first: a mismatch lists what does not fit, NaN/inf
        weights name their layers).

        Fused by default (no cost per step). ``fuse=False`` returns an :class:`UnfusedLora` whose
        ``scale`` can be changed, or which can be removed, without reloading the base model.
        fp8 base weights cannot absorb a LoRA, so there it must be unfused.
        """
        from .lora import UnfusedLora, check_finite, check_lora_matches, fuse_lora, load_lora
        from .models.quantized import is_quantized

        if fuse and is_quantized(self.dit):
            raise ChronoEditError(f"LoRA {path}: the DiT holds quantized (fp8 or GGUF) base weights, which a fused LoRA "
                                  "would round away; load it with fuse=False (the edit command does this itself).")

        weights, _ = load_lora(path)
        check_finite(weights, str(path))
        check_lora_matches(weights, self.dit, str(path))
        if not fuse:  # the hooks' factors live on the compute device, wherever the weights are
            return UnfusedLora(self.dit, weights, scale, device=self.device)
        self.placement.release()  # fuse into the weights' home copy
        fuse_lora(self.dit, weights, scale)
        return None

    # -- conditioning -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """umT5 embeddings (1, 512, text_dim), zero past the prompt's tokens."""
        self.placement.use("text_encoder")
        return WanVideoUnit_PromptEmbedder().encode_prompt(self.core, prompt).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """CLIP penultimate-layer features of the input image (1, 257, 1280)."""
        width, height = image.size
        self.placement.use("image_encoder")
        return WanVideoUnit_ImageEmbedderCLIP().process(self.core, image, None, height, width)["clip_feature"]

    @torch.no_grad()
    def condition_latents(self, image: Image.Image, num_frames: int, tiles: VaeTiles = VaeTiles()) -> torch.Tensor:
        """y = [mask with ones on latent 0 (4 ch), VAE(input image followed by black frames) (16 ch)]."""
        width, height = image.size
        self.placement.use("vae")
        return WanVideoUnit_ImageEmbedderVAE().process(self.core, image, None, num_frames, height, width,
                                                       **tiles.kwargs())["y"]

    # -- sampling -----------------------------------------------------------------------------
    def predict_velocity(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, clip_feature: torch.Tensor, y: torch.Tensor,
                         stack: torch.nn.Module | None = None) -> torch.Tensor:
        """One DiT evaluation with ChronoEdit's temporal positions (``stack``: in place of the block loop,
        see :func:`~chronoedit_lora.models.rope.chronoedit_model_fn`)."""
        self.placement.use("dit")
        out = chronoedit_model_fn(
            self.dit, latents.to(self.dtype), timestep.to(self.dtype).reshape(1),
            skip_len=self.components.temporal_skip_len, rope=self.rope, stack=stack,
            context=context, clip_feature=clip_feature, y=y, use_unified_sequence_parallel=self.sequence_parallel,
        )
        return out.float()

    def guided_velocity(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                        context_neg: torch.Tensor | None, clip_feature: torch.Tensor, y: torch.Tensor,
                        cfg: float, batched: bool = True, kv: ContextCache | None = None,
                        step_cache: StepCache | None = None) -> torch.Tensor:
        """The velocity with classifier-free guidance (none when ``context_neg`` is None): prompt and
        negative prompt in one DiT call of batch 2 (``batched``), or in two calls. Each call runs in
        its guidance branch (``cond``, ``uncond`` or ``pair``) of the context cache ``kv`` and the step cache."""
        def call(branch: str, *inputs: torch.Tensor) -> torch.Tensor:
            with ExitStack() as entered:
                for cache in filter(None, (kv, step_cache)):
                    entered.enter_context(cache.branch(branch))
                return self.predict_velocity(*inputs, stack=step_cache.stack() if step_cache else None)

        if context_neg is None:
            return call("cond", latents, timestep, context, clip_feature, y)
        if batched:
            pair = call("pair", torch.cat([latents] * 2), timestep, torch.cat([context, context_neg]),
                        torch.cat([clip_feature] * 2), torch.cat([y] * 2))
            cond, uncond = pair.chunk(2)
        else:
            cond = call("cond", latents, timestep, context, clip_feature, y)
            uncond = call("uncond", latents, timestep, context_neg, clip_feature, y)
        return uncond + cfg * (cond - uncond)

    @torch.no_grad()
    def __call__(self, image: Image.Image, prompt: str, negative_prompt: str = "", seed: int = 0,
                 **settings) -> EditResult:
        """Edit ``image`` following ``prompt``; returns the last frame as the edited image.
        ``settings``: those of :meth:`edit_many`."""
        return next(self.edit_many([EditRequest(image, prompt, negative_prompt, seed)], **settings))

    @torch.no_grad()
    def edit_many(
        self,
        requests: Sequence[EditRequest],
        steps: int = 50,
        cfg: float = 5.0,
        shift: float | None = None,
        height: int | None = None,
        width: int | None = None,
        temporal_reasoning_steps: int = 0,
        progress: bool = True,
        scheduler: str | None = None,
        batched_guidance: bool = True,
        vae_tiling: str = "auto",
        tile_size: tuple[int, int] = TILE_SIZE,
        tile_stride: tuple[int, int] = TILE_STRIDE,
        chunk: int = 8,
        on_step: Callable[[int, int], None] | None = None,
        context_cache: bool = True,
        step_cache: StepCacheSpec | None = None,
        cache_calibration: Calibration | None = None,
        step_caches: list[StepCache] | None = None,
    ) -> Iterator[EditResult]:
        """Edit each request, yielding the results in order.

        The requests go through the stages ``chunk`` at a time (every prompt, then every CLIP
        feature, every VAE condition, every denoising loop, every decode), so with offloading each
        component is moved to the GPU once per chunk rather than once per edit.
        ``scheduler``: ``unipc`` or ``euler`` (default: :attr:`default_scheduler`); ``shift``: its
        flow shift (default: the folder's config, else 5.0). ``batched_guidance``: with ``cfg`` > 1,
        one DiT call of batch 2 per step instead of two. ``vae_tiling``: ``auto`` (tile frames above
        :data:`~chronoedit_lora.models.vae.AUTO_TILING_PIXELS`), ``on`` or ``off``; tiles in latent units.
        ``on_step(i, steps)`` is called before each denoising step (progress; raising in it stops the edit).
        ``context_cache``: reuse the context's cross-attention K/V at every step (exact; see
        :mod:`chronoedit_lora.models.context_cache`). ``step_cache``: skip steps by reusing the block
        stack's residual (:mod:`chronoedit_lora.step_cache`; ``cache_calibration`` its measurements);
        each edit's :class:`~chronoedit_lora.step_cache.StepCache` is appended to ``step_caches`` if given
        (its computed and skipped calls).
        """
        check_step_cache(step_cache, steps, temporal_reasoning_steps, cache_calibration,
                         sequence_parallel=self.sequence_parallel)
        reasoning = temporal_reasoning_steps > 0
        num_frames = REASONING_FRAMES if reasoning else EDIT_FRAMES
        for start in range(0, len(requests), chunk):
            group = requests[start:start + chunk]
            images = [self._sized(request.image, height, width) for request in group]
            tiles = [VaeTiles(use_tiling(vae_tiling, image.height, image.width), tuple(tile_size), tuple(tile_stride))
                     for image in images]
            contexts = [self.encode_prompt(request.prompt) for request in group]
            negatives = [self.encode_prompt(request.negative_prompt) if cfg > 1.0 else None for request in group]
            clip_features = [self.encode_image(image) for image in images]
            ys = [self.condition_latents(image, num_frames, tile) for image, tile in zip(images, tiles)]
            denoised = [self.denoise(context, negative, clip_feature, y, request.seed, steps, cfg, shift,
                                     temporal_reasoning_steps, scheduler, batched_guidance, progress, on_step,
                                     context_cache, self._step_cache(step_cache, steps, temporal_reasoning_steps,
                                                                     cache_calibration, step_caches))
                        for request, context, negative, clip_feature, y in zip(group, contexts, negatives, clip_features, ys)]
            for request, (latents, reasoning_clip), tile in zip(group, denoised, tiles):
                _refuse_non_finite(latents, "denoised latents", request)
                video = self.decode(latents, reasoning_clip, tile)
                _refuse_non_finite(video, "decoded frames", request)
                frames = [tensor_to_pil(video[0, :, i]) for i in range(video.shape[2])]
                yield EditResult(image=frames[-1], frames=frames, video=video)

    def _step_cache(self, spec: StepCacheSpec | None, steps: int, reasoning_steps: int,
                    calibration: Calibration | None, kept: list[StepCache] | None) -> StepCache | None:
        """A fresh step cache for one edit (kept in ``kept``), or None."""
        if spec is None:
            return None
        cache = StepCache(self.dit, spec, steps, reasoning_steps, calibration)
        if kept is not None:
            kept.append(cache)
        return cache

    @staticmethod
    def _sized(image: Image.Image, height: int | None, width: int | None) -> Image.Image:
        """The input image as RGB at the edit size (default: aspect-preserving, area ~720x1280)."""
        image = image.convert("RGB")
        if height is None or width is None:
            width, height = default_size(*image.size)
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(f"height and width must be multiples of {SIZE_MULTIPLE}, got {height}x{width}")
        return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)

    def denoise(self, context: torch.Tensor, context_neg: torch.Tensor | None, clip_feature: torch.Tensor,
                y: torch.Tensor, seed: int, steps: int, cfg: float, shift: float | None, temporal_reasoning_steps: int,
                scheduler: str | None, batched_guidance: bool, progress: bool,
                on_step: Callable[[int, int], None] | None = None,
                reuse_context: bool = True, step_cache: StepCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The denoising loop: final latents, and the clean-clip estimate of the reasoning clip if it was cut
        (``reuse_context``: the context K/V computed once; ``step_cache``: this edit's, see :meth:`edit_many`)."""
        sampler = make_sampler(resolve_scheduler(scheduler, self.scheduler_config), steps,
                               default_shift(self.scheduler_config) if shift is None else shift,
                               self.scheduler_config, self.device)
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, y.shape[1] - 4, y.shape[2], y.shape[3], y.shape[4])
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        reasoning_clip = None  # x0 estimate of the full reasoning clip when it is cut to [input, edit]
        denoised = latents
        with context_cache(self.dit, reuse_context) as kv:
            for i, t in enumerate(tqdm(sampler.timesteps, desc="editing", disable=not progress)):
                if on_step is not None:
                    on_step(i, len(sampler.timesteps))
                if temporal_reasoning_steps and i == temporal_reasoning_steps:
                    reasoning_clip = denoised
                    latents, y = latents[:, :, EDIT_LATENTS], y[:, :, EDIT_LATENTS]
                    sampler.keep_frames(EDIT_LATENTS)
                if step_cache is not None:
                    step_cache.step = i
                velocity = self.guided_velocity(latents, t, context, context_neg, clip_feature, y, cfg,
                                                batched_guidance, kv, step_cache)
                denoised = latents - sampler.sigmas[i] * velocity  # the active sampler's sigma of this step
                latents = sampler.step(velocity, i, latents)
        return latents, reasoning_clip

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, reasoning_clip: torch.Tensor | None = None,
               tiles: VaeTiles = VaeTiles()) -> torch.Tensor:
        """Decode to a (1, 3, T, H, W) clip in [-1, 1].

        With temporal reasoning the clip is the reasoning frames (all latents but the last: of the
        final latents if reasoning ran to the end, as diffusers does, else of the clean-clip
        estimate when the clip was cut to [input, edit]) followed by the 4 frames of the edit.
        """
        self.placement.use("vae")

        def vae_decode(z: torch.Tensor) -> torch.Tensor:
            return self.components.vae.decode(z.to(self.dtype), device=self.device, **tiles.kwargs()).float()

        if reasoning_clip is None and latents.shape[2] > 2:
            reasoning_clip, latents = latents, latents[:, :, EDIT_LATENTS]
        edit = vae_decode(latents)
        if reasoning_clip is None:
            return edit
        reasoning = vae_decode(reasoning_clip[:, :, :-1])
        return torch.cat([reasoning, edit[:, :, 1:]], dim=2)
