"""The weight formats people download today (issue 31): ComfyUI's models/ layout in fp16 and scaled
fp8, GGUF DiTs (Q8_0, Q4_0, Q4_K), foreign files named in one line, and `model check`."""

from __future__ import annotations

import json
import gguf
import numpy as np
import pytest
import torch
from tests.gguf_files import Q, quantize_q4_k, write_gguf
from safetensors.torch import load_file, save_file

from chronoedit_lora.errors import CheckpointError
from chronoedit_lora.models.components import discover_components
from chronoedit_lora.models.dit import inspect_dit
from chronoedit_lora.models.gguf import read_gguf
from chronoedit_lora.models.identify import identify
from chronoedit_lora.models.loading import read_state_dict
from chronoedit_lora.models.scaled_fp8 import detect_scheme, dequantize_state_dict
from chronoedit_lora.pipeline import ChronoEditPipeline
from chronoedit_lora.tiny import write_tiny_checkpoint

PROMPT = "Add sunglasses to the cat's face."
EDIT = dict(steps=2, cfg=2.0, seed=0, height=32, width=32, progress=False, scheduler="euler")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The tiny model (seed 0, as tiny_diffusers) in ComfyUI's layout, fp16 and scaled fp8."""
    root = tmp_path_factory.mktemp("comfy")
    return {p: write_tiny_checkpoint(root / p, "comfyui", precision=p) for p in ("fp16", "fp8_scaled")}


@pytest.fixture(scope="module")
def reference_edit(tiny_diffusers, input_image):
    return ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)(input_image, PROMPT, **EDIT).video


def _edit(input_image, model=None, **overrides):
    return ChronoEditPipeline.from_pretrained(model, dtype=torch.float32, **overrides)(input_image, PROMPT, **EDIT).video


def test_comfyui_layout_found_by_keys(comfy):
    for precision, root in comfy.items():
        for where in (root, root / "models"):
            paths = discover_components(where)
            assert paths.dit.parent.name == "diffusion_models" and paths.vae.name == "wan_2.1_vae.safetensors"
            assert paths.text_encoder.parent.name == "text_encoders" and paths.tokenizer == paths.text_encoder
            assert paths.image_encoder.name == "clip_vision_h.safetensors" and paths.choices == ()
    scaled = load_file(str(discover_components(comfy["fp8_scaled"]).dit))
    # ComfyUI's legacy scaled fp8: the marker, fp8 weights, a float32 scale_weight per quantized layer
    assert scaled["scaled_fp8"].dtype == torch.float8_e4m3fn
    assert scaled["blocks.0.self_attn.q.weight"].dtype == torch.float8_e4m3fn
    assert scaled["blocks.0.self_attn.q.scale_weight"].dtype == torch.float32
    clip = load_file(str(discover_components(comfy["fp16"]).image_encoder))
    assert "visual_projection.weight" in clip and "vision_model.encoder.layers.0.self_attn.q_proj.weight" in clip


def test_embedded_tokenizer_matches_the_tokenizer_folder(comfy, tiny_diffusers):
    from chronoedit_lora.models.text_encoder import load_tokenizer

    ours = load_tokenizer(discover_components(comfy["fp16"]).tokenizer)
    folder = load_tokenizer(tiny_diffusers / "tokenizer")
    for text in (PROMPT, "Turn the photo into a watercolor painting with soft edges!", "zzz unknown ¿"):
        ids, mask = ours(text, return_mask=True, add_special_tokens=True)
        ref_ids, ref_mask = folder(text, return_mask=True, add_special_tokens=True)
        assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask) and ids.shape == (1, 512)


# Bounds on max |edit - diffusers edit| (video in [-1, 1], float32 compute, 2 steps), each from the
# format's own rounding: fp16 holds the tiny model's bf16 weights exactly (measured 2e-6: float32
# noise); scaled e4m3fn rounds each weight to 3 mantissa bits, relative error up to 2^-4 (measured
# 0.019); Q8_0 rounds to 1/254 of each 32-block's range (measured 0.0066), Q4_0 to 1/14 (0.11), Q4_K to
# about 1/30 (0.055). Each bound is 2.5-5x the measured value.
EDIT_BOUNDS = {"fp16": 1e-5, "fp8_scaled": 0.05, "Q8_0": 0.02, "Q4_0": 0.3, "Q4_K": 0.15}


@pytest.mark.parametrize("precision", ["fp16", "fp8_scaled"])
def test_comfyui_edit_matches_diffusers(comfy, reference_edit, input_image, precision, capsys):
    capsys.readouterr()
    video = _edit(input_image, comfy[precision])
    said = capsys.readouterr().err  # the one line every model-loading command prints
    dit = "chrono_edit_tiny_fp16.safetensors (safetensors, float16)" if precision == "fp16" else \
        "chrono_edit_tiny_fp8_e4m3fn_scaled.safetensors (ComfyUI scaled fp8 (e4m3fn, scaled_fp8 marker)"
    assert said.startswith(f"model: dit: {dit}") and "tokenizer: its embedded spiece_model" in said
    error = (video - reference_edit).abs().max().item()
    print(f"{precision}: max |edit - diffusers edit| = {error:.3g}")
    assert error <= EDIT_BOUNDS[precision]
    if precision == "fp8_scaled":
        assert error > 0  # the scales really were applied to fp8 values, not skipped


def test_scaled_fp8_forms_comfyui_accepts(tmp_path):
    """Marker under a prefix, float32 marker (= e4m3fn), per-row scales, scale_input, the current
    comfy_quant tensors and the _quantization_metadata header all decode to weight.float() * scale."""
    w = torch.randn(8, 16)
    row = w.abs().amax(dim=1, keepdim=True) / 448
    bits = (w / row).to(torch.float8_e4m3fn)
    expected = bits.float() * row
    forms = {
        "marker": ({"model.diffusion_model.scaled_fp8": torch.empty(2, dtype=torch.float32),
                    "model.diffusion_model.l.weight": bits, "model.diffusion_model.l.scale_weight": row,
                    "model.diffusion_model.l.scale_input": torch.tensor(0.5)}, {}),
        "comfy_quant": ({"l.weight": bits.view(torch.uint8), "l.weight_scale": row,
                         "l.comfy_quant": torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)}, {}),
        "header": ({"l.weight": bits, "l.weight_scale": row},
                   {"_quantization_metadata": json.dumps({"layers": {"l": {"format": "float8_e4m3fn"}}})}),
    }
    for name, (state, metadata) in forms.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata=metadata or None)
        weights = read_state_dict([path], torch.float32)
        key = next(k for k in weights if k.endswith("l.weight"))
        assert list(weights) == [key] and torch.equal(weights[key], expected), name
    scheme = detect_scheme({"scaled_fp8": torch.float32}, {})
    assert scheme.marker_dtype == torch.float8_e4m3fn
    with pytest.raises(CheckpointError, match="nvfp4"):
        dequantize_state_dict({"l.weight": torch.zeros(4, 8, dtype=torch.uint8), "l.comfy_quant": torch.tensor(
            list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}, detect_scheme({"l.comfy_quant": torch.uint8}, {}))
    with pytest.raises(CheckpointError, match="does not apply to a weight"):
        dequantize_state_dict({"l.weight": bits, "l.scale_weight": torch.ones(3), "scaled_fp8": torch.empty(0)},
                              detect_scheme({"scaled_fp8": torch.float8_e4m3fn}, {}))


def test_q4_k_blocks_decode_within_rounding():
    values = np.random.RandomState(0).randn(4, 512).astype(np.float32)
    decoded = gguf.quants.dequantize(quantize_q4_k(values), Q.Q4_K)
    step = (values.reshape(-1, 32).max(1) - np.minimum(values.reshape(-1, 32).min(1), 0)) / 15
    # half a 4-bit step per 32-weight sub-block, plus the 6-bit quantization of its scale and min (<= 1/63 each)
    assert np.all(np.abs(decoded - values).reshape(-1, 32).max(1) <= 0.5 * step + 2 * np.abs(values).max() / 63)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_K])
def test_gguf_dit(comfy, tmp_path, input_image, reference_edit, qtype):
    root = comfy["fp16"]
    dit = discover_components(root).dit
    path = write_gguf(tmp_path / f"chrono_edit_tiny_{qtype.name}.gguf", load_file(str(dit)), qtype,
                      {"num_attention_heads": "4"})
    tensors, metadata = read_gguf(path)
    assert any(t.qtype == qtype for t in tensors.values())
    # the 5-D patch embedding is stored flattened, its shape restored from ComfyUI-GGUF's metadata
    assert list(metadata["comfy.gguf.orig_shape.patch_embedding.weight"]) == [192, 36, 1, 2, 2]
    assert tensors["patch_embedding.weight"].shape == (192, 36, 1, 2, 2)
    # dequantized weights are exactly the gguf package's reference dequantization, in torch order
    ours = read_state_dict([path], torch.float32)
    for name, t in tensors.items():
        reference = np.array(gguf.quants.dequantize(t.data, t.qtype)).reshape(t.shape)
        assert torch.equal(ours[name], torch.from_numpy(reference))
    # --model finds it in ComfyUI's unet/ folder beside the other files, by its keys
    models = tmp_path / "models"
    for folder in ("text_encoders", "clip_vision", "vae"):
        (models / folder).mkdir(parents=True)
        for f in (root / "models" / folder).iterdir():
            (models / folder / f.name).symlink_to(f)
    (models / "unet").mkdir()
    (models / "unet" / "ChronoEdit-14B-tiny.gguf").symlink_to(path)
    assert discover_components(models).dit == models / "unet" / "ChronoEdit-14B-tiny.gguf"
    # --dit picks the GGUF; its edit equals the edit from those dequantized weights as a plain file
    plain = tmp_path / "dequantized.safetensors"
    save_file({k: v.contiguous() for k, v in ours.items()}, str(plain), metadata={"num_attention_heads": "4"})
    video = _edit(input_image, root, dit=path)
    error = (video - _edit(input_image, root, dit=plain)).abs().max().item()
    rounding = (video - reference_edit).abs().max().item()
    print(f"{qtype.name}: max |GGUF edit - dequantized-weights edit| = {error:.3g}, - diffusers edit = {rounding:.3g}")
    assert error <= 1e-6 and 0 < rounding <= EDIT_BOUNDS[qtype.name]


def test_foreign_files_named_in_one_line(comfy, tmp_path):
    dit = load_file(str(discover_components(comfy["fp16"]).dit))
    t2v = {k: v for k, v in dit.items() if "img" not in k}
    t2v["patch_embedding.weight"] = t2v["patch_embedding.weight"][:, :16].contiguous()
    files = {
        "t2v.safetensors": (t2v, "a Wan2.1 T2V DiT: no image cross-attention"),
        "lora.safetensors": ({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 192)}, "a LoRA file"),
        "vae.safetensors": (load_file(str(discover_components(comfy["fp16"]).vae)), "a Wan2.1 VAE"),
    }
    for name, (state, said) in files.items():
        save_file(state, str(tmp_path / name))
        assert said in identify(tmp_path / name).looks_like
    (tmp_path / "notes.safetensors").write_bytes(b"not weights at all")
    assert identify(tmp_path / "notes.safetensors").looks_like.startswith("not a weights file")
    good = write_gguf(tmp_path / "whole.gguf", {"blocks.0.ffn.0.weight": torch.randn(8, 32)}, Q.Q8_0)
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert identify(tmp_path / "cut.gguf").looks_like.startswith("not a weights file")
    with pytest.raises(CheckpointError, match="damaged or truncated GGUF file") as raised:
        inspect_dit(tmp_path / "cut.gguf")
    assert "\n" not in str(raised.value)
    for name, said in (("t2v.safetensors", "T2V DiT"), ("lora.safetensors", "LoRA file"), ("vae.safetensors", "VAE")):
        with pytest.raises(CheckpointError, match=said) as raised:
            inspect_dit(tmp_path / name)
        assert "\n" not in str(raised.value)


def test_model_check(comfy, tmp_path, capsys):
    from chronoedit_lora.cli import main

    def run(*args):
        capsys.readouterr()
        code = main(["model", "check", *map(str, args)])
        return code, capsys.readouterr()

    code, out = run(comfy["fp8_scaled"])
    assert code == 0, out.err
    assert "ComfyUI scaled fp8 (e4m3fn, scaled_fp8 marker)" in out.out and "spiece_model" in out.out
    assert f"load it with: --model {comfy['fp8_scaled']}" in out.out
    loose = tmp_path / "loose"
    loose.mkdir()
    for f in (comfy["fp16"] / "models").rglob("*.safetensors"):
        if "vae" not in f.parts[-2]:
            (loose / f.name).symlink_to(f)
    save_file({"blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 8)}, str(loose / "style.safetensors"))
    code, out = run(loose)
    assert code == 1 and "vae            MISSING" in out.out and "--vae PATH" in out.out
    assert f"not used: {loose / 'style.safetensors'}: a LoRA file" in out.out
    code, out = run(loose, "--vae", discover_components(comfy["fp16"]).vae)
    assert code == 0 and f"load it with: --model {loose} --vae " in out.out

# Largest relative error per weight tensor (|w - reference| / max|reference|) of each storage form: the
# dtype's own rounding of the tiny model's bf16 weights (fp32, bf16, fp16 hold them exactly; e4m3fn keeps
# 3 mantissa bits, e5m2 2: at most 2^-4 and 2^-3 of the value).
DIT_FORMS = {"float32": 0.0, "bfloat16": 0.0, "float16": 1e-3, "e4m3fn": 2 ** -4, "e5m2": 2 ** -3,
             "e4m3fn scaled": 2 ** -4, "e5m2 scaled": 2 ** -3}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
@pytest.mark.parametrize("form", list(DIT_FORMS))
def test_dit_storage_forms(comfy, tmp_path, prefix, form):
    from chronoedit_lora.models.dit import load_dit

    source = load_file(str(discover_components(comfy["fp16"]).dit))
    reference = {k: v.float() for k, v in source.items()}
    fp8 = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}.get(form.split()[0])
    state = {}
    for key, value in reference.items():
        if fp8 is not None and key.startswith("blocks.") and value.ndim == 2:
            scale = value.abs().amax() / torch.finfo(fp8).max if form.endswith("scaled") else torch.tensor(1.0)
            state[prefix + key] = (value / scale).to(fp8)
            if form.endswith("scaled"):
                state[prefix + key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            state[prefix + key] = value.to(getattr(torch, form) if fp8 is None else torch.bfloat16)
    if form.endswith("scaled"):
        state[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)
    keys = sorted(state)  # two shards and their index, as big files come
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        save_file({k: state[k] for k in part}, str(tmp_path / f"dit-{i:05d}-of-00002.safetensors"),
                  metadata={"num_attention_heads": "4"})
    (tmp_path / "dit.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f"dit-{1 + (k in keys[len(keys) // 2:]):05d}-of-00002.safetensors" for k in keys}}))
    dit, checkpoint = load_dit(tmp_path, dtype=torch.float32)
    assert checkpoint.key_prefix == prefix and checkpoint.kwargs["num_heads"] == 4
    loaded = dit.state_dict()
    for key, value in reference.items():
        error = (loaded[key] - value).abs().max() / value.abs().max().clamp(min=1e-12)
        assert error <= DIT_FORMS[form], (key, error.item())


def test_several_candidates_say_which_was_chosen(comfy, tmp_path):
    models = tmp_path / "models"
    for folder in ("diffusion_models", "text_encoders", "clip_vision", "vae"):
        (models / folder).mkdir(parents=True)
        for f in (comfy["fp16"] / "models" / folder).iterdir():
            (models / folder / f.name).symlink_to(f)
    (models / "text_encoders" / "umt5_fp8.safetensors").symlink_to(discover_components(comfy["fp8_scaled"]).text_encoder)
    paths = discover_components(tmp_path)
    assert paths.text_encoder.name == "umt5_xxl_tiny_fp16.safetensors"
    assert paths.choices == ("text_encoder: chose umt5_xxl_tiny_fp16.safetensors (float16: the most precise) over "
                             "umt5_fp8.safetensors (float8_e4m3fn 86%, float16 14%); pass --text-encoder to pick another",)
    assert discover_components(tmp_path, text_encoder=models / "text_encoders" / "umt5_fp8.safetensors").choices == ()
    # a more precise Wan2.1-I2V DiT beside ChronoEdit's: same keys, so the name decides, and says so
    dit = load_file(str(paths.dit))
    save_file({k: v.float() for k, v in dit.items()}, str(models / "diffusion_models" / "wan2.1_i2v_720p_fp32.safetensors"))
    paths = discover_components(tmp_path, text_encoder=paths.text_encoder)
    assert paths.dit.name == "chrono_edit_tiny_fp16.safetensors"
    assert paths.choices == ("dit: chose chrono_edit_tiny_fp16.safetensors (float16: its name says ChronoEdit; Wan2.1-I2V "
                             "DiTs have the same keys) over wan2.1_i2v_720p_fp32.safetensors (float32); pass --dit to "
                             "pick another",)


def test_train_on_comfyui_files(comfy, tiny_diffusers, tmp_path):
    """The tutorial's route: a LoRA trains from ComfyUI's fp16 files as from the diffusers folder
    (fp16 holds the tiny model's bf16 weights exactly: the same losses to float32 rounding)."""
    from chronoedit_lora.train.loop.trainer import train
    from tests.test_train import make_subset, tiny_config

    dataset = make_subset(tmp_path / "two", 2)
    losses = [train(tiny_config(model, dataset, tmp_path / name, max_steps=2, save_every=1000)).final_loss
              for name, model in (("comfy", comfy["fp16"]), ("diffusers", tiny_diffusers))]
    print(f"final loss: ComfyUI files {losses[0]:.8f}, diffusers folder {losses[1]:.8f}")
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
