"""The training loss written out in ``LoraTrainingModule.forward`` is DiffSynth's own Wan SFT loss."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffsynth.diffusion.loss import FlowMatchSFTLoss
from diffsynth.pipelines.wan_video import WanVideoPipeline

from chronoedit_lora.data import EditPairDataset
from chronoedit_lora.models.rope import chronoedit_model_fn
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.train.loop.inputs import encode_clip
from chronoedit_lora.train.objective.lora_module import LoraTrainingModule
from chronoedit_lora.train.objective.loss import VALIDATION_SIGMAS, training_schedule, validation_loss

from .test_train import make_subset

TOLERANCE = 1e-6  # relative; both sides run the same ops on the same draws in fp32


@pytest.fixture(scope="module")
def setup(tiny_diffusers, tmp_path_factory):
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    item = EditPairDataset(make_subset(tmp_path_factory.mktemp("one"), 1), 32, 32)[0]
    inputs = encode_clip(pipe, item["video"], item["prompt"])
    torch.manual_seed(0)
    module = LoraTrainingModule(pipe, rank=4, alpha=4.0, targets=["q", "k", "v", "o", "ffn.0", "ffn.2"],
                                shift=3.0, gradient_checkpointing=False)
    with torch.no_grad():  # a LoRA that does something, so the model function really runs through it
        for param in module.lora_parameters():
            param.normal_(0, 0.05)
    return pipe, module, inputs, item


def diffsynth_loss(pipe: ChronoEditPipeline, module: LoraTrainingModule, inputs: dict) -> torch.Tensor:
    """DiffSynth's FlowMatchSFTLoss on a Wan pipeline set up as DiffSynth's trainer sets it up."""
    reference = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    reference.dit = module.dit
    reference.model_fn = partial(chronoedit_model_fn, skip_len=pipe.components.temporal_skip_len, rope=pipe.rope)
    reference.scheduler.set_timesteps(1000, training=True, shift=3.0)
    return FlowMatchSFTLoss(reference, **inputs, use_gradient_checkpointing=False,
                            use_gradient_checkpointing_offload=False)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_forward_equals_diffsynths_flow_match_sft_loss(setup, seed):
    pipe, module, inputs, _ = setup
    torch.manual_seed(seed)
    ours = module(dict(inputs))
    torch.manual_seed(seed)
    theirs = diffsynth_loss(pipe, module, dict(inputs))
    assert ours.item() > 0
    assert abs(ours.item() - theirs.item()) <= TOLERANCE * theirs.item(), (ours.item(), theirs.item())


def test_training_leaves_the_pipeline_as_it_was(tiny_diffusers, setup):
    """The module builds its own model function and schedule; the pipeline that samples during
    training stays the one the edit command uses."""
    _, _, inputs, _ = setup
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    model_fn, scheduler_state = pipe.core.model_fn, dict(vars(pipe.core.scheduler))
    module = LoraTrainingModule(pipe, rank=4, alpha=4.0, targets=["q"], gradient_checkpointing=False)
    module(dict(inputs)).backward()
    assert pipe.core.model_fn is model_fn
    assert vars(pipe.core.scheduler).keys() == scheduler_state.keys()
    assert all(vars(pipe.core.scheduler)[k] is v for k, v in scheduler_state.items())


def test_validation_loss_is_the_unweighted_objective_on_its_grid(setup):
    """By hand: x_t = (1 - sigma) x0 + sigma eps at the grid's timesteps, MSE of the velocity."""
    pipe, _, inputs, item = setup
    schedule = training_schedule()
    generator = torch.Generator().manual_seed(0)
    x0 = inputs["input_latents"].float()
    conditioning = {k: v for k, v in inputs.items() if k != "input_latents"}
    losses = []
    for sigma in VALIDATION_SIGMAS:
        index = torch.argmin((schedule.sigmas - sigma).abs())
        exact, timestep = schedule.sigmas[index], schedule.timesteps[index].reshape(1)
        assert abs(exact - sigma) < 2e-3  # the grid point the schedule has nearest to sigma
        noise = torch.randn(x0.shape, generator=generator)
        with torch.no_grad():
            pred = chronoedit_model_fn(pipe.dit, (1 - exact) * x0 + exact * noise, timestep,
                                       skip_len=pipe.components.temporal_skip_len, **conditioning)
        losses.append(torch.mean((pred - (noise - x0)) ** 2).item())
    expected = sum(losses) / len(losses)
    assert abs(validation_loss(pipe, [item]) - expected) <= TOLERANCE * expected
