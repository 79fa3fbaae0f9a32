"""The step cache: threshold 0 is the uncached edit, skips follow the calibration, branches keep their
own state, reasoning steps are always computed, unsound settings and bad calibration files are refused."""

from __future__ import annotations

import json

import pytest
import torch

from chronoedit_lora.cli import main
from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.pipeline import ChronoEditPipeline, EditRequest
from chronoedit_lora.step_cache import (StepCache, StepCacheSpec, calibration_from, parse_step_cache, predicted_plan,
                                        read_calibration)

STEPS = 6
EDIT = dict(steps=STEPS, cfg=4.0, height=32, width=32, progress=False, scheduler="euler")


@pytest.fixture(scope="module")
def pipe(tiny_diffusers):
    return ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)


@pytest.fixture(scope="module")
def request_(input_image):
    return [EditRequest(input_image, "add a hat", "blurry, low quality", seed=1)]  # cond and uncond differ


def edit(pipe, requests, **settings) -> tuple[torch.Tensor, StepCache | None]:
    kept: list[StepCache] = []
    video = next(pipe.edit_many(requests, **{**EDIT, **settings}, step_caches=kept)).video
    return video, (kept[0] if kept else None)


@pytest.fixture(scope="module")
def uncached(pipe, request_) -> torch.Tensor:
    return edit(pipe, request_)[0]


@pytest.fixture(scope="module")
def mag_batched(pipe, request_, calibration) -> tuple[torch.Tensor, StepCache]:
    return edit(pipe, request_, step_cache=parse_step_cache("mag:0.5"), cache_calibration=calibration)


@pytest.fixture(scope="module")
def calibration(pipe, request_):
    """What calibrate-cache measures: one recorded uncached edit of the same schedule."""
    recorder = StepCache(pipe.dit, None, STEPS, record=True)
    context = pipe.encode_prompt(request_[0].prompt)
    negative = pipe.encode_prompt(request_[0].negative_prompt)
    image = pipe._sized(request_[0].image, 32, 32)
    pipe.denoise(context, negative, pipe.encode_image(image), pipe.condition_latents(image, 5), request_[0].seed, STEPS,
                 EDIT["cfg"], None, 0, "euler", True, False, step_cache=recorder)
    assert recorder.calls() == (STEPS, 0)
    return calibration_from([recorder])


@pytest.mark.parametrize("method", ["first-block", "mag", "tea"])
def test_threshold_zero_is_the_uncached_edit_exactly(pipe, request_, calibration, uncached, method):
    cached, cache = edit(pipe, request_, step_cache=StepCacheSpec(method, 0.0), cache_calibration=calibration)
    assert cache.calls() == (STEPS, 0)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("spec", ["mag:0.5", "tea:0.3"])
def test_calls_are_what_the_calibration_predicts(pipe, request_, calibration, uncached, mag_batched, spec):
    spec = parse_step_cache(spec)
    plan = predicted_plan(spec, calibration)
    cached, cache = mag_batched if spec.method == "mag" else edit(pipe, request_, step_cache=spec,
                                                                  cache_calibration=calibration)
    computed = [i for i, compute in enumerate(plan) if compute]
    assert 0 < len(computed) < STEPS  # the threshold skips some steps, not all
    assert cache.states["pair"].computed == computed and cache.calls() == (len(computed), STEPS - len(computed))
    assert 0 < (cached - uncached).abs().max().item() < 1.0  # an approximation, not a different edit


def test_cond_and_uncond_keep_their_own_state(pipe, request_, calibration, mag_batched):
    """Separate guidance (two calls a step, two states) equals batched guidance (one batch-2 state of both
    halves) under the same skips; a branch reading the other's residual would break the equality."""
    batched, pair_cache = mag_batched
    separate, cache = edit(pipe, request_, step_cache=parse_step_cache("mag:0.5"), cache_calibration=calibration,
                           batched_guidance=False)
    cond, uncond = cache.states["cond"], cache.states["uncond"]
    assert cond.skipped == uncond.skipped == pair_cache.states["pair"].skipped != []
    assert (cond.residual - uncond.residual).abs().max().item() > 1e-3  # the branches differ
    torch.testing.assert_close(separate, batched, rtol=0, atol=1e-5)  # batch-2 vs batch-1 matmul rounding


def test_reasoning_steps_and_the_drop_are_never_skipped(pipe, request_):
    """first-block with a threshold everything stays under skips every step it may: all but the first
    and last, the reasoning steps 0-1 and step 2, where the reasoning frames are dropped."""
    _, cache = edit(pipe, request_, temporal_reasoning_steps=2, step_cache=StepCacheSpec("first-block", 1e9))
    assert cache.states["pair"].computed == [0, 1, 2, STEPS - 1]
    assert cache.states["pair"].skipped == [3, 4]


@pytest.mark.parametrize("value, steps, reasoning, message", [
    ("first-block", 2, 0, "with 2 steps every step must be computed"),
    ("tea:fast", 8, 7, "fewer --temporal-reasoning-steps"),
    ("mag", 8, 0, "needs --cache-calibration"),
    ("pyramid", 8, 0, "must be one of first-block, mag, tea"),
    ("tea:-1", 8, 0, "a threshold >= 0"),
    ("tea --sequence-parallel", 8, 0, "cannot be combined with --sequence-parallel"),
])
def test_unsound_settings_are_refused_by_name(tiny_diffusers, input_image, tmp_path, capsys, value, steps, reasoning,
                                              message):
    input_image.save(tmp_path / "in.png")
    code = main(["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(tmp_path / "out.png"), "--steps", str(steps), "--temporal-reasoning-steps",
                 str(reasoning), "--step-cache", *value.split()])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "--step-cache" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not valid JSON"),
    (json.dumps({"weights": [1, 2]}).encode(), "is not a step-cache calibration"),
    (json.dumps({"format": "chronoedit-lora step-cache calibration", "steps": 3, "mag_ratios": [1.0],
                 "tea_inputs": [0, 0, 0], "tea_outputs": [0, 0, 0], "tea_coefficients": [0] * 5}).encode(),
     "do not match its 3 steps"),
])
def test_a_damaged_or_foreign_calibration_is_one_line(tiny_diffusers, input_image, tmp_path, capsys, content, message):
    (tmp_path / "cal.json").write_bytes(content)
    input_image.save(tmp_path / "in.png")
    code = main(["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(tmp_path / "out.png"), "--step-cache", "tea", "--cache-calibration",
                 str(tmp_path / "cal.json")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "cal.json" in err and len(err.strip().splitlines()) == 1


def test_calibration_round_trips(calibration, tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(calibration.to_json()))
    assert read_calibration(path) == calibration
    with pytest.raises(ChronoEditError, match="measured with 6 steps, the edit has 9"):
        StepCache(None, parse_step_cache("mag"), 9, calibration=calibration)


def test_eval_scores_cached_edits_against_uncached(pipe):
    """eval --step-cache: a pair row's cached edit scored against its uncached edit; a trajectory row
    (temporal reasoning throughout) is edited uncached and not scored."""
    from chronoedit_lora.data import EditPairDataset
    from chronoedit_lora.eval.held_out import EditSettings, encode_pairs
    from chronoedit_lora.eval.metrics import QUANTILES
    from chronoedit_lora.eval.runner import score_current

    from .test_train import EXAMPLE

    dataset = EditPairDataset(EXAMPLE / "with_trajectories.csv", 32, 32)
    pairs = encode_pairs(pipe, [dataset[0], dataset[12]], len(QUANTILES))
    exact, _ = score_current(pipe, pairs, EditSettings(steps=4, step_cache=StepCacheSpec("first-block", 0.0)), None)
    skipping, _ = score_current(pipe, pairs, EditSettings(steps=4, step_cache=StepCacheSpec("first-block", 1e9)), None)
    assert exact["cache_psnr"] == [100.0] and exact["cache_saved"] == [0.0]
    assert skipping["cache_saved"] == [0.5] and skipping["cache_psnr"][0] < 100.0  # steps 1 and 2 of 0-3 skipped


def test_the_web_app_refuses_a_damaged_calibration_at_start(tiny_diffusers, tmp_path, capsys):
    (tmp_path / "cal.json").write_text("[]")
    code = main(["ui", "--model", str(tiny_diffusers), "--cache-calibration", str(tmp_path / "cal.json")])
    err = capsys.readouterr().err
    assert code == 2 and "cal.json: it is not a step-cache calibration" in err and len(err.strip().splitlines()) == 1


def test_the_shipped_tea_coefficients_are_marked_not_calibrated(calibration):
    from chronoedit_lora.step_cache import describe, shipped_tea_coefficients

    assert describe(parse_step_cache("tea:fast"), None).endswith("not calibrated on ChronoEdit")
    assert "not calibrated" not in describe(parse_step_cache("tea:fast"), calibration)
    assert len(shipped_tea_coefficients()) == 5


def test_edit_command_runs_a_step_cache_and_says_which(tiny_diffusers, input_image, tmp_path, capsys):
    input_image.save(tmp_path / "in.png")
    code = main(["edit", "--model", str(tiny_diffusers), "--image", str(tmp_path / "in.png"), "--prompt", "x",
                 "--output", str(tmp_path / "out.png"), "--steps", "4", "--height", "32", "--width", "32",
                 "--step-cache", "tea:fast"])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "out.png").is_file()
    assert "step cache tea:0.2: DiffSynth's Wan2.1-I2V-14B-720P TeaCache coefficients, not calibrated" in out
