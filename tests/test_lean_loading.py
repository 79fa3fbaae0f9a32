"""Loading a DiT adds about its weight bytes to RSS, once (issue: lean loading; bound 1.15x)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .bench_scripts import load_bench

MAX_ADDED_RSS = 1.15  # x the weight bytes


@pytest.mark.slow
def test_dit_load_holds_the_weights_once(tmp_path):
    bench = load_bench("load_dit")
    folder = tmp_path / "transformer"
    weight_bytes = bench.write_synthetic_dit(folder, layers=2)  # ~0.3 GiB bf16, 1.3B-shaped blocks
    result = subprocess.run([sys.executable, "-c", bench.MEASURE, str(folder), "ours"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]  # MEASURE also asserts the weights stayed bf16
    added = json.loads(result.stdout.strip().splitlines()[-1])["added_rss_bytes"]
    assert added <= MAX_ADDED_RSS * weight_bytes, added / weight_bytes
