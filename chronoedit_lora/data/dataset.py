"""The torch Dataset of edit pairs and trajectories, as training clips: a pair is the 5-frame clip
[src, tgt, tgt, tgt, tgt], a trajectory its 29 resampled frames."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ChronoEditError
from ..video import edit_clip, to_tensor
from .buckets import SizePolicy, plan_pair
from .images import load_pair, read_source_size
from .identity import is_image_folder, read_rows
from .metadata import EditPair
from .problems import Problem, format_report
from .trajectories import first_frame_size, load_trajectory


class EditPairDataset(Dataset):
    """Rows of a ``metadata.csv``, resized and cropped identically frame by frame, as training clips.

    Item: ``video`` float (3, T, H, W) in [-1, 1]: T = 5 for a pair ([src, tgt, tgt, tgt, tgt]),
    29 for a trajectory (see :mod:`.trajectories`); ``input_image`` the source frame (3, H, W);
    ``prompt``; ``kind`` ("pair" or "trajectory"); ``index`` (item index) and ``row`` (CSV row).
    Pairs: height and width select a fixed size (winning over max_pixels); otherwise each pair goes
    to the aspect bucket of its source image under ``max_pixels`` (default 1024x1024).
    Trajectories: the aspect bucket of their first frame under ``trajectory_max_pixels`` (default a
    quarter of the pairs' budget, see :meth:`SizePolicy.for_trajectories`). ``repeat`` lists every
    row that many times per epoch. Fatal problems in the CSV raise :class:`ChronoEditError` here; a
    row whose files turn out unreadable raises when it is loaded (``check_dataset`` finds both up front).
    ``prompt_column``: see :func:`.metadata.read_metadata`; ``keep_prompt``: ``csv_path`` may be a folder
    of images instead, each trained as an identity pair with that instruction (:mod:`.identity`).
    """

    def __init__(self, csv_path: str | Path, height: int | None = None, width: int | None = None,
                 max_pixels: int | None = None, repeat: int = 1, allow_outside: bool = False,
                 trajectory_max_pixels: int | None = None, prompt_column: str = "", keep_prompt: str | None = None):
        if repeat < 1:
            raise ChronoEditError(f"repeat must be at least 1, got {repeat}.")
        self.policy = SizePolicy.create(height, width, max_pixels)
        self.trajectory_policy = SizePolicy.for_trajectories(height, width, max_pixels, trajectory_max_pixels)
        self.csv_path = Path(csv_path)
        self.image_folder = is_image_folder(csv_path, keep_prompt)
        pairs, problems = read_rows(csv_path, allow_outside, prompt_column, keep_prompt)
        self._raise_if_fatal(problems)
        self.pairs: list[EditPair] = pairs
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.pairs) * self.repeat

    def pair(self, index: int) -> EditPair:
        """The row behind item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range (dataset of {len(self)}).")
        return self.pairs[index % len(self.pairs)]

    @property
    def kinds(self) -> list[str]:
        """The kind ("pair" or "trajectory") of every item."""
        return [pair.kind for pair in self.pairs] * self.repeat

    @functools.cached_property
    def sizes(self) -> list[tuple[int, int]]:
        """Training (width, height) of every item, from file headers; with :attr:`kinds`, the keys
        of the batches (see :func:`bucket_batches`)."""
        sizes, problems = [], []
        for pair in self.pairs:
            if pair.is_trajectory:
                size, found = first_frame_size(pair.input_image, pair.row, pair.columns[0])
            elif self.policy.fixed:
                size, found = self.policy.fixed, []
            else:
                size, found = read_source_size(pair)
            problems += found
            sizes.append(self.policy_for(pair).target(size) if size else None)
        self._raise_if_fatal(problems)
        return sizes * self.repeat

    def policy_for(self, pair: EditPair) -> SizePolicy:
        """How ``pair``'s training size is chosen."""
        return self.trajectory_policy if pair.is_trajectory else self.policy

    def __getitem__(self, index: int) -> dict:
        pair = self.pair(index)
        if pair.is_trajectory:
            frames, problems = load_trajectory(pair.input_image, pair.row, pair.columns[0])
            self._raise_if_fatal(problems)
            plan, _ = plan_pair(frames[0].size, frames[-1].size, self.trajectory_policy.target(frames[0].size),
                                pair.row, pair.columns)
            video = torch.stack([to_tensor(plan.apply(frame)) for frame in frames], dim=1)
        else:
            images = load_pair(pair)
            self._raise_if_fatal(images.problems)
            plan, _ = plan_pair(images.source.size, images.edited.size, self.policy.target(images.source.size),
                                pair.row, pair.columns)
            video = edit_clip(to_tensor(plan.apply(images.source)), to_tensor(plan.apply(images.edited)))
        return {"video": video, "input_image": video[:, 0], "prompt": pair.prompt, "kind": pair.kind,
                "index": index, "row": pair.row}

    def _raise_if_fatal(self, problems: list[Problem]) -> None:
        fatal = [p for p in problems if p.fatal]
        if fatal:
            # a folder of images (identity pairs) is checked through the training config that names it
            check = ("YOUR_CONFIG.toml` (it checks its preservation_dataset folder)" if self.image_folder
                     else f"{self.csv_path}`")
            raise ChronoEditError(f"{self.csv_path}: the dataset has problems:\n{format_report(fatal)}\n"
                                  f"Run `chronoedit-lora dataset check {check} for the full report.")
