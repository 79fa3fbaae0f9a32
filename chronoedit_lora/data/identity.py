"""A folder of images as identity pairs: each image is both the input and the edited image, with one
"keep" instruction (the preservation set's second form, ``preservation_dataset = "FOLDER"``).

The images are the files directly in the folder with an image suffix, in name order (so a resumed
run picks the same image at the same step); other files and sub-folders are ignored. A link to a
file outside the folder is refused like a CSV's ``../`` path, unless ``allow_outside``.
"""

from __future__ import annotations

from pathlib import Path

from ..files import inside
from .images import IMAGE_SUFFIXES
from .metadata import EditPair, clean_prompt, read_metadata
from .problems import Problem


def folder_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (hidden files left out)."""
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES
                  and not path.name.startswith(".") and not path.is_dir())


def identity_pairs(folder: Path, prompt: str, allow_outside: bool = False) -> tuple[list[EditPair], list[Problem]]:
    """Every image of ``folder`` as an identity pair trained with ``prompt``, and the problems found
    (no images; a link leading out of the folder). Their content is checked like a CSV's files."""
    images = folder_images(folder)
    if not images:
        return [], [Problem(None, None, f"{folder} holds no images (expected {', '.join(sorted(IMAGE_SUFFIXES))} files "
                                        "directly in it).", "Put the images to keep unchanged in the folder, or give "
                                        "the path of a metadata.csv of pairs.")]
    pairs, problems = [], []
    for path in images:
        if not allow_outside and not inside(path.name, folder):
            problems.append(Problem(None, "image", f"{path.name} is a link to {path.resolve()}, outside {folder}.",
                                    "Copy the image into the folder instead of linking to it, or set allow_outside."))
        else:
            pairs.append(EditPair(path, path, clean_prompt(prompt), None))
    return pairs, problems


def is_image_folder(path: str | Path, keep_prompt: str | None) -> bool:
    """Whether :func:`read_rows` reads ``path`` as a folder of images (not a ``metadata.csv``)."""
    return keep_prompt is not None and Path(path).is_dir()


def read_rows(path: str | Path, allow_outside: bool = False, prompt_column: str = "",
              keep_prompt: str | None = None) -> tuple[list[EditPair], list[Problem]]:
    """The pairs of a ``metadata.csv`` (:func:`.metadata.read_metadata`), or, given ``keep_prompt``,
    those of a folder of images (:func:`identity_pairs`)."""
    if is_image_folder(path, keep_prompt):
        return identity_pairs(Path(path).absolute(), keep_prompt, allow_outside)
    return read_metadata(path, allow_outside, prompt_column)
