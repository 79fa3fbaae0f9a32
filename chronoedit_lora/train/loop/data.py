"""Training data: the preflight check, and each process's share of every epoch's batches."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

from ...data import EditPairDataset, bucket_batches, check_dataset, format_report, has_fatal
from ...data.buckets import share_batches
from ...data.metadata import PAIR, TRAJECTORY
from ...data.mixing import MixedDataset, weighted_counts
from ...data.problems import Problem
from ...errors import ChronoEditError
from ...sampling import PRESETS, check_schedule, default_shift, read_scheduler_config, resolve_scheduler
from ..state.checkpoint import Progress
from .config import DatasetSpec, TrainConfig, dataset_specs


def preflight(config: TrainConfig, output: Path) -> None:
    """Everything that can be checked before loading models: the dataset and the output folder."""
    specs = dataset_specs(config)
    if not specs:
        raise ChronoEditError("no dataset: set `dataset` (or [[datasets]] tables) in the config or pass --dataset CSV.")
    held_out = [replace(specs[0], csv=csv_path) for csv_path in (config.sample_dataset, config.eval_dataset) if csv_path]
    for spec in specs + held_out:
        problems = check_dataset(spec.csv, spec.height, spec.width, spec.max_pixels, config.allow_outside,
                                 trajectory_max_pixels=config.trajectory_max_pixels, prompt_column=spec.prompt_column)
        if has_fatal(problems):
            raise ChronoEditError(f"{spec.csv} cannot be used for training:\n{format_report(problems)}")
        if problems:
            print(format_report(problems))
    if config.preservation_dataset:
        check_preservation(config)
    if config.sample_every:  # sample edits use the model folder's sampler, as `edit` does
        scheduler = read_scheduler_config(config.model)
        preset = PRESETS.get(config.sample_preset, {})
        check_schedule(resolve_scheduler(None, scheduler), preset.get("steps", config.sample_steps),
                       preset.get("shift", default_shift(scheduler)), scheduler,
                       "sample_preset" if preset else "sample_steps")
    check_output_folder(output, config.min_free_mb * 2**20)


def preservation_problems(config: TrainConfig) -> list[Problem]:
    """Every problem of the preservation set as training reads it (``dataset check CONFIG.toml`` too)."""
    return check_dataset(config.preservation_dataset, config.height, config.width, config.max_pixels,
                         config.allow_outside, trajectory_max_pixels=config.trajectory_max_pixels,
                         prompt_column=config.prompt_column, keep_prompt=config.preservation_prompt)


def check_preservation(config: TrainConfig) -> None:
    """The preservation set, checked like a training CSV; a folder of images (identity pairs) is
    refused in one line naming its first bad image (or that it holds none)."""
    folder = Path(config.preservation_dataset).is_dir()
    problems = preservation_problems(config)
    fatal = [problem for problem in problems if problem.fatal]
    if fatal and folder:
        first = fatal[0]
        more = f" ({len(fatal) - 1} more problems in the folder)" if len(fatal) > 1 else ""
        # an image's problem (read as a CSV row's input_image) has a CSV's fix; the folder's own, its own
        fix = "Re-export the image, or move it out of the folder." if first.column == "input_image" else first.fix
        raise ChronoEditError(f"preservation_dataset {config.preservation_dataset}: {first.reason}{more} {fix}")
    if fatal:
        raise ChronoEditError(f"{config.preservation_dataset} cannot be used for training:\n{format_report(problems)}")
    if problems:
        print(format_report(problems))


def check_output_folder(output: Path, min_free: int) -> None:
    """The output folder must be creatable, writable and have room for checkpoints."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ChronoEditError(f"output folder {output} is not writable ({exc.strerror}); choose another --output.") from None
    free = shutil.disk_usage(output).free
    if free < min_free:
        raise ChronoEditError(
            f"only {free / 2**20:.0f} MiB free under {output}; checkpoints need at least "
            f"{min_free / 2**20:.0f} MiB. Free some space or choose another --output."
        )


def _open(config: TrainConfig, spec: DatasetSpec, keep_prompt: str | None = None) -> EditPairDataset:
    return EditPairDataset(spec.csv, spec.height, spec.width, spec.max_pixels, spec.repeat, config.allow_outside,
                           config.trajectory_max_pixels, spec.prompt_column, keep_prompt)


def training_items(config: TrainConfig) -> EditPairDataset | MixedDataset:
    """The training CSV as it always was, or the [[datasets]] tables as one :class:`MixedDataset`:
    with weights, the shortest epoch in which each table's share is its weight and every row of
    every table comes at least once; else each table's rows times its repeat."""
    specs = dataset_specs(config)
    if not config.datasets:
        return _open(config, specs[0])
    parts = [_open(config, replace(spec, repeat=1)) for spec in specs]
    rows = [len(part.pairs) for part in parts]
    weights = [spec.weight for spec in specs]
    if weights[0] is not None:
        total = max(math.ceil(r * sum(weights) / w - 1e-9) for r, w in zip(rows, weights))
        counts = weighted_counts(weights, total)
    else:
        counts = [r * spec.repeat for r, spec in zip(rows, specs)]
    return MixedDataset(parts, counts, [spec.prompt_dropout for spec in specs], config.seed)


class TrainingData:
    """The dataset plus a deterministic, resumable split of each epoch's batches across processes."""

    def __init__(self, config: TrainConfig):
        self.dataset = training_items(config)
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.trajectory_share = config.trajectory_share
        self._epochs: dict[int, list[list[int]]] = {}
        # by default the first rows of the (first) training CSV, with their prompts (never dropped ones)
        self.samples = (self._open(config, config.sample_dataset, 1) if config.sample_dataset
                        else getattr(self.dataset, "parts", [self.dataset])[0])
        self.held_out = self._open(config, config.eval_dataset, 1) if config.eval_dataset else None
        self.preservation = (self._open(config, config.preservation_dataset, 1, config.preservation_prompt)
                             if config.preservation_dataset else None)
        share, kinds = self.trajectory_share, set(self.dataset.kinds)
        if share is not None:  # before any model loads (share_batches would refuse only at the first epoch)
            missing = [kind for kind, asked in ((TRAJECTORY, share > 0), (PAIR, share < 1)) if asked and kind not in kinds]
            if missing:
                names = ", ".join(spec.csv for spec in dataset_specs(config))
                raise ChronoEditError(f"trajectory_share = {share:g} asks for {missing[0]} batches, but {names} "
                                      f"has no {missing[0]} rows; add some, or leave trajectory_share unset.")

    @property
    def rows(self) -> int:
        """Rows of the training CSVs, each counted once."""
        return sum(len(part.pairs) for part in getattr(self.dataset, "parts", [self.dataset]))

    @staticmethod
    def _open(config: TrainConfig, csv_path: str, repeat: int, keep_prompt: str | None = None) -> EditPairDataset:
        return _open(config, DatasetSpec(csv_path, repeat=repeat, height=config.height, width=config.width,
                                         max_pixels=config.max_pixels, prompt_column=config.prompt_column), keep_prompt)

    def sample_items(self, count: int) -> list[dict]:
        """The first ``count`` rows of the sample dataset (held-out rows if one is configured), the
        last places given to the first row of each kind not among them (so a mixed dataset's grid
        shows a trajectory too)."""
        pairs = self.samples.pairs
        chosen = list(range(min(count, len(pairs))))
        for kind in {pair.kind for pair in pairs} - {pairs[i].kind for i in chosen}:  # at most one of the two
            if len(chosen) > 1:
                chosen[-1] = next(i for i, pair in enumerate(pairs) if pair.kind == kind)
        return [self.samples[i] for i in chosen]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` (each within one size bucket of one kind), shuffled by (seed, epoch);
        with ``trajectory_share`` set, re-dealt so that share of them are trajectory batches."""
        if epoch not in self._epochs:
            self._epochs = {epoch: self._deal(epoch)}  # the loop moves forward: keep the current epoch only
        return self._epochs[epoch]

    def _deal(self, epoch: int) -> list[list[int]]:
        kinds = self.dataset.kinds
        batches = bucket_batches(list(zip(kinds, self.dataset.sizes)), self.batch_size, self.seed, epoch)
        if self.trajectory_share is None:
            return batches
        return share_batches(batches, [kind == TRAJECTORY for kind in kinds], self.trajectory_share, self.seed, epoch)

    def batches_per_rank(self, world: int) -> int:
        count = len(self.epoch_batches(0)) // world
        if count == 0:
            raise ChronoEditError(
                f"{len(self.dataset)} training items make fewer batches than the {world} processes; "
                "add pairs, raise `repeat`, or lower `batch_size`."
            )
        return count

    def rank_batches(self, epoch: int, rank: int, world: int, start: int = 0) -> list[list[int]]:
        """This process's batches of the epoch from batch ``start`` on (the first ``start`` were trained
        before a resume on another process count): every ``world``-th one, the remainder dropped so
        ranks stay in step."""
        batches = self.epoch_batches(epoch)[start:]
        usable = len(batches) // world * world
        return batches[rank:usable:world]

    def items_trained(self, positions: list[tuple[int, int, int]], world: int) -> list[int] | list[str]:
        """Every item that the ``world`` processes trained on at these (epoch, start, batch) positions
        of their shares (:meth:`.checkpoint.Progress.position`), computed from the deterministic split
        (no communication between ranks); with [[datasets]], as ``D:ITEM`` labels (:meth:`.MixedDataset.label`)."""
        items = sorted(i for epoch, start, batch in positions for rank in range(world)
                       for i in self.rank_batches(epoch, rank, world, start)[batch])
        return [self.dataset.label(i) for i in items] if isinstance(self.dataset, MixedDataset) else items

    def total_steps(self, progress: Progress, world: int, accumulation: int, epochs: int) -> int:
        """Optimizer steps of an ``epochs``-long run continued from ``progress`` on ``world`` processes,
        its current epoch split from ``progress.epoch_start`` on."""
        steps_per_epoch = max(self.batches_per_rank(world) // accumulation, 1)
        if progress.epoch_start == 0:
            return steps_per_epoch * epochs
        left = len(self.rank_batches(progress.epoch, 0, world, progress.epoch_start)) - progress.batch_in_epoch
        return progress.step + (left + (epochs - progress.epoch - 1) * self.batches_per_rank(world)) // accumulation
