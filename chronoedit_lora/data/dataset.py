"""The torch Dataset of edit pairs: each item is the 5-frame clip [src, tgt, tgt, tgt, tgt]."""

from __future__ import annotations

import functools
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import ChronoEditError
from ..video import edit_clip, to_tensor
from .buckets import SizePolicy, plan_pair
from .images import load_pair, read_source_size
from .metadata import EditPair, read_metadata
from .problems import Problem, format_report


class EditPairDataset(Dataset):
    """Edit pairs from a ``metadata.csv``, resized and cropped identically, as training clips.

    Item: ``video`` float (3, 5, H, W) in [-1, 1] = [src, tgt, tgt, tgt, tgt]; ``input_image`` the
    source frame (3, H, W) in [-1, 1]; ``prompt``; ``index`` (item index) and ``row`` (CSV row).
    Height and width select a fixed size (winning over max_pixels); otherwise each pair goes to the aspect bucket of its
    source image under ``max_pixels`` (default 1024x1024). ``repeat`` lists every pair that many
    times per epoch. Fatal problems in the CSV raise :class:`ChronoEditError` here; a pair whose
    files turn out unreadable raises when it is loaded (``check_dataset`` finds both up front).
    """

    def __init__(self, csv_path: str | Path, height: int | None = None, width: int | None = None,
                 max_pixels: int | None = None, repeat: int = 1, allow_outside: bool = False):
        if repeat < 1:
            raise ChronoEditError(f"repeat must be at least 1, got {repeat}.")
        self.policy = SizePolicy.create(height, width, max_pixels)
        self.csv_path = Path(csv_path)
        pairs, problems = read_metadata(csv_path, allow_outside)
        _raise_if_fatal(self.csv_path, problems)
        self.pairs: list[EditPair] = pairs
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.pairs) * self.repeat

    def pair(self, index: int) -> EditPair:
        """The pair behind item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range (dataset of {len(self)}).")
        return self.pairs[index % len(self.pairs)]

    @functools.cached_property
    def sizes(self) -> list[tuple[int, int]]:
        """Training (width, height) of every item, from file headers; keys for :func:`bucket_batches`."""
        if self.policy.fixed:
            return [self.policy.fixed] * len(self)
        sizes, problems = [], []
        for pair in self.pairs:
            size, found = read_source_size(pair)
            problems += found
            sizes.append(self.policy.target(size) if size else None)
        _raise_if_fatal(self.csv_path, problems)
        return sizes * self.repeat

    def __getitem__(self, index: int) -> dict:
        pair = self.pair(index)
        images = load_pair(pair)
        _raise_if_fatal(self.csv_path, images.problems)
        plan, _ = plan_pair(images.source.size, images.edited.size, self.policy.target(images.source.size),
                            pair.row, pair.columns)
        source = to_tensor(plan.apply(images.source))
        edited = to_tensor(plan.apply(images.edited))
        video = edit_clip(source, edited)
        return {"video": video, "input_image": source, "prompt": pair.prompt, "index": index, "row": pair.row}


def _raise_if_fatal(csv_path: Path, problems: list[Problem]) -> None:
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise ChronoEditError(f"{csv_path}: the dataset has problems:\n{format_report(fatal)}\n"
                              f"Run `chronoedit-lora dataset check {csv_path}` for the full report.")
