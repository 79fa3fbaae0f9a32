"""fp8 base weights: half the bytes of bf16 for the DiT blocks' linear weights, exact maths on the
dequantized weights, LoRA gradients intact (where DiffSynth's fp8 wrappers lose them)."""

from __future__ import annotations

import pytest
import torch

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.models.fp8 import FP8, Fp8Linear, dequantize, quantize_, store_blocks_in_fp8
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.train.objective.lora_module import LoraTrainingModule

from .test_train import make_subset, tiny_config

# float8 e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself; below
# the smallest normal (2^-6 of the scale) the step is an absolute 2^-9 of the scale.
FP8_RELATIVE_STEP = 2.0**-4
FP8_SUBNORMAL_STEP = 2.0**-9
# Same dequantized weights, same ops: only float32 summation order differs.
SAME_MATH_ATOL = 1e-5


def test_quantized_linear_rounds_within_float8_precision_and_matches_its_dequantized_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    with torch.no_grad():  # rows of very different magnitude: the per-row scale has to cope
        layer.weight.mul_(torch.logspace(-4, 0, 48).unsqueeze(1))
    original = layer.weight.detach().clone()
    x = torch.randn(5, 64, requires_grad=True)
    quantize_(layer)
    assert isinstance(layer, Fp8Linear) and layer.weight_bits.dtype == torch.uint8
    step = FP8_RELATIVE_STEP * original.abs() + FP8_SUBNORMAL_STEP * layer.weight_scale * 448
    assert torch.all((layer.weight - original).abs() <= step)
    assert (layer.weight - original).abs().max() > 0  # it really is rounded

    out = layer(x)
    out.square().sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.linear(reference_x, layer.weight.detach(), layer.bias)
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference, atol=SAME_MATH_ATOL, rtol=0)
    torch.testing.assert_close(x.grad, reference_x.grad, atol=SAME_MATH_ATOL, rtol=0)


def _pipelines(tiny_diffusers):
    """An fp8-base pipeline, and a plain one whose block linears hold the same dequantized weights."""
    fp8 = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, encoders=False, fp8_base=True)
    plain = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, encoders=False)
    modules = dict(fp8.dit.named_modules())
    with torch.no_grad():
        for name, module in plain.dit.blocks.named_modules():
            if type(module) is torch.nn.Linear:
                module.weight.copy_(modules[f"blocks.{name}"].weight)
    return fp8, plain


def _train_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_latents": torch.randn(1, 16, 2, 4, 4, generator=g), "y": torch.randn(1, 20, 2, 4, 4, generator=g),
            "clip_feature": torch.randn(1, 257, 1280, generator=g), "context": torch.randn(1, 512, 32, generator=g)}


def test_fp8_base_halves_block_weights_and_keeps_lora_gradients(tiny_diffusers):
    fp8, plain = _pipelines(tiny_diffusers)
    bytes_of = lambda model: sum(p.numel() * p.element_size() for p in model.parameters())  # noqa: E731
    linear_weights = sum(m.weight.numel() for m in plain.dit.blocks.modules() if type(m) is torch.nn.Linear)
    rows = sum(m.out_features for m in fp8.dit.blocks.modules() if isinstance(m, Fp8Linear))
    # float32 -> 1 byte per weight, plus one float32 scale per output row
    assert bytes_of(plain.dit) - bytes_of(fp8.dit) == linear_weights * 3 - rows * 4

    modules = []
    for pipe in (fp8, plain):
        torch.manual_seed(0)
        module = LoraTrainingModule(pipe, rank=4, alpha=4.0, targets=["q", "k", "v", "o", "ffn.0", "ffn.2"],
                                    gradient_checkpointing=False)
        with torch.no_grad():
            for param in module.lora_parameters():
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(param.numel()))
        torch.manual_seed(1)  # same timestep and noise in both
        module(_train_inputs()).backward()
        modules.append(module)
    grads = [[p.grad for p in m.lora_parameters()] for m in modules]
    assert len(grads[0]) == 2 * 2 * 10 and all(g is not None and g.abs().max() > 0 for g in grads[0])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=SAME_MATH_ATOL, rtol=1e-4)


def test_diffsynth_fp8_wrappers_lose_lora_gradients(tiny_diffusers):
    """Why fp8.py exists: DiffSynth's fp8 loading runs each block on a copy, so peft's LoRA
    parameters receive no gradient. If this starts failing, DiffSynth fixed it; use theirs."""
    from diffsynth.models.model_loader import ModelPool
    from peft import LoraConfig, inject_adapter_in_model

    from chronoedit_lora.models.dit import ensure_dit_entry
    from chronoedit_lora.models.dit import inspect_dit
    from chronoedit_lora.models.loading import read_state_dict
    from chronoedit_lora.models.rope import chronoedit_model_fn

    ckpt = inspect_dit(tiny_diffusers / "transformer")
    entry = ensure_dit_entry(ckpt.model_hash, ckpt.format, ckpt.key_prefix, ckpt.kwargs)
    fp8_config = {f"{stage}_{what}": FP8 if what == "dtype" else "cpu"
                  for stage in ("offload", "onload", "preparing") for what in ("dtype", "device")}
    fp8_config.update(computation_dtype=torch.bfloat16, computation_device="cpu")
    model = ModelPool().load_model_file(entry, [str(f) for f in ckpt.files], fp8_config,
                                        state_dict=read_state_dict(ckpt.files, FP8))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q", "k", "v", "o"]), model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for param in lora:
            param.data = param.data.float().normal_(std=0.05)
            param.requires_grad_(True)
    inputs = {k: v.to(torch.bfloat16) for k, v in _train_inputs().items()}
    out = chronoedit_model_fn(model, inputs["input_latents"], torch.tensor([500.0], dtype=torch.bfloat16),
                              context=inputs["context"], clip_feature=inputs["clip_feature"], y=inputs["y"])
    out.float().square().mean().backward()
    assert len(lora) == 2 * 8 * 2 and all(p.grad is None for p in lora)


def test_fp8_base_trains_and_edits_with_an_unfused_lora(tiny_diffusers, tmp_path, input_image):
    dataset = make_subset(tmp_path / "pairs", 2)
    result = train_config_run(tiny_diffusers, dataset, tmp_path / "run")
    pipe = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32, fp8_base=True)
    with pytest.raises(ChronoEditError, match="quantized \(fp8 or GGUF\) base weights"):
        pipe.load_lora(result, fuse=True)
    base = pipe(input_image, "Turn it into a pencil sketch.", steps=2, seed=0, height=32, width=32, progress=False)
    lora = pipe.load_lora(result, 1.0, fuse=False)
    edited = pipe(input_image, "Turn it into a pencil sketch.", steps=2, seed=0, height=32, width=32, progress=False)
    lora.remove()
    again = pipe(input_image, "Turn it into a pencil sketch.", steps=2, seed=0, height=32, width=32, progress=False)
    assert _mean_abs(base, edited) > 0.5 and _mean_abs(base, again) == 0


def train_config_run(model, dataset, output):
    from chronoedit_lora.train.loop.trainer import train

    config = tiny_config(model, dataset, output, fp8_base="true", max_steps=3, learning_rate="2e-2")
    result = train(config)
    assert result.steps == 3
    return result.lora


def _mean_abs(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a.image, dtype=np.float32) - np.asarray(b.image, dtype=np.float32)).mean())
