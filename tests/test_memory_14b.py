"""bench/memory_14b.py: its counts match independent references, and its meta-device activation
measurement matches the same measurement on real tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS
from chronoedit_lora.train.loop.config import DEFAULT_TARGETS, load_config

from .bench_scripts import load_bench

SAME_SAVED_RTOL = 0.01
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _bench():
    return load_bench("memory_14b")


def test_14b_dit_parameters_equal_diffusers_chronoedit_transformer():
    from diffusers import ChronoEditTransformer3DModel

    with torch.device("meta"):
        reference = ChronoEditTransformer3DModel(
            num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16, text_dim=4096,
            freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024)
    ours = _bench().build_dit(CHRONOEDIT_14B_KWARGS, rank=32)
    assert sum(p.numel() for n, p in ours.named_parameters() if "lora_" not in n) == \
        sum(p.numel() for p in reference.parameters())


def test_lora_count_and_saved_activations_match_a_real_tiny_dit(tiny_diffusers):
    from chronoedit_lora.models.dit import inspect_dit, load_dit
    from chronoedit_lora.pipeline import ChronoEditPipeline
    from chronoedit_lora.train.objective.lora_module import LoraTrainingModule

    bench = _bench()
    kwargs = inspect_dit(tiny_diffusers / "transformer").kwargs
    counts = bench.count(64, 48, 4, kwargs)
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.bfloat16, encoders=False)
    trained = LoraTrainingModule(pipe, rank=4, alpha=4.0, targets=DEFAULT_TARGETS)
    assert counts.lora_params == sum(p.numel() for p in trained.lora_parameters())

    real = bench.add_lora(load_dit(tiny_diffusers / "transformer", dtype=torch.bfloat16)[0], rank=4)
    # meta kernels keep some norm statistics in float32 where CPU kernels keep bf16: within 1%
    assert abs(bench.saved_by_one_block(real, 64, 48) / counts.block_saved_bytes - 1) < SAME_SAVED_RTOL
    assert counts.tokens == 2 * 4 * 3 and counts.block_input_bytes == counts.tokens * kwargs["dim"] * 2


def test_modes_order_and_fp8_saving():
    bench = _bench()
    counts = bench.count(1024, 1024, 32, CHRONOEDIT_14B_KWARGS)
    table = bench.modes(counts, CHRONOEDIT_14B_KWARGS["num_layers"], gpus=8)
    total = {mode: figures["GPU total"] for mode, figures in table.items()}
    assert total["cached + fp8 base"] < total["cached + activation offload"] < total["cached"] < total["uncached"]
    assert counts.tokens == 8192
    # fp8 roughly halves the DiT: 99% of its parameters sit in the blocks' linear layers
    assert 0.45 < table["cached + fp8 base"]["DiT weights"] / table["cached"]["DiT weights"] < 0.55


def test_fsdp_rows_shard_the_base_and_order_by_gpu_count():
    bench = _bench()
    counts = bench.count(1024, 1024, 32, CHRONOEDIT_14B_KWARGS)
    blocks = CHRONOEDIT_14B_KWARGS["num_layers"]
    table = bench.modes(counts, blocks, gpus=8)
    total = {mode: figures["GPU total"] for mode, figures in table.items()}
    fsdp = {n: table[f"cached + FSDP ({n} GPUs)"] for n in (2, 4, 8)}
    assert total["cached + FSDP (8 GPUs) + activation offload"] < fsdp[8]["GPU total"] < fsdp[4]["GPU total"] \
        < fsdp[2]["GPU total"] < total["cached"]  # DDP holds the whole base on every GPU
    sharded, gathered, root = bench.fsdp_parts(counts, blocks)
    assert sharded + root == counts.dit_params * 2  # the split blocks plus the whole root are the base
    assert gathered == 2 * counts.block_params * 2  # the current and the prefetched block, bf16
    for n, figures in fsdp.items():  # base / N + what is gathered at once
        assert abs(figures["DiT weights"] * bench.GIB - (sharded / n + gathered + root)) < 1
        assert figures["LoRA + grads + AdamW"] == table["cached"]["LoRA + grads + AdamW"] / n
        assert figures["activations"] == table["cached"]["activations"]
    # going from 2 to 8 GPUs saves 3/8 of the blocks' weights on each GPU
    saved = (fsdp[2]["DiT weights"] - fsdp[8]["DiT weights"]) * bench.GIB
    assert abs(saved - sharded * (1 / 2 - 1 / 8)) < 1


def test_trajectory_rows_count_eight_latents():
    bench = _bench()
    kwargs = CHRONOEDIT_14B_KWARGS
    table = bench.trajectory_table(32, kwargs, gpus=8)
    assert len(table) == len(bench.TRAJECTORY_SIZES) * 3
    small, large = (f"{h}x{w}, {8 * (h // 16) * (w // 16)} tokens, cached + fp8 base + activation offload"
                    for h, w in bench.TRAJECTORY_SIZES)
    assert table[small]["GPU total"] < table[large]["GPU total"]
    # 480x832 with 8 latents is 12480 tokens, about 1.5x the 8192 of a 1024x1024 pair: the kept block
    # inputs (offloaded here) grow in proportion, and nothing about the weights changes
    pair = bench.modes(bench.count(1024, 1024, 32, kwargs), kwargs["num_layers"], 8)["cached + fp8 base + activation offload"]
    assert abs(table[small]["CPU RAM (offloaded)"] / pair["CPU RAM (offloaded)"] - 12480 / 8192) < 1e-6
    assert table[small]["DiT weights"] == pair["DiT weights"]


def test_full_finetune_rows_shard_16_bytes_a_trained_parameter():
    bench = _bench()
    counts = bench.count(1024, 1024, 32, CHRONOEDIT_14B_KWARGS)
    blocks = CHRONOEDIT_14B_KWARGS["num_layers"]
    table = bench.full_modes(counts, blocks)
    trained = blocks * (counts.block_params - counts.lora_params // blocks)  # every block's own parameters
    for n in bench.FULL_FINETUNE_GPUS:
        rows = {suffix: table[f"full, cached + FSDP ({n} GPUs){suffix}"] for suffix in ("", " + EMA")}
        # float32 weight, gradient, exp_avg, exp_avg_sq per trained parameter, 1/N each; EMA 4 bytes
        assert abs(rows[""]["trained weights + grads + AdamW"] * bench.GIB - 16 * trained / n) < 1
        assert abs(rows[" + EMA"]["EMA"] * bench.GIB - 4 * trained / n) < 1
        assert rows[" + EMA"]["GPU total"] < 80  # fits an 80 GB GPU before allocator slack
    assert table["full, cached + FSDP (16 GPUs) + EMA"]["GPU total"] < table["full, cached + FSDP (8 GPUs) + EMA"]["GPU total"]


def test_small_card_settings_block_swap_and_the_presets_they_pick():
    bench = _bench()
    kwargs = CHRONOEDIT_14B_KWARGS
    blocks = kwargs["num_layers"]
    c = bench.count(1024, 1024, 32, kwargs)
    figures = bench.small_card_table(32, kwargs, sizes=((1024, 1024),))["1024x1024"]
    for base in bench.BASES:
        whole, block = bench.dit_bytes(c, blocks, base)
        plain = figures[bench.Setting(base=base).name]
        swapped = figures[bench.Setting(base=base, block_swap=True).name]
        # block swap: the non-block weights and two blocks on the GPU, every block in CPU RAM, copied in twice a step
        assert abs((plain["DiT weights"] - swapped["DiT weights"]) * bench.GIB - (blocks - 2) * block) < 1
        assert abs(swapped["CPU RAM (offloaded)"] * bench.GIB - blocks * block) < 1
        assert abs(swapped["PCIe per step"] * bench.GIB - 2 * blocks * block) < 1
        assert swapped["activations"] == plain["activations"]
    assert bench.dit_bytes(c, blocks, "bf16")[0] == c.dit_params * 2
    # a GGUF base holds its type's bytes per block-linear weight: Q8_0 34 per 32, Q4_K 144 per 256
    for base, per_weight in (("Q8_0", 34 / 32), ("Q4_K", 144 / 256)):
        saved = bench.dit_bytes(c, blocks, "bf16")[0] - bench.dit_bytes(c, blocks, base)[0]
        assert abs(saved - c.block_linear_weights * (2 - per_weight)) < 1
    # uncached with block swap: the encoders take the GPU in turn, and umT5's stage sets the peak
    uncached = figures[bench.Setting(cache=False, block_swap=True).name]
    assert uncached["GPU total"] == uncached["encoders"] + uncached["LoRA + grads + AdamW"]

    picks = {gb: bench.cheapest(figures, gb) for gb in bench.CARDS_GB}
    for gb, pick in picks.items():  # it fits, and no setting that moves fewer bytes per step does
        assert figures[pick.name]["GPU total"] <= bench.card_gib(gb)
        assert all(figures[s.name]["GPU total"] > bench.card_gib(gb) for s in bench.settings(bench.SETTING_BASES)
                   if figures[s.name]["PCIe per step"] < figures[pick.name]["PCIe per step"] - 0.01)
    assert picks[16].block_swap and not picks[24].block_swap and picks[80] == bench.Setting()
    # with a Q4_K GGUF file, 16 GB needs no block swap (docs/memory.md)
    assert figures[bench.Setting("Q4_K", activation_offload=True).name]["GPU total"] <= bench.card_gib(16)
    for gb in (16, 24):  # the presets are the settings computed for their card
        config = load_config(CONFIGS / f"chronoedit_14b_lora_{gb}gb.toml", {})
        assert bench.Setting("fp8" if config.fp8_base else "bf16", config.cache, config.activation_offload,
                             config.block_swap) == picks[gb]
        assert (config.height, config.width, config.batch_size, config.rank) == (1024, 1024, 1, 32)
