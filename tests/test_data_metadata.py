"""metadata.csv parsing: layouts, encodings, quoting, and one problem per mistake (row, column, fix)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronoedit_lora.data import EditPair, Problem, clean_prompt, format_report, has_fatal, read_metadata


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A dataset folder with (empty) files a.png, b.png, c.jpg and pair.mp4; metadata only checks existence."""
    (tmp_path / "img").mkdir()
    for name in ("img/a.png", "img/b.png", "img/c.jpg", "pair.mp4"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def write(root: Path, content: str | bytes) -> Path:
    path = root / "metadata.csv"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def only(problems: list[Problem], **fields) -> Problem:
    """The single problem whose attributes equal ``fields``."""
    found = [p for p in problems if all(getattr(p, k) == v for k, v in fields.items())]
    assert len(found) == 1, (fields, problems)
    return found[0]


def test_image_layout(root: Path) -> None:
    pairs, problems = read_metadata(write(root, "input_image,edited_image,prompt\nimg/a.png,img/b.png,make it red\n"))
    assert problems == []
    assert pairs == [EditPair(root / "img/a.png", root / "img/b.png", "make it red", row=2)]


def test_captioned_rows_train_on_caption_cot_unless_another_column_is_named(root: Path) -> None:
    csv_path = write(root, "input_image,edited_image,prompt,caption,caption_cot\n"
                           "img/a.png,img/b.png,,make it red,The user wants to make it red.\n"
                           "img/a.png,img/c.jpg,given prompt,,\n")
    pairs, problems = read_metadata(csv_path)
    assert problems == [] and [p.prompt for p in pairs] == ["The user wants to make it red.", "given prompt"]
    pairs, problems = read_metadata(csv_path, prompt_column="caption")
    assert [p.prompt for p in pairs] == ["make it red", ""]
    only(problems, row=3, column="caption", reason="Empty prompt.")
    _, problems = read_metadata(write(root, "input_image,edited_image,caption\nimg/a.png,img/b.png,x\n"))
    only(problems, row=1, column="prompt", reason="Missing column 'prompt'.")  # a concise caption alone is not used


def test_video_layout_reads_frames_0_and_1(root: Path) -> None:
    pairs, problems = read_metadata(write(root, "video,prompt\npair.mp4,turn left\n"))
    assert problems == []
    (pair,) = pairs
    assert pair.input_image == pair.edited_image == root / "pair.mp4"
    assert (pair.input_frame, pair.edited_frame, pair.is_video, pair.columns) == (0, 1, True, ("video", "video"))


def test_bom_crlf_and_quoted_commas_and_newlines(root: Path) -> None:
    content = ('\ufeffinput_image,edited_image,prompt\r\n'
               'img/a.png,img/b.png,"red, then blue"\r\n'
               'img/a.png,img/c.jpg,"line one\r\nline two, with ""quotes"""\r\n')
    pairs, problems = read_metadata(write(root, content.encode("utf-8")))
    assert problems == []
    assert [p.prompt for p in pairs] == ["red, then blue", 'line one\nline two, with "quotes"']
    assert [p.row for p in pairs] == [2, 3]


def test_header_case_semicolons_backslashes_and_blank_lines(root: Path) -> None:
    content = "Input_Image;Edited_Image;Prompt\n\nimg\\a.png;img\\b.png;x, y\n;;\n"
    pairs, problems = read_metadata(write(root, content))
    assert problems == []
    assert pairs == [EditPair(root / "img/a.png", root / "img/b.png", "x, y", row=3)]


def test_misspelled_column_suggests_the_right_name_and_rows_are_still_checked(root: Path) -> None:
    pairs, problems = read_metadata(write(root, "input_image,edited_imgae,prompt\nimg/a.png,img/b.png,\n"))
    problem = only(problems, column="edited_imgae")
    assert problem.fatal and problem.row == 1
    assert "'edited_image'" in problem.reason and "'edited_image'" in problem.fix
    assert only(problems, column="prompt").reason == "Empty prompt."  # found in the same pass
    assert len(pairs) == 1 and has_fatal(problems)


def test_missing_and_extra_columns(root: Path) -> None:
    _, problems = read_metadata(write(root, "input_image,prompt,notes\nimg/a.png,x,y\n"))
    missing = only(problems, column="edited_image")
    assert missing.fatal and "Missing column" in missing.reason and "input_image,edited_image,prompt" in missing.fix
    extra = only(problems, column="notes")
    assert not extra.fatal and "ignored" in extra.reason


def test_mixed_layouts_and_duplicate_columns(root: Path) -> None:
    _, problems = read_metadata(write(root, "video,input_image,edited_image,prompt,prompt\npair.mp4,,,x,x\n"))
    assert "mixes" in only(problems, row=1, column="video").reason
    assert "twice" in only(problems, row=1, column="prompt").reason


def test_video_layout_is_guessed_from_a_misspelling(root: Path) -> None:
    _, problems = read_metadata(write(root, "vidoe,prompt\npair.mp4,x\n"))
    assert [(p.column, p.fatal) for p in problems] == [("vidoe", True)]
    assert "'video'" in problems[0].fix


def test_empty_prompt_and_empty_path(root: Path) -> None:
    _, problems = read_metadata(write(root, 'input_image,edited_image,prompt\nimg/a.png,,"  \n "\n'))
    assert only(problems, row=2, column="prompt").fatal
    assert only(problems, row=2, column="edited_image").reason == "Empty path."


def test_non_utf8_bytes_name_row_and_column(root: Path) -> None:
    content = "input_image,edited_image,prompt\nimg/a.png,img/b.png,ok\nimg/a.png,img/b.png,caf\xe9 au lait\n"
    _, problems = read_metadata(write(root, content.encode("cp1252")))
    problem = only(problems, row=3, column="prompt")
    assert problem.fatal and "UTF-8" in problem.reason and "café au lait" in problem.fix
    assert len(problems) == 1


def test_non_utf8_header_is_matched_and_reportable(root: Path) -> None:
    content = "input_image,edited_image,pr\xf6mpt\nimg/a.png,img/b.png,x\n".encode("latin-1")
    pairs, problems = read_metadata(write(root, content))
    (problem,) = problems
    assert problem.row == 1 and "'prompt'" in problem.fix and len(pairs) == 1
    format_report(problems).encode("utf-8")  # no lone surrogates left to break printing


def test_utf16_file_is_refused_with_a_fix(root: Path) -> None:
    _, problems = read_metadata(write(root, "input_image,edited_image,prompt\n".encode("utf-16")))
    assert problems[0].fatal and "UTF-16" in problems[0].reason and "UTF-8" in problems[0].fix


def test_duplicate_rows_are_a_warning_naming_the_first(root: Path) -> None:
    row = "img/a.png,img/b.png,same\n"
    pairs, problems = read_metadata(write(root, "input_image,edited_image,prompt\n" + row + row))
    problem = only(problems, row=3)
    assert not problem.fatal and "row 2" in problem.reason
    assert len(pairs) == 2


def test_absolute_and_escaping_paths(root: Path) -> None:
    outside = root.parent / f"{root.name}_outside.png"
    outside.write_bytes(b"x")
    content = f"input_image,edited_image,prompt\n{root / 'img/a.png'},../{outside.name},x\n"
    csv_path = write(root, content)
    _, problems = read_metadata(csv_path)
    assert "absolute" in only(problems, column="input_image").reason
    assert "outside the dataset folder" in only(problems, column="edited_image").reason
    assert all(p.fatal for p in problems)
    pairs, problems = read_metadata(csv_path, allow_outside=True)
    assert problems == [] and pairs[0].edited_image == outside


def test_links_leading_outside_are_refused_like_escaping_paths(root: Path) -> None:
    """Symlinks are resolved: a file or folder link to outside the dataset folder is refused (unless
    allow_outside); a link that stays inside, or a dataset folder reached through a link, is fine."""
    outside = root.parent / f"{root.name}_outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"x")
    (root / "img/out.png").symlink_to(outside / "x.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "img/in.png").symlink_to("a.png")
    csv_path = write(root, "input_image,edited_image,prompt\nimg/out.png,img/b.png,x\nimg/a.png,linked/x.png,y\n"
                           "img/in.png,img/b.png,z\n")
    pairs, problems = read_metadata(csv_path)
    for row, column, link in ((2, "input_image", "img/out.png"), (3, "edited_image", "linked/x.png")):
        problem = only(problems, row=row, column=column)
        assert problem.fatal and f"'{link}' is a link to {(outside / 'x.png').resolve()}" in problem.reason
        assert "outside the dataset folder" in problem.reason
        assert "Copy the file into the CSV's folder" in problem.fix and "allow_outside" in problem.fix
    assert len(problems) == 2 and [p.row for p in pairs] == [4]
    assert pairs[0].input_image == root / "img/in.png"
    pairs, problems = read_metadata(csv_path, allow_outside=True)
    assert problems == [] and len(pairs) == 3
    (root.parent / f"{root.name}_via").symlink_to(root, target_is_directory=True)
    pairs, problems = read_metadata(root.parent / f"{root.name}_via" / "metadata.csv")
    assert len(problems) == 2 and [p.row for p in pairs] == [4]  # the same two rows, no more


def test_missing_file_suggests_the_closest_name(root: Path) -> None:
    _, problems = read_metadata(write(root, "input_image,edited_image,prompt\nimg/a.png,img/c.jpeg,x\n"))
    problem = only(problems, column="edited_image")
    assert "not found" in problem.reason and "'c.jpg'" in problem.fix


def test_unquoted_comma_and_unterminated_quote(root: Path) -> None:
    content = 'input_image,edited_image,prompt\nimg/a.png,img/b.png,red, blue\nimg/a.png,img/b.png,"open\n'
    pairs, problems = read_metadata(write(root, content))
    assert "4 values" in only(problems, row=2).reason and "double quotes" in only(problems, row=2).fix
    assert "syntax error" in only(problems, row=3).reason
    assert pairs == []


def test_header_only_and_missing_file(root: Path) -> None:
    _, problems = read_metadata(write(root, "input_image,edited_image,prompt\n"))
    assert problems[0].fatal and "no pairs" in problems[0].reason
    _, problems = read_metadata(root / "nope.csv")
    assert problems[0].fatal and "not found" in problems[0].reason


@pytest.fixture(scope="module")
def prompt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    (root / "a.png").write_bytes(b"x")
    (root / "b, \"odd\" name.png").write_bytes(b"x")
    return root


# any text but control characters other than tabs and line ends (a row problem: user_files.text_problem)
prompts = st.text(st.characters(exclude_categories=("Cs", "Cc"), include_characters="\t\n\r"), min_size=1,
                  max_size=40).filter(clean_prompt)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(prompts, min_size=1, max_size=5), crlf=st.booleans())
def test_round_trip_of_arbitrary_prompts(prompt_root: Path, rows: list[str], crlf: bool) -> None:
    """Any text prompt written by a CSV writer (commas, quotes, newlines, unicode) reads back as clean_prompt(prompt)."""
    buffer = io.StringIO()
    # Python's writer leaves a lone \r unquoted with lineterminator \n, so that variant quotes everything.
    writer = csv.writer(buffer, lineterminator="\r\n") if crlf else csv.writer(buffer, lineterminator="\n",
                                                                                quoting=csv.QUOTE_ALL)
    writer.writerow(["input_image", "edited_image", "prompt"])
    writer.writerows(["a.png", 'b, "odd" name.png', prompt] for prompt in rows)
    csv_path = prompt_root / "metadata.csv"
    csv_path.write_text(buffer.getvalue(), encoding="utf-8-sig", newline="")
    pairs, problems = read_metadata(csv_path)
    assert [p for p in problems if p.fatal] == []
    assert [p.prompt for p in pairs] == [clean_prompt(prompt) for prompt in rows]
    assert [p.row for p in pairs] == list(range(2, 2 + len(rows)))
    assert {p.edited_image.name for p in pairs} == {'b, "odd" name.png'}
