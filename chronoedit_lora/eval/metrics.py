"""The metric columns of an evaluation: their names, what each measures and which way is better
(no heavy imports: the training config checks keep_best against them)."""

from __future__ import annotations

LOSS = "loss"
QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)  # of training's timestep distribution, see .quantile_loss


def quantile_column(quantile: float) -> str:
    """``loss_q10`` for quantile 0.1."""
    return f"{LOSS}_q{round(quantile * 100):02d}"


HIGHER, LOWER, NEUTRAL = "higher", "lower", "neutral"  # neutral: shown, never ranked

METRICS: dict[str, tuple[str, str]] = {
    LOSS: (LOWER, "held-out flow-matching loss, mean over the timestep quantiles (fixed noise)"),
    **{quantile_column(q): (LOWER, f"held-out loss at timestep quantile {q:g}") for q in QUANTILES},
    "psnr": (HIGHER, "PSNR of the edit to the target, dB"),
    "ssim": (HIGHER, "SSIM of the edit to the target"),
    "lpips": (LOWER, "LPIPS distance of the edit to the target"),
    "clip_image": (HIGHER, "CLIP image similarity of the edit to the target"),
    "clip_text_direction": (HIGHER, "CLIP: the input-to-edit change against the instruction's text"),
    "dino": (HIGHER, "DINOv2 similarity of the edit to the target"),
    "source_ssim": (NEUTRAL, "SSIM of the edit to the input: how much of the input survives"),
    "source_dino": (NEUTRAL, "DINOv2 similarity of the edit to the input"),
    "judge_instruction": (HIGHER, "VLM judge: instruction following, 0-10"),
    "judge_quality": (HIGHER, "VLM judge: perceptual quality, 0-10"),
    "judge_overall": (HIGHER, "VLM judge: sqrt(instruction x quality), 0-10"),
    "judge_unparsed": (NEUTRAL, "VLM judge: answers without a readable score (count)"),
    "cache_psnr": (NEUTRAL, "with --step-cache: PSNR of the cached edit to the uncached one, dB"),
    "cache_ssim": (NEUTRAL, "with --step-cache: SSIM of the cached edit to the uncached one"),
    "cache_saved": (NEUTRAL, "with --step-cache: share of DiT calls skipped"),
}
COUNTED = ("judge_unparsed",)  # summed over the pairs, not averaged
# The overall pick ranks the checkpoints on each of these that was measured (one per kind of evidence).
PICK_METRICS = ("loss", "psnr", "ssim", "lpips", "clip_image", "clip_text_direction", "dino", "judge_overall")
# What training-time evaluation measures (the cheap part), so what keep_best may name.
TRAINING_METRICS = (LOSS, *(quantile_column(q) for q in QUANTILES), "psnr", "ssim", "source_ssim")


def better(metric: str, a: float, b: float) -> bool:
    """Whether value ``a`` of ``metric`` is strictly better than ``b``."""
    direction = METRICS[metric][0]
    return a > b if direction == HIGHER else a < b if direction == LOWER else False
