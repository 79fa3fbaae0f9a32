"""Pixel metrics of an edit against a reference image: PSNR and SSIM, on RGB values in [0, 1].

SSIM is Wang et al.'s (2004): an 11x11 Gaussian window with sigma 1.5, constants (0.01)^2 and
(0.03)^2, each channel on its own, averaged over the map without the window's half-width border
(reflected padding), then over the channels; scikit-image's ``structural_similarity`` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False`` computes the same.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

MAX_PSNR = 100.0  # dB for identical images (the MSE is floored at 1e-10), so that means stay finite
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11 taps: scikit-image's truncate 3.5 at sigma 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit(image: Image.Image) -> torch.Tensor:
    """An image as a float64 tensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)


def _same_size(edit: Image.Image, reference: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    if edit.size != reference.size:
        raise ValueError(f"images differ in size: {edit.size} vs {reference.size}")
    return to_unit(edit), to_unit(reference)


def psnr(edit: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels (capped at :data:`MAX_PSNR`)."""
    a, b = _same_size(edit, reference)
    mse = max(torch.mean((a - b) ** 2).item(), 1e-10)
    return min(10 * math.log10(1.0 / mse), MAX_PSNR)


def _gaussian_window() -> torch.Tensor:
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    line = torch.exp(-offsets**2 / (2 * SSIM_SIGMA**2))
    line /= line.sum()
    return line[:, None] * line[None, :]


def ssim(edit: Image.Image, reference: Image.Image) -> float:
    """Mean structural similarity (1 for identical images), see the module docstring."""
    a, b = _same_size(edit, reference)
    if min(a.shape[1:]) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than {2 * SSIM_RADIUS}x{2 * SSIM_RADIUS}, got {edit.size}")
    window = _gaussian_window()[None, None].repeat(3, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x[None], [SSIM_RADIUS] * 4, mode="reflect")
        return torch.nn.functional.conv2d(padded, window, groups=3)[0]

    mean_a, mean_b = blur(a), blur(b)
    var_a = blur(a * a) - mean_a**2
    var_b = blur(b * b) - mean_b**2
    cov = blur(a * b) - mean_a * mean_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    r = SSIM_RADIUS
    return ssim_map[:, r:-r, r:-r].mean().item()
