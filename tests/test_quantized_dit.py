"""A GGUF or ComfyUI scaled-fp8 DiT kept quantized: diffusers' torch dequantizers equal the gguf
package's reference, adapters train on it with the gradients of the dequantized weights, and the
DiT holds the quantized bytes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.models.dit import inspect_dit, load_dit
from chronoedit_lora.models.fp8 import Fp8Linear
from chronoedit_lora.models.quantized import GGUF_TYPES, GGUFLinear, dequantize_gguf, quantized_bytes
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.tiny import scale_to_fp8
from chronoedit_lora.train.loop.config import DEFAULT_TARGETS
from chronoedit_lora.train.loop.trainer import train
from chronoedit_lora.train.objective.adapter_config import peft_config
from chronoedit_lora.train.objective.lora_module import LoraTrainingModule

from .gguf_files import Q, write_gguf
from .test_fp8 import _train_inputs
from .test_train import make_subset, tiny_config

# The quantized layer computes x @ W.T + b with the very weights the reference holds (float32), so
# only the matmul's kernel may differ from F.linear's. Measured on this CPU: the loss and every
# gradient equal exactly (difference 0) on all three bases; the bounds allow another BLAS's order.
LOSS_RTOL = 1e-6
GRAD_ATOL_OF_MAX = 1e-5


@pytest.fixture(scope="module")
def quantized_files(tiny_wan, tmp_path_factory):
    """The tiny Wan DiT as GGUF Q8_0, GGUF Q4_0 (blocks' 2-D weights quantized, the rest float32, as
    community Wan GGUFs) and ComfyUI scaled fp8 (blocks' weights e4m3fn with a scale_weight)."""
    folder = tmp_path_factory.mktemp("quantized")
    state = load_file(str(tiny_wan / "chronoedit_tiny_bf16.safetensors"))
    heads = {"num_attention_heads": "4"}
    in_blocks = lambda key: key.startswith("blocks.")  # noqa: E731
    files = {name: write_gguf(folder / f"dit_{name}.gguf", state, qtype, heads, in_blocks)
             for name, qtype in (("Q8_0", Q.Q8_0), ("Q4_0", Q.Q4_0))}
    files["fp8_scaled"] = folder / "dit_fp8_e4m3fn_scaled.safetensors"
    save_file(scale_to_fp8(state, in_blocks), str(files["fp8_scaled"]), metadata=heads)
    return files


@pytest.mark.parametrize("qtype", sorted(GGUF_TYPES, key=lambda t: t.name), ids=lambda t: t.name)
def test_gguf_torch_dequantization_equals_the_gguf_reference_exactly(qtype):
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 512  # two 256-weight super-blocks per row
    raw = np.random.default_rng(int(qtype)).integers(0, 256, size=(rows, cols // block * type_size), dtype=np.uint8)
    reference = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype))).reshape(rows, cols)
    ours = dequantize_gguf(torch.from_numpy(raw), qtype, (rows, cols), torch.float32)
    # random bytes make some fp16 scales NaN or huge: those must come out the same too
    torch.testing.assert_close(ours, reference, rtol=0, atol=0, equal_nan=True)


def _quantized_and_reference(tiny_wan, path):
    """A pipeline on the quantized file (kept quantized), and one whose DiT holds the same weights
    dequantized by the readers (the gguf package's reference, ComfyUI's weight * scale)."""
    quantized = ChronoEditPipeline.from_pretrained(tiny_wan, dit=path, dtype=torch.float32, encoders=False)
    reference = ChronoEditPipeline.from_pretrained(tiny_wan, dtype=torch.float32, encoders=False)
    reference.dit.load_state_dict(load_dit(inspect_dit(path), torch.float32)[0].state_dict())
    return quantized, reference


def _first_step(pipe: ChronoEditPipeline) -> tuple[LoraTrainingModule, torch.Tensor, dict[str, torch.Tensor]]:
    """A rank-4 LoRA on ``pipe`` with fixed nonzero weights: its module, first loss and gradients
    (checked to reach the adapter only)."""
    torch.manual_seed(0)
    module = LoraTrainingModule(pipe, rank=4, alpha=4.0, targets=DEFAULT_TARGETS, gradient_checkpointing=True)
    with torch.no_grad():
        for param in module.lora_parameters():
            param.normal_(std=0.05, generator=torch.Generator().manual_seed(param.numel()))
    torch.manual_seed(1)
    loss = module(_train_inputs())
    loss.backward()
    adapter = {id(p) for p in module.lora_parameters()}
    assert all(p.grad is None for p in module.dit.parameters() if id(p) not in adapter)  # the adapter only
    return module, loss.detach(), {n: p.grad for n, p in module.named_trained().items()}


@pytest.mark.parametrize("base", ["Q8_0", "Q4_0", "fp8_scaled"])
def test_lora_first_step_matches_the_dequantized_weights(tiny_wan, quantized_files, base):
    quantized, reference = _quantized_and_reference(tiny_wan, quantized_files[base])
    layer = GGUFLinear if base.startswith("Q") else Fp8Linear
    kept = [m for m in quantized.dit.blocks.modules() if isinstance(m, layer)]
    assert len(kept) == 2 * 12  # every linear of both blocks: 4 self-attention, 6 cross-attention (k_img, v_img), 2 FFN
    # the DiT holds the quantized bytes: measured from its tensors, against each layer's own count
    if base.startswith("Q"):
        qtype = Q[base]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        expected = sum(m.out_features * m.in_features // block * type_size for m in kept)
    else:  # one float8 byte per weight and the float32 scale
        expected = sum(m.out_features * m.in_features + 4 for m in kept)
    assert quantized_bytes(quantized.dit) == expected
    held = sum(p.numel() * p.element_size() for p in quantized.dit.parameters())
    dequantized = sum(p.numel() * p.element_size() for p in reference.dit.parameters())
    linears = sum(m.out_features * m.in_features for m in kept) * 4
    assert held == dequantized - linears + expected
    print(f"{base}: block linears {expected} B kept vs {linears} B float32")

    (_, loss, grads), (_, ref_loss, ref_grads) = (_first_step(pipe) for pipe in (quantized, reference))
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=0)
    worst = max((grads[k] - ref_grads[k]).abs().max().item() / ref_grads[k].abs().max().item() for k in grads)
    print(f"{base}: loss {loss.item():.6f} vs {ref_loss.item():.6f}; largest gradient difference {worst:.2e} of the max")
    assert worst <= GRAD_ATOL_OF_MAX and all(g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("adapter", ["dora", "loha", "lokr"])
def test_other_adapters_train_on_a_q4_base(tiny_wan, quantized_files, adapter):
    pipe = ChronoEditPipeline.from_pretrained(tiny_wan, dit=quantized_files["Q4_0"], dtype=torch.float32, encoders=False)
    config = tiny_config(tiny_wan, "unused.csv", "unused", adapter=adapter, rank=4, alpha=4)
    module = LoraTrainingModule(pipe, 4, 4.0, DEFAULT_TARGETS, gradient_checkpointing=True, adapter=peft_config(config))
    torch.manual_seed(1)
    module(_train_inputs()).backward()
    trained = module.lora_parameters()
    assert trained and any(p.grad is not None and p.grad.abs().max() > 0 for p in trained)
    assert all(p.grad is None for p in module.dit.parameters() if id(p) not in {id(t) for t in trained})


def test_training_on_a_gguf_base_and_full_finetune_refused(tiny_wan, quantized_files, tmp_path):
    dataset = make_subset(tmp_path / "pairs", 2)
    result = train(tiny_config(tiny_wan, dataset, tmp_path / "run", dit=str(quantized_files["Q8_0"]), max_steps=2,
                               gradient_checkpointing=True, block_swap=True))
    assert result.steps == 2 and result.lora.is_file()
    from chronoedit_lora.train.state.export import export_run

    exported = export_run(tmp_path / "run", "comfyui", tmp_path / "baked.safetensors", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(exported)).values()} == {torch.bfloat16}  # a plain model, LoRA baked in
    assert load_dit(inspect_dit(exported), torch.bfloat16)[0] is not None
    with pytest.raises(ChronoEditError, match=r'finetune = "full" .*dit_Q4_0\.gguf.*GGUF'):
        train(tiny_config(tiny_wan, dataset, tmp_path / "full", dit=str(quantized_files["Q4_0"]), finetune="full",
                          max_steps=1))
    assert not (tmp_path / "full").exists() or not any((tmp_path / "full").glob("checkpoints/*"))


def test_merge_onto_a_quantized_base_writes_a_plain_bf16_model(quantized_files, random_lora, tmp_path, capsys):
    from chronoedit_lora.lora import save_lora
    from chronoedit_lora.lora.merge import lora_update, merge_model

    save_lora(random_lora, tmp_path / "lora.safetensors")
    folder, written = merge_model(None, quantized_files["Q4_0"], [(tmp_path / "lora.safetensors", 1.0)], tmp_path / "out")
    assert [p.name for p in written] == ["dit_Q4_0.safetensors"]
    assert "is quantized (gguf): the merged DiT is written dequantized in bfloat16" in capsys.readouterr().err
    merged = load_file(str(written[0]))
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    dequantized = {k: v.to(torch.bfloat16) for k, v in load_dit(inspect_dit(quantized_files["Q4_0"]), torch.float32)[0]
                   .state_dict().items()}
    expected = lora_update([(random_lora, 1.0)])(dequantized)
    assert expected.keys() == {f"{module}.weight" for module in random_lora}
    for key, value in merged.items():
        torch.testing.assert_close(value, expected.get(key, dequantized[key]).to(torch.bfloat16), rtol=0, atol=0)
    assert load_dit(inspect_dit(written[0]), torch.bfloat16)[0] is not None  # a plain model the kit loads


def test_edit_with_a_lora_on_a_gguf_base_equals_the_dequantized_edit(tiny_wan, quantized_files, random_lora,
                                                                     input_image, tmp_path):
    from chronoedit_lora.lora import save_lora

    save_lora(random_lora, tmp_path / "lora.safetensors")
    edit = dict(prompt="Make it a pencil sketch.", steps=2, height=32, width=32, seed=1, progress=False)
    quantized = ChronoEditPipeline.from_pretrained(tiny_wan, dit=quantized_files["Q8_0"], dtype=torch.float32,
                                                   offload="blocks")
    reference = ChronoEditPipeline.from_pretrained(tiny_wan, dtype=torch.float32)
    reference.dit.load_state_dict(load_dit(inspect_dit(quantized_files["Q8_0"]), torch.float32)[0].state_dict())
    with pytest.raises(ChronoEditError, match="quantized"):
        quantized.load_lora(tmp_path / "lora.safetensors", 0.5)  # a fused LoRA would be rounded away
    quantized.load_lora(tmp_path / "lora.safetensors", 0.5, fuse=False)
    reference.load_lora(tmp_path / "lora.safetensors", 0.5, fuse=False)
    assert torch.equal(quantized(input_image, **edit).video, reference(input_image, **edit).video)


def _decoded_reference(tiny_wan, quantized: ChronoEditPipeline) -> ChronoEditPipeline:
    """A plain float32 pipeline whose DiT holds ``quantized``'s weights, the quantized layers decoded."""
    reference = ChronoEditPipeline.from_pretrained(tiny_wan, dtype=torch.float32, encoders=False)
    plain = dict(reference.dit.named_modules())
    with torch.no_grad():
        for name, parameter in quantized.dit.named_parameters():  # the unquantized rest (norms, biases, head)
            if name in dict(reference.dit.named_parameters()):
                reference.dit.get_parameter(name).copy_(parameter)
        for name, layer in quantized.dit.named_modules():
            if isinstance(layer, (Fp8Linear, GGUFLinear)):
                plain[name].weight.copy_(layer.weight)
    return reference


# The base LoRA on a quantized base runs as hooks, x @ W.T + s B (A x), and fused into the decoded
# weights as x @ (W + s B A).T: the same numbers in another float32 order. Measured on this CPU: the
# losses equal to 9 digits, gradients within 1.4e-6 (Q8_0) and 1.2e-6 (fp8) of their largest value.
BASE_LORA_LOSS_RTOL = 1e-6
BASE_LORA_GRAD_ATOL_OF_MAX = 1e-5


@pytest.mark.parametrize("base", ["Q8_0", "fp8_base"])
def test_a_base_lora_on_a_quantized_base_trains_as_if_merged_into_its_decoded_weights(tiny_wan, quantized_files,
                                                                                   distill_like, base):
    """base_loras on a quantized base (the trainer's hooks, as ``fuse=not is_quantized``) give the loss
    and adapter gradients of the decoded weights with the base LoRA merged in."""
    from chronoedit_lora.models.quantized import is_quantized

    if base == "fp8_base":
        quantized = ChronoEditPipeline.from_pretrained(tiny_wan, dtype=torch.float32, encoders=False, fp8_base=True)
    else:
        quantized = ChronoEditPipeline.from_pretrained(tiny_wan, dit=quantized_files[base], dtype=torch.float32,
                                                       encoders=False)
    reference = _decoded_reference(tiny_wan, quantized)
    hooks = quantized.load_lora(distill_like, 0.7, fuse=not is_quantized(quantized.dit))
    assert hooks is not None and reference.load_lora(distill_like, 0.7) is None  # hooks there, merged here
    (module, loss, grads), (_, ref_loss, ref_grads) = (_first_step(pipe) for pipe in (quantized, reference))
    worst = max((grads[k] - ref_grads[k]).abs().max().item() / ref_grads[k].abs().max().item() for k in grads)
    hooks.remove()
    torch.manual_seed(1)
    without = module(_train_inputs()).detach()  # the same quantized base without the base LoRA
    print(f"{base}: loss {loss.item():.8f} vs merged {ref_loss.item():.8f} (without the base LoRA {without.item():.6f});"
          f" largest gradient difference {worst:.2e} of the max")
    torch.testing.assert_close(loss, ref_loss, rtol=BASE_LORA_LOSS_RTOL, atol=0)
    assert worst <= BASE_LORA_GRAD_ATOL_OF_MAX and all(g.abs().max() > 0 for g in grads.values())
    assert abs(without - loss).item() > 1e-3 * loss.item()  # the base LoRA does change what is trained


def test_samples_and_eval_on_a_gguf_base_with_a_base_lora(tiny_wan, quantized_files, distill_like, tmp_path):
    """Training on a Q8_0 base with base_loras (hooks): the distill-preset samples equal `edit` on that
    GGUF with the base LoRA and the step-1 LoRA stacked, and eval_every scores the edits."""
    import csv

    from .test_base_loras import SAMPLE_MAX, SAMPLE_MEAN, sample_against_edit

    pairs, run = make_subset(tmp_path / "pairs", 2), tmp_path / "run"
    gguf_file = str(quantized_files["Q8_0"])
    train(tiny_config(tiny_wan, pairs, run, dit=gguf_file, max_steps=1, save_every=1, sample_every=1, sample_count=1,
                      sample_preset="distill", base_loras=f"{distill_like}:0.7", eval_every=1, eval_dataset=pairs,
                      eval_count=1, eval_steps=2))
    _, difference = sample_against_edit(run, ["--model", str(tiny_wan), "--dit", gguf_file], [f"{distill_like}:0.7"],
                                        pairs, tmp_path)
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    print(f"GGUF + base LoRA: sample vs edit max {difference.max().item()}, mean {difference.mean().item():.3f}; "
          f"eval psnr {rows[-1]['eval/psnr']}")
    assert difference.max().item() <= SAMPLE_MAX and difference.mean().item() <= SAMPLE_MEAN
    assert float(rows[-1]["eval/psnr"]) > 0 and float(rows[-1]["val_loss"]) > 0
