"""Training sizes: aspect buckets, the shared crop of a pair, size warnings, bucketed batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from chronoedit_lora.data import SizePolicy, aspect_buckets, bucket_batches, choose_bucket, plan_crop, plan_pair
from chronoedit_lora.data.buckets import MAX_ASPECT
from chronoedit_lora.errors import ChronoEditError

sides = st.integers(min_value=8, max_value=5000)
budgets = st.integers(min_value=16 * 16, max_value=2048 * 2048)


@settings(max_examples=300, deadline=None)
@given(width=sides, height=sides, max_pixels=budgets)
def test_bucket_sides_budget_and_aspect(width: int, height: int, max_pixels: int) -> None:
    """Sides are multiples of 16, the area fits the budget, and for images inside the bucket range the
    aspect ratio is kept within one 16-pixel step per side: |log(bucket / image aspect)| <= 16/W + 16/H."""
    bucket_w, bucket_h = SizePolicy.create(max_pixels=max_pixels).target((width, height))
    assert bucket_w % 16 == 0 and bucket_h % 16 == 0 and bucket_w * bucket_h <= max_pixels
    if 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
        assert abs(math.log((bucket_w / bucket_h) / (width / height))) <= 16 / bucket_w + 16 / bucket_h


def test_bucket_aspect_error_at_1024_squared_is_below_2_percent() -> None:
    buckets = aspect_buckets(1024 * 1024)
    ratios = np.exp(np.linspace(-math.log(4), math.log(4), 2001))
    errors = [abs(math.log(np.divide(*choose_bucket((r * 1000, 1000), buckets)) / r)) for r in ratios]
    assert max(errors) < 0.02
    assert choose_bucket((1000, 1000), buckets) == (1024, 1024)
    assert choose_bucket((1920, 1080), buckets) == (1360, 768)  # 16:9 -> 1.771 (1.045 Mpx budget 1.049)


def test_buckets_are_symmetric_and_near_the_budget() -> None:
    buckets = aspect_buckets(512 * 512)
    assert set(buckets) == {(h, w) for w, h in buckets}
    assert all(w * h > 512 * 512 * (1 - 2 * 16 / min(w, h)) for w, h in buckets)
    assert max(w / h for w, h in buckets) <= MAX_ASPECT


@settings(max_examples=40, deadline=None)
@given(source=st.tuples(st.integers(32, 128), st.integers(32, 128)),
       edited_scale=st.sampled_from([0.5, 1.0, 1.5, 2.0]),
       target=st.tuples(st.integers(1, 6), st.integers(1, 6)))
def test_both_images_are_cropped_identically(source: tuple[int, int], edited_scale: float,
                                             target: tuple[int, int]) -> None:
    """The same region (fractions of each image) is cut from both; on a smooth gradient, an edited image
    that is the source at another resolution crops to the same pixels away from the border (resampling
    differs there) within 4 levels, mean 1 (two uint8 roundings + resampling; seen: max 3, mean 0.62)."""
    target = (target[0] * 16, target[1] * 16)
    edited_size = (max(1, round(source[0] * edited_scale)), max(1, round(source[1] * edited_scale)))
    plan, _ = plan_pair(source, edited_size, target, row=2)
    src_box = np.divide(plan.pixel_box(source), source * 2)
    tgt_box = np.divide(plan.pixel_box(edited_size), edited_size * 2)
    np.testing.assert_allclose(src_box, tgt_box, atol=1e-12)
    left, top, right, bottom = plan.pixel_box(source)
    assert -1e-9 <= left and -1e-9 <= top and right <= source[0] + 1e-9 and bottom <= source[1] + 1e-9
    assert math.isclose(left + right, source[0]) and math.isclose(top + bottom, source[1])  # centred
    assert math.isclose((right - left) / (bottom - top), target[0] / target[1], rel_tol=1e-9)

    # A linear ramp in continuous image coordinates (pixel centres at (i + 0.5) / n): resolution-independent.
    x, y = np.meshgrid((np.arange(source[0]) + 0.5) / source[0], (np.arange(source[1]) + 0.5) / source[1])
    gradient = np.stack([x * 200 + 20, y * 200 + 20, (x + y) * 100 + 20], axis=-1).astype(np.uint8)
    src = Image.fromarray(gradient)
    tgt = src.resize(edited_size, Image.Resampling.BILINEAR)
    assert plan.apply(src).size == plan.apply(tgt).size == target
    diff = np.abs(np.asarray(plan.apply(src), int) - np.asarray(plan.apply(tgt), int))[2:-2, 2:-2]
    assert diff.mean() <= 1.0 and diff.max() <= 4


def test_fixed_size_plan() -> None:
    plan = plan_crop((100, 50), (32, 32))
    assert plan.box == (0.25, 0.0, 0.75, 1.0) and plan.scale((100, 50)) == pytest.approx(32 / 50)


def test_aspect_mismatch_warning_above_1_percent() -> None:
    _, problems = plan_pair((400, 300), (403, 300), (64, 48), row=3)
    assert problems == []  # 0.75% off: not reported
    _, problems = plan_pair((400, 300), (420, 300), (64, 48), row=3)
    (problem,) = problems
    assert (problem.row, problem.column, problem.fatal) == (3, "edited_image", False)
    assert "5.0%" in problem.reason


def test_upscale_warning_names_the_small_image() -> None:
    _, problems = plan_pair((64, 64), (128, 128), (128, 128), row=5)
    (problem,) = problems
    assert (problem.column, problem.fatal) == ("input_image", False) and "2.00x" in problem.reason
    _, problems = plan_pair((124, 124), (124, 124), (128, 128), row=5)
    assert problems == []  # 3% upscale is below the 5% threshold


def test_size_policy_validation() -> None:
    assert SizePolicy.create(height=32, width=48).target((1000, 10)) == (48, 32)
    for kwargs in ({"height": 32}, {"height": 30, "width": 32}, {"max_pixels": 100}):
        with pytest.raises(ChronoEditError):
            SizePolicy.create(**kwargs)


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.sampled_from(["a", "b", "c"]), max_size=40), batch_size=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1), drop_last=st.booleans())
def test_bucket_batches(keys: list[str], batch_size: int, seed: int, drop_last: bool) -> None:
    batches = bucket_batches(keys, batch_size, seed, epoch=0, drop_last=drop_last)
    assert batches == bucket_batches(keys, batch_size, seed, epoch=0, drop_last=drop_last)  # deterministic
    assert all(len({keys[i] for i in batch}) == 1 and 0 < len(batch) <= batch_size for batch in batches)
    used = sorted(i for batch in batches for i in batch)
    if drop_last:
        assert all(len(batch) == batch_size for batch in batches)
        assert len(used) == sum(len([k for k in keys if k == key]) // batch_size * batch_size for key in set(keys))
    else:
        assert used == list(range(len(keys)))


def test_bucket_batches_reshuffle_per_epoch() -> None:
    keys = ["a"] * 20 + ["b"] * 20
    assert bucket_batches(keys, 4, seed=1, epoch=0) != bucket_batches(keys, 4, seed=1, epoch=1)
    assert bucket_batches(keys, 4, seed=1, epoch=0) != bucket_batches(keys, 4, seed=2, epoch=0)
