"""Wan2.1 VAE as DiffSynth's ``WanVideoVAE``, from ``Wan2.1_VAE.pth`` or a diffusers
``AutoencoderKLWan`` folder (ChronoEdit-14B-Diffusers ``vae/``).

DiffSynth's ``WanVideoVAE`` hard-codes the Wan2.1 sizes and latent statistics;
:class:`SizedWanVideoVAE` builds DiffSynth's own ``VideoVAE_`` at the checkpoint's size and takes
the latent mean/std from the diffusers config when there is one. ``WanVideoVAE.encode`` returns
normalised latents ``(mu - mean) / std`` (diffusers' ``encode`` returns raw ``mu``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from itertools import count
from pathlib import Path

import torch
from diffsynth.core.vram.initialization import skip_model_initialization
from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

from ..errors import CheckpointError, ChronoEditError
from .loading import check_config, convert_shapes, load_component, read_config, wrong_component

MODEL_NAME = "wan_video_vae"
MODEL_CLASS = f"{__name__}.SizedWanVideoVAE"
WAN_VAE_CONVERTER = "diffsynth.utils.state_dict_converters.wan_video_vae.WanVideoVAEStateDictConverter"
# Wan2.2's VAE (residual blocks, patchified input) and attention at encoder scales (diffusers'
# decoder has none there, DiffSynth's would) cannot be mapped onto DiffSynth's Wan2.1 VideoVAE_.
SUPPORTED_CONFIG = {"is_residual": (False,), "patch_size": (None, 1), "attn_scales": ([],),
                    "in_channels": (3,), "out_channels": (3,)}

VAE_TILINGS = ("auto", "on", "off")
# DiffSynth's tiles, in latent units (8 pixels): 272x272-pixel tiles, 144x128-pixel strides.
TILE_SIZE, TILE_STRIDE = (34, 34), (18, 16)
# `auto` tiles frames of more than 1024x1024 pixels, just above ChronoEdit's output area (720x1280;
# the aspect-preserving default sizes reach at most ~0.93 MP): default-size edits stay untiled, so
# equal to the official, untiled pipeline, while the VAE's activations, which grow with the frame
# area, are tiled for larger edits (e.g. the ~2K upscaler LoRA).
AUTO_TILING_PIXELS = 1024 * 1024


def use_tiling(mode: str, height: int, width: int) -> bool:
    """Whether ``--vae-tiling mode`` tiles a ``height`` x ``width`` frame."""
    if mode not in VAE_TILINGS:
        raise ChronoEditError(f"--vae-tiling {mode!r} is not one of {', '.join(VAE_TILINGS)}.")
    return mode == "on" or (mode == "auto" and height * width > AUTO_TILING_PIXELS)


class SizedWanVideoVAE(WanVideoVAE):
    """``WanVideoVAE`` with the inner ``VideoVAE_`` sized by kwargs (defaults: Wan2.1)."""

    def __init__(self, z_dim: int = 16, dim: int = 96, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_scales: Sequence[float] = (),
                 temperal_downsample: Sequence[bool] = (False, True, True)):
        with skip_model_initialization():  # the stock-size VideoVAE_ it builds is replaced below
            super().__init__(z_dim)
        self.model = VideoVAE_(dim=dim, z_dim=z_dim, dim_mult=list(dim_mult), num_res_blocks=num_res_blocks,
                               attn_scales=list(attn_scales), temperal_downsample=list(temperal_downsample),
                               ).eval().requires_grad_(False)

    def set_latent_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-channel latent mean/std ``encode`` normalises with (default: Wan2.1's, as DiffSynth)."""
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self.scale = [self.mean, 1.0 / self.std]


_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                 "conv_shortcut": "shortcut"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.\d+|upsamplers\.0)\.")


def _resnet(prefix: str, rest: str) -> str:
    part, _, param = rest.partition(".")
    return f"{prefix}.{_RESNET_PARTS.get(part, part)}.{param}"


def decoder_layer_numbering(names) -> dict[tuple[int, str], int]:
    """diffusers groups the decoder's layers per up-block; DiffSynth numbers them in one list."""
    found = sorted({(int(m.group(1)), m.group(2)) for m in map(_UP.match, names) if m},
                   key=lambda t: (t[0], t[1].startswith("upsamplers"), int(t[1].split(".")[1])))
    return {key: i for i, key in enumerate(found)}


def autoencoder_kl_wan_key_to_wan(name: str, up_index: dict[tuple[int, str], int]) -> str | None:
    """One ``AutoencoderKLWan`` key -> its ``WanVideoVAE`` key (``up_index``: see
    :func:`decoder_layer_numbering`)."""
    top, _, rest = name.partition(".")
    if top in _TOP:
        return f"model.{_TOP[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        return None
    head, _, tail = rest.partition(".")
    if head in _ENDS:
        return f"model.{top}.{_ENDS[head]}.{tail}"
    if head == "mid_block":  # resnets.0, attentions.0, resnets.1 -> middle.0, 1, 2
        kind, idx, inner = tail.split(".", 2)
        if kind == "attentions":
            return f"model.{top}.middle.1.{inner}"
        return _resnet(f"model.{top}.middle.{2 * int(idx)}", inner)
    if head == "down_blocks":  # already one list, like DiffSynth's
        idx, inner = tail.split(".", 1)
        if inner.startswith(("resample.", "time_conv.")):
            return f"model.encoder.downsamples.{idx}.{inner}"
        return _resnet(f"model.encoder.downsamples.{idx}", inner)
    if head == "up_blocks":
        block, kind, idx, inner = tail.split(".", 3)
        flat = f"model.decoder.upsamples.{up_index[(int(block), f'{kind}.{idx}')]}"
        return f"{flat}.{inner}" if kind == "upsamplers" else _resnet(flat, inner)
    return None


def autoencoder_kl_wan_to_wan_vae(state_dict: Mapping) -> dict:
    """diffusers ``AutoencoderKLWan`` weights -> ``WanVideoVAE`` weights (``model.*``; renames only)."""
    names = list(state_dict)
    numbering = decoder_layer_numbering(names)
    return {target: state_dict[n] for n in names if (target := autoencoder_kl_wan_key_to_wan(n, numbering))}


def wan_vae_kwargs(shapes: Mapping[str, Sequence[int]]) -> dict:
    """``VideoVAE_`` sizes from the shapes of ``WanVideoVAE`` weights (``model.*``): walks the
    encoder's layer list, where a resample layer ends a stage and attention marks its scale."""
    dim = shapes["model.encoder.conv1.weight"][0]
    widths, blocks, temporal, attn_scales = [], [0], [], []
    for i in count():
        layer = f"model.encoder.downsamples.{i}"
        if f"{layer}.resample.1.weight" in shapes:
            temporal.append(f"{layer}.time_conv.weight" in shapes)
            blocks.append(0)
        elif f"{layer}.to_qkv.weight" in shapes:
            scale = 0.5 ** len(temporal)
            attn_scales += [scale] if scale not in attn_scales else []
        elif f"{layer}.residual.2.weight" in shapes:
            widths += [shapes[f"{layer}.residual.2.weight"][0]] if blocks[-1] == 0 else []
            blocks[-1] += 1
        else:
            break
    if len(set(blocks)) != 1:
        raise CheckpointError(f"VAE stages have different numbers of residual blocks ({blocks}).")
    return {"z_dim": shapes["model.conv2.weight"][0], "dim": dim, "dim_mult": [w // dim for w in widths],
            "num_res_blocks": blocks[0], "attn_scales": attn_scales, "temperal_downsample": temporal}


def vae_spec(shapes: dict[str, list[int]], config: dict, where: str) -> tuple[dict, str]:
    """Kwargs and converter (dotted path) for either layout."""
    if "encoder.conv_in.weight" in shapes:
        check_config(config, SUPPORTED_CONFIG, where, "VAE")
        shapes = convert_shapes(autoencoder_kl_wan_to_wan_vae, shapes)
        converter = f"{__name__}.autoencoder_kl_wan_to_wan_vae"
    else:
        shapes, converter = {"model." + name: shape for name, shape in shapes.items()}, WAN_VAE_CONVERTER
    try:
        kwargs = wan_vae_kwargs(shapes)
        in_channels = shapes["model.encoder.conv1.weight"][1]
    except KeyError:
        raise wrong_component(where, "a Wan VAE", "diffusers AutoencoderKLWan weights (vae/) or Wan2.1_VAE.pth",
                              shapes) from None
    # DiffSynth's WanVideoVAE runs 8x spatial, 4x temporal (chunks of 4 frames) on RGB only
    if in_channels != 3 or len(kwargs["dim_mult"]) != 4 or sum(kwargs["temperal_downsample"]) != 2:
        raise CheckpointError(
            f"{where}: not a Wan2.1-type VAE (input channels {in_channels}, {len(kwargs['dim_mult'])} stages, "
            f"temporal downsampling {kwargs['temperal_downsample']}); DiffSynth's WanVideoVAE needs RGB input, "
            "4 stages and 2 temporal downsamplings.")
    return kwargs, converter


def load_vae(path: str | Path, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu") -> SizedWanVideoVAE:
    """The VAE from a ``vae/`` folder (latent mean/std from its ``config.json``) or ``Wan2.1_VAE.pth``
    (Wan2.1's statistics).

    The statistics are set after loading rather than passed as kwargs: DiffSynth's registry keys
    kwargs by weight shapes, and two folders may share shapes but not statistics.
    """
    vae = load_component(path, "VAE", MODEL_NAME, MODEL_CLASS, vae_spec, dtype, device)
    config = read_config(path)
    if "latents_mean" in config and "latents_std" in config:
        mean, std = config["latents_mean"], config["latents_std"]
        if not len(mean) == len(std) == vae.z_dim:
            raise CheckpointError(f"{path}: config.json's latents_mean/latents_std need {vae.z_dim} values each, "
                                  f"not {len(mean)}/{len(std)}.")
        vae.set_latent_stats(mean, std)
    return vae
