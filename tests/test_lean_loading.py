"""Loading a DiT adds about its weight bytes to RSS, once (issue: lean loading; bound 1.15x)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .bench_scripts import load_bench

MAX_ADDED_RSS = 1.15  # x the weight bytes


@pytest.mark.slow
def test_dit_load_holds_the_weights_once(tmp_path):
    bench = load_bench("load_dit")
    folder = tmp_path / "transformer"
    weight_bytes = bench.write_synthetic_dit(folder, layers=2)  # ~0.3 GiB bf16, 1.3B-shaped blocks
    result = subprocess.run([sys.executable, "-c", bench.MEASURE, str(folder), "ours", "bfloat16"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]  # MEASURE also asserts the weights stayed bf16
    added = json.loads(result.stdout.strip().splitlines()[-1])["added_rss_bytes"]
    assert added <= MAX_ADDED_RSS * weight_bytes, added / weight_bytes


def test_read_state_dict_converts_from_a_mapping_and_keeps_no_view_of_it(tmp_path):
    """bf16 files read as float32 (or kept bf16): the values of safetensors' own reader, integer
    tensors untouched; converted tensors own their memory, unconverted ones share the file's buffer."""
    from safetensors.torch import load_file, save_file

    from chronoedit_lora.models.loading import read_state_dict

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(8, 16, generator=g).to(torch.bfloat16), "b": torch.randn(16, generator=g),
               "index": torch.arange(5), "empty": torch.zeros(0, 4, dtype=torch.bfloat16)}
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    expected = load_file(str(path))
    converted = read_state_dict([path], torch.float32)
    for key, tensor in expected.items():
        want = tensor.float() if tensor.is_floating_point() else tensor
        assert converted[key].dtype == want.dtype and torch.equal(converted[key], want), key
        assert converted[key].untyped_storage().nbytes() == want.numel() * want.element_size(), key
    kept = read_state_dict([path])
    assert all(torch.equal(kept[key], expected[key]) for key in expected)
    pointers = [kept[key].data_ptr() for key in ("w", "b", "index")]
    assert max(pointers) - min(pointers) < path.stat().st_size  # views of one buffer holding the file
