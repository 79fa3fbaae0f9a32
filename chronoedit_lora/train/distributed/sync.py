"""Check that every process holds the same LoRA weights (DDP should guarantee it; we verify)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from ...errors import ChronoEditError


def weights_digest(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Per-tensor float64 sums and sums of squares: equal on every rank iff in sync (practically)."""
    return torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in params])


def assert_ranks_in_sync(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Raise if any process's LoRA weights differ from the main process's."""
    if accelerator.num_processes == 1 or any(isinstance(p, DTensor) for p in params):
        return  # under FSDP each rank owns a distinct shard: nothing is replicated to compare
    digest = weights_digest(params).to(accelerator.device)
    gathered = accelerator.gather(digest.unsqueeze(0))
    if not torch.equal(gathered.min(0).values, gathered.max(0).values):
        raise ChronoEditError("LoRA weights differ between processes: distributed training lost sync.")
