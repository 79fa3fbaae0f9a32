"""The edit pipeline's samplers: diffusers' UniPC (the official pipeline's) and DiffSynth's Euler.

ChronoEdit-14B-Diffusers ships ``scheduler/scheduler_config.json``, a ``UniPCMultistepScheduler``
with flow sigmas, which diffusers' ``ChronoEditPipeline`` samples with; the Wan2.1 file layout ships
none, and DiffSynth samples Wan with flow-matching Euler. The folder's own scheduler is the
default. Both step a velocity along shifted flow sigmas; ``shift`` overrides the flow shift of either.
UniPC is multistep: when temporal reasoning cuts the clip to [input, edit], its remembered model
outputs and sample are cut too (:meth:`Sampler.keep_frames`), as diffusers' pipeline does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffsynth.diffusion.flow_match import FlowMatchScheduler
from diffusers import UniPCMultistepScheduler

from .errors import ChronoEditError
from .settings import MAX_TRAIN_TIMESTEPS, check_choice, check_range, check_shift
from .user_files import read_json

SCHEDULERS = ("unipc", "euler")
DEFAULT_SHIFT = 5.0  # Wan2.1-I2V's and ChronoEdit's flow shift
# The official 8-step distill LoRA's settings (nvidia/ChronoEdit-14B-Diffusers lora/).
PRESETS = {"distill": {"steps": 8, "cfg": 1.0, "shift": 2.0}}
CONFIG_FILE = Path("scheduler") / "scheduler_config.json"
CLASS_NAMES = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler"}
# UniPC as ChronoEdit-14B-Diffusers configures it, for `--scheduler unipc` on a folder without a config.
UNIPC_DEFAULTS = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                  "use_flow_sigmas": True, "flow_shift": DEFAULT_SHIFT, "num_train_timesteps": 1000}


def read_scheduler_config(model_dir: str | Path | None) -> dict | None:
    """``scheduler/scheduler_config.json`` of a diffusers model folder, or None (Wan layout, no --model)."""
    if model_dir is None or not (path := Path(model_dir) / CONFIG_FILE).is_file():
        return None
    try:
        config = read_json(path)
    except (OSError, ChronoEditError) as exc:
        raise ChronoEditError(f"{exc} Repair it, or delete it to sample with --scheduler euler.") from None
    if not isinstance(config, dict):
        raise ChronoEditError(f"{path} holds no JSON object; repair it, or delete it to sample with --scheduler euler.")
    check_scheduler_numbers(config, path)
    return config


# The numbers the samplers read from a scheduler config, and the rule each must follow (a flag
# that carries the same value follows the same rule).
SCHEDULER_NUMBERS = {
    "flow_shift": check_shift,
    "shift": check_shift,
    "num_train_timesteps": lambda name, value: check_range(name, value, 1, MAX_TRAIN_TIMESTEPS),
    "solver_order": lambda name, value: check_range(name, value, 1, 3),
}


def check_scheduler_numbers(config: dict, path: Path) -> None:
    """Each number the samplers read must be a number within its rule, naming the file and the key."""
    for key, check in SCHEDULER_NUMBERS.items():
        if key not in config or config[key] is None:
            continue
        value = config[key]
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ChronoEditError(f"{key} must be a number, got {value!r}.")
            check(key, value)
        except ChronoEditError as exc:
            raise ChronoEditError(f"{path}: {exc} Repair the file, or delete it to sample with --scheduler euler.") from None


def resolve_scheduler(name: str | None, config: dict | None) -> str:
    """``name`` if given, else the folder's own scheduler (UniPC for ChronoEdit-14B-Diffusers), else
    Euler; a UniPC config the pipeline cannot step (not flow sigmas + flow prediction) is refused."""
    if name is not None:
        check_choice("--scheduler", name, SCHEDULERS)
    elif config is None:
        name = "euler"
    elif (name := CLASS_NAMES.get(config.get("_class_name"))) is None:
        raise ChronoEditError(f"{CONFIG_FILE} names {config.get('_class_name')!r}, which the kit does not sample "
                              "with; pass --scheduler unipc or --scheduler euler.")
    if name == "unipc" and _is_unipc(config):
        flow = config.get("prediction_type") == "flow_prediction" and config.get("use_flow_sigmas")
        if not flow:
            raise ChronoEditError(f"{CONFIG_FILE}: UniPC with prediction_type {config.get('prediction_type')!r} and "
                                  f"use_flow_sigmas {config.get('use_flow_sigmas')!r}; ChronoEdit needs flow_prediction "
                                  "with flow sigmas. Fix the config or pass --scheduler euler.")
    return name


def default_shift(config: dict | None) -> float:
    """The folder's flow shift (UniPC's ``flow_shift``, diffusers Euler's ``shift``), else 5.0."""
    config = config or {}
    return float(config.get("flow_shift", config.get("shift", DEFAULT_SHIFT)))


def _is_unipc(config: dict | None) -> bool:
    return config is not None and config.get("_class_name") == UNIPC_DEFAULTS["_class_name"]


class Sampler:
    """``timesteps`` and ``sigmas`` (one more than steps, ending at 0); ``step`` advances the latents."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def keep_frames(self, frames: list[int]) -> None:
        """Keep only these latent frames of any state carried between steps (none by default)."""


class EulerSampler(Sampler):
    """DiffSynth's Wan flow-matching Euler: sigmas linspace(1, 0) shifted, no state between steps."""

    def __init__(self, steps: int, shift: float):
        self.scheduler = FlowMatchScheduler("Wan")
        self.scheduler.set_timesteps(steps, shift=shift)
        self.timesteps = self.scheduler.timesteps
        self.sigmas = torch.cat([self.scheduler.sigmas, self.scheduler.sigmas.new_zeros(1)])

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(velocity, self.timesteps[index], latents)


class UniPCSampler(Sampler):
    """diffusers' ``UniPCMultistepScheduler`` from the folder's config (else ChronoEdit's), ``shift`` as flow shift."""

    def __init__(self, steps: int, shift: float, config: dict | None = None, device: str | torch.device = "cpu"):
        base = config if _is_unipc(config) else UNIPC_DEFAULTS
        self.scheduler = UniPCMultistepScheduler.from_config(base, flow_shift=shift)
        self.scheduler.set_timesteps(steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.sigmas = self.scheduler.sigmas

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(velocity, self.timesteps[index], latents, return_dict=False)[0]

    def keep_frames(self, frames: list[int]) -> None:
        """Cut the remembered model outputs and sample, as diffusers' ChronoEditPipeline does at the cut."""
        state = self.scheduler
        state.model_outputs = [out if out is None or out.shape[2] == len(frames) else out[:, :, frames]
                               for out in state.model_outputs]
        if state.last_sample is not None:
            state.last_sample = state.last_sample[:, :, frames]


def check_schedule(name: str, steps: int, shift: float, config: dict | None = None, flag: str = "--steps") -> None:
    """Refuse a schedule the sampler cannot step: UniPC needs distinct timesteps, and many steps at a
    large shift crowd the shifted sigmas near 1 onto the same integer timestep (diffusers then
    fails an assertion mid-edit)."""
    if name != "unipc":
        return
    timesteps = make_sampler(name, steps, shift, config).timesteps
    distinct = len(set(timesteps.tolist()))
    if distinct < len(timesteps):
        raise ChronoEditError(f"{flag} {steps} at flow shift {shift:g}: UniPC's schedule repeats timesteps "
                              f"({distinct} distinct of {len(timesteps)}), which it cannot step. Use fewer steps "
                              "(50 is the official recipe), a smaller --shift, or --scheduler euler.")


def make_sampler(name: str, steps: int, shift: float, config: dict | None = None,
                 device: str | torch.device = "cpu") -> Sampler:
    """The sampler called ``name`` (see :data:`SCHEDULERS`) for ``steps`` steps at flow shift ``shift``."""
    check_choice("scheduler", name, SCHEDULERS)
    return UniPCSampler(steps, shift, config, device) if name == "unipc" else EulerSampler(steps, shift)
