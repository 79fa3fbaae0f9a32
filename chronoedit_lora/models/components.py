"""Load all of ChronoEdit's components (DiT, umT5, CLIP, VAE, tokenizer) from local files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffsynth.models.wan_video_dit import WanModel
from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder

from ..errors import CheckpointError
from .discovery import ComponentPaths, discover_components
from .dit import DiTCheckpoint, inspect_dit, load_dit
from .fp8 import store_blocks_in_fp8
from .image_encoder import VisionTowerImageEncoder, load_image_encoder
from .text_encoder import load_text_encoder
from .vae import SizedWanVideoVAE, load_vae

TEXT_LENGTH = 512  # umT5 context length ChronoEdit was trained with


@dataclass
class LoadedComponents:
    """The models ChronoEdit needs, as DiffSynth modules, plus what we know of the checkpoint."""

    dit: WanModel  # on the meta device (no weights) when only filling the conditioning cache
    text_encoder: WanTextEncoder | None  # None when training from cached conditioning
    image_encoder: VisionTowerImageEncoder | None
    vae: SizedWanVideoVAE | None
    tokenizer: HuggingfaceTokenizer | None
    paths: ComponentPaths
    dit_checkpoint: DiTCheckpoint

    @property
    def temporal_skip_len(self) -> int:
        return self.dit_checkpoint.temporal_skip_len


def load_tokenizer(path: Path) -> HuggingfaceTokenizer:
    """The umT5 tokenizer from a local folder (never downloaded), padding to 512 tokens."""
    if not path.is_dir():
        raise CheckpointError(f"tokenizer {path}: expected a folder with tokenizer files.")
    try:
        return HuggingfaceTokenizer(name=str(path), seq_len=TEXT_LENGTH, clean="whitespace", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"tokenizer {path}: cannot load ({exc}).") from None


def load_components(model_dir: str | Path | None = None, *, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu", encoders: bool = True, with_dit: bool = True,
                    fp8_base: bool = False, **overrides: str | Path | None) -> LoadedComponents:
    """Find (``--model`` + per-component overrides) and load the components: all by default;
    ``encoders=False``: the DiT only, for training from cached conditioning; ``with_dit=False``:
    the encoders only, for filling that cache. ``fp8_base``: the DiT blocks' linear weights stored
    in float8, quantized on the CPU before they reach ``device``."""
    paths = discover_components(model_dir, **overrides)
    dit_checkpoint = inspect_dit(paths.dit)
    if not with_dit:  # a weightless shell: DiffSynth's conditioning units read the DiT's flags
        with torch.device("meta"):
            dit = WanModel(**dit_checkpoint.kwargs)
    else:
        dit, _ = load_dit(dit_checkpoint, dtype=dtype, device="cpu" if fp8_base else device)
        if fp8_base:
            store_blocks_in_fp8(dit)
            dit.to(device)
    return LoadedComponents(
        dit=dit,
        text_encoder=load_text_encoder(paths.text_encoder, dtype, device) if encoders else None,
        image_encoder=load_image_encoder(paths.image_encoder, dtype, device) if encoders else None,
        vae=load_vae(paths.vae, dtype, device) if encoders else None,
        tokenizer=load_tokenizer(paths.tokenizer) if encoders else None,
        paths=paths,
        dit_checkpoint=dit_checkpoint,
    )
