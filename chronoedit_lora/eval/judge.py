"""A local vision-language judge, VIEScore-style (Ku et al. 2024): instruction following and
perceptual quality, each 0-10 with a one-line reason, and their geometric mean as the overall score.

The model is any local transformers image-text-to-text folder the captioner loads (Qwen2.5-VL,
Qwen3-VL; see :mod:`chronoedit_lora.captioners.qwen_vl`). An answer without a score from 0 to 10
is counted as unparsed and left out of the means; it never stops the evaluation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from PIL import Image

from ..captioners.qwen_vl import VisionLanguageModel

ANSWER_FORM = "Answer in one line exactly like this: SCORE: <a whole number from 0 to 10> REASON: <one short sentence>"
INSTRUCTION_QUESTION = (
    "The first image is the original. The second image is an edit of it made for this instruction:\n{instruction}\n"
    "Rate how well the second image follows the instruction, and how little it changes what the instruction did not "
    "ask to change (0: not followed at all, 10: followed perfectly with nothing else changed). " + ANSWER_FORM)
QUALITY_QUESTION = (
    "Rate how natural this image looks and how free it is of artifacts such as distortion, blur, broken shapes, "
    "noise or unnatural details (0: unrecognisable, 10: flawless). " + ANSWER_FORM)
_SCORE = re.compile(r"score\W{0,3}(\d+(?:\.\d+)?)", re.IGNORECASE)
_REASON = re.compile(r"reason\W{0,3}(.*)", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """One answer: its score (None if unparsed), its reason and the raw text."""

    score: float | None
    reason: str
    answer: str


def parse_answer(answer: str) -> Verdict:
    """``SCORE: 7 REASON: ...`` (any case and punctuation around them) -> Verdict; a score outside
    0-10 or none at all is unparsed."""
    found = _SCORE.search(answer)
    score = float(found.group(1)) if found else None
    if score is not None and not 0 <= score <= 10:
        score = None
    reason = _REASON.search(answer)
    text = (reason.group(1) if reason else answer).strip().splitlines()
    return Verdict(score, text[0].strip() if text else "", answer)


@dataclass(frozen=True)
class Judgement:
    """The judge's two verdicts on one edit and the overall score (None unless both parsed)."""

    instruction: Verdict
    quality: Verdict

    @property
    def overall(self) -> float | None:
        scores = (self.instruction.score, self.quality.score)
        return None if None in scores else math.sqrt(scores[0] * scores[1])

    @property
    def unparsed(self) -> int:
        return sum(v.score is None for v in (self.instruction, self.quality))


class Judge:
    """Asks a local vision-language model about each edit (greedy answers, so they are reproducible)."""

    def __init__(self, folder: str, device: str = "cpu", max_new_tokens: int = 60):
        self.model = VisionLanguageModel(folder, device, max_new_tokens)

    def __call__(self, source: Image.Image, edit: Image.Image, instruction: str) -> Judgement:
        following, quality = self.model.ask_many([(INSTRUCTION_QUESTION.format(instruction=instruction), [source, edit]),
                                                  (QUALITY_QUESTION, [edit])])
        return Judgement(parse_answer(following), parse_answer(quality))
