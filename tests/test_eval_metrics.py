"""Each evaluation metric against an independent computation: scikit-image for PSNR and SSIM, the
lpips package for LPIPS, transformers' own forward passes for CLIP and DINOv2, hand-written
answers and a tiny random Qwen2.5-VL for the judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chronoedit_lora.errors import ChronoEditError
from chronoedit_lora.eval.image_metrics import MAX_PSNR, psnr, ssim

from .tiny_metric_models import write_tiny_clip, write_tiny_dino, write_tiny_lpips
from .tiny_vlm import write_tiny_qwen_vl


def _pairs(input_image) -> list[tuple[Image.Image, Image.Image]]:
    """Known image pairs: a structured image against noisy, blurred and shifted versions, and random noise."""
    from PIL import ImageFilter

    rng = np.random.default_rng(0)
    base = np.asarray(input_image.resize((48, 40)))
    noisy = np.clip(base.astype(int) + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
    blurred = Image.fromarray(base).filter(ImageFilter.GaussianBlur(2))
    return [(Image.fromarray(base), Image.fromarray(noisy)), (Image.fromarray(base), blurred),
            (Image.fromarray(base), Image.fromarray(np.roll(base, 3, axis=1))),
            (Image.fromarray(rng.integers(0, 256, base.shape, dtype=np.uint8)), Image.fromarray(base))]


def test_psnr_and_ssim_match_scikit_image(input_image):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    for a, b in _pairs(input_image):
        x, y = np.asarray(a) / 255.0, np.asarray(b) / 255.0
        expected_ssim = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=1.0, channel_axis=-1)
        assert ssim(a, b) == pytest.approx(expected_ssim, abs=1e-9)  # same formula in float64
        assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(np.asarray(a), np.asarray(b), data_range=255), abs=1e-9)
    assert psnr(input_image, input_image) == MAX_PSNR and ssim(input_image, input_image) == pytest.approx(1.0)


def test_lpips_matches_the_lpips_package(tmp_path, input_image):
    from chronoedit_lora.eval.lpips import Lpips
    from chronoedit_lora.video import to_tensor

    reference = write_tiny_lpips(tmp_path / "lpips")
    ours = Lpips(tmp_path / "lpips")
    for a, b in _pairs(input_image):
        x, y = to_tensor(a)[None], to_tensor(b)[None]
        expected = reference(x, y).item()
        assert expected > 0 and ours.distance(a, b) == pytest.approx(expected, rel=1e-5)  # float32 sums in another order
    assert ours.distance(input_image, input_image) == 0.0
    (tmp_path / "lpips" / "alex.pth").unlink()
    with pytest.raises(ChronoEditError, match=r"^--lpips .*expected alex\.pth"):
        Lpips(tmp_path / "lpips")


def test_clip_and_dino_similarities_are_the_cosines_of_transformers_embeddings(tmp_path, input_image):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, Dinov2Model

    from chronoedit_lora.eval.runner import Evaluation, MetricFolders, score_with_models
    from chronoedit_lora.eval.checkpoints import Checkpoint
    from chronoedit_lora.eval.held_out import HeldOutPair

    clip_dir, dino_dir = write_tiny_clip(tmp_path / "clip"), write_tiny_dino(tmp_path / "dino")
    images = [a for pair in _pairs(input_image) for a in pair]
    pairs = [HeldOutPair({}, [], images[0], images[1], "make it a pencil sketch", "pair", 2),
             HeldOutPair({}, [], images[2], images[3], "transform the image into a drawing", "pair", 3)]
    edits = [images[4], images[7]]
    evaluation = Evaluation([Checkpoint("base", None, None)], pairs, values={"base": {}}, edits={"base": edits})
    score_with_models(evaluation, MetricFolders(clip=clip_dir, dino=dino_dir))
    values = evaluation.values["base"]

    clip = CLIPModel.from_pretrained(str(clip_dir)).eval()
    pixels = AutoImageProcessor.from_pretrained(str(clip_dir))(images=images, return_tensors="pt")["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(str(clip_dir))([p.prompt for p in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        # the direction uses unnormalised embeddings: rebuild them from the unit ones and their norms
        norms = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output).norm(dim=-1)
    image_embeds = out.image_embeds  # unit vectors from CLIPModel.forward
    for i, (edit_index, source, target) in enumerate(((4, 0, 1), (7, 2, 3))):
        assert values["clip_image"][i] == pytest.approx((image_embeds[edit_index] @ image_embeds[target]).item(), abs=1e-5)
        change = image_embeds[edit_index] * norms[edit_index] - image_embeds[source] * norms[source]
        expected = torch.nn.functional.cosine_similarity(change, out.text_embeds[i], dim=0).item()
        assert values["clip_text_direction"][i] == pytest.approx(expected, abs=1e-5)

    dino = Dinov2Model.from_pretrained(str(dino_dir)).eval()
    pixels = AutoImageProcessor.from_pretrained(str(dino_dir))(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = dino(pixel_values=pixels).last_hidden_state[:, 0]
    unit = cls / cls.norm(dim=-1, keepdim=True)
    for i, (edit_index, source, target) in enumerate(((4, 0, 1), (7, 2, 3))):
        assert values["dino"][i] == pytest.approx((unit[edit_index] @ unit[target]).item(), abs=1e-5)
        assert values["source_dino"][i] == pytest.approx((unit[edit_index] @ unit[source]).item(), abs=1e-5)


def test_missing_metric_folders_are_one_line_errors_naming_the_flag(tmp_path):
    from chronoedit_lora.eval.runner import MetricFolders

    (tmp_path / "empty").mkdir()
    for flag, folders in (("--clip", MetricFolders(clip=tmp_path / "nope")), ("--dino", MetricFolders(dino=tmp_path / "empty")),
                          ("--judge", MetricFolders(judge=tmp_path / "nope")), ("--lpips", MetricFolders(lpips=tmp_path / "nope"))):
        with pytest.raises(ChronoEditError, match=f"^{flag} ") as error:
            folders.check()
        assert "\n" not in str(error.value)


def test_judge_answers_are_parsed_or_counted(tmp_path, input_image):
    from chronoedit_lora.eval.judge import Judge, parse_answer

    verdict = parse_answer("SCORE: 7 REASON: The sky is orange as asked.\nextra")
    assert (verdict.score, verdict.reason) == (7.0, "The sky is orange as asked.")
    assert parse_answer("score - 8/10, reason: fine").score == 8.0
    assert parse_answer("Score: 11 Reason: too good").score is None  # outside 0-10
    assert parse_answer("I cannot tell.").score is None and parse_answer("I cannot tell.").reason == "I cannot tell."

    vocab = write_tiny_qwen_vl(tmp_path / "vlm")
    judge = Judge(str(tmp_path / "vlm"), max_new_tokens=4)
    judgement = judge(input_image, input_image.rotate(90), "make it a sketch")
    exchanges = judge.model.exchanges
    assert [e["images"] for e in exchanges] == [2, 1]  # instruction: input and edit; quality: the edit alone
    assert [e["input_ids"].tolist().count(vocab["<|vision_start|>"]) for e in exchanges] == [2, 1]
    # the random model answers with random words: every answer is either parsed (0-10) or counted
    scores = (judgement.instruction.score, judgement.quality.score)
    assert judgement.unparsed == sum(s is None for s in scores)
    assert all(s is None or 0 <= s <= 10 for s in scores)
    assert (judgement.overall is None) == (judgement.unparsed > 0)
