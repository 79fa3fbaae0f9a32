"""CLIP image encoder (open-clip XLM-RoBERTa ViT-H/14 vision tower) as DiffSynth's
``WanImageEncoder``, from Wan's ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` or a
transformers ``CLIPVisionModel`` folder (ChronoEdit-14B-Diffusers ``image_encoder/``).

DiffSynth's ``WanImageEncoder`` hard-codes ViT-H/14 and also builds the 24-layer XLM-RoBERTa text
tower, which ChronoEdit never uses. :class:`VisionTowerImageEncoder` builds only DiffSynth's own
``VisionTransformer``, at the checkpoint's size, and keeps ``encode_image`` and ``model.visual``
(penultimate-block features: what ChronoEdit conditions on, transformers' ``hidden_states[-2]``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision.transforms as T
from diffsynth.models.wan_video_image_encoder import VisionTransformer, WanImageEncoder

from ..errors import CheckpointError
from .loading import check_config, convert_shapes, load_component, wrong_component

MODEL_NAME = "wan_video_image_encoder"
MODEL_CLASS = f"{__name__}.VisionTowerImageEncoder"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, used by ViT-H/14
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_H_HEAD_DIM = 80  # ViT-H/14: 1280 / 16 heads; Wan's .pth does not record the head count
ACTIVATIONS = ("gelu", "quick_gelu")  # transformers hidden_act names DiffSynth's blocks implement


class VisionTowerImageEncoder(WanImageEncoder):
    """``WanImageEncoder`` holding only the vision tower, sized by its kwargs (defaults: ViT-H/14)."""

    def __init__(self, image_size: int = 224, patch_size: int = 14, dim: int = 1280, mlp_ratio: float = 4.0,
                 num_heads: int = 16, num_layers: int = 32, activation: str = "gelu", norm_eps: float = 1e-5):
        torch.nn.Module.__init__(self)  # not WanImageEncoder.__init__: it builds the unused text tower
        self.model = torch.nn.Module()
        self.model.image_size = image_size
        self.model.visual = VisionTransformer(
            image_size=image_size, patch_size=patch_size, dim=dim, mlp_ratio=mlp_ratio, out_dim=dim,
            num_heads=num_heads, num_layers=num_layers, pool_type="token", pre_norm=True, post_norm=False,
            activation=activation, norm_eps=norm_eps)
        del self.model.visual.head  # pooling head and final norm: unused for penultimate features
        self.model.visual.post_norm = None
        self.transforms = T.Compose([T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)])


_VISUAL = "model.visual."
_HF_TOP = {
    "embeddings.class_embedding": "cls_embedding",
    "embeddings.patch_embedding.weight": "patch_embedding.weight",
    "embeddings.position_embedding.weight": "pos_embedding",
    "pre_layrnorm.weight": "pre_norm.weight",
    "pre_layrnorm.bias": "pre_norm.bias",
}
# transformers module after "encoder.layers.N." -> DiffSynth module after "transformer.N."
_HF_LAYER = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.2", "self_attn.q_proj": "attn.to_qkv", "self_attn.k_proj": "attn.to_qkv",
    "self_attn.v_proj": "attn.to_qkv",
}
_HF_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def clip_vision_key_to_wan(name: str) -> str | None:
    """One transformers CLIP vision key (with or without ``vision_model.``) -> ours (None: unused,
    e.g. ``post_layernorm``, the text tower of a full ``CLIPModel``)."""
    name = name.removeprefix("vision_model.")
    if name in _HF_TOP:
        return _VISUAL + _HF_TOP[name]
    match = _HF_LAYER_KEY.match(name)
    if match and match.group(2) in _HF_LAYER:
        return f"{_VISUAL}transformer.{match.group(1)}.{_HF_LAYER[match.group(2)]}.{match.group(3)}"
    return None


def clip_vision_to_wan_image_encoder(state_dict: Mapping) -> dict:
    """transformers ``CLIPVisionModel`` weights -> :class:`VisionTowerImageEncoder` weights: renames,
    q/k/v fused into ``to_qkv`` (that order), embeddings given the batch axis open-clip stores."""
    converted = {}
    for name in state_dict:
        target = clip_vision_key_to_wan(name)
        if target is None or (".to_qkv." in target and ".q_proj." not in name):
            continue
        if ".to_qkv." in target:
            parts = (name.replace(".q_proj.", f".{p}.") for p in ("q_proj", "k_proj", "v_proj"))
            converted[target] = torch.cat([state_dict[part] for part in parts])
        elif target.endswith(("cls_embedding", "pos_embedding")):
            converted[target] = state_dict[name].reshape(1, -1, state_dict[name].shape[-1])
        else:
            converted[target] = state_dict[name]
    return converted


def wan_clip_to_image_encoder(state_dict: Mapping) -> dict:
    """Wan's open-clip ``.pth`` (``visual.*``, ``textual.*``, ``log_scale``) -> ours: the vision tower
    without its pooling head and final norm."""
    return {"model." + name: state_dict[name] for name in state_dict
            if name.startswith("visual.") and name != "visual.head" and not name.startswith("visual.post_norm.")}


def wan_image_encoder_kwargs(shapes: Mapping[str, Sequence[int]], num_heads: int | None = None) -> dict:
    """:class:`VisionTowerImageEncoder` sizes from the shapes of its weights (``model.visual.*``).
    The head count is not in any shape: pass it, or ViT-H/14's head width of 80 is assumed."""
    dim, _, patch_size, _ = shapes[_VISUAL + "patch_embedding.weight"]
    grid = math.isqrt(shapes[_VISUAL + "pos_embedding"][1] - 1)  # patches + class token
    hidden = shapes[_VISUAL + "transformer.0.mlp.0.weight"][0]
    if int(dim * (hidden / dim)) != hidden:
        raise CheckpointError(f"MLP width {hidden} is not representable as a ratio of width {dim} in DiffSynth's CLIP.")
    return {
        "image_size": grid * patch_size, "patch_size": patch_size, "dim": dim, "mlp_ratio": hidden / dim,
        "num_heads": num_heads or dim // VIT_H_HEAD_DIM,
        "num_layers": len({name.split(".")[3] for name in shapes if name.startswith(_VISUAL + "transformer.")}),
    }


def image_encoder_spec(shapes: dict[str, list[int]], config: dict, where: str) -> tuple[dict, str]:
    """Kwargs and converter (dotted path) for either layout. transformers' ``config.json`` (also a
    full ``CLIPModel``'s ``vision_config``) gives the head count, activation and norm eps; Wan's
    file has none: ViT-H/14's 16 heads, GELU and 1e-5."""
    vision = config.get("vision_config", config)
    if any(name.removeprefix("vision_model.").startswith("embeddings.patch_embedding.") for name in shapes):
        check_config(vision, {"hidden_act": ACTIVATIONS}, where, "CLIP vision tower")
        converter = clip_vision_to_wan_image_encoder
    else:
        converter = wan_clip_to_image_encoder
    try:
        kwargs = wan_image_encoder_kwargs(convert_shapes(converter, shapes), vision.get("num_attention_heads"))
    except KeyError:
        raise wrong_component(where, "a CLIP vision tower", "transformers CLIPVisionModel weights (image_encoder/) "
                              "or Wan's models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", shapes) from None
    kwargs.update(activation=vision.get("hidden_act", "gelu"), norm_eps=vision.get("layer_norm_eps", 1e-5))
    return kwargs, f"{__name__}.{converter.__name__}"


def load_image_encoder(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu") -> VisionTowerImageEncoder:
    """The CLIP image encoder from an ``image_encoder/`` folder or Wan's open-clip file."""
    return load_component(path, "image encoder", MODEL_NAME, MODEL_CLASS, image_encoder_spec, dtype, device)
