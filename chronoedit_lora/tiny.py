"""Tiny, deterministic, random-weight ChronoEdit checkpoints in the real on-disk layouts.

The 14B weights never reach our CI machines, so every code path is exercised on these: the
ChronoEdit-14B-Diffusers layout (sharded transformer + index, text_encoder/, image_encoder/,
image_processor/, vae/, tokenizer/, scheduler/, model_index.json), written with the libraries'
own ``save_pretrained``, and the Wan2.1 file layout (one DiT .safetensors, Wan ``.pth`` encoders,
``google/umt5-xxl/`` tokenizer) holding the very same weights.

Sizes keep every constraint ChronoEdit has: CLIP width 1280 with 257 tokens, 16 latent channels,
DiT input 36 channels, a head dim for which Wan's and diffusers' RoPE splits agree, 512 text tokens.
Every parameter is redrawn from a seeded normal (see ``randomize_parameters``), so outputs are far
from zero and no norm scale or bias is a constant that would hide a misplaced key.
"""

from __future__ import annotations

import json
import math
import shutil
import string
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import torch

CORPUS = """
The user wants to transform the image into a pencil sketch while keeping the composition and the
pose of every person unchanged. Add sunglasses to the cat's face, and make sure the reflection in
the lenses matches the room. Replace the sky with a golden sunset over the hills; the trees, the
road and the houses should stay exactly where they are. Turn the photo into a watercolor painting
with soft edges and paper texture. Remove the car from the street and fill the empty space with
the same stones, grass and shadows. Make it night and relight the scene with warm lamps: the red
house, the green tree and the blue river stay. Enhance image clarity and resolution while keeping
the content identical, super-resolution, high detail. The user wants to change the color of the
woman's dress from white to dark blue, and keep her hair, her face and the background as they are.
Put a small brown dog on the wooden bench next to the man who is reading a book. Add snow to the
roof, the garden and the fence, as if it is a cold winter morning. The user wants to draw a hat on
the boy, a yellow hat with a wide brim that casts a soft shadow on his eyes. Erase the text on the
sign and leave a clean metal surface. Rotate the cup so that the handle points to the left. Zoom
out and show more of the kitchen, the table and the window behind it. Convert the picture to black
and white, with strong contrast and deep shadows. Make the flowers bloom in pink, purple and
orange, and add a few bees flying around them. The user wants to age the old man's portrait by
twenty years: grey hair, wrinkles around the eyes and a calm smile. Change the season to autumn,
with red and orange leaves on the ground. Place a lighthouse on the cliff and a boat on the calm
sea. The person should raise the left hand and wave at the camera. Keep the lighting natural and
the perspective consistent; do not move the camera. Sketch the outline of the mountain with thin
black lines on a white background. Add rain, wet reflections on the street and people holding
umbrellas. The image should look like an oil painting from the last century, with visible brush
strokes. Replace the plastic chair with a leather armchair in the same position. Make the water
clear and turquoise so the fish and the sand below are visible. The edited image must preserve
the identity of the girl, her glasses and her scarf, while the wall behind her becomes a brick
wall covered with green ivy.
"""
TINY_IMAGE_SIZE = 32  # CLIP input; with patch 2 -> 16 x 16 + 1 = 257 tokens, as ViT-H/14 at 224
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT_DIM = 32

# Keyword arguments of each library class (the text encoder's vocab_size comes from the tokenizer).
TRANSFORMER_CONFIG = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 36,
    "out_channels": 16, "text_dim": TEXT_DIM, "freq_dim": 256, "ffn_dim": 128, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": 1280,
    "added_kv_proj_dim": 64, "rope_max_seq_len": 1024, "rope_temporal_skip_len": 8,
}
TEXT_ENCODER_CONFIG = {
    "d_model": TEXT_DIM, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0,
}
IMAGE_ENCODER_CONFIG = {
    "hidden_size": 1280, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 16,
    "image_size": TINY_IMAGE_SIZE, "patch_size": 2, "hidden_act": "gelu", "projection_dim": 1024,
}
VAE_CONFIG = {  # latents_mean / latents_std: the class defaults, i.e. Wan2.1's
    "base_dim": 16, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
IMAGE_PROCESSOR_CONFIG = {
    "size": {"shortest_edge": TINY_IMAGE_SIZE}, "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    "do_center_crop": True, "resample": 3, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
}
SCHEDULER_CONFIG = {
    "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 5.0, "num_train_timesteps": 1000,
}
TRANSFORMER_SHARD_SIZE = "250KB"  # the real transformer has 14 shards; this gives several, too
NORM_SCALE_STD = 0.1  # norm scales become 1 + N(0, 0.1^2)
BIAS_STD = 0.1  # biases and other vectors become N(0, 0.1^2)


def tokenizer_vocab() -> list[tuple[str, float]]:
    """umT5-style Unigram pieces: pad 0, eos 1, unk 2, then the corpus's words (with SentencePiece's
    word-start mark "▁") and single printable ASCII characters, scored by log frequency.

    Built by counting, not by a trainer run, so it is deterministic by construction. Words outside
    the corpus split into characters; characters outside ASCII become ``<unk>``.
    """
    words = Counter("▁" + w for w in CORPUS.replace(".", " .").replace(",", " ,").replace(":", " :")
                    .replace(";", " ;").split())
    chars = Counter(c for w in words.elements() for c in w)
    chars.update(c for c in string.printable.strip() if c not in chars)
    total = sum(words.values()) + sum(chars.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = sorted(words.items()) + sorted(chars.items())  # words start with "▁", so no piece repeats
    return vocab + [(piece, round(math.log(count / total), 6)) for piece, count in pieces]


def build_tokenizer(folder: Path) -> int:
    """Write the tiny tokenizer (transformers' T5 tokenizer, umT5's pipeline) to ``folder``; return its size."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=tokenizer_vocab(), extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def randomize_parameters(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every parameter from ``generator``: tensors that start as all ones (norm scales)
    become 1 + N(0, 0.1^2), biases and other vectors N(0, 0.1^2), and matrices and kernels
    N(0, 1/fan_in), which keeps activations near unit scale."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if torch.all(param == 1):
                value = 1 + NORM_SCALE_STD * noise
            elif param.ndim == 1 or name.endswith("bias"):
                value = BIAS_STD * noise
            else:
                value = noise / math.sqrt(param.numel() // param.shape[0])
            param.copy_(value)


def _generator(seed: int, component: str) -> torch.Generator:
    """An independent, reproducible generator per (seed, component)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{component}:{seed}".encode()))


def _build_models(vocab_size: int, seed: int) -> dict[str, torch.nn.Module]:
    """The four networks, built with their library classes and redrawn from ``seed``."""
    from diffusers import AutoencoderKLWan, ChronoEditTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):  # the constructors' own init must not touch the caller's RNG
        models = {
            "transformer": ChronoEditTransformer3DModel(**TRANSFORMER_CONFIG),
            "text_encoder": UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TEXT_ENCODER_CONFIG)),
            "image_encoder": CLIPVisionModel(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG)),
            "vae": AutoencoderKLWan(**VAE_CONFIG),
        }
    for name, model in models.items():
        randomize_parameters(model, _generator(seed, name))
        model.eval()
    return models


def write_tiny_diffusers_checkpoint(root: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a tiny ChronoEdit-14B-Diffusers-layout checkpoint to ``root``; the weights (stored in
    ``dtype``) are a deterministic function of ``seed``. ``ChronoEditPipeline.from_pretrained(root)`` loads it."""
    from diffusers import ChronoEditPipeline, UniPCMultistepScheduler
    from transformers import AutoTokenizer, CLIPImageProcessor

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(root / "tokenizer")
    models = _build_models(vocab_size, seed)
    for model in models.values():
        torch.nn.Module.to(model, dtype)  # every tensor in dtype, as in the real files (diffusers' .to would warn)
    pipe = ChronoEditPipeline(tokenizer=AutoTokenizer.from_pretrained(str(root / "tokenizer")),
                              image_processor=CLIPImageProcessor(**IMAGE_PROCESSOR_CONFIG),
                              scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG), **models)
    pipe.save_config(str(root))  # model_index.json
    pipe.transformer.save_pretrained(str(root / "transformer"), max_shard_size=TRANSFORMER_SHARD_SIZE)
    for name in ("text_encoder", "image_encoder", "vae", "image_processor", "scheduler"):
        getattr(pipe, name).save_pretrained(str(root / name))
    return root


def write_tiny_wan_checkpoint(root: str | Path, seed: int = 0) -> Path:
    """Write the same tiny weights in the Wan2.1 file layout (DiT single file, ``.pth`` encoders)."""
    from safetensors.torch import save_file

    from .models.components import load_components

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_tiny_diffusers_checkpoint(Path(tmp) / "diffusers", seed)
        loaded = load_components(source, dtype=torch.bfloat16)
        dit_state = {k: v.contiguous() for k, v in loaded.dit.state_dict().items()}
        save_file(dit_state, str(root / "chronoedit_tiny_bf16.safetensors"), metadata={
            "num_attention_heads": str(loaded.dit_checkpoint.kwargs["num_heads"]),
            "rope_temporal_skip_len": str(loaded.temporal_skip_len)})
        torch.save(loaded.text_encoder.state_dict(), root / "models_t5_umt5-xxl-enc-bf16.pth")
        torch.save(loaded.vae.model.state_dict(), root / "Wan2.1_VAE.pth")
        torch.save({k.removeprefix("model."): v for k, v in loaded.image_encoder.state_dict().items()},
                   root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
        shutil.copytree(source / "tokenizer", root / "google" / "umt5-xxl", dirs_exist_ok=True)
        (root / "tiny_checkpoint.json").write_text(json.dumps({"layout": "wan", "seed": seed}, indent=2))
    return root


LAYOUTS = {"diffusers": write_tiny_diffusers_checkpoint, "wan": write_tiny_wan_checkpoint}


def write_tiny_checkpoint(root: str | Path, layout: str = "diffusers", seed: int = 0) -> Path:
    """Write a tiny checkpoint in ``layout`` ("diffusers" or "wan")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout](root, seed=seed)
