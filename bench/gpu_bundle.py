"""bench/gpu_check.py in one call on a bare GPU machine, from wheels carried with the checkout.

    python bench/gpu_bundle.py download            # here, with network: the wheels into bench/wheels/
    python bench/gpu_bundle.py run --out DIR       # there, offline: install them, run the check into DIR

The GPU machine has Python 3.12, torch, accelerate, peft and transformers (with their own
dependencies), but no diffsynth, diffusers or modelscope, and no network. :data:`WHEELS` is what
the kit and the check import beyond that (found by running make-tiny, an edit and a cached fp8
training here and mapping every imported module to its distribution; tests/test_gpu_bundle.py
repeats the import check): pinned to the versions the kit is tested with, except torchvision,
which must match the machine's torch. ``download`` fetches them for CPython 3.12 on x86-64 Linux
(``pip download --only-binary=:all: --no-deps``) into the git-ignored ``bench/wheels/`` (about
52 MB, at most :data:`BUDGET_MIB`) and checks the set. ``run`` refuses at once without CUDA
(exit 2, nothing installed); else it installs the wheels with ``pip install --no-index --no-deps
--target`` into a folder outside the checkout (the machine's own packages stay untouched), checks
that every module imports, and runs ``bench/gpu_check.py`` (the mid-size checkpoint, an edit per
offload mode at 720x1280, 20 cached fp8 training steps) within ``--limit`` seconds. ``DIR`` gets
``gpu_check.json``, the runs' logs and ``bundle.json`` (what was installed, timings).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / "bench" / "wheels"
BUDGET_MIB = 64
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
# distribution==version -> the top-level module the check imports from it ("" : a dependency only)
WHEELS = {
    "diffsynth==2.1.12": "diffsynth",
    "diffusers==0.42.1": "diffusers",
    "modelscope==1.40.2": "modelscope",  # imported by diffsynth's loader
    "modelscope-hub==0.5.1": "modelscope_hub",
    "einops==0.8.2": "einops",
    "ftfy==6.3.1": "ftfy",  # diffsynth's umT5 tokenizer
    "wcwidth==0.9.4": "wcwidth",
    "imageio==2.38.2": "imageio",  # diffsynth's data operators
    "pandas==3.1.1": "pandas",
    "python-dateutil==4.0.0": "dateutil",
    "tzdata==2026.6": "",
    "pillow==12.3.0": "PIL",  # below 13 for gradio (the web app)
    "torchvision==0.26.0": "torchvision",  # the build for torch 2.11, the GPU machine's
    "tensorboard==2.21.0": "tensorboard",  # the training log (torch.utils.tensorboard)
    "protobuf==7.36.2": "google.protobuf",
    "absl-py==2.5.1": "absl",
    "requests==2.34.2": "requests",  # diffusers, modelscope
    "urllib3==2.8.0": "urllib3",
    "certifi==2026.10.19.post1": "certifi",
    "charset-normalizer==3.5.3": "charset_normalizer",
    "cryptography==50.0.2": "cryptography",  # modelscope-hub
    "cffi==2.1.1": "cffi",
    "pycparser==3.12": "pycparser",
    "sniffio==1.3.1": "sniffio",
    "gguf==0.19.0": "gguf",  # GGUF DiT files, read wherever weights are identified
}
# The check's own imports, tried after installing (a missing or broken wheel fails here, in seconds).
CHECK_IMPORTS = ("chronoedit_lora.cli", "chronoedit_lora.pipeline", "chronoedit_lora.train.loop.trainer",
                 "torch.utils.tensorboard")
NO_CUDA = ("gpu_bundle.py run needs a CUDA GPU, and torch.cuda.is_available() is False here; nothing was "
           "installed or run.")


def normalized(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427: runs of -_. become _, lower case)."""
    return "".join("_" if c in "-." else c for c in name).lower()


def wheel_for(spec: str, files: list[Path]) -> Path | None:
    """The wheel of ``name==version`` among ``files``, or None."""
    name, version = spec.split("==")
    prefix = f"{normalized(name)}-{version}-"
    return next((f for f in files if f.name.lower().startswith(prefix)), None)


def fits_python(wheel: Path, python: str = PYTHON) -> bool:
    """True if the wheel's tags install on CPython ``python`` on x86-64 Linux."""
    *_, py_tags, abi_tag, platform_tags = wheel.stem.split("-")
    wanted = int(python.replace(".", ""))

    def cpython(tag: str) -> int | None:
        return int(tag[2:]) if tag.startswith("cp") and tag[2:].isdigit() else None

    pythons = py_tags.split(".")
    pure = "py3" in pythons and abi_tag == "none"
    exact = wanted in map(cpython, pythons) and abi_tag in (f"cp{wanted}", "none")
    stable = abi_tag == "abi3" and any((cpython(tag) or wanted + 1) <= wanted for tag in pythons)
    linux = any(p == "any" or (p.startswith(("manylinux", "linux")) and p.endswith("x86_64"))
                for p in platform_tags.split("."))
    return (pure or exact or stable) and linux


def check_wheels(folder: Path, budget_mib: float = BUDGET_MIB) -> list[str]:
    """Every problem of the wheel set in ``folder``: missing, not for CPython 3.12 x86-64 Linux, not
    listed, over the budget."""
    files = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    problems = []
    for spec in WHEELS:
        wheel = wheel_for(spec, files)
        if wheel is None:
            problems.append(f"{spec}: no wheel in {folder}")
        elif not fits_python(wheel):
            problems.append(f"{wheel.name}: not installable on CPython {PYTHON} x86-64 Linux")
    listed = {wheel_for(spec, files) for spec in WHEELS}
    problems += [f"{f.name}: not in the list (remove it)" for f in files if f not in listed]
    total = sum(f.stat().st_size for f in files)
    if total > budget_mib * 2**20:
        problems.append(f"{folder}: {total / 2**20:.1f} MiB of wheels, over the {budget_mib} MiB budget")
    return problems


def download(folder: Path) -> int:
    """Fetch :data:`WHEELS` for CPython 3.12 x86-64 Linux into ``folder``, then check the set."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--python-version",
               PYTHON, "--implementation", "cp", "-d", str(folder)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + list(WHEELS), check=True)
    problems = check_wheels(folder)
    total = sum(f.stat().st_size for f in folder.glob("*.whl")) / 2**20
    print("\n".join(problems) or f"{len(WHEELS)} wheels, {total:.1f} MiB in {folder}: complete")
    return 1 if problems else 0


def run(out: Path, wheels: Path, target: Path, limit: float, check_args: list[str]) -> int:
    """Install the wheels offline and run gpu_check.py into ``out`` (refused at once without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    started = time.perf_counter()
    problems = check_wheels(wheels)
    if problems:
        print("the carried wheels are incomplete:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("*.whl"))
    files = [str(wheel_for(spec, found)) for spec in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--target",
                    str(target), "--quiet", *files], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(REPO)]), DIFFSYNTH_SKIP_DOWNLOAD="true")
    modules = CHECK_IMPORTS + tuple(m for m in WHEELS.values() if m)
    imported = subprocess.run([sys.executable, "-c", f"import importlib; [importlib.import_module(m) for m in {modules!r}]"],
                              env=env, capture_output=True, text=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": sys.version.split()[0],
              "wheels": list(WHEELS), "install_s": time.perf_counter() - started,
              "imports_ok": imported.returncode == 0, "import_error": imported.stderr[-2000:]}
    code = 1
    if imported.returncode == 0:
        workdir = target.parent / "gpu_check"
        command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--json", str(out / "gpu_check.json"),
                   "--workdir", str(workdir), *check_args]
        try:
            check = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                                   timeout=max(1.0, limit - (time.perf_counter() - started)))
            code, output = check.returncode, check.stdout + "\n--- stderr ---\n" + check.stderr
        except subprocess.TimeoutExpired as stopped:
            output = f"gpu_check.py stopped after the {limit:.0f} s limit\n{stopped.stdout or ''}{stopped.stderr or ''}"
        (out / "gpu_check.out").write_text(output if isinstance(output, str) else output.decode(errors="replace"))
        for log in workdir.glob("*.log"):
            shutil.copy(log, out / log.name)
    report["returncode"], report["total_s"] = code, time.perf_counter() - started
    (out / "bundle.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("download", help="here: fetch the wheels for CPython 3.12 x86-64 Linux")
    fetch.add_argument("--wheels", default=str(WHEEL_DIR))
    check = sub.add_parser("check", help="check a wheel folder (complete, for Python 3.12, within the budget)")
    check.add_argument("--wheels", default=str(WHEEL_DIR))
    go = sub.add_parser("run", help="there: install the wheels offline and run gpu_check.py")
    go.add_argument("--out", required=True, help="gpu_check.json, logs and bundle.json go here")
    go.add_argument("--wheels", default=str(WHEEL_DIR))
    go.add_argument("--target", default="/tmp/chronoedit-gpu/site", help="where the wheels are installed")
    go.add_argument("--limit", type=float, default=450.0, help="seconds for everything (the device allows 600)")
    args, check_args = parser.parse_known_args(argv)
    if args.command != "run" and check_args:
        parser.error(f"unrecognized arguments: {' '.join(check_args)}")
    if args.command == "download":
        return download(Path(args.wheels))
    if args.command == "check":
        problems = check_wheels(Path(args.wheels))
        print("\n".join(problems) or "complete")
        return 1 if problems else 0
    return run(Path(args.out), Path(args.wheels), Path(args.target), args.limit, check_args)


if __name__ == "__main__":
    sys.exit(main())
