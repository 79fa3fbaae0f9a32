"""Step caching, opt-in (``--step-cache first-block|mag|tea[:THRESHOLD|:slow|:fast]``): a skipped
denoising step reuses the cached residual of the DiT's whole block stack.

Why the kit's own, in this one module: cache-dit's ``BlockAdapter`` and diffusers' hooks attach to a
diffusers transformer whose ``forward`` runs its blocks with ``hidden_states``/
``encoder_hidden_states`` keywords and whose pipeline sets the cache context per call; DiffSynth's
blocks take ``(x, context, t_mod, freqs)`` and are run one by one from ``model_fn_wan_video``, and
ChronoEdit changes the token count mid-edit (temporal reasoning), which neither knows
(docs/performance.md). Here, for one DiT call, ``dit.blocks`` is one :class:`CachedStack` (lent by
:func:`~chronoedit_lora.models.rope.chronoedit_model_fn`) that runs the real blocks (hooks, offload
and compiled blocks as they are) or adds the branch's cached residual.

Policies (each guidance branch, ``cond``/``uncond``/``pair``, keeps its own state):

* ``first-block``: block 0 always runs; if its residual moved less than the threshold (relative L1)
  since the last computed step, the other blocks' cached residual is added to its output.
* ``mag`` (MagCache): skip while the accumulated error of the calibrated per-step residual-magnitude
  ratios stays under the threshold, at most :data:`MAG_MAX_SKIPS` in a row, after a warm-up of
  :data:`MAG_RETENTION` of the steps. Needs a calibration (``calibrate-cache``).
* ``tea`` (TeaCache): skip while the accumulated polynomial of the timestep modulation's relative
  change stays under the threshold; coefficients from a calibration, else DiffSynth's
  Wan2.1-I2V-14B-720P ones, which are *not calibrated on ChronoEdit*.

Always computed: the first and last step, every temporal-reasoning step and the step at which the
reasoning frames are dropped (the token count changes there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ChronoEditError

METHODS = ("first-block", "mag", "tea")
PRESETS = {"first-block": {"slow": 0.05, "fast": 0.1}, "mag": {"slow": 0.12, "fast": 0.24},
           "tea": {"slow": 0.1, "fast": 0.2}}
MAG_RETENTION = 0.2  # MagCache's retention ratio: the first 20% of the steps are always computed
MAG_MAX_SKIPS = 4  # MagCache's K: at most this many skipped steps in a row
FORMAT = "chronoedit-lora step-cache calibration"
NOT_CALIBRATED = "not calibrated on ChronoEdit"


@dataclass(frozen=True)
class StepCacheSpec:
    """A ``--step-cache`` value: the method and its threshold (0: never skip)."""

    method: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.method}:{self.threshold:g}"


def parse_step_cache(value: str | None, flag: str = "--step-cache") -> StepCacheSpec | None:
    """``METHOD[:THRESHOLD|:slow|:fast]`` (default preset ``slow``) -> spec; None or "off" -> None."""
    if value is None or value in ("", "off"):
        return None
    method, _, level = value.partition(":")
    if method not in METHODS:
        raise ChronoEditError(f"{flag} {value!r}: the method must be one of {', '.join(METHODS)} (e.g. mag:fast).")
    level = level or "slow"
    if level in PRESETS[method]:
        return StepCacheSpec(method, PRESETS[method][level])
    try:
        threshold = float(level)
    except ValueError:
        threshold = -1.0
    if not math.isfinite(threshold) or threshold < 0:
        raise ChronoEditError(f"{flag} {value!r}: after '{method}:' give slow, fast or a threshold >= 0 (e.g. {method}:0.1).")
    return StepCacheSpec(method, threshold)


def warmup_steps(method: str, steps: int) -> int:
    """The first steps a method always computes (MagCache's retention; one step otherwise)."""
    return max(1, math.ceil(MAG_RETENTION * steps)) if method == "mag" else 1


def always_computed(method: str, step: int, steps: int, reasoning_steps: int) -> bool:
    """Steps no cache may skip: warm-up, reasoning steps and the one dropping their frames, the last."""
    return step < warmup_steps(method, steps) or step <= reasoning_steps or step == steps - 1


def check_skippable(spec: StepCacheSpec, steps: int, reasoning_steps: int, flag: str = "--step-cache") -> None:
    """Refuse a step cache that could skip nothing (a schedule no longer than its warm-up plus the
    steps always computed)."""
    if all(always_computed(spec.method, i, steps, reasoning_steps) for i in range(steps)):
        raise ChronoEditError(
            f"{flag} {spec.method}: with {steps} steps every step must be computed (the first "
            f"{warmup_steps(spec.method, steps)} as warm-up, the last, and temporal reasoning's steps 0-"
            f"{reasoning_steps} if any); use more --steps, fewer --temporal-reasoning-steps, or drop {flag}.")


def check_step_cache(spec: StepCacheSpec | None, steps: int, reasoning_steps: int,
                     calibration: Calibration | None = None, flag: str = "--step-cache",
                     sequence_parallel: bool = False) -> None:
    """:func:`check_skippable`; MagCache without a calibration of this step count, and any step cache
    under sequence parallelism (each rank would decide on its own share of the tokens), refused."""
    if spec is None:
        return
    if sequence_parallel:
        raise ChronoEditError(f"{flag} cannot be combined with --sequence-parallel: each rank would decide its "
                              "skips on its own share of the tokens; drop one of them.")
    check_skippable(spec, steps, reasoning_steps, flag)
    if spec.method == "mag" and calibration is None:
        raise ChronoEditError(f"{flag} mag needs --cache-calibration FILE (its per-step ratios); write one "
                              "with `chronoedit-lora calibrate-cache`.")
    if spec.method == "mag" and calibration.steps != steps:
        raise ChronoEditError(f"--cache-calibration was measured with {calibration.steps} steps, the edit has "
                              f"{steps}: MagCache's ratios are per step; calibrate with --steps {steps}.")


# -- calibration files ----------------------------------------------------------------------------
@dataclass
class Calibration:
    """What ``calibrate-cache`` measured on uncached edits: per step, the mean ratio of the block stack's
    residual norm to the previous step's (MagCache), the relative L1 change of the timestep modulation
    and of the residual (TeaCache's input and output), and the degree-4 polynomial fitted from one to
    the other; ``about``: the model, LoRAs and settings it was measured with."""

    steps: int
    mag_ratios: list[float]
    tea_inputs: list[float]
    tea_outputs: list[float]
    tea_coefficients: list[float]
    about: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": 1, "steps": self.steps, "mag_ratios": self.mag_ratios,
                "tea_inputs": self.tea_inputs, "tea_outputs": self.tea_outputs,
                "tea_coefficients": self.tea_coefficients, "about": self.about}


def read_calibration(path: str | Path) -> Calibration:
    """A calibration JSON; a damaged or foreign file is one line naming it."""
    from .user_files import read_json

    value = read_json(path)
    why = None
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        why = "it is not a step-cache calibration"
    else:
        try:
            steps = int(value["steps"])
            lists = [[float(x) for x in value[key]] for key in ("mag_ratios", "tea_inputs", "tea_outputs", "tea_coefficients")]
            if any(len(values) != steps for values in lists[:3]) or len(lists[3]) != 5 \
                    or not all(math.isfinite(x) for values in lists for x in values):
                why = f"its lists do not match its {steps} steps, or hold non-finite numbers"
        except (KeyError, TypeError, ValueError) as exc:
            why = f"a field is missing or malformed ({exc})"
    if why:
        raise ChronoEditError(f"{path}: {why}; write one with `chronoedit-lora calibrate-cache`.")
    return Calibration(steps, *lists, about=value.get("about") if isinstance(value.get("about"), dict) else {})


def fit_tea(inputs: list[float], outputs: list[float]) -> list[float]:
    """TeaCache's rescaling: the degree-4 polynomial (highest power first) from input to output change."""
    points = [(x, y) for x, y in zip(inputs, outputs) if x > 0]
    if len(points) < 5:
        raise ChronoEditError(f"calibrate-cache: {len(points)} step changes to fit TeaCache's degree-4 "
                              "polynomial from; use at least 6 --steps.")
    x, y = np.array(points).T
    return [float(c) for c in np.polyfit(x, y, 4)]


def calibration_from(recorders: list[StepCache], about: dict | None = None) -> Calibration:
    """The calibration of uncached edits recorded by ``recorders`` (one per edit, ``record=True``): per
    step the mean over edits and branches (1.0 and 0.0 at steps with no previous residual of that shape:
    the first, and the one dropping the reasoning frames); TeaCache's polynomial fitted on every point."""
    steps = recorders[0].steps
    records = [state.records for recorder in recorders for state in recorder.states.values()]

    def mean(step: int, index: int, default: float) -> float:
        values = [r[step][index] for r in records if step in r]
        return sum(values) / len(values) if values else default

    points = [r[step][1:] for r in records for step in r]
    inputs, outputs = [p[0] for p in points], [p[1] for p in points]
    return Calibration(steps, [mean(i, 0, 1.0) for i in range(steps)], [mean(i, 1, 0.0) for i in range(steps)],
                       [mean(i, 2, 0.0) for i in range(steps)], fit_tea(inputs, outputs), dict(about or {}))


def describe(spec: StepCacheSpec, calibration: Calibration | None) -> str:
    """One line saying what a step cache runs on (the shipped TeaCache coefficients are marked)."""
    if spec.method == "tea" and calibration is None:
        return f"step cache {spec}: DiffSynth's Wan2.1-I2V-14B-720P TeaCache coefficients, {NOT_CALIBRATED}"
    source = "" if spec.method == "first-block" else f", calibrated on {calibration.about.get('model', '?')}"
    return f"step cache {spec}{source}"


def shipped_tea_coefficients() -> list[float]:
    """DiffSynth's TeaCache coefficients for Wan2.1-I2V-14B-720P (not calibrated on ChronoEdit)."""
    from diffsynth.pipelines.wan_video import TeaCache

    return list(TeaCache(1, 0.0, "Wan2.1-I2V-14B-720P").coefficients)


# -- the policies' decisions ------------------------------------------------------------------------
class MagDecision:
    """MagCache's accumulated ratio, error and run of skips since the last computed step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ratio, self.error, self.skips = 1.0, 0.0, 0

    def skip(self, ratio: float, threshold: float) -> bool:
        self.ratio *= ratio
        self.error += abs(1.0 - self.ratio)
        self.skips += 1
        if self.error < threshold and self.skips <= MAG_MAX_SKIPS:
            return True
        self.reset()
        return False


class TeaDecision:
    """TeaCache's accumulated rescaled change since the last computed step."""

    def __init__(self, coefficients: list[float]) -> None:
        self.polynomial = np.poly1d(coefficients)
        self.reset()

    def reset(self) -> None:
        self.accumulated = 0.0

    def skip(self, change: float, threshold: float) -> bool:
        self.accumulated += float(self.polynomial(change))
        if self.accumulated < threshold:
            return True
        self.reset()
        return False


def predicted_plan(spec: StepCacheSpec, calibration: Calibration, reasoning_steps: int = 0) -> list[bool]:
    """Which steps ``spec`` computes (True) on the calibration's schedule: MagCache's and TeaCache's
    decisions depend only on the step, so this is what an edit does (first-block depends on the image)."""
    if spec.method == "first-block":
        raise ChronoEditError("first-block's skips depend on each image; calibrate-cache --check measures them.")
    steps, decision = calibration.steps, MagDecision() if spec.method == "mag" else TeaDecision(calibration.tea_coefficients)
    values = calibration.mag_ratios if spec.method == "mag" else calibration.tea_inputs
    plan = []
    for i in range(steps):
        if always_computed(spec.method, i, steps, reasoning_steps):
            plan.append(True)
            decision.reset()
        else:
            plan.append(not decision.skip(values[i], spec.threshold))
    return plan


# -- the runtime ------------------------------------------------------------------------------------
def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old|."""
    return ((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12)).item()


@dataclass
class BranchState:
    """One guidance branch's cache: the skipped part's residual, what its decision compares against,
    and (when recording) the per-step statistics."""

    residual: torch.Tensor | None = None
    first_residual: torch.Tensor | None = None
    t_mod: torch.Tensor | None = None
    decision: MagDecision | TeaDecision | None = None
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    records: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # step -> (mag, tea in, tea out)


class StepCache:
    """One edit's step cache (``spec`` None with ``record``: compute everything and record the
    calibration statistics). The pipeline sets :attr:`step` before each step and runs each DiT call
    inside :meth:`branch`, with :meth:`stack` as its block stack."""

    def __init__(self, dit: torch.nn.Module, spec: StepCacheSpec | None, steps: int, reasoning_steps: int = 0,
                 calibration: Calibration | None = None, record: bool = False) -> None:
        check_step_cache(spec, steps, reasoning_steps, calibration)
        self.dit, self.spec, self.steps, self.reasoning_steps = dit, spec, steps, reasoning_steps
        self.calibration, self.record = calibration, record
        self.tea_coefficients = calibration.tea_coefficients if calibration else shipped_tea_coefficients()
        self.states: dict[str, BranchState] = {}
        self.active: BranchState | None = None
        self.step = 0

    @contextmanager
    def branch(self, name: str) -> Iterator[None]:
        """The DiT call(s) inside belong to guidance branch ``name`` (its own state)."""
        previous, self.active = self.active, self.states.setdefault(name, self._new_state())
        try:
            yield
        finally:
            self.active = previous

    def stack(self) -> CachedStack:
        """The module that runs in place of ``dit.blocks`` for a call in the active branch."""
        return CachedStack(self, self.active, self.dit.blocks)

    def _new_state(self) -> BranchState:
        method = self.spec.method if self.spec else None
        decision = MagDecision() if method == "mag" else TeaDecision(self.tea_coefficients) if method == "tea" else None
        return BranchState(decision=decision)

    def calls(self) -> tuple[int, int]:
        """(computed, skipped) DiT calls over every branch."""
        return (sum(len(s.computed) for s in self.states.values()), sum(len(s.skipped) for s in self.states.values()))

    def should_skip(self, state: BranchState, x: torch.Tensor, t_mod: torch.Tensor, first: torch.Tensor | None) -> bool:
        """This step's decision for one branch (its state updated as its policy does)."""
        spec, step = self.spec, self.step
        forced = spec is None or always_computed(spec.method, step, self.steps, self.reasoning_steps) \
            or state.residual is None or state.residual.shape != x.shape
        if spec is not None and spec.method == "first-block":
            skip = not forced and relative_l1(first, state.first_residual) < spec.threshold
            if not skip:
                state.first_residual = first
            return skip
        if forced:
            if state.decision is not None:
                state.decision.reset()
            return False
        if spec.method == "mag":
            return state.decision.skip(self.calibration.mag_ratios[step], spec.threshold)
        return state.decision.skip(relative_l1(t_mod, state.t_mod), spec.threshold)


class CachedStack(torch.nn.Module):
    """The DiT's block stack for one call: the blocks, or the branch's cached residual."""

    def __init__(self, cache: StepCache, state: BranchState, blocks: torch.nn.ModuleList) -> None:
        super().__init__()
        self.cache, self.state = cache, state
        self.inner = [blocks]  # a list, so the blocks are not registered twice

    def forward(self, x: torch.Tensor, context: torch.Tensor, t_mod: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        cache, state, blocks = self.cache, self.state, self.inner[0]
        start = 1 if cache.spec is not None and cache.spec.method == "first-block" else 0
        h = blocks[0](x, context, t_mod, freqs) if start else x
        skip = cache.should_skip(state, x, t_mod, h - x if start else None)
        previous_t_mod, state.t_mod = state.t_mod, t_mod
        if skip:
            state.skipped.append(cache.step)
            return h + state.residual
        out = h
        for block in list(blocks)[start:]:
            out = block(out, context, t_mod, freqs)
        residual = out - h
        if cache.record and state.residual is not None and state.residual.shape == residual.shape:
            ratio = (residual.norm(dim=-1) / state.residual.norm(dim=-1).clamp_min(1e-12)).mean().item()
            state.records[cache.step] = (ratio, relative_l1(t_mod, previous_t_mod), relative_l1(residual, state.residual))
        state.residual = residual
        state.computed.append(cache.step)
        return out
