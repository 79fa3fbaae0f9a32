"""CLIP image encoder (open-clip XLM-RoBERTa ViT-H/14 vision tower) as DiffSynth's
``WanImageEncoder``, from Wan's ``.pth`` or a transformers ``CLIPVisionModel`` folder.

DiffSynth's ``WanImageEncoder`` hard-codes ViT-H/14 and also builds the 24-layer XLM-RoBERTa text
tower, which ChronoEdit never uses. :class:`VisionTowerImageEncoder` builds only DiffSynth's own
``VisionTransformer`` at the checkpoint's size and keeps ``encode_image`` (penultimate-block
features, what ChronoEdit conditions on).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision.transforms as T
from diffsynth.models.wan_video_image_encoder import VisionTransformer, WanImageEncoder

from ..errors import CheckpointError
from .loading import load_component

MODEL_NAME = "wan_video_image_encoder"
MODEL_CLASS = f"{__name__}.VisionTowerImageEncoder"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, used by ViT-H/14
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_H_HEAD_DIM = 80  # 1280 / 16 heads

_HF_BLOCK = re.compile(r"^(?:vision_model\.)?encoder\.layers\.(\d+)\.(.+)$")
_HF_BLOCK_RENAMES = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2",
}


class VisionTowerImageEncoder(WanImageEncoder):
    """``WanImageEncoder`` holding only the vision tower, sized by its kwargs."""

    def __init__(self, image_size: int = 224, patch_size: int = 14, dim: int = 1280, mlp_ratio: float = 4.0,
                 num_heads: int = 16, num_layers: int = 32, norm_eps: float = 1e-5):
        torch.nn.Module.__init__(self)  # not WanImageEncoder.__init__: it builds the unused text tower
        self.model = torch.nn.Module()
        self.model.image_size = image_size
        self.model.visual = VisionTransformer(
            image_size=image_size, patch_size=patch_size, dim=dim, mlp_ratio=mlp_ratio, out_dim=dim,
            num_heads=num_heads, num_layers=num_layers, pool_type="token", pre_norm=True, post_norm=False,
            activation="gelu", norm_eps=norm_eps)
        del self.model.visual.head  # pooling head and final norm: unused for penultimate features
        self.model.visual.post_norm = None
        self.transforms = T.Compose([T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)])


def _wan_name(name: str) -> str | None:
    """Wan ``.pth`` key (``visual.*``) -> ours (``model.visual.*``); text tower and head dropped."""
    if not name.startswith("visual.") or name == "visual.head" or name.startswith("visual.post_norm."):
        return None
    return "model." + name


def _hf_name(name: str, state_dict: Mapping | None = None) -> str | None:
    """transformers ``CLIPVisionModel`` key -> ours (q/k/v are fused separately)."""
    name = name.removeprefix("vision_model.")
    simple = {
        "embeddings.class_embedding": "model.visual.cls_embedding",
        "embeddings.patch_embedding.weight": "model.visual.patch_embedding.weight",
        "embeddings.position_embedding.weight": "model.visual.pos_embedding",
        "pre_layrnorm.weight": "model.visual.pre_norm.weight",
        "pre_layrnorm.bias": "model.visual.pre_norm.bias",
    }
    if name in simple:
        return simple[name]
    match = _HF_BLOCK.match(name)
    if not match:
        return None  # post_layernorm, position_ids
    layer, rest = match.groups()
    module, _, param = rest.rpartition(".")
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"model.visual.transformer.{layer}.attn.to_qkv.{param}"
    if module in _HF_BLOCK_RENAMES:
        return f"model.visual.transformer.{layer}.{_HF_BLOCK_RENAMES[module]}.{param}"
    return None


def wan_clip_to_image_encoder(state_dict: Mapping) -> dict:
    """Converter for Wan's open-clip ``.pth`` (keys ``visual.*``)."""
    return {_wan_name(k): state_dict[k] for k in state_dict if _wan_name(k)}


def clip_vision_to_image_encoder(state_dict: Mapping) -> dict:
    """Converter for transformers ``CLIPVisionModel`` weights: renames, fuses q/k/v, reshapes embeddings."""
    converted: dict = {}
    for name in state_dict:
        target = _hf_name(name)
        if target is None or target.endswith((".to_qkv.weight", ".to_qkv.bias")):
            continue
        tensor = state_dict[name]
        if target.endswith(("cls_embedding", "pos_embedding")):
            tensor = tensor.reshape(1, -1, tensor.shape[-1])
        converted[target] = tensor
    for name in state_dict:
        if ".self_attn.q_proj." in name:
            parts = [state_dict[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            converted[_hf_name(name)] = torch.cat(parts, dim=0)
    return converted


def image_encoder_kwargs(shapes: dict[str, list[int]], config: dict, where: str) -> tuple[dict, str]:
    """Sizes of the vision tower and the converter for its layout."""
    hf = any(k.removeprefix("vision_model.").startswith("embeddings.patch_embedding") for k in shapes)
    if hf:
        get = {k.removeprefix("vision_model."): v for k, v in shapes.items()}
        patch, pos = get["embeddings.patch_embedding.weight"], get["embeddings.position_embedding.weight"]
        layers = {k.split(".")[2] for k in get if k.startswith("encoder.layers.")}
        mlp = get["encoder.layers.0.mlp.fc1.weight"][0]
        converter = f"{__name__}.clip_vision_to_image_encoder"
        eps = config.get("layer_norm_eps", 1e-5)
    elif "visual.patch_embedding.weight" in shapes:
        patch, pos = shapes["visual.patch_embedding.weight"], shapes["visual.pos_embedding"][1:]
        layers = {k.split(".")[2] for k in shapes if k.startswith("visual.transformer.")}
        mlp = shapes["visual.transformer.0.mlp.0.weight"][0]
        converter = f"{__name__}.wan_clip_to_image_encoder"
        eps = 1e-5
    else:
        raise CheckpointError(f"{where} does not hold a CLIP vision tower (no patch embedding).")
    dim, patch_size = patch[0], patch[2]
    grid = round((pos[0] - 1) ** 0.5)
    heads = config.get("num_attention_heads") or dim // VIT_H_HEAD_DIM
    return {
        "image_size": grid * patch_size, "patch_size": patch_size, "dim": dim, "mlp_ratio": mlp / dim,
        "num_heads": heads, "num_layers": len(layers), "norm_eps": eps,
    }, converter


def load_image_encoder(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> VisionTowerImageEncoder:
    """Load the CLIP image encoder from an ``image_encoder/`` folder or Wan's open-clip file."""
    return load_component(path, "image encoder", MODEL_NAME, MODEL_CLASS, image_encoder_kwargs, dtype, device)
