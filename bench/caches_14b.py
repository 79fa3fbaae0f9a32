"""The edit caches on ChronoEdit-14B's shapes: ``python bench/gpu_check.py --dit-14b`` (CUDA only).

No 14B checkpoint is needed: :func:`plan` counts, on the meta device, how many of the 40 blocks of
ChronoEdit-14B's DiT (:data:`~chronoedit_lora.models.dit.CHRONOEDIT_14B_KWARGS`) fit in the free GPU
memory beside one denoising step (what ``--offload auto`` counts: :func:`chronoedit_lora.offload.needs`,
context cache included); :func:`random_pipeline` builds that DiT in bf16 straight on the GPU (meta,
then ``to_empty``: no CPU copy) with seeded random weights; :func:`time_variants` runs the kit's own
denoising loop (``ChronoEditPipeline.denoise``, batched guidance) uncached, with the context cache and
with each step cache, alternating, on the conditioning shapes of an edit at the chosen size (umT5's
512 x 4096, CLIP's 257 x 1280, the 2 latent frames of an edit). On random weights the differences
measure the mechanism, not quality; the report states how many blocks ran.
"""

from __future__ import annotations

import statistics
import time

import torch
from diffsynth.models.wan_video_dit import WanModel, precompute_freqs_cis_3d

from chronoedit_lora.models.components import LoadedComponents
from chronoedit_lora.models.context_cache import dit_cache_bytes
from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS, DiTCheckpoint
from chronoedit_lora.offload import GIB, needs
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.step_cache import StepCache, parse_step_cache
from chronoedit_lora.video import EDIT_FRAMES, latent_frames, latent_tokens

BLOCKS_14B = CHRONOEDIT_14B_KWARGS["num_layers"]
TEMPORAL_SKIP_LEN = 8  # ChronoEdit's (the released checkpoints' default)


def meta_model(blocks: int, kwargs: dict = CHRONOEDIT_14B_KWARGS, dtype: torch.dtype = torch.bfloat16) -> WanModel:
    """A weightless DiT of ``kwargs``'s shapes with ``blocks`` blocks, on the meta device."""
    with torch.device("meta"):
        return WanModel(**{**kwargs, "num_layers": blocks}).to(dtype)


def plan(free_bytes: float, height: int, width: int, branches: int = 2) -> dict:
    """The most of 14B's blocks whose bf16 weights, step working memory and context cache fit ``free_bytes``."""
    tokens = latent_tokens(width, height)
    dit = meta_model(BLOCKS_14B)
    for blocks in range(BLOCKS_14B, 0, -1):
        dit.blocks = dit.blocks[:blocks]
        need = needs({"text_encoder": None, "image_encoder": None, "vae": None, "dit": dit}, tokens, 0,
                     dit_cache_bytes(dit, branches, torch.bfloat16))["none"]
        if need <= free_bytes:
            return {"blocks": blocks, "of": BLOCKS_14B, "tokens": tokens, "needs_GiB": need / GIB,
                    "free_GiB": free_bytes / GIB}
    raise SystemExit(f"not even one of ChronoEdit-14B's blocks fits in {free_bytes / GIB:.1f} GiB at {width}x{height}; "
                     "pick a smaller --height/--width")


@torch.no_grad()
def random_pipeline(blocks: int, device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                    kwargs: dict = CHRONOEDIT_14B_KWARGS, seed: int = 0) -> ChronoEditPipeline:
    """The kit's pipeline around a DiT of ``kwargs``'s shapes with ``blocks`` blocks and seeded random
    weights made on ``device`` (matrices N(0, 0.02), norm weights 1, biases 0); no encoders, no VAE."""
    dit = meta_model(blocks, kwargs, dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for name, parameter in dit.named_parameters():
        if parameter.dim() > 1:
            parameter.normal_(0, 0.02, generator=generator)
        else:
            parameter.fill_(1.0 if "norm" in name else 0.0)
    dit.freqs = precompute_freqs_cis_3d(kwargs["dim"] // kwargs["num_heads"])
    checkpoint = DiTCheckpoint(files=(), format="diffusers", key_prefix="", kwargs={**kwargs, "num_layers": blocks},
                               temporal_skip_len=TEMPORAL_SKIP_LEN, shapes={})
    components = LoadedComponents(dit.eval(), None, None, None, None, paths=None, dit_checkpoint=checkpoint)
    return ChronoEditPipeline(components, device, dtype)


def edit_inputs(pipe: ChronoEditPipeline, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random conditioning of an edit's shapes: umT5 context and its negative, CLIP features, VAE condition y."""
    generator = torch.Generator().manual_seed(seed)
    kwargs = pipe.components.dit_checkpoint.kwargs

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(pipe.device, pipe.dtype)

    return {"context": draw(1, 512, kwargs["text_dim"]), "context_neg": draw(1, 512, kwargs["text_dim"]),
            "clip_feature": draw(1, 257, 1280),
            "y": draw(1, kwargs["in_dim"] - 16, latent_frames(EDIT_FRAMES), height // 8, width // 8)}


def variants(step_caches: tuple[str, ...]) -> dict[str, tuple[bool, str | None]]:
    """Name -> (context cache, step cache spec): uncached, context cache, and each step cache on top of it."""
    return {"uncached": (False, None), "context cache": (True, None),
            **{f"context + {spec}": (True, spec) for spec in step_caches}}


def time_variants(pipe: ChronoEditPipeline, height: int, width: int, steps: int, step_caches: tuple[str, ...],
                  repeats: int = 2, cfg: float = 5.0) -> dict[str, dict]:
    """Each variant's denoising loop, alternating (after one untimed warm-up round): median seconds, ratio
    to uncached, DiT calls and block-stack passes, peak CUDA GiB (None on a CPU), max |latents - uncached|."""
    inputs, cuda = edit_inputs(pipe, height, width), pipe.device.type == "cuda"
    runs: dict[str, list[float]] = {name: [] for name in variants(step_caches)}
    figures: dict[str, dict] = {}
    for repeat in range(repeats + 1):
        for name, (context, spec) in variants(step_caches).items():
            cache = StepCache(pipe.dit, parse_step_cache(spec), steps, 0) if spec else None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            latents, _ = pipe.denoise(**inputs, seed=0, steps=steps, cfg=cfg, shift=None, temporal_reasoning_steps=0,
                                      scheduler="euler", batched_guidance=True, progress=False,
                                      reuse_context=context, step_cache=cache)
            if cuda:
                torch.cuda.synchronize()
            if repeat:  # the first round warms up kernels and the allocator
                runs[name].append(time.perf_counter() - start)
            computed, skipped = cache.calls() if cache else (steps, 0)
            figures[name] = {"dit_calls": computed + skipped, "stack_passes": computed,
                             "peak_GiB": torch.cuda.max_memory_allocated() / GIB if cuda else None,
                             "max_abs_difference": (latents.float() - figures["uncached"]["latents"]).abs().max().item()
                             if name != "uncached" else 0.0, "latents": latents.float()}
    base = statistics.median(runs["uncached"])
    return {name: {"seconds": statistics.median(runs[name]), "ratio_to_uncached": statistics.median(runs[name]) / base,
                   **{key: value for key, value in figures[name].items() if key != "latents"}} for name in runs}
