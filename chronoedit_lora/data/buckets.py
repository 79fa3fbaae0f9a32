"""Training sizes and the shared crop of an edit pair: fixed size or aspect-ratio buckets, and batching.

Both images of a pair go through one :class:`CropPlan` whose crop box is given as fractions of
the image. Applying it to the edited image is the same as first resizing the edited image to the
input image's size and then cropping both identically, with a single resampling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import ChronoEditError
from ..settings import check_size
from ..video import SIZE_MULTIPLE as MULTIPLE
from .problems import Problem

MAX_ASPECT = 4.0  # widest bucket; more extreme images are centre-cropped to it
DEFAULT_MAX_PIXELS = 1024 * 1024
ASPECT_MISMATCH = 0.01  # relative aspect difference between input and edited image that is reported
UPSCALE_REPORTED = 1.05  # upscaling by less than 5% is not worth a warning
TRAJECTORY_TOKEN_FACTOR = 4  # a trajectory's latent frames (8) per pair latent frames (2)


@dataclass(frozen=True)
class CropPlan:
    """Resize-to-cover then centre-crop: output ``size`` (width, height) from the region ``box``
    (left, top, right, bottom as fractions of the image's width and height)."""

    size: tuple[int, int]
    box: tuple[float, float, float, float]

    def pixel_box(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The crop box in pixels of an image of ``image_size``."""
        width, height = image_size
        left, top, right, bottom = self.box
        return left * width, top * height, right * width, bottom * height

    def scale(self, image_size: tuple[int, int]) -> float:
        """Output pixels per image pixel for an image of ``image_size`` (> 1 means upscaling)."""
        left, top, right, bottom = self.pixel_box(image_size)
        return max(self.size[0] / (right - left), self.size[1] / (bottom - top))

    def apply(self, image: Image.Image) -> Image.Image:
        """Crop and resize ``image`` in one Lanczos resampling."""
        return image.resize(self.size, Image.Resampling.LANCZOS, box=self.pixel_box(image.size))


def plan_crop(image_size: tuple[int, int], target_size: tuple[int, int]) -> CropPlan:
    """The centred crop of ``image_size`` with the aspect ratio of ``target_size`` (as large as possible)."""
    width, height = image_size
    target_width, target_height = target_size
    scale = max(target_width / width, target_height / height)
    keep_x = min(1.0, target_width / scale / width)  # kept fraction of the width (min: float round-off)
    keep_y = min(1.0, target_height / scale / height)
    return CropPlan(target_size, ((1 - keep_x) / 2, (1 - keep_y) / 2, (1 + keep_x) / 2, (1 + keep_y) / 2))


def plan_pair(source_size: tuple[int, int], edited_size: tuple[int, int], target_size: tuple[int, int],
              row: int, columns: tuple[str, str] = ("input_image", "edited_image")) -> tuple[CropPlan, list[Problem]]:
    """The crop plan shared by both images (from the source's size) and warnings: edited aspect ratio
    off by more than 1%, or an image upscaled by more than 5%."""
    plan = plan_crop(source_size, target_size)
    problems = []
    mismatch = abs(_aspect(edited_size) / _aspect(source_size) - 1)
    if mismatch > ASPECT_MISMATCH:
        problems.append(Problem(
            row, columns[1], f"The edited image ({_wxh(edited_size)}) and the input image ({_wxh(source_size)}) "
            f"differ in aspect ratio by {mismatch:.1%}; the edited image is stretched to the input's shape.",
            "Crop or pad the edited image to the input image's aspect ratio.", fatal=False))
    sizes = {columns[0]: source_size} | ({columns[1]: edited_size} if edited_size != source_size else {})
    for column, size in sizes.items():
        scale = plan.scale(size)
        if scale > UPSCALE_REPORTED:
            problems.append(Problem(
                row, column, f"The image ({_wxh(size)}) is smaller than the training size {_wxh(target_size)}; "
                f"it is upscaled {scale:.2f}x.",
                "Use a larger image, or a smaller height/width or max_pixels.", fatal=False))
    return plan, problems


@functools.lru_cache(maxsize=16)
def aspect_buckets(max_pixels: int, multiple: int = MULTIPLE,
                   max_aspect: float = MAX_ASPECT) -> tuple[tuple[int, int], ...]:
    """All (width, height) buckets, sides multiples of ``multiple`` and area at most ``max_pixels``:
    for every side length the longest other side that fits, aspect ratio within ``max_aspect``.
    Sorted by aspect ratio."""
    if max_pixels < multiple * multiple:
        raise ChronoEditError(f"max_pixels {max_pixels} is below the smallest size {multiple}x{multiple}.")
    sizes = set()
    for side in range(multiple, max_pixels // multiple + 1, multiple):
        other = max_pixels // side // multiple * multiple
        if 1 / max_aspect <= side / other <= max_aspect:
            sizes |= {(side, other), (other, side)}
    return tuple(sorted(sizes, key=lambda s: (_aspect(s), s[0])))


def choose_bucket(image_size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest to ``image_size`` in aspect ratio (log scale); the larger one on a tie."""
    target = math.log(_aspect(image_size))
    return min(buckets, key=lambda b: (abs(math.log(_aspect(b)) - target), -b[0] * b[1]))


@dataclass(frozen=True)
class SizePolicy:
    """Where training sizes come from: a fixed (width, height), or aspect buckets under a pixel budget."""

    fixed: tuple[int, int] | None
    buckets: tuple[tuple[int, int], ...]

    @classmethod
    def create(cls, height: int | None = None, width: int | None = None,
               max_pixels: int | None = None) -> SizePolicy:
        """Height and width together select a fixed size (and win over ``max_pixels``); otherwise
        buckets under ``max_pixels`` (default 1024x1024). Raises ChronoEditError on bad values."""
        check_size(height, width, prefix="")
        if height is not None and width is not None:
            return cls((width, height), ())
        return cls(None, aspect_buckets(max_pixels or DEFAULT_MAX_PIXELS))

    @classmethod
    def for_trajectories(cls, height: int | None = None, width: int | None = None, max_pixels: int | None = None,
                         trajectory_max_pixels: int | None = None) -> SizePolicy:
        """Aspect buckets under ``trajectory_max_pixels``; by default a quarter of the pairs' budget
        (``height`` x ``width`` if fixed, else ``max_pixels``), since a trajectory's 8 latents are
        4 times a pair's 2, so a trajectory batch costs about what a pair batch does."""
        pair_budget = height * width if height is not None and width is not None else max_pixels or DEFAULT_MAX_PIXELS
        budget = trajectory_max_pixels or max(pair_budget // TRAJECTORY_TOKEN_FACTOR, MULTIPLE * MULTIPLE)
        return cls(None, aspect_buckets(budget))

    def target(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Training (width, height) for a source image of ``image_size``."""
        return self.fixed or choose_bucket(image_size, self.buckets)


def bucket_batches(keys: Sequence[Hashable], batch_size: int, seed: int, epoch: int = 0,
                   drop_last: bool = False) -> list[list[int]]:
    """Shuffled batches of sample indices, each drawn within one bucket (samples with equal keys).

    Deterministic for a given (seed, epoch); a new epoch reshuffles. The last batch of a bucket may
    be smaller unless ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1.")
    rng = np.random.default_rng([seed, epoch])
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    batches = []
    for indices in groups.values():
        shuffled = [indices[i] for i in rng.permutation(len(indices))]
        batches += [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)
                    if not drop_last or i + batch_size <= len(shuffled)]
    return [batches[i] for i in rng.permutation(len(batches))]


def share_batches(batches: list[list[int]], is_special: Sequence[bool], share: float, seed: int,
                  epoch: int = 0) -> list[list[int]]:
    """The epoch's ``batches`` (each of one kind) re-dealt so that ``round(share * len(batches))`` of
    them are of the kind ``is_special`` marks (trajectory batches) and the rest of the other kind.

    The epoch keeps its length. A kind that has fewer batches than its share is cycled (each pass
    reshuffled), one with more is cut; the two kinds are interleaved in a random order. Deterministic
    for a given (seed, epoch).
    """
    rng = np.random.default_rng([seed, epoch, 1])
    special = [batch for batch in batches if is_special[batch[0]]]
    plain = [batch for batch in batches if not is_special[batch[0]]]
    wanted = round(share * len(batches))
    for kind, count in ((special, wanted), (plain, len(batches) - wanted)):
        if count and not kind:
            raise ChronoEditError(f"a share of {share:g} needs batches of both kinds, but the data has only one.")
    dealt = {True: iter(_cycle(special, wanted, rng)), False: iter(_cycle(plain, len(batches) - wanted, rng))}
    order = rng.permutation([True] * wanted + [False] * (len(batches) - wanted))
    return [next(dealt[bool(kind)]) for kind in order]


def _cycle(batches: list[list[int]], count: int, rng: np.random.Generator) -> list[list[int]]:
    """``count`` batches: ``batches`` in order, then reshuffled passes over them as needed."""
    dealt = list(batches[:count])
    while len(dealt) < count:
        dealt += [batches[i] for i in rng.permutation(len(batches))][:count - len(dealt)]
    return dealt


def _aspect(size: tuple[int, int]) -> float:
    return size[0] / size[1]


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
