"""Captioner and prompt-enhancer plugins (``--captioner`` / ``--prompt-enhancer`` MODULE:CALLABLE).

A captioner is ``f(before: Image, after: Image, hint: str | None) -> str | Caption``: a prompt, or
both prompts of the original release's labelling (:class:`Caption`). It may also offer
``f.caption_batch(pairs, reason_unchanged) -> list[Caption]``, which ``dataset prepare`` then calls
with ``--caption-batch-size`` pairs at a time. A prompt enhancer is
``f(image: Image, instruction: str) -> str``. :mod:`.qwen_vl` implements both on a local
transformers vision-language model (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE).
"""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import NO_CHANGE


@dataclass(frozen=True)
class Caption:
    """A labelled pair: the concise instruction (or ``no change``) and the detailed prompt trained on."""

    caption: str
    caption_cot: str = ""  # "The user wants to ...", 80-100 words; empty if not asked for

    @property
    def unchanged(self) -> bool:
        """Whether the model saw no change between the two images."""
        return self.caption.strip().strip(".\"'").lower() == NO_CHANGE
