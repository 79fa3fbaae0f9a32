"""What a ChronoEdit clip is: an edit as a short video whose first frame is the input image and
whose last frame is the edit, with the frame counts, the size multiple and the conversions between
images and frame tensors that the pipeline, the dataset and the trainer share."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

EDIT_FRAMES = 5  # [input, 3 in-between frames, edit] -> 2 latent frames (VAE temporal factor 4)
REASONING_FRAMES = 29  # 8 latent frames while the model "reasons" about the trajectory
VAE_TIME_FACTOR = 4  # the Wan VAE keeps frame 0 and packs every 4 frames after it into one latent


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of ``frames`` frames (5 -> 2, 29 -> 8)."""
    return 1 + (frames - 1) // VAE_TIME_FACTOR


REASONING_LATENTS = latent_frames(REASONING_FRAMES)
SIZE_MULTIPLE = 16  # VAE factor 8 x DiT patch 2
DEFAULT_MAX_AREA = 720 * 1280  # the official inference's output area


def default_size(width: int, height: int, max_area: int = DEFAULT_MAX_AREA) -> tuple[int, int]:
    """Aspect-preserving ``(width, height)`` with area about ``max_area``, sides multiples of 16."""
    aspect = height / width
    out_h = round(math.sqrt(max_area * aspect)) // SIZE_MULTIPLE * SIZE_MULTIPLE
    out_w = round(math.sqrt(max_area / aspect)) // SIZE_MULTIPLE * SIZE_MULTIPLE
    return max(out_w, SIZE_MULTIPLE), max(out_h, SIZE_MULTIPLE)


def latent_tokens(width: int, height: int, frames: int = EDIT_FRAMES) -> int:
    """DiT sequence length of a clip: latent frames (VAE 4x in time) x (H / 16) x (W / 16)."""
    return latent_frames(frames) * (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)


def edit_clip(source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """The training clip of a pair, (3, 5, H, W): [source, edited, edited, edited, edited]."""
    return torch.stack([source] + [edited] * (EDIT_FRAMES - 1), dim=1)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float frame (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(frame: torch.Tensor) -> Image.Image:
    """A frame (3, H, W) in [-1, 1] as an RGB image (rounded to the nearest level)."""
    array = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
