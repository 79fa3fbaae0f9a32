"""The Qwen-VL captioner and prompt enhancer, run for real on tiny random Qwen2.5-VL, Qwen3-VL and
Qwen3-VL-MoE models built offline; ``dataset prepare`` with it (both prompts, "no change", resume)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from chronoedit_lora.captioners import qwen_vl
from chronoedit_lora.captioners.prompts import EDIT_INSTRUCTION, ENHANCE, REASONING
from chronoedit_lora.cli import main
from chronoedit_lora.data import read_metadata

from .tiny_vlm import KINDS, write_tiny_qwen_vl

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example_dataset"


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory) -> dict[str, tuple[Path, dict[str, int]]]:
    """Each kind's folder and vocabulary, plus "no change": a Qwen2.5-VL that answers only that."""
    folders = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        folders[kind] = folder, write_tiny_qwen_vl(folder, kind)
    folder = tmp_path_factory.mktemp("no_change")
    folders["no change"] = folder, write_tiny_qwen_vl(folder, answer="no change")
    return folders


@pytest.fixture()
def default_model(monkeypatch):
    """Points the plugin functions at a model folder (answers of at most 4 tokens: a random model never
    stops by itself); forgets the loaded model afterwards."""
    monkeypatch.setattr(qwen_vl, "MAX_NEW_TOKENS", 4)

    def use(folder: Path) -> None:
        monkeypatch.setenv(qwen_vl.MODEL_ENV, str(folder))
        qwen_vl.release()
    yield use
    qwen_vl.release()


def example_pair(index: int) -> tuple[Image.Image, Image.Image]:
    return tuple(Image.open(EXAMPLE / side / f"{index:03d}.png").convert("RGB") for side in ("before", "after"))


def pair_folder(root: Path, count: int) -> Path:
    for side in ("before", "after"):
        (root / side).mkdir(parents=True)
        for i in range(count):
            shutil.copy(EXAMPLE / side / f"{i:03d}.png", root / side / f"p{i}.png")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_two_stages_in_batches(tiny_vlms, kind):
    folder, vocab = tiny_vlms[kind]
    captioner = qwen_vl.make_captioner(str(folder), device_map="cpu", max_new_tokens=4)
    pairs = [example_pair(0), example_pair(2)]
    captions = captioner.caption_batch(pairs)
    exchanges = list(captioner.model.exchanges)
    assert [e["instruction"] for e in exchanges] == [EDIT_INSTRUCTION] * 2 + [
        REASONING.format(instruction=c.caption) for c in captions]  # stage 2 is given stage 1's instruction
    for exchange in exchanges:
        ids = exchange["input_ids"].tolist()
        assert exchange["images"] == 2 and ids.count(vocab["<|vision_start|>"]) == 2
        assert ids.count(vocab["<|image_pad|>"]) > 2  # each image expanded into its patch tokens
    assert all(c.caption and c.caption_cot.startswith(qwen_vl.INTENT) and not c.unchanged for c in captions)
    assert captioner(*pairs[1]) == captions[1]  # the padded batch answers as the pair alone does


def test_device_map_loading_gives_the_plain_load(tiny_vlms):
    """device_map="auto" (straight to the devices, as a 30B model must load) holds the same weights and
    answers as transformers' plain load, here on the CPU."""
    folder, _ = tiny_vlms["qwen3_vl_moe"]
    mapped = qwen_vl.VisionLanguageModel(str(folder), device_map="auto", max_new_tokens=6)
    plain = qwen_vl.VisionLanguageModel(str(folder), device_map=None, max_new_tokens=6)
    reference = plain.model.state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in mapped.model.state_dict().items())
    request = [(EDIT_INSTRUCTION, example_pair(1))]
    assert mapped.ask_many(request) == plain.ask_many(request)


def test_prepare_writes_both_prompts_and_resumes(tiny_vlms, default_model, tmp_path, capsys):
    default_model(tiny_vlms["qwen3_vl_moe"][0])
    source = pair_folder(tmp_path / "pairs", 3)
    command = ["dataset", "prepare", str(source), "--captioner", "chronoedit_lora.captioners.qwen_vl:caption",
               "--caption-batch-size", "2"]
    assert main(command) == 0
    csv_path = source / "metadata.csv"
    rows = list(csv.DictReader(csv_path.open()))
    assert [set(row) for row in rows] == [{"input_image", "edited_image", "caption", "caption_cot"}] * 3
    pairs, problems = read_metadata(csv_path)
    assert problems == [] and [p.prompt for p in pairs] == [row["caption_cot"] for row in rows]  # trained on
    progress = source / "metadata.captions.jsonl"
    lines = progress.read_text().splitlines()
    progress.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # as if stopped while writing the third
    assert main([*command, "--overwrite"]) == 0
    assert "2 pairs already captioned, 1 to caption" in capsys.readouterr().out
    assert list(csv.DictReader(csv_path.open())) == rows
    default_model(tmp_path / "no-model-here")  # all captioned: a rerun loads no model
    assert main([*command, "--overwrite"]) == 0
    assert list(csv.DictReader(csv_path.open())) == rows


def test_no_change_pairs_are_reported_and_left_out_unless_kept(tiny_vlms, default_model, tmp_path, capsys):
    default_model(tiny_vlms["no change"][0])
    source = pair_folder(tmp_path / "pairs", 2)
    command = ["dataset", "prepare", str(source), "--captioner", "chronoedit_lora.captioners.qwen_vl:caption"]
    assert main(command) == 2
    assert "saw no change in any of the 2 pair(s) (p0, p1)" in capsys.readouterr().err
    asked = [e["instruction"] for e in qwen_vl._default().model.exchanges]
    assert asked == [EDIT_INSTRUCTION] * 2  # no reasoning stage for "no change"
    assert main([*command, "--keep-unchanged"]) == 0
    rows = list(csv.DictReader((source / "metadata.csv").open()))
    assert [row["caption"] for row in rows] == ["no change"] * 2
    assert all(row["caption_cot"].startswith(qwen_vl.INTENT) for row in rows)  # kept: reasoned about too


def test_no_change_with_other_pairs_is_listed(tmp_path, monkeypatch, capsys):
    source = pair_folder(tmp_path / "pairs", 2)
    shutil.copy(source / "before" / "p1.png", source / "after" / "p1.png")  # p1 unchanged
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["dataset", "prepare", str(source), "--captioner", "captioner_plugin:labels"]) == 0
    assert "no change: 1 pair(s) left out (--keep-unchanged keeps them): p1" in capsys.readouterr().out
    assert [row["input_image"] for row in csv.DictReader((source / "metadata.csv").open())] == ["before/p0.png"]


def test_prompt_enhancer_through_edit(tiny_vlms, default_model, tiny_diffusers, tmp_path, capsys):
    default_model(tiny_vlms["qwen2_5_vl"][0])
    image = tmp_path / "x.png"
    example_pair(1)[0].save(image)
    assert main(["edit", "--model", str(tiny_diffusers), "--image", str(image), "--prompt", "sketch it",
                 "--output", str(tmp_path / "o.png"), "--prompt-enhancer", "chronoedit_lora.captioners.qwen_vl:enhance_prompt",
                 "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"]) == 0
    assert "enhanced prompt: The user wants to" in capsys.readouterr().out
    assert qwen_vl._default.cache_info().currsize == 0  # released before ChronoEdit loaded
    captioner = qwen_vl.make_captioner(str(tiny_vlms["qwen2_5_vl"][0]), device_map="cpu", max_new_tokens=2)
    captioner.enhance(example_pair(1)[0], "sketch it")
    (exchange,) = captioner.model.exchanges
    assert exchange["instruction"] == ENHANCE.format(instruction="sketch it") and exchange["images"] == 1


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(qwen_vl.MODEL_ENV, raising=False)
    qwen_vl.release()
    with pytest.raises(Exception, match=qwen_vl.MODEL_ENV):
        qwen_vl.caption(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)))
    with pytest.raises(Exception, match="not a local folder"):
        qwen_vl.make_captioner(str(tmp_path / "nope"))


def test_large_images_are_capped_at_the_originals_short_side(tiny_vlms):
    small = qwen_vl.cap_short_side(Image.new("L", (4000, 3000)), qwen_vl.MAX_SHORT_SIDE)
    assert small.mode == "RGB" and small.size == (1440, 1080)  # short side 1080, aspect kept
    assert qwen_vl.cap_short_side(Image.new("RGB", (64, 32)), 1080).size == (64, 32)
    folder, vocab = tiny_vlms["qwen2_5_vl"]
    model = qwen_vl.VisionLanguageModel(str(folder), device_map="cpu", max_new_tokens=1)
    image_tokens = []
    for cap in (32, 256):  # the same 256 x 256 image under a small and a large cap
        model.max_short_side = cap
        model.ask_many([("What is this?", [Image.new("RGB", (256, 256))])])
        image_tokens.append(model.exchanges[-1]["input_ids"].tolist().count(vocab["<|image_pad|>"]))
    assert 0 < image_tokens[0] < image_tokens[1]
