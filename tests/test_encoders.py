"""Text encoder, image encoder and VAE loaded from the diffusers folders through DiffSynth vs the
same weights run by transformers / diffusers (fp32)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

from chronoedit_lora.errors import CheckpointError
from chronoedit_lora.models.image_encoder import load_image_encoder
from chronoedit_lora.models.text_encoder import load_text_encoder
from chronoedit_lora.models.vae import load_vae

# fp32 on the same weights: only summation order differs.
TEXT_ATOL = 1e-5
CLIP_ATOL = 1e-5
VAE_ATOL = 1e-5


def test_text_encoder_matches_transformers(tiny_diffusers):
    tokenizer = AutoTokenizer.from_pretrained(tiny_diffusers / "tokenizer")
    batch = tokenizer(["The user wants to add sunglasses to the cat.", "Make it night."], padding="max_length",
                      max_length=512, truncation=True, return_tensors="pt")
    reference = UMT5EncoderModel.from_pretrained(tiny_diffusers / "text_encoder", torch_dtype=torch.float32).eval()
    ours = load_text_encoder(tiny_diffusers / "text_encoder", dtype=torch.float32)
    with torch.no_grad():
        expected = reference(batch.input_ids, batch.attention_mask).last_hidden_state
        got = ours(batch.input_ids, batch.attention_mask)
    valid = batch.attention_mask.bool()
    assert expected[valid].abs().max() > 0.5
    assert (expected - got)[valid].abs().max().item() <= TEXT_ATOL


def test_image_encoder_matches_transformers_penultimate_layer(tiny_diffusers):
    reference = CLIPVisionModel.from_pretrained(tiny_diffusers / "image_encoder", torch_dtype=torch.float32).eval()
    ours = load_image_encoder(tiny_diffusers / "image_encoder", dtype=torch.float32)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = ours.model.visual(pixels, use_31_block=True)
    assert got.shape == (2, 257, 1280)
    assert expected.abs().max() > 0.5
    assert (expected - got).abs().max().item() <= CLIP_ATOL


@pytest.fixture(scope="module")
def vaes(tiny_diffusers):
    reference = AutoencoderKLWan.from_pretrained(tiny_diffusers / "vae", torch_dtype=torch.float32).eval()
    return reference, load_vae(tiny_diffusers / "vae", dtype=torch.float32)


def test_vae_encode_matches_diffusers(vaes):
    reference, ours = vaes
    clip = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean = torch.tensor(reference.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        expected = (reference.encode(clip).latent_dist.mode() - mean) / std  # DiffSynth returns normalised latents
        got = ours.encode([clip[0]], device="cpu")
    assert got.shape == (1, 16, 2, 4, 4)
    assert (expected - got).abs().max().item() <= VAE_ATOL


def test_vae_decode_matches_diffusers(vaes):
    reference, ours = vaes
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    mean = torch.tensor(reference.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(reference.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        expected = reference.decode(latents * std + mean).sample
        got = ours.decode(latents, device="cpu")
    assert got.shape == expected.shape == (1, 3, 5, 32, 32)
    assert expected.std() > 0.05
    assert (expected - got).abs().max().item() <= VAE_ATOL


@pytest.mark.parametrize("component", ["text_encoder", "image_encoder", "vae"])
def test_wan_files_load_the_same_weights(tiny_diffusers, tiny_wan, component):
    """The Wan .pth files written by make-tiny hold the same tensors as the diffusers folders."""
    from chronoedit_lora.models.discovery import discover_components

    loader = {"text_encoder": load_text_encoder, "image_encoder": load_image_encoder, "vae": load_vae}[component]
    wan_path = getattr(discover_components(tiny_wan), component)
    assert wan_path.suffix == ".pth"
    a = loader(tiny_diffusers / component, dtype=torch.float32).state_dict()
    b = loader(wan_path, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_component_in_a_slot_is_named(tiny_diffusers, tmp_path):
    with pytest.raises(CheckpointError, match="does not hold a umT5 text encoder"):
        load_text_encoder(tiny_diffusers / "vae")
    with pytest.raises(CheckpointError, match="does not hold a Wan VAE"):
        load_vae(tiny_diffusers / "text_encoder")
    with pytest.raises(CheckpointError, match="does not hold a CLIP vision tower"):
        load_image_encoder(tiny_diffusers / "vae")
    with pytest.raises(CheckpointError, match="not found|No image encoder weights"):
        load_image_encoder(tmp_path / "missing")
