"""Captions and prompt enhancement with a local transformers vision-language model (e.g. Qwen2.5-VL).

Nothing is downloaded: the model folder comes from ``make_captioner(path)`` or, for the plugin
functions ``caption`` / ``enhance_prompt``, from the ``CHRONOEDIT_CAPTIONER_MODEL`` variable.

    chronoedit-lora dataset prepare data/pairs --captioner chronoedit_lora.captioners.qwen_vl:caption
    chronoedit-lora edit ... --prompt-enhancer chronoedit_lora.captioners.qwen_vl:enhance_prompt

Captioning asks twice: first for a one-line instruction describing the before -> after edit, then
for ChronoEdit's detailed form of it ("The user wants to ...").
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import ChronoEditError

MODEL_ENV = "CHRONOEDIT_CAPTIONER_MODEL"
CONCISE = ("The first image is the original, the second is the edited version. In one short imperative "
           "sentence, say what edit turns the first into the second.")
DETAILED = ("Rewrite this edit instruction for an image-editing model: {instruction}\n"
            "Start with 'The user wants to', say precisely what changes (objects, colours, materials, light, "
            "style) and what must stay the same (composition, identities, positions, background). 50 to 90 words.")
ENHANCE = ("Here is an image and a short edit instruction: {instruction}\nRewrite it as a detailed instruction "
           "starting with 'The user wants to', describing what changes in this image and what stays the same.")
INTENT = "The user wants to"
MAX_IMAGE_PIXELS = 1024 * 1024  # about 1300 visual tokens per image for Qwen2.5-VL


@dataclass
class VisionLanguageModel:
    """A local image-text-to-text model and its processor, asked one question at a time."""

    path: str
    device: str = "cpu"
    max_new_tokens: int = 200
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are shrunk first (aspect kept)
    exchanges: list[dict] = field(default_factory=list)  # (question, images, answer) for inspection

    def __post_init__(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not os.path.isdir(self.path):
            raise ChronoEditError(f"captioner model {self.path!r}: not a local folder (nothing is downloaded).")
        self.processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModelForImageTextToText.from_pretrained(  # in the dtype it was saved in, e.g. bf16
            self.path, local_files_only=True, dtype="auto").to(self.device).eval()

    @torch.no_grad()
    def ask(self, images: list[Image.Image], question: str) -> str:
        """The model's greedy answer to ``question`` about ``images`` (shown before the question, in order)."""
        images = [fit_pixels(image, self.max_image_pixels) for image in images]
        messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=images, return_tensors="pt").to(self.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answer = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
        self.exchanges.append({"question": question, "images": len(images), "input_ids": inputs["input_ids"], "answer": answer})
        return answer


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` as RGB, shrunk to at most ``max_pixels`` with its aspect ratio kept."""
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    if scale < 1:
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                             Image.Resampling.LANCZOS)
    return image.convert("RGB")


def _with_intent(text: str, fallback: str) -> str:
    """ChronoEdit's prompt form: starts with "The user wants to"."""
    text = text.strip() or fallback
    if text.startswith(INTENT):
        return text
    return f"{INTENT} {text[:1].lower()}{text[1:]}"


class Captioner:
    """``captioner(before, after, hint)``: a concise instruction, then its detailed ChronoEdit form."""

    def __init__(self, model: VisionLanguageModel):
        self.model = model

    def __call__(self, before: Image.Image, after: Image.Image, hint: str | None = None) -> str:
        question = CONCISE + (f" Context: {hint}" if hint else "")
        concise = self.model.ask([before, after], question) or (hint or "edit the image")
        return _with_intent(self.model.ask([before, after], DETAILED.format(instruction=concise)), concise)

    def enhance(self, image: Image.Image, instruction: str) -> str:
        return _with_intent(self.model.ask([image], ENHANCE.format(instruction=instruction)), instruction)


def make_captioner(path: str, device: str = "cpu", max_new_tokens: int = 200) -> Captioner:
    return Captioner(VisionLanguageModel(path, device, max_new_tokens))


@functools.lru_cache(maxsize=1)
def _default() -> Captioner:
    path = os.environ.get(MODEL_ENV)
    if not path:
        raise ChronoEditError(f"set {MODEL_ENV} to a local vision-language model folder (e.g. Qwen2.5-VL-7B-Instruct).")
    return make_captioner(path, "cuda" if torch.cuda.is_available() else "cpu")


def caption(before: Image.Image, after: Image.Image, hint: str | None = None) -> str:
    """Plugin entry point for ``--captioner``."""
    return _default()(before, after, hint)


def enhance_prompt(image: Image.Image, instruction: str) -> str:
    """Plugin entry point for ``--prompt-enhancer``."""
    return _default().enhance(image, instruction)
