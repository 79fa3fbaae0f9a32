"""Find ChronoEdit's components under ``--model DIR`` (diffusers or Wan2.1 file layout) and load
them all (DiT, umT5, CLIP, VAE, tokenizer).

Nothing is downloaded: a component that cannot be found is an error saying where we looked.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from diffsynth.models.wan_video_dit import WanModel
from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder

from ..errors import CheckpointError
from .dit import DiTCheckpoint, inspect_dit, load_dit, meta_dit
from .fp8 import store_blocks_in_fp8
from .image_encoder import VisionTowerImageEncoder, load_image_encoder
from .text_encoder import load_text_encoder, load_tokenizer
from .vae import SizedWanVideoVAE, load_vae

# Wan2.1-I2V-14B file names (the original DiffSynth recipe's layout), .pth or converted .safetensors.
WAN_FILES = {
    "text_encoder": ("models_t5_umt5-xxl-enc-bf16.pth", "models_t5_umt5-xxl-enc-bf16.safetensors"),
    "image_encoder": (
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        "models_clip_open-clip-xlm-roberta-large-vit-huge-14.safetensors",
    ),
    "vae": ("Wan2.1_VAE.pth", "Wan2.1_VAE.safetensors"),
    "tokenizer": ("google/umt5-xxl", "tokenizer"),
}
DIFFUSERS_FOLDERS = {
    "dit": "transformer",
    "text_encoder": "text_encoder",
    "image_encoder": "image_encoder",
    "vae": "vae",
    "tokenizer": "tokenizer",
}
_NOT_DIT = tuple(name for names in WAN_FILES.values() for name in names)


@dataclass(frozen=True)
class ComponentPaths:
    """Where each ChronoEdit component lives (a file or a folder each)."""

    dit: Path
    text_encoder: Path
    image_encoder: Path
    vae: Path
    tokenizer: Path


def discover_components(model_dir: str | Path | None = None, **overrides: str | Path | None) -> ComponentPaths:
    """Locate every component under ``model_dir``; keyword overrides (e.g. ``vae=...``) win.

    Raises :class:`CheckpointError` naming each missing component and the places searched.
    """
    unknown = set(overrides) - {f.name for f in fields(ComponentPaths)}
    if unknown:
        raise TypeError(f"unknown component override(s): {', '.join(sorted(unknown))}")
    given = {k: Path(v) for k, v in overrides.items() if v is not None}
    found: dict[str, Path] = {}
    missing: list[str] = []
    root = Path(model_dir) if model_dir is not None else None
    if root is not None and not root.is_dir():
        raise CheckpointError(f"--model {root}: no such folder.")
    for name in DIFFUSERS_FOLDERS:
        if name in given:
            if not given[name].exists():
                raise CheckpointError(f"{name} override {given[name]} does not exist.")
            found[name] = given[name]
            continue
        if root is None:
            missing.append(f"{name}: no --model folder and no --{name.replace('_', '-')} given")
            continue
        path, searched = _find(root, name)
        if path is None:
            missing.append(f"{name}: looked for {', '.join(searched)}")
        else:
            found[name] = path
    if missing:
        component = root.name if root is not None and root.name in DIFFUSERS_FOLDERS.values() else None
        hint = (f"\n{root} looks like the {component}/ folder of a model: pass its parent, --model {root.parent}"
                + (f" (or the DiT alone with --dit {root})" if component == "transformer" else "") + "."
                if component else "")
        raise CheckpointError(
            "ChronoEdit components not found (nothing is downloaded; point --model at a "
            "ChronoEdit-14B-Diffusers folder or a Wan2.1 file folder, or pass per-component paths):\n  "
            + "\n  ".join(missing) + hint
        )
    return ComponentPaths(**found)


def find_dit(path: str | Path) -> Path:
    """The DiT of a model folder (diffusers or Wan layout), or ``path`` itself when it is the DiT
    (its folder, index JSON or single file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model folder or DiT file.")
    found, searched = _find(path, "dit") if path.is_dir() else (path, [])
    if found is None:
        raise CheckpointError(f"{path}: no DiT found (looked for {', '.join(searched)}).")
    return found


def _find(root: Path, name: str) -> tuple[Path | None, list[str]]:
    folder = root / DIFFUSERS_FOLDERS[name]
    searched = [str(folder)]
    if folder.is_dir():
        return folder, searched
    if name == "dit":
        return _find_wan_dit(root, searched)
    for candidate in WAN_FILES[name]:
        searched.append(str(root / candidate))
        if (root / candidate).exists():
            return root / candidate, searched
    return None, searched


def _find_wan_dit(root: Path, searched: list[str]) -> tuple[Path | None, list[str]]:
    indexes = sorted(root.glob("*.safetensors.index.json"))
    searched.append(f"{root}/*.safetensors.index.json")
    if indexes:
        return indexes[0], searched
    singles = [p for p in sorted(root.glob("*.safetensors")) if p.name not in _NOT_DIT]
    searched.append(f"{root}/<one DiT *.safetensors>")
    if len(singles) == 1:
        return singles[0], searched
    if len(singles) > 1:
        raise CheckpointError(
            f"{root} holds several .safetensors files ({', '.join(p.name for p in singles)}); "
            "pass the DiT with --dit."
        )
    return None, searched


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

    def modules(self) -> dict[str, torch.nn.Module | None]:
        """The four models by stage name (text_encoder, image_encoder, vae, dit)."""
        return {"text_encoder": self.text_encoder, "image_encoder": self.image_encoder, "vae": self.vae,
                "dit": self.dit}


def load_components(model_dir: str | Path | None = None, *, dtype: torch.dtype = torch.bfloat16,
                    device: str | torch.device = "cpu", encoders: bool = True, with_dit: bool = True,
                    fp8_base: bool = False, dit_device: str | torch.device | None = None,
                    **overrides: str | Path | None) -> LoadedComponents:
    """Find (``--model`` + per-component overrides) and load the components: all by default;
    ``encoders=False``: the DiT only, for training from cached conditioning; ``with_dit=False``:
    the encoders only, for filling that cache. ``fp8_base``: the DiT blocks' linear weights stored
    in float8, quantized on the CPU before they reach ``device``. ``dit_device``: where the DiT goes
    instead of ``device`` (FSDP training loads it on the CPU and moves only each rank's shards)."""
    paths = discover_components(model_dir, **overrides)
    dit_checkpoint = inspect_dit(paths.dit)
    if not with_dit:  # a weightless shell: DiffSynth's conditioning units read the DiT's flags
        dit = meta_dit(dit_checkpoint)
    else:
        dit_device = dit_device or device
        dit, _ = load_dit(dit_checkpoint, dtype=dtype, device="cpu" if fp8_base else dit_device)
        if fp8_base:
            store_blocks_in_fp8(dit)
            dit.to(dit_device)
    return LoadedComponents(
        dit=dit,
        text_encoder=load_text_encoder(paths.text_encoder, dtype, device) if encoders else None,
        image_encoder=load_image_encoder(paths.image_encoder, dtype, device) if encoders else None,
        vae=load_vae(paths.vae, dtype, device) if encoders else None,
        tokenizer=load_tokenizer(paths.tokenizer) if encoders else None,
        paths=paths,
        dit_checkpoint=dit_checkpoint,
    )
