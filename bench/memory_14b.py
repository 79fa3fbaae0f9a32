"""What sits in GPU memory while training a ChronoEdit-14B LoRA, or fully fine-tuning it, per mode,
computed, not guessed.

    python bench/memory_14b.py [--height 1024 --width 1024] [--rank 32] [--gpus 8] [--json out.json]

Besides edit pairs (5 frames, 2 latents) at --height x --width, it computes trajectory rows (29
frames, 8 latents) at 480x832 and 720x1280 in the modes small GPUs would use, and full fine-tuning
(``finetune = "full"``, every block trained) under FSDP on 8 and 16 GPUs.

Parameter counts come from the kit's own model classes built on the meta device (no weights):
the DiT as DiffSynth's ``WanModel`` with ChronoEdit-14B's kwargs and peft LoRA injected the way the
trainer does it, umT5-XXL, the ViT-H/14 vision tower and the Wan2.1 VAE. Activations come from
running one DiT block forward on meta tensors of the training shapes and adding up, with
``saved_tensors_hooks``, every tensor autograd keeps for backward. Runs in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
TRAIN_FRAMES = 5  # [source, edit x 4] -> 2 latent frames
TRAJECTORY_FRAMES = 29  # a trajectory row: 8 latent frames
TRAJECTORY_SIZES = ((480, 832), (720, 1280))
TEXT_TOKENS, CLIP_TOKENS = 512, 257


@dataclass
class Counts:
    """Bytes and element counts measured on the meta-device models."""

    dit_params: int
    block_params: int  # one DiTBlock's parameters, LoRA included (what FSDP all-gathers per block)
    block_linear_weights: int  # weights of the nn.Linear layers inside the blocks (what fp8 stores in 1 byte)
    block_linear_rows: int  # their output rows (one float32 fp8 scale each)
    largest_linear: int
    lora_params: int
    encoder_params: dict[str, int]
    tokens: int
    block_input_bytes: int  # one block's input x, bf16: what gradient checkpointing keeps per block
    block_saved_bytes: int  # everything one block's forward keeps for backward (flash-attention accounting)


def build_dit(kwargs: dict, rank: int) -> torch.nn.Module:
    """A DiffSynth ``WanModel`` of ``kwargs`` on the meta device, bf16, with the trainer's peft LoRA."""
    from diffsynth.models.wan_video_dit import WanModel

    with torch.device("meta"):
        return add_lora(WanModel(**kwargs).to(torch.bfloat16), rank)


def add_lora(dit: torch.nn.Module, rank: int) -> torch.nn.Module:
    """peft LoRA on the trainer's default targets; only LoRA trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    from chronoedit_lora.train.loop.config import DEFAULT_TARGETS

    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=DEFAULT_TARGETS), dit)
    for name, param in dit.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:  # under autocast the LoRA matmuls run in bf16 too
            param.data = param.data.to(torch.bfloat16)
    return dit


def encoder_params() -> dict[str, int]:
    """Parameter counts of umT5-XXL, the ViT-H/14 vision tower and the Wan2.1 VAE (kit classes, defaults)."""
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    from chronoedit_lora.models.image_encoder import VisionTowerImageEncoder
    from chronoedit_lora.models.vae import SizedWanVideoVAE

    with torch.device("meta"):
        models = {"umT5-XXL": WanTextEncoder(), "CLIP ViT-H/14": VisionTowerImageEncoder(), "VAE": SizedWanVideoVAE()}
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def latent_tokens(height: int, width: int, frames: int = TRAIN_FRAMES) -> int:
    """DiT tokens of a training clip: latent frames (2 for a pair, 8 for a trajectory) x (H/8/2) x (W/8/2)."""
    latent_frames = 1 + (frames - 1) // 4
    return latent_frames * (height // 16) * (width // 16)


def saved_by_one_block(dit: torch.nn.Module, height: int, width: int, frames: int = TRAIN_FRAMES) -> int:
    """Bytes autograd keeps for backward from one bf16 block's forward (LoRA in bf16, as under autocast).

    Tensors are counted once per storage; parameters and the block's inputs not at all.
    Attention is counted as GPU flash attention keeps it (q, k, v, output and a float32
    log-sum-exp per query and head), not as the CPU math path that this meta run dispatches to,
    which would keep the full attention matrices.
    """
    import torch.nn.functional as F

    from chronoedit_lora.models.lean_ops import use_lean_ops
    from chronoedit_lora.models.rope import use_real_rope

    use_lean_ops(dit)  # the block as chronoedit_model_fn runs it
    use_real_rope(dit)
    block = dit.blocks[0]
    seq = latent_tokens(height, width, frames)
    like = {"device": block.modulation.device, "dtype": torch.bfloat16}
    # RoPE rotations, a float32 (cos, sin) pair per token and head-dim pair; their values do not matter here
    freqs = torch.ones(seq, 1, block.self_attn.head_dim, device=like["device"])
    x = torch.randn(1, seq, dit.dim, **like, requires_grad=True)
    context = torch.randn(1, CLIP_TOKENS + TEXT_TOKENS, dit.dim, **like)
    t_mod = torch.randn(1, 6, dit.dim, **like)
    # parameters are resident anyway; the block's inputs are counted per block (x) or are shared by all
    params = {t.untyped_storage()._cdata for t in (*block.parameters(), x, context, t_mod, freqs)}
    saved: dict[int, int] = {}
    in_attention = [False]

    alive = []  # held until the end, so that no counted storage is freed and its address reused

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        alive.append(tensor)
        if not in_attention[0] and storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    def flash_attention(q, k, v, *args, **kwargs):
        in_attention[0] = True
        out = sdpa(q, k, v, *args, **kwargs)
        in_attention[0] = False
        for tensor in (q, k, v, out):
            alive.append(tensor)
            saved[tensor.untyped_storage()._cdata] = tensor.numel() * 2
        saved[id(out)] = q.shape[0] * q.shape[1] * q.shape[2] * 4  # log-sum-exp
        return out

    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, flash_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            block(x, context, t_mod, freqs)
    finally:
        F.scaled_dot_product_attention = sdpa
    return sum(saved.values())


def count(height: int, width: int, rank: int, kwargs: dict, frames: int = TRAIN_FRAMES) -> Counts:
    """Every figure the modes are computed from, for a DiT of ``kwargs`` and clips of ``frames``."""
    dit = build_dit(kwargs, rank)
    linears = [m for m in dit.blocks.modules() if type(m) is torch.nn.Linear]
    saved = saved_by_one_block(dit, height, width, frames)
    tokens = latent_tokens(height, width, frames)
    return Counts(
        dit_params=sum(p.numel() for n, p in dit.named_parameters() if "lora_" not in n),
        block_params=sum(p.numel() for p in dit.blocks[0].parameters()),
        block_linear_weights=sum(m.weight.numel() for m in linears),
        block_linear_rows=sum(m.out_features for m in linears),
        largest_linear=max(m.weight.numel() for m in linears),
        lora_params=sum(p.numel() for p in dit.parameters() if p.requires_grad),
        encoder_params=encoder_params(),
        tokens=tokens,
        block_input_bytes=tokens * dit.dim * 2,
        block_saved_bytes=saved,
    )


FSDP_GPUS = (2, 4)  # FSDP rows besides --gpus
FSDP_UNSHARDED_BLOCKS = 2  # the block being computed and the next one, which FSDP2 prefetches (forward and backward)


def fsdp_parts(c: Counts, blocks: int) -> tuple[int, int, int]:
    """bf16 bytes FSDP splits per block (all blocks' base weights), gathers at once (the current and the
    prefetched block, LoRA included), and keeps whole (the root's parameters: patch, text and time
    embeddings, head; FSDP2 keeps the root unit gathered from the forward through the backward)."""
    base_per_block = c.block_params - c.lora_params // blocks
    return blocks * base_per_block * 2, FSDP_UNSHARDED_BLOCKS * c.block_params * 2, (c.dit_params - blocks * base_per_block) * 2


def fsdp_dit_bytes(c: Counts, blocks: int, gpus: int) -> float:
    """One GPU's DiT bytes under FSDP (configs/accelerate/fsdp.yaml, bf16) on ``gpus`` GPUs."""
    sharded, gathered, root = fsdp_parts(c, blocks)
    return sharded / gpus + gathered + root


def modes(c: Counts, blocks: int, gpus: int) -> dict[str, dict[str, float]]:
    """GPU-resident GiB per category for each training mode (plus CPU RAM where offloading moves it)."""
    bf16_dit = c.dit_params * 2
    fp8_dit = bf16_dit - c.block_linear_weights + c.block_linear_rows * 4 + c.largest_linear * 2  # + one bf16 copy
    encoders = sum(c.encoder_params.values()) * 2
    lora_state = c.lora_params * 4 * 4  # fp32 weights, grads, AdamW exp_avg and exp_avg_sq
    zero2_lora = c.lora_params * 4 + c.lora_params * 4 * 3 / gpus  # grads and optimizer states sharded
    checkpointed = blocks * c.block_input_bytes + c.block_saved_bytes  # block inputs + one block recomputed
    recompute_only = c.block_saved_bytes + c.block_input_bytes
    rows = {
        "uncached": (bf16_dit, encoders, lora_state, checkpointed, 0),
        "cached": (bf16_dit, 0, lora_state, checkpointed, 0),
        "cached + fp8 base": (fp8_dit, 0, lora_state, checkpointed, 0),
        "cached + activation offload": (bf16_dit, 0, lora_state, recompute_only, blocks * c.block_input_bytes),
        f"cached + ZeRO-2 ({gpus} GPUs)": (bf16_dit, 0, zero2_lora, checkpointed, 0),
        "cached + fp8 base + activation offload": (fp8_dit, 0, lora_state, recompute_only, blocks * c.block_input_bytes),
    }
    for n in sorted({*FSDP_GPUS, gpus}):  # FSDP also shards the LoRA's weights, gradients and AdamW states
        rows[f"cached + FSDP ({n} GPUs)"] = (fsdp_dit_bytes(c, blocks, n), 0, lora_state / n, checkpointed, 0)
    rows[f"cached + FSDP ({gpus} GPUs) + activation offload"] = (
        fsdp_dit_bytes(c, blocks, gpus), 0, lora_state / gpus, recompute_only, blocks * c.block_input_bytes)
    names = ("DiT weights", "encoders", "LoRA + grads + AdamW", "activations", "CPU RAM (offloaded)")
    table = {mode: {name: value / GIB for name, value in zip(names, values)} for mode, values in rows.items()}
    for figures in table.values():
        figures["GPU total"] = sum(v for k, v in figures.items() if k != "CPU RAM (offloaded)")
    return table


FULL_FINETUNE_GPUS = (8, 16)
FULL_COLUMNS = ("DiT weights", "trained weights + grads + AdamW", "EMA", "activations", "CPU RAM (offloaded)")


def full_modes(c: Counts, blocks: int, gpus: tuple[int, ...] = FULL_FINETUNE_GPUS) -> dict[str, dict[str, float]]:
    """GiB per GPU for a full fine-tune of every block under FSDP (configs/accelerate/fsdp_full.yaml):
    float32 master weights, their gradients and AdamW's two moments (16 bytes a parameter) and the
    optional float32 EMA (4 bytes) are split 1/N; each GPU also holds the root's bf16 weights, the two
    gathered bf16 blocks (the current and the prefetched one) and one block's whole bf16 gradient
    before it is reduce-scattered; activations as for a LoRA (gradient checkpointing)."""
    sharded, gathered, root = fsdp_parts(c, blocks)
    trained = sharded // 2  # the blocks' parameters (their bf16 bytes / 2)
    checkpointed = blocks * c.block_input_bytes + c.block_saved_bytes
    recompute_only = c.block_saved_bytes + c.block_input_bytes
    weights = root + gathered + gathered // FSDP_UNSHARDED_BLOCKS
    rows = {}
    for n in gpus:
        rows[f"full, cached + FSDP ({n} GPUs)"] = (weights, trained * 16 / n, 0, checkpointed, 0)
        rows[f"full, cached + FSDP ({n} GPUs) + EMA"] = (weights, trained * 16 / n, trained * 4 / n, checkpointed, 0)
        rows[f"full, cached + FSDP ({n} GPUs) + EMA + activation offload"] = (
            weights, trained * 16 / n, trained * 4 / n, recompute_only, blocks * c.block_input_bytes)
    table = {mode: {name: value / GIB for name, value in zip(FULL_COLUMNS, values)} for mode, values in rows.items()}
    for figures in table.values():
        figures["GPU total"] = sum(v for k, v in figures.items() if k != "CPU RAM (offloaded)")
    return table


PAIR_SIZES = ((1024, 1024), (720, 1280))  # the small-card table's edit pairs (height, width)
CARDS_GB = (12, 16, 24, 48, 80)
CARD_MARGIN = 1.5 * GIB  # CUDA context and allocator slack, as chronoedit_lora.offload reserves for an edit
# How the DiT's block linears are held: bf16, fp8_base (or a ComfyUI fp8 file), or a GGUF file of a type
# (kept quantized, chronoedit_lora.models.quantized). Q4_K stands for Q4_K_M, most of whose weights are Q4_K.
BASES = ("bf16", "fp8", "Q8_0", "Q4_K")
SETTING_BASES = ("bf16", "fp8")  # what training settings choose; a GGUF base is another download


@dataclass(frozen=True)
class Setting:
    """One combination of the settings that trade speed for GPU memory."""

    base: str = "bf16"
    cache: bool = True
    activation_offload: bool = False
    block_swap: bool = False

    @property
    def name(self) -> str:
        parts = ["cached" if self.cache else "uncached"] + ([f"{self.base} base"] if self.base != "bf16" else [])
        parts += ["block swap"] * self.block_swap + ["activation offload"] * self.activation_offload
        return " + ".join(parts)

    @property
    def toml(self) -> str:
        """The training settings that select it."""
        return ", ".join(f"{key} = {'true' if value else 'false'}" for key, value in (
            ("cache", self.cache), ("fp8_base", self.base == "fp8"), ("block_swap", self.block_swap),
            ("activation_offload", self.activation_offload)))


def settings(bases: tuple[str, ...] = BASES) -> list[Setting]:
    """Every combination of base, cache, activation offload and block swap."""
    return [Setting(base, cache, offload, swap) for base in bases for cache in (True, False)
            for swap in (False, True) for offload in (False, True)]


SMALL_CARD_COLUMNS = ("DiT weights", "encoders", "LoRA + grads + AdamW", "activations", "CPU RAM (offloaded)",
                      "PCIe per step", "GPU total")


def dit_bytes(c: Counts, blocks: int, base: str) -> tuple[float, float]:
    """(the whole DiT, one block) in bytes as ``base`` holds them; fp8: block linears 1 byte a weight plus
    a float32 scale per row (``chronoedit_lora.models.fp8``); GGUF: the type's block bytes per weight."""
    base_block = c.block_params - c.lora_params // blocks
    if base == "bf16":
        linears = c.block_linear_weights * 2
    elif base == "fp8":
        linears = c.block_linear_weights + c.block_linear_rows * 4
    else:
        import gguf

        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[base]]
        linears = c.block_linear_weights * type_size / block_size
    saved = c.block_linear_weights * 2 - linears
    return c.dit_params * 2 - saved, base_block * 2 - saved / blocks


def dequantized_bytes(c: Counts, base: str) -> int:
    """The largest block linear's decoded copy while it computes: bf16 for fp8; a float32 decode and
    its bf16 cast for GGUF (diffusers' dequantizers run in float32)."""
    return {"bf16": 0, "fp8": 2}.get(base, 6) * c.largest_linear


def setting_figures(c: Counts, blocks: int, setting: Setting) -> dict[str, float]:
    """Bytes on the GPU (per category and at the peak), in CPU RAM, and moved over PCIe per optimizer step.

    Block swap (``block_swap = true``, ``chronoedit_lora.offload.BlockStreamer``): the DiT's non-block
    weights stay, and two blocks are on the GPU at a time (the one computing and the prefetched next),
    each block copied in twice a step (forward, then recomputation + backward). Uncached, the
    encoders are then on the GPU for their own stage only (each copied in once a step), so the peak
    is the larger of the encoder stage (the largest encoder + the adapter's state) and the DiT stage.
    Quantized bases: the decoded copy of the largest linear exists while it computes (:func:`dequantized_bytes`).
    """
    whole, block = dit_bytes(c, blocks, setting.base)
    dequantized = dequantized_bytes(c, setting.base)
    lora_state = c.lora_params * 4 * 4  # fp32 weights, grads, AdamW exp_avg and exp_avg_sq
    inputs = blocks * c.block_input_bytes
    activations = (c.block_saved_bytes + c.block_input_bytes) if setting.activation_offload else \
        inputs + c.block_saved_bytes
    encoder_bytes = {name: n * 2 for name, n in c.encoder_params.items()}
    encoders = 0 if setting.cache else (max(encoder_bytes.values()) if setting.block_swap else sum(encoder_bytes.values()))
    dit = (whole - blocks * block + 2 * block if setting.block_swap else whole) + dequantized
    cpu = (blocks * block if setting.block_swap else 0) + (inputs if setting.activation_offload else 0)
    cpu += sum(encoder_bytes.values()) if setting.block_swap and not setting.cache else 0
    pcie = (2 * blocks * block if setting.block_swap else 0) + (2 * inputs if setting.activation_offload else 0)
    pcie += sum(encoder_bytes.values()) if setting.block_swap and not setting.cache else 0
    dit_stage = dit + lora_state + activations + (0 if setting.block_swap else encoders)
    total = max(dit_stage, encoders + lora_state)
    values = (dit, encoders, lora_state, activations, cpu, pcie, total)
    return {name: value / GIB for name, value in zip(SMALL_CARD_COLUMNS, values)}


def small_card_table(rank: int, kwargs: dict, sizes=PAIR_SIZES) -> dict[str, dict[str, dict[str, float]]]:
    """``{"HxW": {setting name: figures}}`` for edit pairs at batch 1, every :func:`settings` combination."""
    table = {}
    for height, width in sizes:
        c = count(height, width, rank, kwargs)
        table[f"{height}x{width}"] = {s.name: setting_figures(c, kwargs["num_layers"], s) for s in settings()}
    return table


def card_gib(gb: int) -> float:
    """What a card sold as ``gb`` GB (10^9 bytes) leaves for tensors, in GiB: less :data:`CARD_MARGIN`."""
    return (gb * 1e9 - CARD_MARGIN) / GIB


def cheapest(figures: dict[str, dict[str, float]], gb: int) -> Setting | None:
    """The setting that fits a ``gb`` card and moves the fewest bytes over PCIe per step; among equals,
    bf16 before fp8 (no rounding of the base), then cached (no encoders run per step)."""
    fitting = [s for s in settings(SETTING_BASES) if figures[s.name]["GPU total"] <= card_gib(gb)]
    return min(fitting, key=lambda s: (round(figures[s.name]["PCIe per step"], 2), BASES.index(s.base), not s.cache),
               default=None)


def trajectory_modes(gpus: int) -> tuple[str, ...]:
    """The modes the trajectory table shows: the smallest single-GPU ones and FSDP."""
    return ("cached + fp8 base + activation offload", "cached + fp8 base", f"cached + FSDP ({gpus} GPUs) + activation offload")


def trajectory_table(rank: int, kwargs: dict, gpus: int) -> dict[str, dict[str, float]]:
    """GiB per category for trajectory rows at :data:`TRAJECTORY_SIZES`, in :func:`trajectory_modes`."""
    rows = {}
    for height, width in TRAJECTORY_SIZES:
        c = count(height, width, rank, kwargs, TRAJECTORY_FRAMES)
        table = modes(c, kwargs["num_layers"], gpus)
        for mode in trajectory_modes(gpus):
            rows[f"{height}x{width}, {c.tokens} tokens, {mode}"] = table[mode]
    return rows


def print_table(table: dict[str, dict[str, float]]) -> None:
    columns = list(next(iter(table.values())))
    print("| mode | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for mode, figures in table.items():
        print(f"| {mode} | " + " | ".join(f"{figures[k]:.1f}" if figures[k] else "0" for k in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS

    c = count(args.height, args.width, args.rank, CHRONOEDIT_14B_KWARGS)
    table = modes(c, CHRONOEDIT_14B_KWARGS["num_layers"], args.gpus)
    print(f"ChronoEdit-14B LoRA training at {args.height}x{args.width}, batch 1, rank {args.rank}, bf16, "
          f"gradient checkpointing; GiB on each GPU")
    print_table(table)
    trajectories = trajectory_table(args.rank, CHRONOEDIT_14B_KWARGS, args.gpus)
    print(f"\nTrajectory rows ({TRAJECTORY_FRAMES} frames, 8 latents), batch 1, rank {args.rank}; GiB on each GPU")
    print_table(trajectories)
    full = full_modes(c, CHRONOEDIT_14B_KWARGS["num_layers"])
    print(f"\nFull fine-tuning of every block (finetune = \"full\"), {args.height}x{args.width}, batch 1, bf16 compute, "
          "float32 master weights; GiB on each GPU")
    print_table(full)
    print(f"\nDiT {c.dit_params / 1e9:.2f} B parameters ({c.block_linear_weights / c.dit_params:.1%} in block linears); "
          + ", ".join(f"{name} {n / 1e9:.2f} B" for name, n in c.encoder_params.items())
          + f"; LoRA {c.lora_params / 1e6:.1f} M.")
    print(f"{c.tokens} tokens; per block: input {c.block_input_bytes / GIB:.2f} GiB, saved for backward "
          f"{c.block_saved_bytes / GIB:.2f} GiB (attention counted as flash attention keeps it).")
    print("Not included: CUDA context and allocator slack, transient temporaries inside an op, the VAE's "
          "encode activations (uncached mode, no_grad), tensors outside the blocks.")
    sharded, gathered, root = fsdp_parts(c, CHRONOEDIT_14B_KWARGS["num_layers"])
    print("ZeRO-2 shards only gradients and optimizer states, which a LoRA barely has. FSDP shards the frozen "
          f"base too: each GPU holds 1/N of the blocks' {sharded / GIB:.1f} GiB, plus {FSDP_UNSHARDED_BLOCKS} gathered "
          f"blocks ({gathered / GIB:.2f} GiB: the current one and the prefetched next) and the root's "
          f"{root / GIB:.2f} GiB (embeddings and head, gathered through forward and backward).")
    small = small_card_table(args.rank, CHRONOEDIT_14B_KWARGS)
    picks = {}
    for size, figures in small.items():
        print(f"\nOne GPU, edit pair {size}, batch 1, rank {args.rank}; GiB (PCIe per step: GiB copied between CPU "
              "and GPU per optimizer step)")
        print_table(figures)
        picks[size] = {gb: getattr(cheapest(figures, gb), "name", None) for gb in CARDS_GB}
        for gb, name in picks[size].items():
            print(f"{gb} GB ({card_gib(gb):.1f} GiB for tensors): {name or 'nothing fits'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "counts": vars(c), "modes": table,
                                               "trajectories": trajectories, "full": full, "small_cards": small,
                                               "cheapest": picks}, indent=2))


if __name__ == "__main__":
    main()
