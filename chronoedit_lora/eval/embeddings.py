"""Embedding similarities from local transformers folders: CLIP (``--clip``, a ``CLIPModel``
folder) and DINOv2 (``--dino``, a ``Dinov2Model`` folder). Nothing is downloaded.

* CLIP image similarity: cosine of the two images' CLIP image embeddings.
* CLIP text direction: cosine between the change in CLIP image embedding from the input to the
  edit and the instruction's CLIP text embedding (text cut to CLIP's 77 tokens): how much the
  change goes the way the instruction says.
* DINOv2 similarity: cosine of the two images' DINOv2 CLS embeddings (``pooler_output``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..errors import ChronoEditError
from ..user_files import read_json

CLIP_MAX_TOKENS = 77


def check_model_folder(folder: str | Path, flag: str) -> Path:
    """A local transformers model folder (with ``config.json``); a one-line error naming ``flag`` otherwise."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        what = "not a folder" if not folder.is_dir() else "no config.json in it (not a transformers model folder)"
        raise ChronoEditError(f"{flag} {folder}: {what}; nothing is downloaded, give a local model folder.")
    return folder


# flag -> the config.json model_type(s) it takes, their name, the processors the kit builds from the folder
MODEL_KINDS = {
    "--clip": (("clip",), "a CLIPModel", ("AutoImageProcessor", "AutoTokenizer")),
    "--dino": (("dinov2",), "a Dinov2Model", ("AutoImageProcessor",)),
    "--judge": (("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"), "a Qwen2.5-VL or Qwen3-VL", ("AutoProcessor",)),
}


def check_model_kind(folder: str | Path, flag: str) -> None:
    """:func:`check_model_folder`, and the folder holds the model ``flag`` takes (its config's
    ``model_type``) with the processors the kit builds from it; a one-line error naming ``flag``
    otherwise. Reads configs only: no weights."""
    import transformers

    folder = check_model_folder(folder, flag)
    types, name, processors = MODEL_KINDS[flag]
    config = read_json(folder / "config.json")
    found = config.get("model_type") if isinstance(config, dict) else None
    if found not in types:
        held = f"a {found!r} model" if found else "no model_type in its config.json"
        raise ChronoEditError(f"{flag} {folder}: holds {held}, not {name} model ({' or '.join(types)}); "
                              f"give {flag} {name} folder.")
    for processor in processors:
        try:
            getattr(transformers, processor).from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a folder it cannot read
            said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ChronoEditError(f"{flag} {folder}: its {processor} cannot be built ({said}); the folder is "
                                  "incomplete: copy the model's processor and tokenizer files into it.") from None


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as ``pooler_output`` of a model output."""
    return output if torch.is_tensor(output) else output.pooler_output


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


class _ImageEmbedder:
    """A transformers model class loaded from a local folder named by ``FLAG``, with its image processor."""

    MODEL_CLASS = ""
    FLAG = ""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        import transformers

        self.folder = check_model_folder(folder, self.FLAG)
        self.device = torch.device(device)
        model_class = getattr(transformers, self.MODEL_CLASS)
        self.model = model_class.from_pretrained(str(self.folder), local_files_only=True).to(self.device).eval()
        self.processor = transformers.AutoImageProcessor.from_pretrained(str(self.folder), local_files_only=True)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """The folder's own preprocessing (resize, crop, normalise) of RGB images, as one batch."""
        return self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"].to(self.device)


class ClipScorer(_ImageEmbedder):
    """CLIP image and text embeddings from a local ``CLIPModel`` folder."""

    MODEL_CLASS, FLAG = "CLIPModel", "--clip"

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer

        super().__init__(folder, device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=self.pixels(images))).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=CLIP_MAX_TOKENS, return_tensors="pt")
        return _pooled(self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()
                                                       if k in ("input_ids", "attention_mask")})).float().cpu()


class DinoScorer(_ImageEmbedder):
    """DINOv2 CLS embeddings from a local ``Dinov2Model`` folder."""

    MODEL_CLASS, FLAG = "Dinov2Model", "--dino"

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.model(pixel_values=self.pixels(images)).pooler_output.float().cpu()
