"""DiT loading through DiffSynth's registry, checked number-for-number against diffusers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import ChronoEditTransformer3DModel
from safetensors.torch import load_file, save_file

from chronoedit_lora.errors import CheckpointError
from chronoedit_lora.models.dit import inspect_dit, load_dit
from chronoedit_lora.models.rope import chronoedit_model_fn, temporal_positions

# Our path and diffusers' differ only in float rounding (DiffSynth builds the timestep sinusoid
# and RoPE in float64, diffusers in float32): bound the difference relative to the output scale.
PARITY_RTOL = 1e-4
# The legacy [0, 1] positions must change a 2-frame output by far more than the parity noise.
LEGACY_MIN_EFFECT = 10 * PARITY_RTOL


def _dit_inputs(frames: int, seed: int = 0, text_dim: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 16, frames, 8, 8, generator=g),
        "y": torch.randn(1, 20, frames, 8, 8, generator=g),
        "context": torch.randn(1, 512, text_dim, generator=g),
        "clip": torch.randn(1, 257, 1280, generator=g),
        "t": torch.tensor([725.0]),
    }


@pytest.fixture(scope="module")
def reference(tiny_diffusers: Path) -> ChronoEditTransformer3DModel:
    return ChronoEditTransformer3DModel.from_pretrained(tiny_diffusers / "transformer", torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(tiny_diffusers: Path):
    return load_dit(tiny_diffusers / "transformer", dtype=torch.float32)


def _run_both(reference, ours, frames: int, rope: str = "skip"):
    model, ckpt = ours
    inp = _dit_inputs(frames, text_dim=model.text_embedding[0].in_features)
    with torch.no_grad():
        ref = reference(torch.cat([inp["x"], inp["y"]], 1), inp["t"], inp["context"], inp["clip"], return_dict=False)[0]
        out = chronoedit_model_fn(
            model, inp["x"], inp["t"], skip_len=ckpt.temporal_skip_len, rope=rope,
            context=inp["context"], clip_feature=inp["clip"], y=inp["y"],
        )
    return ref, out


@pytest.mark.parametrize("frames", [2, 8])
def test_dit_matches_diffusers(reference, ours, frames):
    ref, out = _run_both(reference, ours, frames)
    scale = ref.abs().max().item()
    assert scale > 0.1, "reference output is degenerate; the tiny weights are too small to test anything"
    assert (out - ref).abs().max().item() <= PARITY_RTOL * scale


def test_legacy_rope_reproduces_consecutive_positions_and_differs(reference, ours):
    ref, skip = _run_both(reference, ours, 2, rope="skip")
    _, legacy = _run_both(reference, ours, 2, rope="legacy")
    scale = ref.abs().max().item()
    assert (legacy - skip).abs().max().item() >= LEGACY_MIN_EFFECT * scale
    # legacy == diffusers with the temporal-skip length set to 2, i.e. positions [0, 1]
    reference.rope.temporal_skip_len = 2
    try:
        legacy_ref, _ = _run_both(reference, ours, 2)
    finally:
        reference.rope.temporal_skip_len = 8
    assert (legacy - legacy_ref).abs().max().item() <= PARITY_RTOL * scale


def test_temporal_positions():
    assert temporal_positions(2) == [0, 7]
    assert temporal_positions(2, rope="legacy") == [0, 1]
    assert temporal_positions(8) == list(range(8))
    assert temporal_positions(1) == [0]


def test_inspect_reads_sizes_from_shapes(tiny_diffusers):
    ckpt = inspect_dit(tiny_diffusers / "transformer")
    config = json.loads((tiny_diffusers / "transformer" / "config.json").read_text())
    assert ckpt.format == "diffusers"
    assert ckpt.kwargs["dim"] == config["num_attention_heads"] * config["attention_head_dim"]
    assert ckpt.kwargs["num_layers"] == config["num_layers"]
    assert ckpt.kwargs["in_dim"] == 36 and ckpt.kwargs["has_image_input"]
    assert ckpt.temporal_skip_len == config.get("rope_temporal_skip_len", 8)
    assert len(ckpt.files) >= 3


def test_index_json_and_shard_list_load_the_same(tiny_diffusers, ours):
    folder = tiny_diffusers / "transformer"
    index = next(folder.glob("*.index.json"))
    shards = sorted(folder.glob("*-of-*.safetensors"))
    for source in (index, shards):
        assert inspect_dit(source).files == ours[1].files


def _copy_transformer(tiny_diffusers: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "transformer"
    shutil.copytree(tiny_diffusers / "transformer", dst)
    return dst


def test_missing_shard_is_named(tiny_diffusers, tmp_path):
    folder = _copy_transformer(tiny_diffusers, tmp_path)
    victim = sorted(folder.glob("*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        inspect_dit(folder)
    with pytest.raises(CheckpointError, match=victim.name):
        inspect_dit(sorted(folder.glob("*-of-*.safetensors")))


def test_stray_shard_is_named(tiny_diffusers, tmp_path):
    folder = _copy_transformer(tiny_diffusers, tmp_path)
    first = sorted(folder.glob("*-of-*.safetensors"))[0]
    stray = folder / "diffusion_pytorch_model-00009-of-00009.safetensors"  # left from another download
    shutil.copy(first, stray)
    with pytest.raises(CheckpointError, match=stray.name):
        inspect_dit(folder)


def test_corrupt_header_is_a_clear_error(tiny_diffusers, tmp_path):
    folder = _copy_transformer(tiny_diffusers, tmp_path)
    shard = sorted(folder.glob("*-of-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"{ this is not json at all !!!!!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}.*corrupt"):
        inspect_dit(folder)


def test_truncated_shard_is_a_clear_error(tiny_diffusers, tmp_path):
    folder = _copy_transformer(tiny_diffusers, tmp_path)
    shard = sorted(folder.glob("*-of-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        inspect_dit(folder)


def _rewrite_index(folder: Path, edit) -> tuple[Path, dict]:
    """Apply ``edit`` to the copied folder's index JSON (a dict, or what ``edit`` returns) and save it."""
    index = next(folder.glob("*.index.json"))
    data = json.loads(index.read_text())
    data = edit(data) or data
    index.write_text(json.dumps(data))
    return index, data


@pytest.mark.parametrize("where", ["parent", "absolute", "link"])
def test_index_naming_a_shard_outside_its_folder_is_refused(tiny_diffusers, tmp_path, where):
    """A weight_map value that leads out of the index's folder (../, absolute, a symlink to outside)
    is refused naming the index, the key and the file, before the outside file is read."""
    folder = _copy_transformer(tiny_diffusers, tmp_path)
    shard = sorted(folder.glob("*-of-*.safetensors"))[0]
    outside = tmp_path / "elsewhere" / shard.name
    outside.parent.mkdir()
    shard.unlink()
    outside.write_bytes(b"not a safetensors file")  # reading it would be a different error
    name = {"parent": f"../elsewhere/{shard.name}", "absolute": str(outside), "link": shard.name}[where]
    if where == "link":
        shard.symlink_to(outside)
    key = None

    def point_at_outside(data):
        nonlocal key
        for k, v in data["weight_map"].items():
            if v == shard.name:
                data["weight_map"][k] = name
                key = key or k

    index, _ = _rewrite_index(folder, point_at_outside)
    with pytest.raises(CheckpointError) as raised:
        inspect_dit(folder)
    message = str(raised.value)
    assert str(index) in message and repr(key) in message and repr(name) in message
    assert "leads outside the index's folder" in message and "put the shard there" in message
    assert ("followed only within the folder" in message) == (where == "link")
    assert "not a safetensors file" not in message and "corrupt" not in message  # the outside file was not read


def test_index_link_inside_its_folder_is_fine(tiny_diffusers, tmp_path, ours):
    folder = _copy_transformer(tiny_diffusers, tmp_path)
    shard = sorted(folder.glob("*-of-*.safetensors"))[0]
    (folder / "blobs").mkdir()
    shard.rename(folder / "blobs" / shard.name)
    shard.symlink_to(Path("blobs") / shard.name)
    assert [p.name for p in inspect_dit(folder).files] == [p.name for p in ours[1].files]


def test_hugging_face_cache_snapshot_links_load(tiny_diffusers, tmp_path, ours):
    """The Hugging Face cache layout: <repo>/snapshots/<rev>/transformer/* are links into <repo>/blobs/."""
    repo = tmp_path / "models--nvidia--ChronoEdit-14B-Diffusers"
    folder = repo / "snapshots" / "0123abcd" / "transformer"
    folder.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted((tiny_diffusers / "transformer").iterdir())):
        blob = repo / "blobs" / f"sha{i}"
        shutil.copy(file, blob)
        (folder / file.name).symlink_to(Path("../../../blobs") / blob.name)
    assert [p.name for p in inspect_dit(folder).files] == [p.name for p in ours[1].files]
    blob = repo / "blobs" / "sha0"
    (folder / "stray").symlink_to(tmp_path)  # a link out of the cache is still refused
    index, _ = _rewrite_index(folder, lambda data: {"weight_map": {**data["weight_map"], "x.weight": "stray"}})
    with pytest.raises(CheckpointError, match="leads outside the index's folder"):
        inspect_dit(folder)
    assert blob.is_file()


@pytest.mark.parametrize("content, message", [
    ([1, 2], "holds a JSON list, not an object"),
    ({"metadata": {}}, "no \"weight_map\""),
    ({"weight_map": ["a.safetensors"]}, "\"weight_map\" is a JSON list, not an object"),
    ({"weight_map": {"blocks.0.x": 3}}, "weight_map entry 'blocks.0.x' is 3, not a shard file name"),
])
def test_malformed_index_is_a_clear_error(tiny_diffusers, tmp_path, content, message):
    folder = _copy_transformer(tiny_diffusers, tmp_path)
    index, _ = _rewrite_index(folder, lambda data: content)
    with pytest.raises(CheckpointError) as raised:
        inspect_dit(folder)
    assert str(index) in str(raised.value) and message in str(raised.value)
    assert "re-download the index" in str(raised.value)


def test_wrong_folder_and_wrong_component(tiny_diffusers, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_dit(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="No DiT weights"):
        inspect_dit(tmp_path)
    vae_file = next((tiny_diffusers / "vae").glob("*.safetensors"))
    with pytest.raises(CheckpointError, match="is not a ChronoEdit DiT: it looks like an image VAE in diffusers' names"):
        inspect_dit(vae_file)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_single_original_format_file(ours, tmp_path, prefix):
    """The ComfyUI-style single file (original Wan keys, optional prefix) loads to the same model."""
    model, ckpt = ours
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "chrono_edit_tiny.safetensors"
    save_file(state, str(path), metadata={"num_attention_heads": str(ckpt.kwargs["num_heads"])})
    loaded, ckpt = load_dit(path, dtype=torch.float32)
    assert ckpt.format == "wan" and ckpt.key_prefix == prefix
    for (k1, v1), (k2, v2) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2)
    assert set(load_file(str(path))) == set(state)
