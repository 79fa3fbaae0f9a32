"""``chronoedit-lora calibrate-cache`` on the tiny model: the JSON it writes is what --step-cache reads,
and --check's table has each setting's calls (predicted ones equal to those made) and scores."""

from __future__ import annotations

import re

from chronoedit_lora.cli import main
from chronoedit_lora.step_cache import parse_step_cache, predicted_plan, read_calibration

from .test_train import make_subset
from .tiny_metric_models import write_tiny_lpips

STEPS = 6


def test_calibrate_then_check_writes_json_table_and_plot(tiny_diffusers, tmp_path, capsys):
    dataset = make_subset(tmp_path / "held_out", 1, start=8)
    write_tiny_lpips(tmp_path / "lpips")
    output = tmp_path / "cal.json"
    code = main(["calibrate-cache", "--model", str(tiny_diffusers), "--dataset", str(dataset), "--steps", str(STEPS),
                 "--height", "32", "--width", "32", "--cfg", "3", "--dtype", "float32", "--scheduler", "euler",
                 "--output", str(output), "--check", "mag:0,mag:0.5,tea:0.3,first-block:0.5",
                 "--lpips", str(tmp_path / "lpips")])
    out = capsys.readouterr().out
    assert code == 0
    calibration = read_calibration(output)
    assert calibration.steps == STEPS and calibration.about["rows"] == 1
    assert calibration.mag_ratios[0] == 1.0 and all(r > 0 for r in calibration.mag_ratios)
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (\S+) \| (\d+) \| (\d+) \| (\S+) \| (\d+)% \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)}
    assert list(rows) == ["mag:0", "mag:0.5", "tea:0.3", "first-block:0.5"]
    computed, skipped, predicted, _, psnr, ssim, lpips = rows["mag:0"]
    assert (int(computed), int(skipped), predicted) == (STEPS, 0, str(STEPS))
    assert float(psnr) == 100.0 and float(ssim) == 1.0 and float(lpips) == 0.0  # uncached against itself
    for name in ("mag:0.5", "tea:0.3"):
        computed, skipped, predicted = rows[name][:3]
        assert int(computed) == int(predicted) == sum(predicted_plan(parse_step_cache(name), calibration))
        assert int(computed) + int(skipped) == STEPS
    assert (tmp_path / "cal-check.png").stat().st_size > 0


def test_bad_check_settings_are_refused_before_any_model_loads(tiny_diffusers, tmp_path, capsys):
    dataset = make_subset(tmp_path / "held_out", 1, start=8)
    code = main(["calibrate-cache", "--model", str(tiny_diffusers), "--dataset", str(dataset), "--steps", "2",
                 "--output", str(tmp_path / "cal.json"), "--check"])
    err = capsys.readouterr().err
    assert code == 2 and "--check first-block: with 2 steps" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cal.json").exists()
