"""Evaluate checkpoints: one loaded model serves them all (each LoRA applied through hooks and
removed again, see :class:`~chronoedit_lora.lora.UnfusedLora`), the held-out pairs are encoded
once, then the metric models and the judge score the edits, one model in memory at a time."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..pipeline import ChronoEditPipeline
from .checkpoints import Checkpoint
from ..step_cache import StepCache
from .embeddings import ClipScorer, DinoScorer, check_model_kind, cosine
from .held_out import EditSettings, HeldOutPair, edit_pair, negative_embedding, reasoning_steps
from .image_metrics import psnr, ssim
from .judge import Judge, Judgement
from .lpips import Lpips, lpips_files
from .metrics import COUNTED
from .quantile_loss import quantile_losses

Values = dict[str, list[float | None]]  # metric -> one value per held-out pair (None: not measured)


@dataclass(frozen=True)
class MetricFolders:
    """Local folders of the optional metric models and the judge (None: not measured)."""

    lpips: Path | None = None
    clip: Path | None = None
    dino: Path | None = None
    judge: Path | None = None

    def check(self) -> None:
        """Each given folder holds what its model needs (a one-line error naming the flag), before any model loads."""
        if self.lpips:
            lpips_files(self.lpips)
        for flag, folder in (("--clip", self.clip), ("--dino", self.dino), ("--judge", self.judge)):
            if folder:
                check_model_kind(folder, flag)


@dataclass
class Evaluation:
    """Every checkpoint's values per pair, its edits and the judge's verdicts."""

    checkpoints: list[Checkpoint]
    pairs: list[HeldOutPair]
    values: dict[str, Values] = field(default_factory=dict)  # by checkpoint label
    edits: dict[str, list[Image.Image]] = field(default_factory=dict)
    judgements: dict[str, list[Judgement]] = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, float | None]]:
        """checkpoint label -> metric -> mean over the pairs (a count for ``judge_unparsed``)."""
        return {checkpoint.label: summarise(self.values[checkpoint.label]) for checkpoint in self.checkpoints}


def summarise(values: Values) -> dict[str, float | None]:
    """Mean of each metric over the pairs that have a value (None if none has); counts are summed."""
    table = {}
    for metric, per_pair in values.items():
        known = [v for v in per_pair if v is not None]
        table[metric] = sum(known) if metric in COUNTED else (sum(known) / len(known) if known else None)
    return table


def pixel_scores(edit: Image.Image, pair: HeldOutPair) -> dict[str, float]:
    """PSNR and SSIM to the target, and SSIM to the input (how much of it survives)."""
    return {"psnr": psnr(edit, pair.target), "ssim": ssim(edit, pair.target), "source_ssim": ssim(edit, pair.source)}


def step_cache(pipe: ChronoEditPipeline, pair: HeldOutPair, settings: EditSettings) -> StepCache | None:
    """A fresh step cache for one held-out edit, if ``settings`` asks for one (never for a trajectory row,
    which reasons throughout: no step of it may be skipped)."""
    if settings.step_cache is None or reasoning_steps(pair, settings):
        return None
    return StepCache(pipe.dit, settings.step_cache, settings.steps, reasoning_steps(pair, settings),
                     settings.cache_calibration)


def cache_scores(cache: StepCache, cached: Image.Image, uncached: Image.Image) -> dict[str, float]:
    """The cached edit against the uncached one, and the share of DiT calls the cache skipped."""
    computed, skipped = cache.calls()
    return {"cache_psnr": psnr(cached, uncached), "cache_ssim": ssim(cached, uncached),
            "cache_saved": skipped / (computed + skipped)}


@torch.no_grad()
def score_current(pipe: ChronoEditPipeline, pairs: list[HeldOutPair], settings: EditSettings | None,
                  negative: torch.Tensor | None, advance: Callable[[int], object] = lambda n: None,
                  ) -> tuple[Values, list[Image.Image]]:
    """The quantile losses of the DiT as it is now and, unless ``settings`` is None, each pair's edit
    with its pixel scores. ``advance(n)``: called as pairs are done (a progress bar)."""
    values: Values = dict(quantile_losses(pipe, pairs))
    edits = []
    if settings is None:
        advance(len(pairs))
        return values, edits
    for pair in pairs:
        cache = step_cache(pipe, pair, settings)
        edits.append(edit_pair(pipe, pair, settings, negative, cache))
        scores = pixel_scores(edits[-1], pair)
        if cache is not None:
            scores.update(cache_scores(cache, edits[-1], edit_pair(pipe, pair, settings, negative)))
        for metric, value in scores.items():
            values.setdefault(metric, []).append(value)
        advance(1)
    return values, edits


def evaluate_checkpoints(pipe: ChronoEditPipeline, checkpoints: list[Checkpoint], pairs: list[HeldOutPair],
                         settings: EditSettings | None) -> Evaluation:
    """Losses and edits of every checkpoint on the encoded pairs (``settings`` None: losses only)."""
    evaluation = Evaluation(checkpoints, pairs)
    negative = negative_embedding(pipe, settings) if settings else None
    pipe.dit.eval()
    with tqdm(total=len(checkpoints) * len(pairs), desc="checkpoints x pairs", unit="pair", dynamic_ncols=True) as bar:
        for checkpoint in checkpoints:
            bar.set_postfix_str(checkpoint.label)
            hooks = pipe.load_lora(checkpoint.path, fuse=False) if checkpoint.path else None
            try:
                evaluation.values[checkpoint.label], evaluation.edits[checkpoint.label] = score_current(
                    pipe, pairs, settings, negative, bar.update)
            finally:
                if hooks is not None:
                    hooks.remove()
    return evaluation


def _release_memory() -> None:
    """Return what a deleted model held (CPU RAM, or the GPU's cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_with_models(evaluation: Evaluation, folders: MetricFolders, device: str = "cpu") -> None:
    """Add LPIPS, CLIP, DINOv2 and judge values for the edits, loading each given model in turn."""
    pairs, labels = evaluation.pairs, [c.label for c in evaluation.checkpoints]
    if folders.lpips:
        model = Lpips(folders.lpips, device)
        for label in labels:
            evaluation.values[label]["lpips"] = [model.distance(edit, pair.target)
                                                 for edit, pair in zip(evaluation.edits[label], pairs)]
        del model
        _release_memory()
    if folders.clip:
        clip = ClipScorer(folders.clip, device)
        targets, sources = clip.images([p.target for p in pairs]), clip.images([p.source for p in pairs])
        texts = clip.texts([p.prompt for p in pairs])
        for label in labels:
            edits = clip.images(evaluation.edits[label])
            evaluation.values[label]["clip_image"] = cosine(edits, targets).tolist()
            evaluation.values[label]["clip_text_direction"] = cosine(edits - sources, texts).tolist()
        del clip
        _release_memory()
    if folders.dino:
        dino = DinoScorer(folders.dino, device)
        targets, sources = dino.images([p.target for p in pairs]), dino.images([p.source for p in pairs])
        for label in labels:
            edits = dino.images(evaluation.edits[label])
            evaluation.values[label]["dino"] = cosine(edits, targets).tolist()
            evaluation.values[label]["source_dino"] = cosine(edits, sources).tolist()
        del dino
        _release_memory()
    if folders.judge:
        judge = Judge(str(folders.judge), device)
        with tqdm(total=len(labels) * len(pairs), desc="judge", unit="edit", dynamic_ncols=True) as bar:
            for label in labels:
                verdicts = []
                for edit, pair in zip(evaluation.edits[label], pairs):
                    verdicts.append(judge(pair.source, edit, pair.prompt))
                    bar.update(1)
                evaluation.judgements[label] = verdicts
                evaluation.values[label].update({
                    "judge_instruction": [v.instruction.score for v in verdicts],
                    "judge_quality": [v.quality.score for v in verdicts],
                    "judge_overall": [v.overall for v in verdicts],
                    "judge_unparsed": [v.unparsed for v in verdicts]})
        del judge
        _release_memory()
