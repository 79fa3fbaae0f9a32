"""Training as separate processes: two ranks over gloo, SIGKILL + --resume, SIGINT, the README demo."""

from __future__ import annotations

import csv
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from chronoedit_lora.lora import load_lora

from .test_train import RESUME_ATOL, make_subset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TRAIN_FLAGS = ["--height", "32", "--width", "32", "--dtype", "float32", "--rank", "8", "--alpha", "8",
               "--learning_rate", "5e-3", "--gradient_checkpointing", "false"]


def _train_cmd(model: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "chronoedit_lora.cli", "train", "--model", str(model), "--dataset", str(dataset),
            "--output", str(output), *TRAIN_FLAGS, *extra]


def _max_diff(a: Path, b: Path) -> float:
    """The largest difference between the tensors of two adapter files (of any one type)."""
    wa, wb = load_lora(a)[0], load_lora(b)[0]
    assert wa.keys() == wb.keys()
    return max((tensor - wb[k].tensors()[field]).abs().max().item() for k in wa for field, tensor in wa[k].tensors().items())


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300, lines: int = 0) -> None:
    """Until ``path`` exists (holding more than ``lines`` lines), while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and (not lines or len(path.read_text().splitlines()) > lines)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _sigint_as_in_a_terminal() -> None:
    """A child's SIGINT as a terminal leaves it (Popen's preexec_fn): a suite started in the background
    (``cmd &``, nohup) hands its children SIGINT ignored, and Python then keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _read_until(process: subprocess.Popen, text: bytes, timeout: float = 300) -> bytes:
    """The process's stderr (a binary pipe) read as it comes, up to where ``text`` appears: a state
    the process reached, whatever the machine's load (tqdm's bars end in \\r, not a line end)."""
    fd, seen, deadline = process.stderr.fileno(), b"", time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s: {seen[-2000:]!r}"
        if select.select([fd], [], [], 1.0)[0]:
            chunk = os.read(fd, 1 << 16)
            assert chunk, f"exited before {text!r}: {seen[-2000:]!r}"
            seen += chunk
    return seen


def test_two_processes_over_gloo(tiny_diffusers, tmp_path):
    dataset = make_subset(tmp_path / "data", 8)
    output = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
           str(ROOT / "scripts/train.py"), "--model", str(tiny_diffusers), "--dataset", str(dataset), "--output", str(output),
           *TRAIN_FLAGS, "--max_steps", "6", "--save_every", "3", "--check_sync_every", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    rows = list(csv.DictReader((output / "logs" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # written once, by rank 0
    per_step = [list(map(int, r["samples"].split())) for r in rows]
    assert all(len(s) == 2 and s[0] != s[1] for s in per_step)  # each rank its own pair
    first_epoch = [i for s in per_step[:4] for i in s]
    assert sorted(first_epoch) == list(range(8))  # 8 pairs / 2 ranks = 4 steps cover the epoch once
    # LoRA weights were compared across ranks after every step (--check_sync_every 1): a
    # divergence would have failed the run. Each rank saved its own RNG state.
    checkpoint = output / "checkpoints" / "step-000006"
    assert (checkpoint / "rng-rank0.pt").is_file() and (checkpoint / "rng-rank1.pt").is_file()


def test_the_lr_schedule_counts_optimizer_steps_whatever_the_process_count(tiny_diffusers, tmp_path):
    """Warm-up under 2 processes and accumulation 2 logs, step by step, the single-process run's lr."""
    dataset = make_subset(tmp_path / "data", 8)
    flags = ["--max_steps", "4", "--warmup_steps", "4", "--gradient_accumulation", "2", "--save_every", "100"]
    single = subprocess.run(_train_cmd(tiny_diffusers, dataset, tmp_path / "one", *flags), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(ROOT / "configs/accelerate/cpu_2proc.yaml"), str(ROOT / "scripts/train.py"),
                             *_train_cmd(tiny_diffusers, dataset, tmp_path / "two", *flags)[4:]],
                            capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    lrs = [[float(r["lr"]) for r in csv.DictReader((tmp_path / run / "logs" / "metrics.csv").open())] for run in ("one", "two")]
    assert lrs[0] == lrs[1] == [5e-3 * k / 4 for k in (2, 3, 4, 4)]  # lr after each optimizer step: min(1, (s + 1) / 4)


def test_sigkill_then_resume_matches_uninterrupted(tiny_diffusers, tmp_path):
    dataset = make_subset(tmp_path / "data", 4)
    steps = ["--max_steps", "8", "--save_every", "3", "--seed", "3"]
    straight = subprocess.run(_train_cmd(tiny_diffusers, dataset, tmp_path / "straight", *steps), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_cmd(tiny_diffusers, dataset, killed, *steps), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(killed / "checkpoints" / "step-000003" / "progress.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "lora.safetensors").exists()  # it really died before the end
    resumed = subprocess.run(_train_cmd(tiny_diffusers, dataset, killed, *steps, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert _max_diff(tmp_path / "straight" / "lora.safetensors", killed / "lora.safetensors") <= RESUME_ATOL


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_saves_and_says_how_to_resume(tiny_diffusers, tmp_path, stop_signal):
    dataset = make_subset(tmp_path / "data", 4)
    output = tmp_path / "run"
    process = subprocess.Popen(_train_cmd(tiny_diffusers, dataset, output, "--max_steps", "400", "--save_every", "200"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(output / "logs" / "metrics.csv", process, lines=1)  # a step's row: training is in its loop
    process.send_signal(stop_signal)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + stop_signal, err[-2000:]  # 130 / 143: `train && edit` does not go on
    assert "--resume" in out
    saved = sorted((output / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 400


@pytest.mark.parametrize("moment, step, resumes_at", [
    ("step", 5, 3),  # between two checkpoints
    ("checkpoint-folder", 6, 3),  # checkpoint 6 written but not renamed into place
    ("checkpoint-file", 6, 3),  # checkpoint 6's optimizer state half-written
    ("step-lora", 6, 6),  # checkpoint 6 in place, its lora-step file half-written
])
def test_sigkill_at_any_moment_then_resume_matches_uninterrupted(tiny_diffusers, tmp_path, straight_run, moment, step,
                                                                  resumes_at):
    dataset, steps, straight = straight_run
    killed = tmp_path / "killed"
    dead = subprocess.run([sys.executable, "-m", "tests.fault_harness", moment, str(step), "--",
                           *_train_cmd(tiny_diffusers, dataset, killed, *steps)[4:]],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-2000:]
    assert not (killed / "lora.safetensors").exists()
    resumed = subprocess.run(_train_cmd(tiny_diffusers, dataset, killed, *steps, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {resumes_at}" in resumed.stdout
    assert not list(killed.rglob("*.tmp*")) and not list(killed.rglob("*.partial"))  # no debris left behind
    assert _max_diff(straight, killed / "lora.safetensors") <= RESUME_ATOL


@pytest.fixture(scope="module")
def straight_run(tiny_diffusers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    dataset = make_subset(folder / "data", 4)
    steps = ["--max_steps", "8", "--save_every", "3", "--seed", "3"]
    straight = subprocess.run(_train_cmd(tiny_diffusers, dataset, folder / "run", *steps), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    return dataset, steps, folder / "run" / "lora.safetensors"


def test_ctrl_c_during_an_edit_is_one_line_and_exit_130(tiny_diffusers, input_image, tmp_path):
    input_image.save(tmp_path / "in.png")
    process = subprocess.Popen([sys.executable, "-m", "chronoedit_lora.cli", "edit", "--model", str(tiny_diffusers),
                                "--image", str(tmp_path / "in.png"), "--prompt", "x", "--output", str(tmp_path / "o.png"),
                                "--steps", "1000", "--scheduler", "euler", "--height", "32", "--width", "32",
                                "--dtype", "float32", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=_sigint_as_in_a_terminal)
    # Euler: UniPC's 1000-step schedule repeats timesteps and is refused
    seen = _read_until(process, b"editing:")  # the denoising loop's bar: the models are loaded, the edit runs
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=300)  # the step under way finishes first (seconds on a busy machine)
    err = (seen + rest).decode()
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "chronoedit-lora edit: interrupted.", err[-2000:]
    assert not (tmp_path / "o.png").exists()


def test_ctrl_c_in_a_captioner_plugin_is_an_interrupt_not_the_plugins_failure(tmp_path):
    """The user's Ctrl-C while a plugin runs exits 130 as anywhere else; a plugin raising KeyboardInterrupt
    itself is its failure (tests/test_faults.py)."""
    for side in ("before", "after"):
        (tmp_path / side).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / side / "000.png")
    process = subprocess.Popen([sys.executable, "-m", "chronoedit_lora.cli", "dataset", "prepare", str(tmp_path),
                                "--captioner", "tests.faulty_plugins:slow"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_sigint_as_in_a_terminal)
    seen = _read_until(process, b"slow captioner: started")
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    err = (seen + rest).decode()
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "chronoedit-lora dataset: interrupted.", err[-2000:]
    assert not (tmp_path / "metadata.csv").exists()


# Ctrl-C caught at the worst moments, made certain: inside the denoising loop's body (its progress bar
# closes only when the frames are freed) and inside a progress bar's constructor (its finalizer raises)
INTERRUPTED_MIDWAY = '''
import sys
from chronoedit_lora import cli
from chronoedit_lora.commands import edit
from tqdm import tqdm

class HalfBuilt:
    def __del__(self):
        raise AttributeError("no start_t: built up to where the signal came")

def run(args):
    half = HalfBuilt()
    for _ in tqdm(range(3), desc="editing"):
        raise KeyboardInterrupt

edit.run = run
sys.exit(cli.main(["edit"]))
'''


def test_an_interrupt_anywhere_ends_with_the_interrupted_line_and_no_traceback():
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_MIDWAY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines[-1] == "chronoedit-lora edit: interrupted.", result.stderr
    assert any(line.startswith("editing:") for line in lines[:-1]), result.stderr  # the bar closed before it


def test_readme_demo_command():
    """The README's first command after setup: make-tiny, train on the example dataset, edit."""
    env = dict(os.environ)
    result = subprocess.run(["bash", str(ROOT / "scripts/demo.sh")], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    demo = ROOT / "runs" / "demo"
    assert (demo / "lora" / "lora.safetensors").is_file() and (demo / "edit.png").is_file() and (demo / "edit.mp4").is_file()
