"""block_swap: training with the DiT's blocks streamed through the compute device gives the same
LoRA, and holds one or two blocks there at a time (measured with bench/memory_edit_14b.py's tracker)."""

from __future__ import annotations

import copy
import csv

import pytest
import torch

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.lora import load_lora
from chronoedit_lora.offload import weight_bytes
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.train.distributed.launch import check_launch
from chronoedit_lora.train.loop.config import DEFAULT_TARGETS, TrainConfig, validate
from chronoedit_lora.train.loop.trainer import train
from chronoedit_lora.train.objective.lora_module import LoraTrainingModule

from .bench_scripts import load_bench
from .test_fp8 import _train_inputs
from .test_train import make_subset, tiny_config

BLOCKS = 5  # the tiny DiT's 2 blocks, deep-copied up to 5, so "one or two at a time" means something


@pytest.fixture(scope="module")
def three_pairs(tmp_path_factory):
    return make_subset(tmp_path_factory.mktemp("pairs"), 3)


def _losses(run) -> list[str]:
    return [row["loss"] for row in csv.DictReader((run / "logs" / "metrics.csv").open())]


@pytest.mark.parametrize("extra", [{}, {"fp8_base": True, "activation_offload": True, "cache": True}],
                         ids=["plain", "fp8+activation_offload+cache"])
def test_block_swap_trains_the_same_lora_and_losses(tiny_diffusers, three_pairs, tmp_path, extra):
    common = dict(max_steps=3, save_every=100, seed=3, gradient_checkpointing=True, **extra)
    plain = train(tiny_config(tiny_diffusers, three_pairs, tmp_path / "plain", **common))
    swapped = train(tiny_config(tiny_diffusers, three_pairs, tmp_path / "swap", block_swap=True, **common))
    assert swapped.steps == plain.steps == 3
    # on a CPU the streamed copies hold the same values, and the ops run in the same order: exactly equal
    assert _losses(tmp_path / "swap") == _losses(tmp_path / "plain")
    a, b = load_lora(plain.lora)[0], load_lora(swapped.lora)[0]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down) for k in a)


def _pipe(tiny_diffusers, offload: str) -> ChronoEditPipeline:
    """The tiny DiT with :data:`BLOCKS` blocks, its weights streamed (``blocks``) or resident (``none``)."""
    loaded = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, encoders=False)
    blocks = loaded.dit.blocks
    blocks.extend(copy.deepcopy(blocks[i % len(blocks)]) for i in range(len(blocks), BLOCKS))
    return ChronoEditPipeline(loaded.components, loaded.device, loaded.dtype, offload=offload)


def _step(module: LoraTrainingModule) -> torch.Tensor:
    """One training forward and backward; the loss."""
    torch.manual_seed(1)  # same timestep and noise
    loss = module(_train_inputs())
    loss.backward()
    return loss.detach()


def test_streamed_training_step_holds_one_or_two_blocks(tiny_diffusers):
    tracker_class = load_bench("memory_edit_14b").LiveTensors
    results = {}
    for mode in ("none", "blocks"):
        pipe = _pipe(tiny_diffusers, mode)
        torch.manual_seed(0)
        module = LoraTrainingModule(pipe, rank=4, alpha=4.0, targets=DEFAULT_TARGETS, gradient_checkpointing=True)
        with tracker_class() as tracker:  # counts what the step allocates: with block_swap, the weights' copies too
            loss = _step(module)
        grads = {name: p.grad.clone() for name, p in module.named_trained().items()}
        results[mode] = (pipe, loss, grads, tracker.peak)

    (plain, loss, grads, plain_peak), (pipe, swap_loss, swap_grads, swap_peak) = results["none"], results["blocks"]
    assert torch.equal(swap_loss, loss) and all(torch.equal(swap_grads[k], grads[k]) for k in grads)

    streamer = pipe.placement.streamer
    n = len(pipe.dit.blocks)
    forward, backward = streamer.log[:n], streamer.log[n:]
    # forward: block i computes with block i + 1 prefetched; backward (checkpointing recomputes each
    # block just before its backward): block i with block i - 1 prefetched, the later ones gone home
    assert forward == [(i, i + 1) for i in range(n - 1)] + [(n - 1,)]
    assert backward == [(i, i - 1) for i in range(n - 1, 0, -1)] + [(0,)]
    assert streamer.on_device == []  # the last block went home when the backward ended

    block = sum(t.numel() * t.element_size() for t in pipe.dit.blocks[0].parameters() if not t.requires_grad)
    rest = weight_bytes(pipe.dit) - weight_bytes(pipe.dit.blocks)  # the non-block weights, copied on in the step
    held = swap_peak - plain_peak  # the same activations and gradients on top in both
    print(f"block {block} B, non-block weights {rest} B, streaming adds {held} B at the peak "
          f"(resident DiT weights: {weight_bytes(plain.dit.blocks) + rest} B)")
    assert rest + block <= held <= rest + 2 * block


def test_block_swap_settings_refused_by_name(monkeypatch):
    with pytest.raises(ChronoEditError, match="block_swap = true needs gradient_checkpointing = true"):
        validate(TrainConfig(block_swap=True, gradient_checkpointing=False))
    with pytest.raises(ChronoEditError, match='block_swap = true streams the frozen base weights; finetune = "full"'):
        validate(TrainConfig(block_swap=True, finetune="full"))
    with pytest.raises(ChronoEditError, match="block_swap = true cannot be combined with compile = true"):
        validate(TrainConfig(block_swap=True, compile=True))
    validate(TrainConfig(block_swap=True, fp8_base=True, activation_offload=True, cache=True))

    check_launch(TrainConfig(block_swap=True))  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ChronoEditError, match="block_swap = true cannot be combined with a 2-process launch"):
        check_launch(TrainConfig(block_swap=True))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ChronoEditError, match="block_swap = true cannot be combined with an FSDP launch"):
        check_launch(TrainConfig(block_swap=True))
