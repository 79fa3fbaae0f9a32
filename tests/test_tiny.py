"""The tiny checkpoints mirror the real layouts and are deterministic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from transformers import AutoTokenizer

from chronoedit_lora.models.components import discover_components
from chronoedit_lora.tiny import write_tiny_diffusers_checkpoint

MAX_TINY_BYTES = 50 * 2**20  # "well under 100 MB"


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_diffusers_layout(tiny_diffusers):
    for folder in ("transformer", "text_encoder", "image_encoder", "image_processor", "vae", "tokenizer", "scheduler"):
        assert (tiny_diffusers / folder).is_dir(), folder
    index = json.loads((tiny_diffusers / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted((tiny_diffusers / "transformer").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert {p.name for p in shards} == set(index["weight_map"].values())
    assert json.loads((tiny_diffusers / "model_index.json").read_text())["_class_name"] == "ChronoEditPipeline"
    size = sum(p.stat().st_size for p in tiny_diffusers.rglob("*") if p.is_file())
    assert size < MAX_TINY_BYTES


def test_wan_layout_is_discovered(tiny_wan):
    paths = discover_components(tiny_wan)
    assert paths.dit.name == "chronoedit_tiny_bf16.safetensors"
    assert paths.text_encoder.name == "models_t5_umt5-xxl-enc-bf16.pth"
    assert paths.vae.name == "Wan2.1_VAE.pth"
    assert paths.image_encoder.name == "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    assert paths.tokenizer == tiny_wan / "google" / "umt5-xxl"


def test_deterministic_per_seed(tiny_diffusers, tmp_path):
    again = write_tiny_diffusers_checkpoint(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny_diffusers)
    other = write_tiny_diffusers_checkpoint(tmp_path / "other", seed=1)
    differing = {k for k, v in _digests(other).items() if _digests(tiny_diffusers)[k] != v}
    shards = {k for k in _digests(other) if k.startswith("transformer/") and k.endswith(".safetensors")}
    assert shards | {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"} <= differing


def test_tokenizer_matches_umt5_conventions(tiny_diffusers):
    tokenizer = AutoTokenizer.from_pretrained(tiny_diffusers / "tokenizer")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("The user wants to add sunglasses", padding="max_length", max_length=16).input_ids
    last = ids.index(1)
    assert ids[last + 1:] == [0] * (16 - last - 1) and 2 not in ids[:last]
    assert 2 in tokenizer("zebra ümlaut").input_ids  # characters outside the vocabulary -> unk
