"""Find ChronoEdit's components under ``--model DIR`` (diffusers or Wan2.1 file layout) and load
them all (DiT, umT5, CLIP, VAE, tokenizer).

Nothing is downloaded: a component that cannot be found is an error saying where we looked.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffsynth.models.wan_video_dit import WanModel
from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder

from ..errors import CheckpointError
from .dit import DiTCheckpoint, inspect_dit, load_dit, meta_dit
from .fp8 import store_blocks_in_fp8
from .identify import FILE_SUFFIXES, FileInfo, identify
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


COMFYUI_FOLDERS = {  # ComfyUI's models/ subfolders (and their older names) that hold each component
    "dit": ("diffusion_models", "unet", "gguf"),
    "text_encoder": ("text_encoders", "clip"),
    "image_encoder": ("clip_vision",),
    "vae": ("vae",),
}
COMPONENT_FLAGS = {name: "--" + name.replace("_", "-") for name in DIFFUSERS_FOLDERS}


@dataclass(frozen=True)
class ComponentPaths:
    """Where each ChronoEdit component lives (a file or a folder each), and why, when a choice was made."""

    dit: Path
    text_encoder: Path
    image_encoder: Path
    vae: Path
    tokenizer: Path
    choices: tuple[str, ...] = ()  # "dit: chose X over Y (…)" for every component several files fitted


COMPONENT_NAMES = tuple(DIFFUSERS_FOLDERS)  # the per-component override names, in loading order


def discover_components(model_dir: str | Path | None = None, **overrides: str | Path | None) -> ComponentPaths:
    """Locate every component under ``model_dir``; keyword overrides (e.g. ``vae=...``) win.

    Raises :class:`CheckpointError` naming each missing component and the places searched.
    """
    found, missing, choices = survey(model_dir, **overrides)
    if missing:
        root = Path(model_dir) if model_dir is not None else None
        component = root.name if root is not None and root.name in DIFFUSERS_FOLDERS.values() else None
        hint = (f"\n{root} looks like the {component}/ folder of a model: pass its parent, --model {root.parent}"
                + (f" (or the DiT alone with --dit {root})" if component == "transformer" else "") + "."
                if component else "")
        raise CheckpointError(
            "ChronoEdit components not found (nothing is downloaded; point --model at a ChronoEdit-14B-Diffusers "
            "folder, a Wan2.1 file folder, ComfyUI's models/ folder or a folder of weight files, or pass "
            "per-component paths):\n  " + "\n  ".join(f"{name}: {why}" for name, why in missing.items()) + hint
        )
    return ComponentPaths(**found, choices=tuple(choices))


def survey(model_dir: str | Path | None = None, **overrides: str | Path | None
           ) -> tuple[dict[str, Path], dict[str, str], list[str]]:
    """``(found, missing, choices)``: each component's path, each missing one with where it was looked
    for, and the choices made among several fitting files (``model check`` reports all three)."""
    unknown = set(overrides) - set(COMPONENT_NAMES)
    if unknown:
        raise TypeError(f"unknown component override(s): {', '.join(sorted(unknown))}")
    given = {k: Path(v) for k, v in overrides.items() if v is not None}
    found: dict[str, Path] = {}
    missing: dict[str, str] = {}
    choices: list[str] = []
    root = Path(model_dir) if model_dir is not None else None
    if root is not None and not root.is_dir():
        raise CheckpointError(f"--model {root}: no such folder.")
    loose: LooseFiles | None = None
    for name in COMPONENT_NAMES:
        if name in given:
            if not given[name].exists():
                raise CheckpointError(f"{name} override {given[name]} does not exist.")
            found[name] = given[name]
            continue
        if root is None:
            missing[name] = f"no --model folder and no {COMPONENT_FLAGS[name]} given"
            continue
        path, searched = _find(root, name)
        if path is None and name != "tokenizer":
            loose = loose or LooseFiles(root)
            path, choice = loose.pick(name)
            searched.append(loose.where(name))
            if choice:
                choices.append(choice)
        if path is None and name == "tokenizer":
            path, note = _embedded_tokenizer(found.get("text_encoder"))
            searched.append(note)
        if path is None:
            missing[name] = "looked for " + ", ".join(searched)
        else:
            found[name] = path
    return found, missing, choices


def _embedded_tokenizer(text_encoder: Path | None) -> tuple[Path | None, str]:
    """The text-encoder file itself when it carries ComfyUI's ``spiece_model``."""
    if text_encoder is not None and text_encoder.is_file() and identify(text_encoder).has_tokenizer:
        return text_encoder, f"a spiece_model inside the text encoder {text_encoder.name}"
    return None, "a spiece_model inside a ComfyUI text-encoder file"


class LooseFiles:
    """The weight files of a ComfyUI ``models/`` folder (or its four subfolders) or of a plain folder,
    each identified from its headers once."""

    def __init__(self, root: Path):
        self.root = root
        base = root / "models" if (root / "models").is_dir() else root
        self.folders = [base / sub for subs in COMFYUI_FOLDERS.values() for sub in subs if (base / sub).is_dir()]
        files = [f for folder in self.folders for f in sorted(folder.rglob("*")) if f.suffix in FILE_SUFFIXES]
        files += [f for f in sorted(root.iterdir()) if f.is_file() and f.suffix in FILE_SUFFIXES]
        self.infos = [identify(f) for f in files if f.is_file()]

    def where(self, name: str) -> str:
        places = [str(f) for f in self.folders if f.name in COMFYUI_FOLDERS[name]] + [str(self.root)]
        return f"weight files in {' and '.join(places)} recognised by their keys"

    def pick(self, name: str) -> tuple[Path | None, str]:
        """The file for component ``name`` and, when several fit, the sentence saying which and why.
        DiTs whose name says ChronoEdit come first (Wan2.1-I2V's DiTs have the very same keys and
        shapes, so the keys cannot tell them apart); then the most precise (most bits per weight in its
        least precise tensor type: fp32 32, bf16/fp16 16, Q8_0 8.5, fp8 8, Q4_K 4.5…); then the first name."""
        fits = [info for info in self.infos if info.component == name]
        if not fits:
            return None, ""
        named = lambda info: name == "dit" and "chrono" in info.path.name.lower()  # noqa: E731
        fits.sort(key=lambda info: (not named(info), -info.least_bits, str(info.path)))
        if len(fits) == 1:
            return fits[0].path, ""
        best = fits[0]
        why = ("its name says ChronoEdit; Wan2.1-I2V DiTs have the same keys" if named(best) and not named(fits[1])
               else "the most precise" if best.least_bits > fits[1].least_bits else "the first name of equals")
        others = ", ".join(f"{i.path.name} ({i.dtype})" for i in fits[1:])
        return best.path, (f"{name}: chose {best.path.name} ({best.dtype}: {why}) over {others}; "
                           f"pass {COMPONENT_FLAGS[name]} to pick another")

    def others(self) -> list[FileInfo]:
        """The files that are no ChronoEdit component, with what each looks like."""
        return [info for info in self.infos if info.component is None]


def find_dit(path: str | Path) -> Path:
    """The DiT of a model folder (diffusers or Wan layout), or ``path`` itself when it is the DiT
    (its folder, index JSON or single file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model folder or DiT file.")
    found, searched = _find(path, "dit") if path.is_dir() else (path, [])
    if found is None:
        loose = LooseFiles(path)
        found, _ = loose.pick("dit")
        searched.append(loose.where("dit"))
    if found is None:
        raise CheckpointError(f"{path}: no DiT found (looked for {', '.join(searched)}).")
    return found


def _find(root: Path, name: str) -> tuple[Path | None, list[str]]:
    folder = root / DIFFUSERS_FOLDERS[name]
    searched = [str(folder)]
    # a diffusers component folder has its config.json (ComfyUI's models/vae/ holds loose files instead)
    if folder.is_dir() and (name == "tokenizer" or (folder / "config.json").is_file()):
        return folder, searched
    if name == "dit":
        return _find_wan_dit(root, searched)
    for candidate in WAN_FILES[name]:
        searched.append(str(root / candidate))
        if (root / candidate).exists():
            return root / candidate, searched
    return None, searched


def _find_wan_dit(root: Path, searched: list[str]) -> tuple[Path | None, list[str]]:
    """A sharded DiT by its index JSON; single files are recognised by their keys (:class:`LooseFiles`)."""
    indexes = sorted(root.glob("*.safetensors.index.json"))
    searched.append(f"{root}/*.safetensors.index.json")
    return (indexes[0] if indexes else None), searched


def describe_path(path: Path) -> str:
    """``file (format, dtype)`` for a weights file, ``folder/`` for a diffusers or tokenizer folder."""
    if path.is_dir():
        return f"{path.name}/"
    if path.suffix in FILE_SUFFIXES:
        info = identify(path)
        return f"{path.name} ({info.format}, {info.dtype})" if info.component else path.name
    return path.name


def summary_line(paths: ComponentPaths, names: tuple[str, ...] = COMPONENT_NAMES) -> str:
    """The one line every model-loading command prints: each component's file, format and dtype."""
    parts = []
    for name in names:
        path = getattr(paths, name)
        if name == "tokenizer" and path == paths.text_encoder:
            parts.append("tokenizer: its embedded spiece_model")
        else:
            parts.append(f"{name.replace('_', ' ')}: {describe_path(path)}")
    notes = "".join(f" [{choice}]" for choice in paths.choices)
    return "model: " + "; ".join(parts) + notes


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
                    fp8_base: bool = False, dit_device: str | torch.device | None = None, announce: bool = True,
                    **overrides: str | Path | None) -> LoadedComponents:
    """Find (``--model`` + per-component overrides) and load the components: all by default;
    ``encoders=False``: the DiT only, for training from cached conditioning; ``with_dit=False``:
    the encoders only, for filling that cache. ``fp8_base``: the DiT blocks' linear weights stored
    in float8, quantized on the CPU before they reach ``device``. ``dit_device``: where the DiT goes
    instead of ``device`` (FSDP training loads it on the CPU and moves only each rank's shards).
    ``announce``: print :func:`summary_line` to stderr (every model-loading command does)."""
    paths = discover_components(model_dir, **overrides)
    dit_checkpoint = inspect_dit(paths.dit)
    if announce:
        print(summary_line(paths, COMPONENT_NAMES if encoders else ("dit",)), file=sys.stderr)
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
