"""bench/gpu_bundle.py without a GPU: its wheel list covers what the kit imports beyond the GPU
machine's packages, the wheel-set check finds what is missing, foreign or too large, and ``run``
refuses at once without CUDA."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from .bench_scripts import load_bench

bundle = load_bench("gpu_bundle")

ON_THE_GPU_MACHINE = ("torch", "accelerate", "peft", "transformers")  # with their own dependencies
# Imported here but not needed there: diffusers imports scipy only if it is installed; google-auth
# and googleapis-common-protos only share protobuf's ``google`` namespace; the kit itself is the
# checkout; imageio-ffmpeg is only for MP4 clips, which the check does not read or write; pandas
# imports pytz and urllib3 brotli only if installed (here they come with gradio, for the web app);
# transformers imports sentencepiece only if installed (the kit's umT5 tokenizer is a tokenizers one).
NOT_NEEDED = {"scipy", "google-auth", "googleapis-common-protos", "chronoedit-lora", "imageio-ffmpeg", "pytz", "brotli",
              "sentencepiece"}
# The commands the check runs (make-tiny, edit, train), imported in a fresh interpreter.
COMMANDS = ("chronoedit_lora.commands.make_tiny", "chronoedit_lora.commands.edit", "chronoedit_lora.commands.train",
            "chronoedit_lora.tiny")
LIST_DISTRIBUTIONS = """
import importlib, importlib.metadata, json, sys
for module in {modules!r}:
    importlib.import_module(module)
found = importlib.metadata.packages_distributions()
print(json.dumps(sorted({{d for m in sys.modules for d in found.get(m.split(".")[0], [])}})))
"""


def _name(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _with_dependencies(roots: tuple[str, ...]) -> set[str]:
    """The installed distributions ``roots`` need, recursively (extras left out)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = _name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def test_wheels_cover_what_the_kit_imports_beyond_the_gpu_machine():
    script = LIST_DISTRIBUTIONS.format(modules=bundle.CHECK_IMPORTS + COMMANDS)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {_name(d) for d in json.loads(result.stdout.splitlines()[-1])}
    carried = {_name(spec.split("==")[0]) for spec in bundle.WHEELS}
    missing = imported - _with_dependencies(ON_THE_GPU_MACHINE) - NOT_NEEDED - carried
    assert not missing, f"imported by the kit, on neither the GPU machine nor in WHEELS: {sorted(missing)}"
    assert {"diffsynth", "diffusers", "modelscope", "torchvision", "tensorboard"} <= carried
    declared = {_name(r.name): r.specifier for r in map(Requirement, _pyproject()["project"]["dependencies"])}
    for spec in bundle.WHEELS:  # what pyproject.toml declares, except torchvision (the machine's torch's)
        name, version = spec.split("==")
        if name != "torchvision" and _name(name) in declared:
            assert declared[_name(name)].contains(version), (spec, str(declared[_name(name)]))
    assert {"diffsynth", "diffusers", "pillow", "pandas"} <= {_name(s.split("==")[0]) for s in bundle.WHEELS} & set(declared)


def _pyproject() -> dict:
    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def _fake_wheels(folder: Path, size: int = 10) -> list[Path]:
    """Empty stand-ins named like the wheels ``download`` fetches (pure, abi3 and cp312 builds)."""
    folder.mkdir()
    tags = {"pandas": "cp312-cp312-manylinux_2_28_x86_64", "cryptography": "cp311-abi3-manylinux_2_28_x86_64",
            "protobuf": "cp310-abi3-manylinux2014_x86_64"}
    files = []
    for spec in bundle.WHEELS:
        name, version = spec.split("==")
        path = folder / f"{bundle.normalized(name)}-{version}-{tags.get(name, 'py3-none-any')}.whl"
        path.write_bytes(b"\0" * size)
        files.append(path)
    return files


def test_check_names_missing_foreign_stray_and_oversized_wheels(tmp_path):
    files = _fake_wheels(tmp_path / "wheels")
    assert bundle.check_wheels(tmp_path / "wheels") == []
    files[0].unlink()
    pandas = next(f for f in files if f.name.startswith("pandas-"))
    pandas.rename(pandas.with_name(pandas.name.replace("cp312-cp312", "cp311-cp311")))
    (tmp_path / "wheels" / "numpy-2.0.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    problems = bundle.check_wheels(tmp_path / "wheels", budget_mib=1e-6)
    assert any(p.startswith(f"{list(bundle.WHEELS)[0]}: no wheel") for p in problems)
    assert any("pandas-3.1.1-cp311" in p and "not installable" in p for p in problems)
    assert any(p.startswith("numpy-2.0.0") and "not in the list" in p for p in problems)
    assert any("over the" in p for p in problems) and len(problems) == 4


def test_wheel_tags_for_python_3_12_on_linux():
    fits = bundle.fits_python
    assert fits(Path("a-1-py3-none-any.whl")) and fits(Path("a-1-py2.py3-none-any.whl"))
    assert fits(Path("a-1-cp312-cp312-manylinux_2_28_x86_64.whl"))
    assert fits(Path("a-1-cp39-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"))
    assert not fits(Path("a-1-cp311-cp311-manylinux_2_28_x86_64.whl"))
    assert not fits(Path("a-1-cp313-abi3-manylinux_2_28_x86_64.whl"))
    assert not fits(Path("a-1-cp312-cp312-macosx_11_0_arm64.whl"))
    assert not fits(Path("a-1-cp312-cp312-manylinux_2_28_aarch64.whl"))


def test_run_without_cuda_refuses_before_installing_anything(tmp_path, capsys):
    code = bundle.main(["run", "--out", str(tmp_path / "out"), "--target", str(tmp_path / "site"),
                        "--wheels", str(tmp_path / "none")])
    error = capsys.readouterr().err
    assert code == 2 and "needs a CUDA GPU" in error and "nothing was installed" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "site").exists()
