"""Several datasets as one epoch: each dataset's share of the items by weight (or its repeats), and
the items trained with an empty instruction (prompt dropout), all fixed by the seed, so a resume, on
any process count, trains the same items with the same prompts."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from torch.utils.data import Dataset

from .dataset import EditPairDataset
from .metadata import EditPair


def weighted_counts(weights: list[float], total: int) -> list[int]:
    """``total`` items shared in proportion to ``weights`` (largest remainders get the rest: exact where it divides)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _rows(count: int, rows: int, rng: np.random.Generator) -> list[int]:
    """``count`` row indices: every row equally often (``count // rows`` times), the rest drawn without repeats."""
    return list(range(rows)) * (count // rows) + sorted(rng.permutation(rows)[:count % rows].tolist())


class MixedDataset(Dataset):
    """The items of several :class:`EditPairDataset` (each with its own size policy and prompt column):
    dataset ``j`` lists ``counts[j]`` of its rows per epoch, and ``round(dropout[j] * counts[j])`` of
    those items, chosen by ``seed``, carry an empty prompt. Items are listed dataset by dataset;
    the epoch's batches shuffle them (:func:`.buckets.bucket_batches`)."""

    def __init__(self, parts: list[EditPairDataset], counts: list[int], dropout: list[float], seed: int):
        self.parts = parts
        self.items: list[tuple[int, int, bool]] = []  # (dataset, row, prompt dropped)
        for j, (part, count, fraction) in enumerate(zip(parts, counts, dropout)):
            rng = np.random.default_rng([seed, j])
            rows = _rows(count, len(part.pairs), rng)
            dropped = set(rng.permutation(count)[:round(fraction * count)].tolist())
            self.items += [(j, row, k in dropped) for k, row in enumerate(rows)]
        self.pairs: list[EditPair] = [
            dataclasses.replace(parts[j].pairs[row], prompt="") if dropped else parts[j].pairs[row]
            for j, row, dropped in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def pair(self, index: int) -> EditPair:
        """The row behind item ``index`` (its prompt empty if dropped)."""
        return self.pairs[index]

    def label(self, index: int) -> str:
        """Item ``index`` as ``D:ITEM`` (its [[datasets]] table, from 1, and its item there; ``…-`` if its prompt was dropped)."""
        j, row, dropped = self.items[index]
        return f"{j + 1}:{row}" + ("-" if dropped else "")

    @functools.cached_property
    def kinds(self) -> list[str]:
        return [pair.kind for pair in self.pairs]

    @functools.cached_property
    def sizes(self) -> list[tuple[int, int]]:
        return [self.parts[j].sizes[row] for j, row, _ in self.items]

    def __getitem__(self, index: int) -> dict:
        j, row, dropped = self.items[index]
        item = self.parts[j][row]
        return {**item, "index": index, "prompt": "" if dropped else item["prompt"]}
