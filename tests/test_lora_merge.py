"""`lora merge` bakes LoRAs into the DiT, keeps the checkpoint's layout, and equals fused inference."""

from __future__ import annotations

import json

import pytest
import torch

from chronoedit_lora.cli import main
from chronoedit_lora.lora import fuse_lora, load_lora, save_lora
from chronoedit_lora.models.dit import load_dit
from chronoedit_lora.models.components import discover_components


@pytest.mark.parametrize("layout", ["diffusers", "wan"])
def test_merge_equals_fused_weights_and_keeps_the_layout(request, random_lora, tmp_path, layout):
    model = request.getfixturevalue("tiny_diffusers" if layout == "diffusers" else "tiny_wan")
    save_lora(random_lora, tmp_path / "l.safetensors")
    out = tmp_path / "merged"
    assert main(["lora", "merge", "--model", str(model), "--lora", f"{tmp_path / 'l.safetensors'}:0.5", "--output", str(out)]) == 0
    source, merged = discover_components(model), discover_components(out)
    if layout == "diffusers":
        assert sorted(p.name for p in merged.dit.iterdir()) == sorted(p.name for p in source.dit.iterdir())
        index = json.loads(next(merged.dit.glob("*.index.json")).read_text())
        assert set(index["weight_map"].values()) == {p.name for p in merged.dit.glob("*-of-*.safetensors")}
    else:
        assert merged.dit.name == source.dit.name
    assert merged.vae.resolve() == source.vae.resolve()  # untouched components are linked
    base, _ = load_dit(source.dit, dtype=torch.bfloat16)  # stored dtype: the merge rounds like fusing does
    fuse_lora(base, load_lora(tmp_path / "l.safetensors")[0], scale=0.5)
    baked, _ = load_dit(merged.dit, dtype=torch.bfloat16)
    a, b = base.state_dict(), baked.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = load_dit(source.dit, dtype=torch.bfloat16)[0].state_dict()
    assert not torch.equal(changed["blocks.0.self_attn.q.weight"], b["blocks.0.self_attn.q.weight"])


def test_merge_refuses_a_mismatched_lora(tiny_diffusers, random_lora, tmp_path, capsys):
    save_lora({"blocks.7.ffn.0": random_lora["blocks.0.ffn.0"]}, tmp_path / "bad.safetensors")
    assert main(["lora", "merge", "--model", str(tiny_diffusers), "--lora", str(tmp_path / "bad.safetensors"),
                 "--output", str(tmp_path / "out")]) == 2
    assert "blocks.7.ffn.0" in capsys.readouterr().err


def test_merge_model_checks_every_lora_before_writing(tiny_diffusers, random_lora, tmp_path):
    from chronoedit_lora.lora import LoraMismatchError
    from chronoedit_lora.lora.merge import merge_model

    save_lora(random_lora, tmp_path / "good.safetensors")
    save_lora({"blocks.7.ffn.0": random_lora["blocks.0.ffn.0"]}, tmp_path / "bad.safetensors")
    with pytest.raises(LoraMismatchError, match="blocks.7.ffn.0"):
        merge_model(tiny_diffusers, None, [(tmp_path / "good.safetensors", 1.0), (tmp_path / "bad.safetensors", 1.0)],
                    tmp_path / "out")
    assert not (tmp_path / "out").exists()
