"""umT5 text encoder, CLIP image encoder and Wan VAE loaded into DiffSynth's classes from both
layouts (transformers/diffusers folders, Wan2.1 files) vs transformers/diffusers running the same
tiny random weights (fp32, CPU), the key conversion at the real 14B sizes (meta tensors), and the
errors for missing or wrong files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffsynth.models.wan_video_text_encoder import WanTextEncoder
from diffsynth.models.wan_video_vae import VideoVAE_
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from chronoedit_lora.errors import CheckpointError
from chronoedit_lora.models.loading import convert_shapes, hash_shapes
from chronoedit_lora.models.image_encoder import (
    CLIP_MEAN, CLIP_STD, VisionTowerImageEncoder, clip_vision_to_wan_image_encoder, load_image_encoder,
    wan_clip_to_image_encoder, wan_image_encoder_kwargs)
from chronoedit_lora.models.text_encoder import load_text_encoder, umt5_to_wan_text_encoder, wan_text_encoder_kwargs
from chronoedit_lora.models.vae import SizedWanVideoVAE, autoencoder_kl_wan_to_wan_vae, load_vae, wan_vae_kwargs

# fp32, same weights: only summation order (and SDPA vs eager attention) differs.
TEXT_ATOL = 1e-5  # measured 2.4e-6 (outputs up to 3.9)
CLIP_ATOL = 1e-4  # measured 0 (same SDPA kernels; outputs up to 62)
VAE_ATOL = 1e-5  # measured 2.4e-7 (encode), 5.2e-6 (decode)

# Tiny configs: CLIP keeps ChronoEdit's width 1280 and 257 tokens (16 x 16 patches + class token).
TINY_UMT5 = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_CLIP = dict(hidden_size=1280, intermediate_size=256, num_hidden_layers=2, num_attention_heads=16,
                 image_size=32, patch_size=2, hidden_act="gelu")
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])

# Released sizes (umT5-XXL, open-clip ViT-H/14, Wan2.1 VAE) and DiffSynth's hashes of the Wan files.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                image_size=224, patch_size=14, hidden_act="gelu")
WAN_T5_HASH = "9c8818c2cbea55eca56c7b447df170da"  # models_t5_umt5-xxl-enc-bf16.pth
WAN_VAE_HASH = "ccc42284ea13e1ad04693284c7a09be6"  # Wan2.1_VAE.pth


def test_the_wan_file_hashes_are_diffsynths():
    from diffsynth.configs.model_configs import MODEL_CONFIGS

    registered = {entry["model_hash"]: entry["model_name"] for entry in MODEL_CONFIGS}
    assert registered[WAN_T5_HASH] == "wan_video_text_encoder" and registered[WAN_VAE_HASH] == "wan_video_vae"


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """fp32 eval model whose every parameter is perturbed (norm scales are no longer all ones), so
    a weight loaded into the wrong place cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.float().eval()


def _shapes(state_dict: dict, prefix: str = "") -> dict[str, list[int]]:
    return {prefix + name: list(tensor.shape) for name, tensor in state_dict.items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _random_saved(tmp_path_factory, build, seed: int, name: str):
    """A randomised reference model (built by ``build``) and the folder it was saved to."""
    torch.manual_seed(seed)
    model = _randomised(build(), seed=seed)
    folder = tmp_path_factory.mktemp(name) / name
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
    return _random_saved(tmp_path_factory, lambda: UMT5EncoderModel(UMT5Config(**TINY_UMT5)), 1, "text_encoder")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _random_saved(tmp_path_factory, lambda: CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)), 2, "image_encoder")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return _random_saved(tmp_path_factory, lambda: AutoencoderKLWan(**TINY_VAE), 3, "vae")


# ---- text encoder ---------------------------------------------------------------------------

def _token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64-token sequences, the second padded (id 0, mask 0) after 20 tokens; 64 > 8 exact
    relative-position buckets, so the log-spaced buckets are exercised too."""
    ids = torch.randint(3, TINY_UMT5["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, 20:], mask[1, 20:] = 0, 0
    return ids, mask


def test_text_encoder_matches_umt5(umt5):
    reference, folder = umt5
    ours = load_text_encoder(folder, dtype=torch.float32)
    assert type(ours) is WanTextEncoder and not ours.shared_pos
    ids, mask = _token_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert expected.abs().max() > 0.5
    assert _max_diff(expected, got) <= TEXT_ATOL  # padded positions included


def test_text_encoder_wan_pth_loads_the_same(umt5, tmp_path):
    ours = load_text_encoder(umt5[1], dtype=torch.float32)
    torch.save(ours.state_dict(), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    wan = load_text_encoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32)
    ids, mask = _token_batch()
    with torch.no_grad():
        assert torch.equal(ours(ids, mask), wan(ids, mask))


def test_umt5_xxl_keys_convert_to_wan_file_layout():
    with torch.device("meta"):
        umt5_xxl = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    wan_shapes = convert_shapes(umt5_to_wan_text_encoder, _shapes(umt5_xxl.state_dict()))
    assert hash_shapes(wan_shapes) == WAN_T5_HASH  # exactly the keys and shapes of Wan's .pth
    assert wan_text_encoder_kwargs(wan_shapes) == dict(
        vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24, num_buckets=32,
        shared_pos=False)  # WanTextEncoder's defaults, i.e. umT5-XXL


# ---- image encoder --------------------------------------------------------------------------

def _pixels() -> torch.Tensor:
    """Two already-preprocessed (CLIP-normalised) 32 x 32 images."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_image_encoder_matches_clip_penultimate_layer(clip):
    reference, folder = clip
    ours = load_image_encoder(folder, dtype=torch.float32)
    assert type(ours) is VisionTowerImageEncoder
    with torch.no_grad():
        expected = reference(pixel_values=_pixels(), output_hidden_states=True).hidden_states[-2]
        got = ours.model.visual(_pixels(), use_31_block=True)
    assert got.shape == (2, 257, 1280)
    assert expected.abs().max() > 1.0
    assert _max_diff(expected, got) <= CLIP_ATOL


def test_encode_image_normalises_a_minus_one_to_one_image(clip):
    """DiffSynth's ``encode_image`` (what its pipeline calls) on an image in [-1, 1] at the encoder's
    size = CLIP on the CLIP-normalised image."""
    reference, folder = clip
    ours = load_image_encoder(folder, dtype=torch.float32)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    normalised = ((image + 1) / 2 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference(pixel_values=normalised, output_hidden_states=True).hidden_states[-2]
        got = ours.encode_image([image.clone()])
    assert _max_diff(expected, got) <= CLIP_ATOL


def test_image_encoder_prefixed_keys_and_wan_pth_load_the_same(clip, tmp_path):
    """transformers 4 (the released files) saved ``vision_model.*`` keys, transformers 5 saves them
    bare; Wan's open-clip file also holds the text tower, pooling head and final norm (ignored)."""
    folder = clip[1]
    ours = load_image_encoder(folder, dtype=torch.float32)
    prefixed = tmp_path / "image_encoder"
    prefixed.mkdir()
    shutil.copy(folder / "config.json", prefixed / "config.json")
    save_file({f"vision_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()},
              prefixed / "model.safetensors")
    wan_file = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    generator = torch.Generator().manual_seed(7)
    torch.save({**{k.removeprefix("model."): v for k, v in ours.state_dict().items()},
                "visual.head": torch.randn(1280, 1024, generator=generator),
                "visual.post_norm.weight": torch.randn(1280, generator=generator),
                "textual.token_embedding.weight": torch.randn(10, 8, generator=generator),
                "log_scale": torch.tensor(4.6)}, wan_file)
    with torch.no_grad():
        expected = ours.model.visual(_pixels(), use_31_block=True)
        for source in (prefixed, wan_file):
            loaded = load_image_encoder(source, dtype=torch.float32)
            assert type(loaded) is VisionTowerImageEncoder
            assert torch.equal(loaded.model.visual(_pixels(), use_31_block=True), expected)


def test_vit_h_14_keys_convert_to_the_wan_file_layout():
    with torch.device("meta"):
        hf = CLIPVisionModel(CLIPVisionConfig(**VIT_H_14))
        wan = VisionTowerImageEncoder()  # the Wan file's visual.* keys, without head and post_norm
    converted = convert_shapes(clip_vision_to_wan_image_encoder, _shapes(hf.state_dict(), "vision_model."))
    assert converted == _shapes(wan.state_dict())
    expected = dict(image_size=224, patch_size=14, dim=1280, mlp_ratio=4.0, num_heads=16, num_layers=32)
    assert wan_image_encoder_kwargs(converted, num_heads=16) == expected
    wan_file = {k.removeprefix("model."): v for k, v in converted.items()}
    wan_file.update({"visual.head": [1280, 1024], "visual.post_norm.weight": [1280], "log_scale": [],
                     "textual.token_embedding.weight": [250002, 1024]})
    assert convert_shapes(wan_clip_to_image_encoder, wan_file) == converted
    assert wan_image_encoder_kwargs(converted) == expected  # no config (Wan's file): ViT-H/14's head width 80


# ---- VAE ------------------------------------------------------------------------------------

def _clip_5_frames() -> torch.Tensor:
    return torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(8)) * 2 - 1


def _stats(config) -> tuple[torch.Tensor, torch.Tensor]:
    """A VAE config's latent mean and std, shaped to broadcast over (batch, channel, t, h, w)."""
    return (torch.tensor(config["latents_mean"]).view(1, -1, 1, 1, 1),
            torch.tensor(config["latents_std"]).view(1, -1, 1, 1, 1))


def test_vae_matches_diffusers(vae):
    reference, folder = vae
    ours = load_vae(folder, dtype=torch.float32)
    assert type(ours) is SizedWanVideoVAE
    mean, std = _stats(reference.config)
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        raw = reference.encode(_clip_5_frames()).latent_dist.mode()
        encoded = ours.encode([_clip_5_frames()[0]], device="cpu")  # normalised: (mu - mean) / std
        expected_video = reference.decode(latents * std + mean).sample
        decoded = ours.decode(latents, device="cpu")
    assert encoded.shape == (1, 16, 2, 4, 4)
    assert _max_diff((raw - mean) / std, encoded) <= VAE_ATOL
    assert decoded.shape == (1, 3, 5, 32, 32)
    assert expected_video.std() > 0.05
    assert _max_diff(expected_video, decoded) <= VAE_ATOL


def test_vae_latent_stats_come_from_the_config(vae, tmp_path):
    reference, folder = vae
    custom = tmp_path / "vae"
    shutil.copytree(folder, custom)
    config = json.loads((custom / "config.json").read_text())
    generator = torch.Generator().manual_seed(10)
    config["latents_mean"] = torch.randn(16, generator=generator).tolist()
    config["latents_std"] = (torch.rand(16, generator=generator) + 0.5).tolist()
    (custom / "config.json").write_text(json.dumps(config))
    ours = load_vae(custom, dtype=torch.float32)
    mean, std = _stats(config)
    with torch.no_grad():
        raw = reference.encode(_clip_5_frames()).latent_dist.mode()
        encoded = ours.encode([_clip_5_frames()[0]], device="cpu")
    assert _max_diff((raw - mean) / std, encoded) <= VAE_ATOL


def test_vae_wan_pth_loads_the_same(vae, tmp_path):
    """Wan2.1_VAE.pth carries no statistics: Wan2.1's, which diffusers' default config also holds."""
    ours = load_vae(vae[1], dtype=torch.float32)
    torch.save(ours.model.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    wan = load_vae(tmp_path / "Wan2.1_VAE.pth", dtype=torch.float32)
    assert type(wan) is SizedWanVideoVAE
    with torch.no_grad():
        video = _clip_5_frames()[0]
        assert torch.equal(wan.encode([video], device="cpu"), ours.encode([video], device="cpu"))
        latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(11))
        assert torch.equal(wan.decode(latents, device="cpu"), ours.decode(latents, device="cpu"))


def test_wan21_vae_keys_convert_to_the_wan_file_layout():
    with torch.device("meta"):
        diffusers_vae = AutoencoderKLWan()  # diffusers' defaults are Wan2.1's, as in ChronoEdit's vae/
    converted = convert_shapes(autoencoder_kl_wan_to_wan_vae, _shapes(diffusers_vae.state_dict()))
    assert hash_shapes({k.removeprefix("model."): v for k, v in converted.items()}) == WAN_VAE_HASH
    assert wan_vae_kwargs(converted) == dict(z_dim=16, dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                             attn_scales=[], temperal_downsample=[False, True, True])


def test_vae_attention_scales_are_read_from_the_layer_list():
    with torch.device("meta"):
        model = VideoVAE_(dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2, attn_scales=[0.5],
                          temperal_downsample=[True, False, True])
    assert wan_vae_kwargs(_shapes(model.state_dict(), "model.")) == dict(
        z_dim=4, dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=2, attn_scales=[0.5],
        temperal_downsample=[True, False, True])


# ---- errors ---------------------------------------------------------------------------------

def test_missing_paths_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"text encoder weights not found: .*missing\.pth"):
        load_text_encoder(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"No image encoder weights in .*empty"):
        (tmp_path / "empty").mkdir()
        load_image_encoder(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"VAE weights not found"):  # CheckpointError is a ValueError
        load_vae(tmp_path / "vae")


def test_wrong_component_files_are_named(umt5, clip, vae, tmp_path):
    torch.save(load_vae(vae[1], dtype=torch.float32).model.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    cases = [
        (load_text_encoder, vae[1], "does not hold a umT5 text encoder"),
        (load_text_encoder, tmp_path / "Wan2.1_VAE.pth", "does not hold a umT5 text encoder"),
        (load_image_encoder, umt5[1], "does not hold a CLIP vision tower"),
        (load_vae, clip[1], "does not hold a Wan VAE"),
    ]
    for loader, path, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            loader(path)
        assert str(path) in str(error.value)


def test_configs_diffsynth_cannot_run_are_refused(umt5, tmp_path):
    folder = tmp_path / "text_encoder"
    shutil.copytree(umt5[1], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-silu"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-silu' is not supported"):
        load_text_encoder(folder)
