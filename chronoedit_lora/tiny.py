"""Tiny, deterministic, random-weight ChronoEdit checkpoints in the real on-disk layouts.

The 14B weights never reach our CI machines, so every code path is exercised on these: the
ChronoEdit-14B-Diffusers layout (sharded transformer + index, text_encoder/, image_encoder/,
image_processor/, vae/, tokenizer/, scheduler/, model_index.json), written with the libraries'
own ``save_pretrained``, and the Wan2.1 file layout (one DiT .safetensors, Wan ``.pth`` encoders,
``google/umt5-xxl/`` tokenizer) holding the very same weights.

Sizes keep every constraint ChronoEdit has: CLIP width 1280 with 257 tokens, 16 latent channels,
DiT input 36 channels, width 192 > 36 x 4 patch inputs (so a LoRA can learn), head dim 48 (Wan's and diffusers' RoPE splits agree), 512 text tokens.
The ``mid`` size (for benchmarks) has a DiT in Wan2.1-1.3B's shapes, the real Wan2.1 VAE, and the
real umT5-XXL / ViT-H widths with only a few of their layers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import atomic_folder
from .models.components import load_components
from .models.image_encoder import CLIP_MEAN, CLIP_STD
from .models.text_encoder import SPIECE_KEY

CORPUS = (
    "The user wants to transform the image into a pencil sketch while keeping the composition. "
    "Add sunglasses to the cat's face. Replace the sky with a golden sunset over the hills. "
    "Turn the photo into a watercolor painting with soft edges and paper texture. "
    "Remove the car from the street and keep the houses, trees and people unchanged. "
    "Make it night, relight the scene with warm lamps; the red house, the green tree and the blue river stay. "
    "Enhance image clarity and resolution while keeping the content identical, super-resolution, high detail."
)
TINY_IMAGE_SIZE = 32  # CLIP input; with patch 2 -> 16 x 16 + 1 = 257 tokens, as ViT-H/14 at 224


@dataclass(frozen=True)
class CheckpointSize:
    """Constructor arguments of each component (the rest is fixed by ChronoEdit's design)."""

    text: dict = field(default_factory=lambda: {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4})
    image: dict = field(default_factory=lambda: {"intermediate_size": 256, "num_hidden_layers": 2, "image_size": TINY_IMAGE_SIZE,
                                                 "patch_size": 2})
    transformer: dict = field(default_factory=lambda: {"num_attention_heads": 4, "attention_head_dim": 48, "ffn_dim": 384,
                                                       "num_layers": 2})
    vae: dict = field(default_factory=lambda: {"base_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1})
    shard_size: str = "1MB"  # forces the transformer into several shards, like the real 14 shards


SIZES = {
    "tiny": CheckpointSize(),
    # DiT: Wan2.1-1.3B (1536 wide, 30 blocks); VAE: Wan2.1's; umT5-XXL and ViT-H/14 widths, 2 and 4 layers.
    "mid": CheckpointSize(
        text={"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 2, "num_heads": 64},
        image={"intermediate_size": 5120, "num_hidden_layers": 4, "image_size": 224, "patch_size": 14},
        transformer={"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30},
        vae={"base_dim": 96, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2},
        shard_size="500MB"),
}


def build_tokenizer(folder: Path) -> int:
    """Write a small Unigram tokenizer with umT5's special ids (pad 0, eos 1, unk 2); return its size.

    Its pieces are the corpus's words (with SentencePiece's "▁" word-start mark) and characters,
    scored by log frequency: fully deterministic, no training run.
    """
    import math
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = Counter("▁" + w for w in CORPUS.replace(".", " .").replace(",", " ,").split())
    chars = Counter(c for w in words.elements() for c in w)
    total = sum(words.values()) + sum(chars.values())
    pieces = sorted(words.items()) + sorted(chars.items())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, round(math.log(count / total), 6)) for piece, count in pieces if piece not in dict(vocab)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                              extra_ids=0, model_max_length=512)
    wrapped.save_pretrained(str(folder))
    return tokenizer.get_vocab_size()


def _perturb_constant_parameters(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give constant-initialised tensors (norm scales, zero biases) random values, so that a key
    mapped to the wrong place cannot go unnoticed in parity tests."""
    with torch.no_grad():
        for param in module.parameters():
            if param.numel() > 1 and torch.all(param == param.flatten()[0]):
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def write_tiny_diffusers_checkpoint(root: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                                    size: str = "tiny") -> Path:
    """Write a random ChronoEdit-14B-Diffusers-layout checkpoint of ``size`` (see ``SIZES``) to
    ``root`` (new or empty; it appears whole or not at all), deterministic per seed."""
    with atomic_folder(root) as staging:
        _write_diffusers_layout(staging, seed, dtype, size)
    return Path(root)


def _write_diffusers_layout(root: Path, seed: int, dtype: torch.dtype, size: str) -> None:
    from diffusers import AutoencoderKLWan, ChronoEditPipeline, ChronoEditTransformer3DModel, UniPCMultistepScheduler
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    vocab = build_tokenizer(root / "tokenizer")
    generator = torch.Generator().manual_seed(seed)

    def seeded(offset: int):
        torch.manual_seed(seed * 1000 + offset)

    sizes = SIZES[size]
    seeded(1)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab, **sizes.text, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0))
    seeded(2)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=1280, num_attention_heads=16, **sizes.image, hidden_act="gelu", projection_dim=1024))
    seeded(3)
    width = sizes.transformer["num_attention_heads"] * sizes.transformer["attention_head_dim"]
    transformer = ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=36, out_channels=16, text_dim=sizes.text["d_model"], freq_dim=256,
        **sizes.transformer, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280,
        added_kv_proj_dim=width, rope_max_seq_len=1024, rope_temporal_skip_len=8)
    seeded(4)
    vae = AutoencoderKLWan(**sizes.vae, z_dim=16, attn_scales=[], temperal_downsample=[False, True, True])
    for model in (text_encoder, image_encoder, transformer, vae):
        _perturb_constant_parameters(model, generator)
        model.to(dtype)

    clip_size = sizes.image["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": clip_size}, crop_size={"height": clip_size, "width": clip_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3, do_center_crop=True)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0,
                                        num_train_timesteps=1000)
    pipe = ChronoEditPipeline(tokenizer=AutoTokenizer.from_pretrained(str(root / "tokenizer")),
                              text_encoder=text_encoder, image_encoder=image_encoder, image_processor=image_processor,
                              transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.save_config(str(root))
    transformer.save_pretrained(str(root / "transformer"), max_shard_size=sizes.shard_size)
    for name, component in (("text_encoder", text_encoder), ("image_encoder", image_encoder), ("vae", vae),
                            ("image_processor", image_processor), ("scheduler", scheduler)):
        component.save_pretrained(str(root / name))


def wan_dit_state(loaded) -> dict[str, torch.Tensor]:
    """The loaded DiT's weights in Wan's original names (what single-file repacks hold)."""
    return {k: v.contiguous() for k, v in loaded.dit.state_dict().items()}


def write_tiny_wan_checkpoint(root: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write the same tiny weights in the Wan2.1 file layout (DiT single file, ``.pth`` encoders) to
    ``root`` (new or empty; it appears whole or not at all)."""
    from safetensors.torch import save_file

    with atomic_folder(root) as staging, tempfile.TemporaryDirectory() as tmp:
        source = write_tiny_diffusers_checkpoint(Path(tmp) / "diffusers", seed, size=size)
        loaded = load_components(source, dtype=torch.bfloat16, announce=False)
        save_file(wan_dit_state(loaded), str(staging / "chronoedit_tiny_bf16.safetensors"), metadata={
            "num_attention_heads": str(loaded.dit_checkpoint.kwargs["num_heads"]),
            "rope_temporal_skip_len": str(loaded.temporal_skip_len)})
        torch.save(loaded.text_encoder.state_dict(), staging / "models_t5_umt5-xxl-enc-bf16.pth")
        torch.save(loaded.vae.model.state_dict(), staging / "Wan2.1_VAE.pth")
        torch.save({k.removeprefix("model."): v for k, v in loaded.image_encoder.state_dict().items()},
                   staging / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
        shutil.copytree(source / "tokenizer", staging / "google" / "umt5-xxl", dirs_exist_ok=True)
        (staging / "tiny_checkpoint.json").write_text(json.dumps({"layout": "wan", "seed": seed}, indent=2))
    return Path(root)


COMFYUI_PRECISIONS = ("fp16", "fp8_scaled")
COMFYUI_FOLDERS = ("diffusion_models", "text_encoders", "clip_vision", "vae")


def scale_to_fp8(state: dict[str, torch.Tensor], quantized, prefix: str = "") -> dict[str, torch.Tensor]:
    """ComfyUI's legacy scaled fp8 (comfy/model_detection.py, comfy/ops.py ``scaled_fp8_ops``): the
    2-D weights chosen by ``quantized`` as ``float8_e4m3fn`` with a float32 ``scale_weight``
    (their largest magnitude maps to e4m3fn's 448), everything else in fp16, and the
    ``[prefix]scaled_fp8`` marker (an empty e4m3fn tensor)."""
    out: dict[str, torch.Tensor] = {}
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    for key, tensor in state.items():
        if tensor.ndim == 2 and key.endswith(".weight") and quantized(key):
            scale = (tensor.float().abs().amax() / fp8_max).clamp(min=torch.finfo(torch.float32).tiny)
            out[key] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
        else:
            out[key] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def spiece_model_bytes(tokenizer_json: Path) -> bytes:
    """A SentencePiece Unigram model holding the very pieces and scores of the tiny tokenizer (pad 0,
    eos 1, unk 2): what ComfyUI embeds in its umT5 files as ``spiece_model``."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = len(vocab)
    proto.trainer_spec.pad_id, proto.trainer_spec.eos_id, proto.trainer_spec.unk_id = 0, 1, 2
    proto.trainer_spec.bos_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    kinds = {0: pb.ModelProto.SentencePiece.CONTROL, 1: pb.ModelProto.SentencePiece.CONTROL,
             2: pb.ModelProto.SentencePiece.UNKNOWN}
    for index, (piece, score) in enumerate(vocab):
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = kinds.get(index, pb.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def write_tiny_comfyui_checkpoint(root: str | Path, seed: int = 0, size: str = "tiny", precision: str = "fp16") -> Path:
    """The same tiny weights as ComfyUI keeps them: ``models/diffusion_models/`` (Wan names),
    ``models/text_encoders/`` (Hugging Face T5 names and the tokenizer as ``spiece_model``),
    ``models/clip_vision/clip_vision_h.safetensors`` (Hugging Face CLIP vision names plus
    ``visual_projection.weight``) and ``models/vae/wan_2.1_vae.safetensors`` (Wan's names).
    ``precision``: fp16, or ComfyUI's scaled fp8 for the DiT's blocks and umT5's layers."""
    from safetensors.torch import load_file, save_file

    if precision not in COMFYUI_PRECISIONS:
        raise ValueError(f"precision must be one of {COMFYUI_PRECISIONS}, got {precision!r}")
    with atomic_folder(root) as staging, tempfile.TemporaryDirectory() as tmp:
        diffusers = write_tiny_diffusers_checkpoint(Path(tmp) / "diffusers", seed, size=size)
        loaded = load_components(diffusers, dtype=torch.bfloat16, announce=False)
        models = staging / "models"
        for folder in COMFYUI_FOLDERS:
            (models / folder).mkdir(parents=True)
        dit = wan_dit_state(loaded)
        text = load_file(str(next((diffusers / "text_encoder").glob("*.safetensors"))))
        text[SPIECE_KEY] = torch.frombuffer(bytearray(spiece_model_bytes(diffusers / "tokenizer" / "tokenizer.json")),
                                            dtype=torch.uint8)
        clip = {"vision_model." + k.removeprefix("vision_model."): v
                for k, v in load_file(str(next((diffusers / "image_encoder").glob("*.safetensors")))).items()}
        clip["visual_projection.weight"] = torch.randn(1024, clip["vision_model.post_layernorm.weight"].shape[0],
                                                       generator=torch.Generator().manual_seed(seed)).to(torch.float16)
        meta = {"num_attention_heads": str(SIZES[size].transformer["num_attention_heads"])}
        if precision == "fp8_scaled":
            dit_file, text_file = "chrono_edit_tiny_fp8_e4m3fn_scaled.safetensors", "umt5_xxl_tiny_fp8_e4m3fn_scaled.safetensors"
            dit = scale_to_fp8(dit, lambda key: key.startswith("blocks."))
            text = scale_to_fp8(text, lambda key: key.startswith("encoder.block."))
        else:
            dit_file, text_file = "chrono_edit_tiny_fp16.safetensors", "umt5_xxl_tiny_fp16.safetensors"
            dit = {k: v.to(torch.float16) for k, v in dit.items()}
            text = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in text.items()}
        save_file(dit, str(models / "diffusion_models" / dit_file), metadata=meta)
        save_file(text, str(models / "text_encoders" / text_file))
        save_file({k: v.to(torch.float16) for k, v in clip.items()}, str(models / "clip_vision" / "clip_vision_h.safetensors"))
        save_file({k: v.to(torch.float16).contiguous() for k, v in loaded.vae.model.state_dict().items()},
                  str(models / "vae" / "wan_2.1_vae.safetensors"))
        (staging / "tiny_checkpoint.json").write_text(json.dumps({"layout": "comfyui", "seed": seed,
                                                                   "precision": precision}, indent=2))
    return Path(root)


LAYOUTS = {"diffusers": write_tiny_diffusers_checkpoint, "wan": write_tiny_wan_checkpoint,
           "comfyui": write_tiny_comfyui_checkpoint}


def write_tiny_checkpoint(root: str | Path, layout: str = "diffusers", seed: int = 0, size: str = "tiny",
                          precision: str = "fp16") -> Path:
    """Write a random checkpoint of ``size`` ("tiny" or "mid") in ``layout`` ("diffusers", "wan" or
    "comfyui"; ``precision`` applies to "comfyui": fp16 or fp8_scaled)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if layout == "comfyui":
        return write_tiny_comfyui_checkpoint(root, seed=seed, size=size, precision=precision)
    return LAYOUTS[layout](root, seed=seed, size=size)
