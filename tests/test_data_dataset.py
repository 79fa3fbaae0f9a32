"""EditPairDataset items (the 5-frame clip) and check_dataset's one-pass report, on real files."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from chronoedit_lora.data import EditPairDataset, bucket_batches, check_dataset, format_report, has_fatal
from chronoedit_lora.errors import ChronoEditError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def solid(path: Path, size: tuple[int, int], colour: tuple[int, int, int], mode: str = "RGB") -> str:
    Image.new("RGB", size, colour).convert(mode).save(path)
    return path.name


def write_csv(root: Path, text: str) -> Path:
    path = root / "metadata.csv"
    path.write_text(text, encoding="utf-8")
    return path


def value(colour: tuple[int, int, int]) -> torch.Tensor:
    """An 8-bit colour in the dataset's [-1, 1] range, shaped to broadcast over (3, ..., H, W)."""
    return (torch.tensor(colour, dtype=torch.float32) / 127.5 - 1).view(3, 1, 1)


def test_item_is_the_five_frame_clip(tmp_path: Path) -> None:
    a, b = solid(tmp_path / "a.png", (80, 40), RED), solid(tmp_path / "b.png", (160, 80), BLUE)
    dataset = EditPairDataset(write_csv(tmp_path, f'input_image,edited_image,prompt\n{a},{b},"blue, now"\n'),
                              height=32, width=48, repeat=3)
    assert len(dataset) == 3
    item = dataset[2]
    video = item["video"]
    assert video.shape == (3, 5, 32, 48) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    torch.testing.assert_close(video[:, 0], value(RED).expand(3, 32, 48), atol=1e-6, rtol=0)
    for frame in range(1, 5):
        torch.testing.assert_close(video[:, frame], value(BLUE).expand(3, 32, 48), atol=1e-6, rtol=0)
    assert torch.equal(item["input_image"], video[:, 0])
    assert (item["prompt"], item["index"], item["row"]) == ("blue, now", 2, 2)
    assert len(list(dataset)) == 3  # iteration stops (IndexError past the end)


def test_buckets_and_batches_through_a_dataloader(tmp_path: Path) -> None:
    rows = ["input_image,edited_image,prompt"]
    for i, size in enumerate([(64, 64), (128, 64), (64, 64), (130, 66), (64, 128)]):
        rows.append(f"{solid(tmp_path / f's{i}.png', size, RED)},{solid(tmp_path / f't{i}.png', size, BLUE)},p{i}")
    dataset = EditPairDataset(write_csv(tmp_path, "\n".join(rows)), max_pixels=64 * 64)
    assert dataset.sizes == [(64, 64), (80, 48), (64, 64), (80, 48), (48, 80)]
    # Batches stay within a bucket, so the default collate stacks same-size clips.
    loader = DataLoader(dataset, batch_sampler=bucket_batches(dataset.sizes, batch_size=2, seed=0))
    shapes = sorted(tuple(batch["video"].shape) for batch in loader)
    assert shapes == [(1, 3, 5, 80, 48), (2, 3, 5, 48, 80), (2, 3, 5, 64, 64)]


def test_video_rows_build_the_clip_from_frames_0_and_1(tmp_path: Path) -> None:
    with imageio.get_writer(tmp_path / "pair.mp4", fps=8, codec="libx264", quality=9, macro_block_size=1) as writer:
        for colour in (RED, BLUE, RED):  # a third frame is ignored (with a warning in the check)
            writer.append_data(np.full((32, 48, 3), colour, np.uint8))
    item = EditPairDataset(write_csv(tmp_path, "video,prompt\npair.mp4,blue\n"), height=32, width=48)[0]
    assert item["video"].shape == (3, 5, 32, 48)
    # H.264 on flat colours: within 12 levels (0.1 in [-1, 1]).
    assert (item["video"][:, 0] - value(RED)).abs().max() < 0.1
    assert (item["video"][:, 1:] - value(BLUE).unsqueeze(1)).abs().max() < 0.1


def test_exif_rotated_pair_is_upright_in_the_clip(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    for name, colour in (("s.jpg", RED), ("t.jpg", BLUE)):
        image = Image.new("RGB", (64, 32), (255, 255, 255))
        image.paste(colour, (0, 0, 16, 16))  # stored top-left -> displayed top-right
        image.save(tmp_path / name, quality=95, exif=exif)
    item = EditPairDataset(write_csv(tmp_path, "input_image,edited_image,prompt\ns.jpg,t.jpg,x\n"),
                           height=64, width=32)[0]
    for frame, colour in ((0, RED), (4, BLUE)):
        assert (item["video"][:, frame, 4, 24] - value(colour).view(3)).abs().max() < 0.1
        assert (item["video"][:, frame, 4, 4] - 1).abs().max() < 0.1  # white


def test_fatal_csv_problems_raise_with_the_report(tmp_path: Path) -> None:
    solid(tmp_path / "a.png", (32, 32), RED)
    with pytest.raises(ChronoEditError, match=r"row 2, column prompt\]: Empty prompt"):
        EditPairDataset(write_csv(tmp_path, "input_image,edited_image,prompt\na.png,a.png,\n"))
    with pytest.raises(ChronoEditError, match="height and width"):
        EditPairDataset(write_csv(tmp_path, "input_image,edited_image,prompt\na.png,a.png,x\n"), height=32)


def test_unreadable_pair_raises_when_loaded(tmp_path: Path) -> None:
    solid(tmp_path / "a.png", (32, 32), RED)
    (tmp_path / "b.png").write_bytes(b"")
    dataset = EditPairDataset(write_csv(tmp_path, "input_image,edited_image,prompt\na.png,b.png,x\n"),
                              height=32, width=32)
    with pytest.raises(ChronoEditError, match="0 bytes"):
        dataset[0]


def test_check_dataset_reports_every_problem_in_one_pass(tmp_path: Path) -> None:
    ok = solid(tmp_path / "ok.png", (64, 64), RED)
    solid(tmp_path / "wide.png", (96, 64), BLUE)
    solid(tmp_path / "small.png", (16, 16), BLUE)
    solid(tmp_path / "gray.png", (64, 64), RED, mode="L")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    csv_path = write_csv(tmp_path, "\n".join([
        "input_image,edited_image,prompt,notes",
        f"{ok},wide.png,aspect differs,",      # row 2: warning, edited aspect
        f"{ok},cut.png,truncated,",            # row 3: error, edited truncated
        f"zero.png,{ok},empty file,",          # row 4: error, input empty
        f"small.png,{ok},upscaled,",           # row 5: warning, input upscaled 4x
        f"gray.png,{ok},,",                    # row 6: note (grayscale) + error (empty prompt)
        f"{ok},missing.png,gone,",             # row 7: error, not found
        f"{ok},wide.png,aspect differs,",      # row 8: duplicate of row 2 (+ aspect warning)
    ]))
    problems = check_dataset(csv_path, height=64, width=64)
    found = {(p.row, p.column, p.fatal) for p in problems}
    assert found == {
        (1, "notes", False),
        (2, "edited_image", False), (8, "edited_image", False), (8, None, False),
        (3, "edited_image", True),
        (4, "input_image", True),
        (5, "input_image", False),
        (6, "input_image", False), (6, "prompt", True),
        (7, "edited_image", True),
    }
    assert len(problems) == len(found) and has_fatal(problems)
    report = format_report(problems)
    assert report.splitlines()[-1] == "4 errors, 6 warnings."
    assert "error [row 3, column edited_image]: cut.png is unreadable or truncated" in report
    assert report.index("error [row 7") < report.index("warning [row 1")  # errors first
    assert all(line.startswith("    fix: ") for line in report.splitlines()[1:-1:2])


def test_clean_dataset_has_no_problems(tmp_path: Path) -> None:
    a, b = solid(tmp_path / "a.png", (64, 64), RED), solid(tmp_path / "b.png", (64, 64), BLUE)
    problems = check_dataset(write_csv(tmp_path, f"input_image,edited_image,prompt\n{a},{b},x\n"), max_pixels=64 * 64)
    assert problems == [] and not has_fatal(problems)
    assert format_report(problems) == "No problems found."
