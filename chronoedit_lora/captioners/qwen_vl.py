"""Captions and prompt enhancement with a local transformers vision-language model: Qwen2.5-VL,
Qwen3-VL or Qwen3-VL-MoE (the original release's default is Qwen3-VL-30B-A3B-Instruct).

Nothing is downloaded: the model folder comes from ``make_captioner(path)`` or, for the plugin
functions ``caption`` / ``enhance_prompt``, from the ``CHRONOEDIT_CAPTIONER_MODEL`` variable.

    chronoedit-lora dataset prepare data/pairs --captioner chronoedit_lora.captioners.qwen_vl:caption
    chronoedit-lora edit ... --prompt-enhancer chronoedit_lora.captioners.qwen_vl:enhance_prompt

Labelling follows the original's two stages (see :mod:`.prompts`): a concise instruction or
``no change``, then the detailed "The user wants to ..." prompt; both are returned. The weights go
straight to the devices of a device map ("auto": spread over the GPUs), never whole through CPU RAM.
"""

from __future__ import annotations

import functools
import gc
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import ChronoEditError
from . import Caption
from .prompts import EDIT_INSTRUCTION, ENHANCE, INTENT, REASONING

MODEL_ENV = "CHRONOEDIT_CAPTIONER_MODEL"
MAX_SHORT_SIDE = 1080  # the original's cap: larger images are shrunk to this short side first
MAX_NEW_TOKENS = 512  # the original's answer limit

Request = tuple[str, Sequence[Image.Image]]  # (instruction, images)


@dataclass
class VisionLanguageModel:
    """A local image-text-to-text model and its processor, asked a batch of requests at a time."""

    path: str
    device_map: str | dict = "auto"  # transformers/accelerate device map; "auto": the GPUs, then CPU RAM
    max_new_tokens: int = MAX_NEW_TOKENS
    max_short_side: int = MAX_SHORT_SIDE
    exchanges: deque = field(default_factory=lambda: deque(maxlen=32))  # the latest requests, for inspection

    def __post_init__(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not os.path.isdir(self.path):
            raise ChronoEditError(f"captioner model {self.path!r}: not a local folder (nothing is downloaded).")
        self.processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # a batch's answers all start at the same position
        # transformers 5 builds the model on the meta device and loads each weight straight onto its device
        # in the map (what low_cpu_mem_usage=True did before), in the dtype it was saved in, e.g. bf16
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.path, local_files_only=True, dtype="auto", device_map=self.device_map).eval()

    @torch.no_grad()
    def ask_many(self, requests: Sequence[Request]) -> list[str]:
        """Greedy answers to ``(instruction, images)`` requests, generated as one padded batch: the
        instruction is the system message, the images (in order) the user's."""
        conversations = [[{"role": "system", "content": [{"type": "text", "text": instruction}]},
                          {"role": "user", "content": [{"type": "image"} for _ in images]}]
                         for instruction, images in requests]
        texts = [self.processor.apply_chat_template(conversation, add_generation_prompt=True)
                 for conversation in conversations]
        images = [cap_short_side(image, self.max_short_side) for _, group in requests for image in group]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answers = [answer.strip() for answer in self.processor.batch_decode(
            output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
        for (instruction, group), ids, answer in zip(requests, inputs["input_ids"], answers):
            self.exchanges.append({"instruction": instruction, "images": len(group), "input_ids": ids, "answer": answer})
        return answers


def cap_short_side(image: Image.Image, max_short_side: int) -> Image.Image:
    """``image`` as RGB, shrunk (aspect kept) so that its short side is at most ``max_short_side``."""
    scale = max_short_side / min(image.size)
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
    """Labels (before, after) pairs in the original's two stages; rewrites instructions for ``edit``."""

    def __init__(self, model: VisionLanguageModel):
        self.model = model

    def caption_batch(self, pairs: Sequence[tuple[Image.Image, Image.Image]], reason_unchanged: bool = False,
                      hint: str | None = None) -> list[Caption]:
        """Both prompts of each pair, in two batched stages; a ``no change`` pair gets its detailed
        prompt only if ``reason_unchanged`` (to be trained on as an edit that keeps the image)."""
        instruction = EDIT_INSTRUCTION + (f"\n\nContext from the user: {hint}" if hint else "")
        concise = self.model.ask_many([(instruction, pair) for pair in pairs])
        reasoned = [i for i, text in enumerate(concise) if reason_unchanged or not Caption(text).unchanged]
        detailed = self.model.ask_many([(REASONING.format(instruction=concise[i]), pairs[i]) for i in reasoned]) \
            if reasoned else []
        cot = {i: _with_intent(text, concise[i]) for i, text in zip(reasoned, detailed)}
        return [Caption(text, cot.get(i, "")) for i, text in enumerate(concise)]

    def __call__(self, before: Image.Image, after: Image.Image, hint: str | None = None) -> Caption:
        return self.caption_batch([(before, after)], hint=hint)[0]

    def enhance(self, image: Image.Image, instruction: str) -> str:
        """``instruction`` about ``image`` in ChronoEdit's detailed form (the original's prompt enhancer)."""
        return _with_intent(self.model.ask_many([(ENHANCE.format(instruction=instruction), [image])])[0], instruction)


def make_captioner(path: str, device_map: str | dict = "auto", max_new_tokens: int = MAX_NEW_TOKENS) -> Captioner:
    return Captioner(VisionLanguageModel(path, device_map, max_new_tokens))


@functools.lru_cache(maxsize=1)
def _default() -> Captioner:
    path = os.environ.get(MODEL_ENV)
    if not path:
        raise ChronoEditError(f"set {MODEL_ENV} to a local vision-language model folder (e.g. Qwen3-VL-30B-A3B-Instruct "
                              "or Qwen2.5-VL-7B-Instruct).")
    return make_captioner(path, "auto" if torch.cuda.is_available() else "cpu", MAX_NEW_TOKENS)


def release() -> None:
    """Free the plugin functions' model (its GPU memory too), e.g. before ChronoEdit loads."""
    _default.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def caption(before: Image.Image, after: Image.Image, hint: str | None = None) -> Caption:
    """Plugin entry point for ``--captioner``."""
    return _default()(before, after, hint)


def caption_batch(pairs: Sequence[tuple[Image.Image, Image.Image]], reason_unchanged: bool = False) -> list[Caption]:
    """``caption`` for several pairs at once (``dataset prepare`` finds it as ``caption.caption_batch``)."""
    return _default().caption_batch(pairs, reason_unchanged)


def enhance_prompt(image: Image.Image, instruction: str) -> str:
    """Plugin entry point for ``--prompt-enhancer`` (``edit`` frees the model afterwards: ``enhance_prompt.release``)."""
    return _default().enhance(image, instruction)


caption.caption_batch = caption_batch
enhance_prompt.release = release
