"""Registry entries: the hashes we register for the released 14B files are what DiffSynth computes
for models of those shapes, and registering is idempotent."""

from __future__ import annotations

import importlib
import subprocess
import sys

import torch
from diffsynth.configs.model_configs import MODEL_CONFIGS
from diffsynth.models.wan_video_dit import WanModel
from diffusers import ChronoEditTransformer3DModel

from chronoedit_lora.models.dit import CHRONOEDIT_14B_KWARGS, KNOWN_14B_DITS, register_known_checkpoints
from chronoedit_lora.models.loading import hash_shapes


def _shapes(model: torch.nn.Module, prefix: str = "") -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in model.state_dict().items()}


def test_known_hashes_are_those_of_the_14b_shapes():
    with torch.device("meta"):
        wan = WanModel(**CHRONOEDIT_14B_KWARGS)
        diffusers = ChronoEditTransformer3DModel(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
    expected = {
        hash_shapes(_shapes(diffusers)): ("diffusers", ""),
        hash_shapes(_shapes(wan, "model.diffusion_model.")): ("wan", "model.diffusion_model."),
        hash_shapes(_shapes(wan, "diffusion_model.")): ("wan", "diffusion_model."),
    }
    for model_hash, layout in expected.items():
        assert KNOWN_14B_DITS[model_hash] == layout
    # DiffSynth's own Wan2.1-I2V-14B entry covers the unprefixed original-format file.
    plain = hash_shapes(_shapes(wan))
    assert any(e["model_hash"] == plain and e["extra_kwargs"] == CHRONOEDIT_14B_KWARGS for e in MODEL_CONFIGS)


def test_registration_is_idempotent():
    before = len(MODEL_CONFIGS)
    importlib.reload(importlib.import_module("chronoedit_lora.models"))
    register_known_checkpoints()
    assert len(MODEL_CONFIGS) == before
    for model_hash in KNOWN_14B_DITS:
        assert sum(e["model_hash"] == model_hash for e in MODEL_CONFIGS) == 1


def test_entries_exist_in_a_fresh_worker_process():
    """What an accelerate/torchrun worker sees after `import chronoedit_lora.models`."""
    code = ("import chronoedit_lora.models; from diffsynth.configs.model_configs import MODEL_CONFIGS as M; "
            "print(sum(e['model_hash'] == 'e0e8b7e0ab5bbf15b88be20fdf9dfcbd' for e in M))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "1"
