"""The Qwen2.5-VL captioner / prompt enhancer, run for real on a tiny random model built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from chronoedit_lora.captioners import qwen_vl
from chronoedit_lora.cli import main

from .tiny_vlm import write_tiny_qwen_vl

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example_dataset"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm")
    vocab = write_tiny_qwen_vl(folder)
    return folder, vocab


def test_captioner_asks_twice_with_both_images(tiny_vlm):
    folder, vocab = tiny_vlm
    captioner = qwen_vl.make_captioner(str(folder), max_new_tokens=6)
    before, after = (Image.open(EXAMPLE / side / "000.png").convert("RGB") for side in ("before", "after"))
    text = captioner(before, after, "pencil sketch")
    assert isinstance(text, str) and text.startswith(qwen_vl.INTENT) and len(text) > len(qwen_vl.INTENT)
    exchanges = captioner.model.exchanges
    assert len(exchanges) == 2  # concise instruction, then the detailed description
    assert "pencil sketch" in exchanges[0]["question"] and exchanges[1]["question"].startswith("Rewrite")
    for exchange in exchanges:
        ids = exchange["input_ids"][0].tolist()
        assert exchange["images"] == 2 and ids.count(vocab["<|vision_start|>"]) == 2
        assert ids.count(vocab["<|image_pad|>"]) > 2  # each image expanded into its patch tokens


def test_plugins_through_the_cli(tiny_vlm, tmp_path, monkeypatch, tiny_diffusers, capsys):
    folder, _ = tiny_vlm
    monkeypatch.setenv(qwen_vl.MODEL_ENV, str(folder))
    qwen_vl._default.cache_clear()
    source = tmp_path / "pairs"
    for side in ("before", "after"):
        (source / side).mkdir(parents=True)
        Image.open(EXAMPLE / side / "001.png").save(source / side / "x.png")
    assert main(["dataset", "prepare", str(source), "--captioner", "chronoedit_lora.captioners.qwen_vl:caption"]) == 0
    assert "The user wants to" in (source / "metadata.csv").read_text()
    assert main(["edit", "--model", str(tiny_diffusers), "--image", str(source / "before" / "x.png"), "--prompt", "sketch it",
                 "--output", str(tmp_path / "o.png"), "--prompt-enhancer", "chronoedit_lora.captioners.qwen_vl:enhance_prompt",
                 "--steps", "1", "--height", "32", "--width", "32", "--dtype", "float32"]) == 0
    assert "enhanced prompt: The user wants to" in capsys.readouterr().out
    qwen_vl._default.cache_clear()


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(qwen_vl.MODEL_ENV, raising=False)
    qwen_vl._default.cache_clear()
    with pytest.raises(Exception, match=qwen_vl.MODEL_ENV):
        qwen_vl.caption(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)))
    with pytest.raises(Exception, match="not a local folder"):
        qwen_vl.make_captioner(str(tmp_path / "nope"))


def test_large_images_are_shrunk_before_the_processor(tiny_vlm):
    small = qwen_vl.fit_pixels(Image.new("L", (4000, 3000)), 1024 * 1024)
    assert small.mode == "RGB" and small.width * small.height <= 1024 * 1024
    assert abs(small.width / small.height - 4 / 3) < 0.01 and small.width > 1150  # aspect kept, not over-shrunk
    assert qwen_vl.fit_pixels(Image.new("RGB", (64, 32)), 1024 * 1024).size == (64, 32)
    folder, vocab = tiny_vlm
    model = qwen_vl.VisionLanguageModel(str(folder), max_new_tokens=2)
    image_tokens = []
    for budget in (32 * 32, 256 * 256):  # the same 256 x 256 image under a small and a large budget
        model.max_image_pixels = budget
        model.ask([Image.new("RGB", (256, 256))], "What is this?")
        image_tokens.append(model.exchanges[-1]["input_ids"][0].tolist().count(vocab["<|image_pad|>"]))
    assert 0 < image_tokens[0] < image_tokens[1]
