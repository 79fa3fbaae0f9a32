"""Wan2.1 VAE as DiffSynth's ``WanVideoVAE``, from ``Wan2.1_VAE.pth`` or a diffusers
``AutoencoderKLWan`` folder (ChronoEdit-14B-Diffusers ``vae/``).

DiffSynth's ``WanVideoVAE`` hard-codes the Wan2.1 sizes and latent statistics;
:class:`SizedWanVideoVAE` builds DiffSynth's own ``VideoVAE_`` at the checkpoint's size and takes
the latent mean/std from the diffusers config when there is one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

from ..errors import CheckpointError
from .loading import load_component

MODEL_NAME = "wan_video_vae"
MODEL_CLASS = f"{__name__}.SizedWanVideoVAE"


class SizedWanVideoVAE(WanVideoVAE):
    """``WanVideoVAE`` with the inner ``VideoVAE_`` sized by kwargs (defaults: Wan2.1)."""

    def __init__(self, z_dim: int = 16, dim: int = 96, dim_mult: tuple[int, ...] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, temperal_downsample: tuple[bool, ...] = (False, True, True),
                 latents_mean: list[float] | None = None, latents_std: list[float] | None = None):
        super().__init__(z_dim)  # built on the meta device by DiffSynth's loader, so free
        self.model = VideoVAE_(dim=dim, z_dim=z_dim, dim_mult=list(dim_mult), num_res_blocks=num_res_blocks,
                               attn_scales=[], temperal_downsample=list(temperal_downsample)).eval().requires_grad_(False)
        if latents_mean is not None and latents_std is not None:
            self.mean, self.std = torch.tensor(latents_mean), torch.tensor(latents_std)
            self.scale = [self.mean, 1.0 / self.std]


_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}


def _resnet(prefix: str, rest: str) -> str:
    part, _, param = rest.partition(".")
    return f"{prefix}.{_RESNET_PARTS.get(part, part)}.{param}"


def diffusers_name_to_wan(name: str, up_index: dict[tuple[int, str], int]) -> str | None:
    """One ``AutoencoderKLWan`` key -> ``WanVideoVAE`` key (``up_index``: decoder layer numbering)."""
    top, _, rest = name.partition(".")
    if top in _TOP:
        return f"model.{_TOP[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return None
    head, _, tail = rest.partition(".")
    if head in _ENDS:
        return f"model.{top}.{_ENDS[head]}.{tail}"
    if head == "mid_block":
        kind, idx, inner = tail.split(".", 2)
        if kind == "attentions":
            return f"model.{top}.middle.1.{inner}"
        return _resnet(f"model.{top}.middle.{0 if idx == '0' else 2}", inner)
    if head == "down_blocks":
        idx, inner = tail.split(".", 1)
        if inner.startswith(("resample.", "time_conv.")):
            return f"model.encoder.downsamples.{idx}.{inner}"
        return _resnet(f"model.encoder.downsamples.{idx}", inner)
    if head == "up_blocks":
        block, kind, idx, inner = tail.split(".", 3)
        flat = up_index[(int(block), f"{kind}.{idx}")]
        if kind == "upsamplers":
            return f"model.decoder.upsamples.{flat}.{inner}"
        return _resnet(f"model.decoder.upsamples.{flat}", inner)
    return None


_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.\d+|upsamplers\.0)\.")


def decoder_layer_numbering(names) -> dict[tuple[int, str], int]:
    """Diffusers groups the decoder's layers per up-block; DiffSynth numbers them in one list."""
    found = sorted({(int(m.group(1)), m.group(2)) for m in map(_UP.match, names) if m},
                   key=lambda t: (t[0], t[1].startswith("upsamplers"), int(t[1].split(".")[1])))
    return {key: i for i, key in enumerate(found)}


def autoencoder_kl_wan_to_wan_vae(state_dict: Mapping) -> dict:
    """Converter for diffusers ``AutoencoderKLWan`` weights (called with a lazy ``DiskMap``)."""
    names = list(state_dict)
    numbering = decoder_layer_numbering(names)
    return {target: state_dict[n] for n in names if (target := diffusers_name_to_wan(n, numbering))}


WAN_VAE_CONVERTER = "diffsynth.utils.state_dict_converters.wan_video_vae.WanVideoVAEStateDictConverter"


def vae_kwargs(shapes: dict[str, list[int]], config: dict, where: str) -> tuple[dict, str]:
    """VAE kwargs read from the layer shapes (either layout) and the converter for the layout."""
    if "encoder.conv_in.weight" in shapes:
        numbering = decoder_layer_numbering(shapes)
        wan = {t: v for k, v in shapes.items() if (t := diffusers_name_to_wan(k, numbering))}
        converter = f"{__name__}.autoencoder_kl_wan_to_wan_vae"
    elif "encoder.conv1.weight" in shapes and "conv2.weight" in shapes:
        wan = {"model." + k: v for k, v in shapes.items()}
        converter = WAN_VAE_CONVERTER
    else:
        raise CheckpointError(f"{where} does not hold a Wan VAE (no encoder input convolution).")
    return {**_sizes_from_wan_shapes(wan),
            "latents_mean": config.get("latents_mean"), "latents_std": config.get("latents_std")}, converter


def _sizes_from_wan_shapes(shapes: dict[str, list[int]]) -> dict:
    """Base width, stage multipliers, blocks per stage and temporal downsampling of the encoder."""
    dim = shapes["model.encoder.conv1.weight"][0]
    stage_widths, blocks, temporal = [], [0], []
    i = 0
    while True:
        layer = f"model.encoder.downsamples.{i}"
        if f"{layer}.resample.1.weight" in shapes:
            temporal.append(f"{layer}.time_conv.weight" in shapes)
            blocks.append(0)
        elif f"{layer}.residual.2.weight" in shapes:
            if blocks[-1] == 0:
                stage_widths.append(shapes[f"{layer}.residual.2.weight"][0])
            blocks[-1] += 1
        else:
            break
        i += 1
    return {"z_dim": shapes["model.conv2.weight"][0], "dim": dim,
            "dim_mult": [w // dim for w in stage_widths], "num_res_blocks": blocks[0],
            "temperal_downsample": temporal}


def load_vae(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> SizedWanVideoVAE:
    """Load the VAE from a ``vae/`` folder or ``Wan2.1_VAE.pth``."""
    return load_component(path, "VAE", MODEL_NAME, MODEL_CLASS, vae_kwargs, dtype, device)
