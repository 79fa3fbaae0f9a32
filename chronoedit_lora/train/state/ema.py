"""An exponential moving average (EMA) of the trained weights, kept beside them.

After optimizer step ``t`` the average moves towards the weights: ``ema = d_t * ema + (1 - d_t) * w``
with ``d_1 = 0`` (the average starts at the weights after the first step) and then either a fixed
``d_t = ema_decay`` or the power EMA ``d_t = (1 - 1/t) ** (ema_power + 1)`` (Karras et al. 2024,
"Analyzing and improving the training dynamics of diffusion models"), whose averaging window
grows with training. Everything is float32 and lives where the weights live: under FSDP each rank
averages its own shards (no communication); :meth:`full` gathers them for a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..loop.config import TrainConfig
from ..distributed.fsdp import full_tensors, local


def decay(step: int, ema_decay: float, ema_power: float) -> float:
    """The decay ``d_t`` applied at optimizer step ``step`` (1-based)."""
    if step <= 1:
        return 0.0
    return (1.0 - 1.0 / step) ** (ema_power + 1.0) if ema_power else ema_decay


class ExponentialMovingAverage:
    """The EMA of ``params`` (name -> parameter, plain or FSDP-sharded)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], ema_decay: float, ema_power: float):
        self.params = params
        self.ema_decay, self.ema_power = ema_decay, ema_power
        with torch.no_grad():
            self.average = {name: p.detach().float().clone() for name, p in params.items()}

    @classmethod
    def maybe(cls, config: TrainConfig, params: dict[str, torch.nn.Parameter]) -> ExponentialMovingAverage | None:
        """The EMA ``config`` asks for (None without ``ema_decay``/``ema_power``)."""
        return cls(params, config.ema_decay, config.ema_power) if config.ema_decay or config.ema_power else None

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the weights after optimizer step ``step``."""
        names = list(self.params)
        weight = 1.0 - decay(step, self.ema_decay, self.ema_power)
        torch._foreach_lerp_([local(self.average[n]) for n in names], [local(self.params[n]).float() for n in names],
                             weight)

    def full(self, keep: bool) -> dict[str, torch.Tensor]:
        """The whole average (CPU), gathered from the shards under FSDP (every rank must call it;
        only those with ``keep`` get the tensors)."""
        return full_tensors(self.average, keep)

    @torch.no_grad()
    def load_full(self, named: dict[str, torch.Tensor]) -> None:
        """Set the average from whole tensors (as :meth:`full` returns them), each rank keeping its shard."""
        for name, tensor in self.average.items():
            value = named[name].to(device=local(tensor).device, dtype=tensor.dtype)
            if isinstance(tensor, DTensor):
                value = distribute_tensor(value, tensor.device_mesh, tensor.placements, src_data_rank=None)
            local(tensor).copy_(local(value))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The weights hold the average inside the block (for samples), their own values again after it."""
        saved = {name: local(p).detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            local(p).copy_(local(self.average[name]))
        try:
            yield
        finally:
            for name, p in self.params.items():
                local(p).copy_(saved[name])
