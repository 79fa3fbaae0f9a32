"""Peak GPU memory of one ChronoEdit-14B edit (inference, no gradients, bf16) per offload mode, computed.

    python bench/memory_edit_14b.py [--json out.json]

Same method as ``bench/memory_14b.py``: every model is the kit's own class built on the meta device
with the real 14B shapes (no weights), so weight bytes are the parameters' bytes, and working
memory is *measured* by running each stage of ``ChronoEditPipeline.__call__`` on meta tensors
under :class:`LiveTensors`, a ``TorchDispatchMode`` that records every tensor storage as an op
creates it and drops it when it is freed, keeping the peak of the sum. Stages, in pipeline order:
umT5 (prompt and negative prompt), CLIP, VAE encode of the condition clip, one denoising step of
the DiT (the loop repeats it), VAE decode. Each stage's measurement includes the small tensors the
pipeline carries from earlier stages (embeddings, ``y``, latents).

Attention is counted as flash attention allocates it (the output plus a float32 log-sum-exp per
query and head, never an L x L matrix): DiffSynth's ``flash_attention`` and
``F.scaled_dot_product_attention`` are replaced by that allocation while measuring. umT5's own
attention is explicit (einsum + softmax) and is counted as it runs.

Modes: ``none`` (everything resident), ``model`` (each component on the GPU for its stage only),
``model + fp8 DiT`` (block linears as float8 + float32 row scales, ``chronoedit_lora.models.fp8``),
``blocks`` (the DiT's non-block weights and two blocks resident: one computing, the next being
copied), ``blocks + fp8 DiT``. Guidance is counted as one batch-2 DiT call (prompt and negative
prompt together); batch 1 (two separate calls) is reported too. Not counted: the CUDA context
(~0.5-1 GiB), allocator fragmentation and caching slack, workspace inside one kernel (cuBLAS,
flash attention's own), the CPU side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_14b import CLIP_TOKENS, GIB, TEXT_TOKENS, encoder_params  # noqa: E402

DTYPE = torch.bfloat16
EDIT_FRAMES, REASONING_FRAMES = 5, 29  # chronoedit_lora.video: 2 and 8 latent frames
SIZES = {  # name -> (height, width, frames)
    "720x1280": (720, 1280, EDIT_FRAMES),
    "1024x1024": (1024, 1024, EDIT_FRAMES),
    "1584x1056": (1584, 1056, EDIT_FRAMES),
    "720x1280 reasoning": (720, 1280, REASONING_FRAMES),
}
TILE_SIZE, TILE_STRIDE = (34, 34), (18, 16)  # DiffSynth's tiled VAE defaults, latent units
CFG, SIGMA = 5.0, 0.5
# NVIDIA's model card for the official diffusers pipeline (GB as they state it)
REFERENCE_GB = {"model offload": 34, "model offload + temporal reasoning": 38}
GOALS_GIB = {"model": 34, "model + fp8 DiT": 20, "blocks": 12}
MODES = ("none", "model", "model + fp8 DiT", "blocks", "blocks + fp8 DiT")


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages that ops create while active: ``now`` and ``peak``.

    A storage is counted from the op that creates it until it is freed (checked before each
    op, so an op's inputs and outputs are live together, as in a GPU allocator). Storages that
    existed before (parameters, buffers) and views of them are never counted. Works the same
    on meta and on real tensors.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def _sweep(self) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]

    def reset_peak(self) -> None:
        self._sweep()
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tensors_in}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in inputs and ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def _flash(q, k, v, num_heads, compatibility_mode=False):
    """DiffSynth's ``flash_attention`` (q: b, s, n*d) as flash-attn allocates: output + log-sum-exp."""
    lse = torch.empty(q.shape[0], num_heads, q.shape[1], dtype=torch.float32, device=q.device)
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    del lse  # returned to autograd only; freed at once without gradients
    return out


def _sdpa(q, k, v, *args, **kwargs):
    """``F.scaled_dot_product_attention`` (q: b, n, s, d) as its flash kernel allocates."""
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    del lse
    return out


@contextlib.contextmanager
def flash_attention_accounting():
    """Within: every attention of the DiT and CLIP allocates what flash attention would."""
    import diffsynth.models.wan_video_dit as dit_module
    import diffsynth.models.wan_video_image_encoder as clip_module

    saved = dit_module.flash_attention, clip_module.flash_attention, F.scaled_dot_product_attention
    dit_module.flash_attention = clip_module.flash_attention = _flash
    F.scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        dit_module.flash_attention, clip_module.flash_attention, F.scaled_dot_product_attention = saved


def measure(fn, *args, **kwargs) -> int:
    """Peak bytes of the tensors ``fn`` creates (inputs it creates itself included), no grad."""
    with torch.no_grad(), flash_attention_accounting(), LiveTensors() as tracker:
        fn(*args, **kwargs)
    return tracker.peak


# -- models -----------------------------------------------------------------------------------
def build_models(dit_kwargs: dict, fp8: bool = False, sizes: dict | None = None) -> dict[str, torch.nn.Module]:
    """The kit's classes on the meta device, bf16: DiT (``fp8``: blocks' linears quantized as
    ``chronoedit_lora.models.fp8`` does), umT5-XXL, ViT-H/14 vision tower, Wan2.1 VAE (``sizes``:
    constructor kwargs per encoder, e.g. from :func:`checkpoint_kwargs`; default the released sizes)."""
    sizes = sizes or {}
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    from chronoedit_lora.models.fp8 import store_blocks_in_fp8
    from chronoedit_lora.models.image_encoder import VisionTowerImageEncoder
    from chronoedit_lora.models.vae import SizedWanVideoVAE

    with torch.device("meta"):
        dit = WanModel(**dit_kwargs).to(DTYPE).eval().requires_grad_(False)
        if fp8:
            store_blocks_in_fp8(dit)
        models = {"dit": dit, "text_encoder": WanTextEncoder(**sizes.get("text_encoder", {})).to(DTYPE).eval(),
                  "image_encoder": VisionTowerImageEncoder(**sizes.get("image_encoder", {})).to(DTYPE).eval(),
                  "vae": SizedWanVideoVAE(**sizes.get("vae", {})).to(DTYPE)}
    return models


def checkpoint_kwargs(model_dir: str | Path) -> tuple[dict, dict]:
    """(DiT kwargs, encoder kwargs) of a checkpoint folder, read from its weight headers only."""
    from chronoedit_lora.models.components import discover_components
    from chronoedit_lora.models.dit import inspect_dit
    from chronoedit_lora.models.image_encoder import image_encoder_spec
    from chronoedit_lora.models.loading import read_config, read_shapes, resolve_weight_files
    from chronoedit_lora.models.text_encoder import text_encoder_spec
    from chronoedit_lora.models.vae import vae_spec

    paths = discover_components(model_dir)
    specs = {"text_encoder": text_encoder_spec, "image_encoder": image_encoder_spec, "vae": vae_spec}
    encoders = {}
    for name, spec in specs.items():
        path = getattr(paths, name)
        shapes, _ = read_shapes(resolve_weight_files(path, name.replace("_", " ")))
        encoders[name] = spec(shapes, read_config(path), str(path))[0]
    return inspect_dit(paths.dit).kwargs, encoders


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def weight_bytes(models: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Resident bytes of each component, and of one DiT block and the DiT without its blocks."""
    dit = models["dit"]
    block = nbytes(dit.blocks[0])
    return {"DiT": nbytes(dit), "DiT block": block, "DiT non-block": nbytes(dit) - len(dit.blocks) * block,
            "umT5-XXL": nbytes(models["text_encoder"]), "CLIP": nbytes(models["image_encoder"]),
            "VAE": nbytes(models["vae"])}


# -- stages (each mirrors chronoedit_lora/pipeline.py, on meta tensors) -------------------------
def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def carried(dit_kwargs: dict, frames: int, height: int, width: int, upto: str,
            device: torch.device | str = "meta") -> list[torch.Tensor]:
    """Tensors the pipeline holds on the GPU when stage ``upto`` starts (created inside a measurement)."""
    latent_frames = 1 + (frames - 1) // 4
    lat = (latent_frames, height // 8, width // 8)
    text = dit_kwargs["text_dim"]
    order = ["text", "clip", "vae_encode", "dit", "decode"]
    made = []
    if order.index(upto) > 0:  # context, negative context
        made += [torch.empty(1, TEXT_TOKENS, text, dtype=DTYPE, device=device) for _ in range(2)]
    if order.index(upto) > 1:
        made.append(torch.empty(1, CLIP_TOKENS, 1280, dtype=DTYPE, device=device))
    if order.index(upto) > 2:
        made.append(torch.empty(1, 4 + 16, *lat, dtype=DTYPE, device=device))  # y
    if order.index(upto) > 3:  # final latents (float32) and, with reasoning, the clean-clip estimate
        made += [torch.empty(1, 16, *lat, device=device) for _ in range(1 + (latent_frames > 2))]
    return made


def text_stage(models, dit_kwargs, frames, height, width) -> None:
    """``encode_prompt`` twice (prompt, negative prompt), each kept; 512 tokens, umT5's own attention."""
    encoder = models["text_encoder"]
    device = _device(encoder)
    kept = []
    for _ in range(2):
        ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device=device)
        mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long, device=device)
        emb = encoder(ids, mask)
        emb[:, TEXT_TOKENS // 2:] = 0
        kept.append(emb.to(DTYPE))
        del ids, mask, emb


def clip_stage(models, dit_kwargs, frames, height, width) -> None:
    """``encode_image``: the full-size image on the GPU, resized to 224 inside, 257 penultimate features."""
    device = _device(models["image_encoder"])
    state = carried(dit_kwargs, frames, height, width, "clip", device)  # noqa: F841 (held, as by the pipeline)
    from chronoedit_lora.models.image_encoder import CLIP_MEAN, CLIP_STD

    encoder = models["image_encoder"]
    image = torch.empty(1, 3, height, width, dtype=DTYPE, device=device)
    # DiffSynth's encode_image, with torchvision's Normalize spelled out (its zero-std check reads a value)
    size = (encoder.model.image_size,) * 2
    videos = F.interpolate(image, size=size, mode="bicubic", align_corners=False).mul_(0.5).add_(0.5)
    mean, std = (torch.tensor(v, dtype=DTYPE, device=device).view(-1, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    videos = videos.clone().sub_(mean).div_(std)
    clip = encoder.model.visual(videos, use_31_block=True).to(DTYPE)  # noqa: F841


def vae_encode_stage(models, dit_kwargs, frames, height, width) -> None:
    """``condition_latents``: [image, black frames] encoded untiled, mask prepended -> y."""
    vae = models["vae"]
    device = _device(vae)
    state = carried(dit_kwargs, frames, height, width, "vae_encode", device)  # noqa: F841
    image = torch.empty(1, 3, height, width, dtype=DTYPE, device=device)
    mask = torch.ones(1, frames, height // 8, width // 8, device=device)
    vae_input = torch.concat([image.transpose(0, 1), torch.zeros(3, frames - 1, height, width, device=device)], dim=1)
    latents = vae.single_encode(vae_input.to(DTYPE).unsqueeze(0), device)
    mask = torch.concat([torch.repeat_interleave(mask[:, 0:1], repeats=4, dim=1), mask[:, 1:]], dim=1)
    mask = mask.view(1, mask.shape[1] // 4, 4, height // 8, width // 8).transpose(1, 2)[0]
    y = torch.concat([mask.to(DTYPE), latents[0].to(DTYPE)]).unsqueeze(0)  # noqa: F841


def dit_stage(models, dit_kwargs, frames, height, width, batch: int = 2) -> None:
    """One denoising step: the DiT on prompt and negative prompt (one batch-2 call, or two batch-1
    calls), guidance, Euler update. The loop repeats this step; nothing accumulates across steps."""
    from chronoedit_lora.models.rope import chronoedit_model_fn

    dit = models["dit"]
    device = _device(dit)
    context, context_neg, clip, y = carried(dit_kwargs, frames, height, width, "dit", device)
    latents = torch.randn(1, 16, *y.shape[2:], device=device)
    timestep = torch.full((1,), 500.0, device=device)

    def call(lat, ctx, clip_feature, cond):
        return chronoedit_model_fn(dit, lat.to(DTYPE), timestep.to(DTYPE).reshape(1), skip_len=8, rope="skip",
                                   context=ctx, clip_feature=clip_feature, y=cond).float()

    if batch == 2:
        both = call(torch.cat([latents] * 2), torch.cat([context, context_neg]), torch.cat([clip] * 2),
                    torch.cat([y] * 2))
        velocity, uncond = both.chunk(2)
        del both
    else:
        velocity = call(latents, context, clip, y)
        uncond = call(latents, context_neg, clip, y)
    velocity = uncond + CFG * (velocity - uncond)
    denoised = latents - SIGMA * velocity  # noqa: F841
    latents = latents + (SIGMA - 1.0) * velocity


def decode_stage(models, dit_kwargs, frames, height, width, tiled: bool = False) -> None:
    """``ChronoEditPipeline.decode``: the edit's 2 latents, then (reasoning) the reasoning clip's
    latents but the last, each as one clip; untiled (the kit's default) or DiffSynth's tiled decode
    (one 34 x 34-latent tile on the GPU at a time, the frame accumulation on the CPU)."""
    vae = models["vae"]
    device = _device(vae)
    state = carried(dit_kwargs, frames, height, width, "decode", device)
    latents = state[4]
    clips = [latents[:, :, [0, -1]]] + ([state[5][:, :, :-1]] if len(state) > 5 else [])
    decoded = []
    for clip in clips:
        clip = clip.to(DTYPE)
        if tiled:  # the first tile is the largest; decode() keeps the latents on the CPU
            tile = clip[:, :, :, :TILE_SIZE[0], :TILE_SIZE[1]].contiguous()
            del clip
            vae.model.decode(tile, vae.scale)
            vae.model.clear_cache()
        else:
            video = vae.single_decode(clip, device)
            vae.model.clear_cache()
            decoded.append(torch.stack([video.squeeze(0)]).float())
            del video, clip
    if len(decoded) > 1:
        torch.cat([decoded[1], decoded[0][:, :, 1:]], dim=2)


def decode_tiles(latent_height: int, latent_width: int) -> int:
    """How many tiles DiffSynth's ``tiled_decode`` splits a latent frame into (its own rule)."""
    tasks = 0
    for h in range(0, latent_height, TILE_STRIDE[0]):
        if h - TILE_STRIDE[0] >= 0 and h - TILE_STRIDE[0] + TILE_SIZE[0] >= latent_height:
            continue
        for w in range(0, latent_width, TILE_STRIDE[1]):
            if w - TILE_STRIDE[1] >= 0 and w - TILE_STRIDE[1] + TILE_SIZE[1] >= latent_width:
                continue
            tasks += 1
    return tasks


def block_peak(dit: torch.nn.Module, tokens: int, batch: int = 1) -> int:
    """Peak bytes of the intermediates of one no-grad block forward (its inputs x, context,
    t_mod and the RoPE table created outside, so not counted), on ``dit``'s device."""
    from chronoedit_lora.models.lean_ops import use_lean_ops
    from chronoedit_lora.models.rope import use_real_rope

    use_lean_ops(dit)  # the block as chronoedit_model_fn runs it
    use_real_rope(dit)
    block = dit.blocks[0]
    device = block.modulation.device
    x = torch.randn(batch, tokens, dit.dim, device=device, dtype=block.modulation.dtype)
    context = torch.randn(batch, CLIP_TOKENS + TEXT_TOKENS, dit.dim, device=device, dtype=x.dtype)
    t_mod = torch.randn(batch, 6, dit.dim, device=device, dtype=x.dtype)
    freqs = torch.ones(tokens, 1, block.self_attn.head_dim, device=device)  # float32 (cos, sin) pairs
    return measure(block, x, context, t_mod, freqs)


# -- assembling -------------------------------------------------------------------------------
STAGES = {"text encoder": ("umT5-XXL", text_stage), "CLIP": ("CLIP", clip_stage),
          "VAE encode": ("VAE", vae_encode_stage), "DiT": ("DiT", dit_stage), "VAE decode": ("VAE", decode_stage)}


def working_memory(models: dict, fp8_models: dict, dit_kwargs: dict, sizes: dict) -> dict[str, dict[str, int]]:
    """Measured working bytes of every stage (and its variants) for each size."""
    out = {}
    for name, (height, width, frames) in sizes.items():
        args = (dit_kwargs, frames, height, width)
        out[name] = {
            "text encoder": measure(text_stage, models, *args),
            "CLIP": measure(clip_stage, models, *args),
            "VAE encode": measure(vae_encode_stage, models, *args),
            "DiT batch 2": measure(dit_stage, models, *args, batch=2),
            "DiT batch 1": measure(dit_stage, models, *args, batch=1),
            "DiT fp8 batch 2": measure(dit_stage, fp8_models, *args, batch=2),
            "DiT fp8 batch 1": measure(dit_stage, fp8_models, *args, batch=1),
            "VAE decode": measure(decode_stage, models, *args, tiled=False),
            "VAE decode tiled": measure(decode_stage, models, *args, tiled=True),
        }
    return out


def stage_peaks(weights: dict[str, int], fp8_weights: dict[str, int], work: dict[str, int], mode: str,
                batch: int = 2, tiled: bool = False) -> dict[str, int]:
    """GPU bytes at each stage's peak in ``mode`` (weights resident in that stage + its working memory)."""
    fp8 = mode.endswith("fp8 DiT")
    dit_w = fp8_weights if fp8 else weights
    stage_work = {"text encoder": work["text encoder"], "CLIP": work["CLIP"], "VAE encode": work["VAE encode"],
                  "DiT": work[f"DiT{' fp8' if fp8 else ''} batch {batch}"],
                  "VAE decode": work["VAE decode tiled" if tiled else "VAE decode"]}
    component = {"umT5-XXL": weights["umT5-XXL"], "CLIP": weights["CLIP"], "VAE": weights["VAE"]}
    if mode == "none":
        everything = dit_w["DiT"] + sum(component.values())
        return {stage: everything + w for stage, w in stage_work.items()}
    if mode.startswith("model"):
        component["DiT"] = dit_w["DiT"]
        return {stage: component[comp] + stage_work[stage] for stage, (comp, _) in STAGES.items()}
    # blocks: the non-block weights stay on the GPU throughout (conservative), two blocks while the DiT runs
    resident = dit_w["DiT non-block"]
    component["DiT"] = 2 * dit_w["DiT block"]
    return {stage: resident + component[comp] + stage_work[stage] for stage, (comp, _) in STAGES.items()}


def mode_table(weights, fp8_weights, work_by_size, batch: int = 2, tiled: bool = False) -> dict:
    """{mode: {size: {"GiB": peak, "stage": the stage that sets it}}}."""
    table = {}
    for mode in MODES:
        table[mode] = {}
        for size, work in work_by_size.items():
            peaks = stage_peaks(weights, fp8_weights, work, mode, batch, tiled)
            stage = max(peaks, key=peaks.get)
            table[mode][size] = {"GiB": peaks[stage] / GIB, "stage": stage}
    return table


def compute(dit_kwargs: dict, sizes: dict = SIZES, encoder_kwargs: dict | None = None,
            model: str = "ChronoEdit-14B") -> dict:
    """Every figure of the report, as a JSON-ready dict (``encoder_kwargs``: see :func:`build_models`)."""
    models = build_models(dit_kwargs, sizes=encoder_kwargs)
    fp8_models = build_models(dit_kwargs, fp8=True, sizes=encoder_kwargs)
    weights, fp8_weights = weight_bytes(models), weight_bytes(fp8_models)
    work = working_memory(models, fp8_models, dit_kwargs, sizes)
    dit = models["dit"]
    per_size = {}
    for name, (height, width, frames) in sizes.items():
        latent_frames = 1 + (frames - 1) // 4
        tokens = latent_frames * (height // 16) * (width // 16)
        per_size[name] = {"height": height, "width": width, "frames": frames, "latent_frames": latent_frames,
                          "tokens": tokens, "decode_tiles": decode_tiles(height // 8, width // 8),
                          "block_peak_batch_2_GiB": block_peak(dit, tokens, batch=2) / GIB,
                          "kept_across_blocks_batch_2_GiB": kept_across_blocks(dit_kwargs, tokens, 2) / GIB}
    variants = {f"batch {b}{', tiled decode' if t else ''}": mode_table(weights, fp8_weights, work, b, t)
                for b in (2, 1) for t in (False, True)}
    return {
        "model": model,
        "dit_kwargs": dit_kwargs,
        "encoder_kwargs": encoder_kwargs or "released sizes (class defaults)",
        "sizes": per_size,
        "weights_GiB": {k: v / GIB for k, v in weights.items()},
        "fp8_weights_GiB": {k: v / GIB for k, v in fp8_weights.items() if k.startswith("DiT")},
        "working_GiB": {size: {k: v / GIB for k, v in w.items()} for size, w in work.items()},
        "peak_GiB": variants["batch 2"],
        "variants": variants,
        "goals_GiB": GOALS_GIB,
        "reference_GB": REFERENCE_GB,
        "notes": NOTES,
    }


def kept_across_blocks(dit_kwargs: dict, tokens: int, batch: int) -> int:
    """Bytes the DiT call holds between blocks: x, context (CLIP + text tokens), t_mod, RoPE table."""
    dim, head_dim = dit_kwargs["dim"], dit_kwargs["dim"] // dit_kwargs["num_heads"]
    x = batch * tokens * dim * 2
    context = batch * (CLIP_TOKENS + TEXT_TOKENS) * dim * 2
    t_mod = 6 * dim * 2
    freqs = tokens * head_dim * 4  # float32 (cos, sin) pairs
    return x + context + t_mod + freqs


NOTES = [
    "Computed on meta-device models of the real shapes, not measured on a GPU.",
    "Working memory: peak of live tensors while each pipeline stage runs on meta tensors "
    "(TorchDispatchMode tracking every storage from creation to release).",
    "Attention counted as flash attention allocates it (output + float32 log-sum-exp), no L x L matrix; "
    "umT5's explicit attention is counted as it runs.",
    "Default: guidance as one batch-2 DiT call; 'batch 1' = prompt and negative prompt in separate calls.",
    "VAE decode untiled unless 'tiled decode' (DiffSynth tile_size=(34, 34), tile_stride=(18, 16) latents).",
    "Block offload: the DiT's non-block weights counted as resident in every stage, two blocks during the DiT.",
    "Not counted: CUDA context (~0.5-1 GiB), allocator caching/fragmentation, kernel workspaces.",
]


def print_report(result: dict) -> None:
    sizes = list(result["sizes"])
    w, f8 = result["weights_GiB"], result["fp8_weights_GiB"]
    print(f"{result['model']} edit: peak GPU memory per offload mode, GiB (computed on meta-device models, "
          "not measured on a GPU)")
    print(f"weights: DiT {w['DiT']:.1f} (fp8 {f8['DiT']:.1f}; one block {w['DiT block']:.2f}, fp8 "
          f"{f8['DiT block']:.2f}; non-block {w['DiT non-block']:.2f}), umT5-XXL {w['umT5-XXL']:.1f}, "
          f"CLIP {w['CLIP']:.2f}, VAE {w['VAE']:.2f}")
    for variant, table in result["variants"].items():
        print(f"\n{variant} (guidance {'one batch-2 call' if variant.startswith('batch 2') else 'two calls'}, "
              f"VAE decode {'tiled' if 'tiled' in variant else 'untiled'}):")
        print("| mode | " + " | ".join(sizes) + " |\n|---|" + "---|" * len(sizes))
        for mode, row in table.items():
            print(f"| {mode} | " + " | ".join(f"{row[s]['GiB']:.1f} ({row[s]['stage']})" for s in sizes) + " |")
    print("\nworking memory per stage, GiB:")
    stages = list(next(iter(result["working_GiB"].values())))
    print("| size | " + " | ".join(stages) + " |\n|---|" + "---|" * len(stages))
    for size, work in result["working_GiB"].items():
        print(f"| {size} | " + " | ".join(f"{work[s]:.2f}" for s in stages) + " |")
    for size, info in result["sizes"].items():
        print(f"{size}: {info['tokens']} tokens, one block's no-grad peak (batch 2) "
              f"{info['block_peak_batch_2_GiB']:.2f}"
              f" GiB, kept across blocks {info['kept_across_blocks_batch_2_GiB']:.2f} GiB, "
              f"{info['decode_tiles']} decode tiles")
    print(f"\nOfficial diffusers pipeline per NVIDIA: about {REFERENCE_GB['model offload']} GB with model offload, "
          f"about {REFERENCE_GB['model offload + temporal reasoning']} GB with temporal reasoning.")
    for size in ("720x1280", "720x1280 reasoning"):
        if size in result["sizes"]:
            two, one = (result["variants"][v]["model"][size]["GiB"] * GIB / 1e9 for v in ("batch 2", "batch 1"))
            print(f"Ours, model offload, {size}: {two:.1f} GB (one batch-2 call), {one:.1f} GB (two calls, as "
                  "diffusers does), without the CUDA context.")
    for note in result["notes"]:
        print("* " + note)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--only", action="append", choices=sorted(SIZES), help="just this size (repeatable)")
    parser.add_argument("--model", help="shapes of this checkpoint folder instead of ChronoEdit-14B's "
                        "(e.g. make-tiny --size mid; headers only, no weights read)")
    args = parser.parse_args(argv)
    from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS

    sizes = {name: SIZES[name] for name in (args.only or SIZES)}
    if args.model:
        dit_kwargs, encoder_kwargs = checkpoint_kwargs(args.model)
        result = compute(dit_kwargs, sizes, encoder_kwargs, model=str(args.model))
    else:
        result = compute(CHRONOEDIT_14B_KWARGS, sizes)
    result["args"] = vars(args)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
