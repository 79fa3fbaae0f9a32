"""The Train tab: a form over the training settings, run as a background ``chronoedit-lora
train`` process (one at a time), its progress and log tail; stop sends SIGINT (the trainer
finishes its step and saves a checkpoint) and resume reruns the form with ``--resume``.
The run folder's lock is the trainer's own; a locked folder is refused before a process starts,
and any later refusal of the trainer shows up as the process's error line.

Whatever the form, the preset, the uploaded config or the free-form ``--key value`` settings say,
the training the page starts reads and writes only where the app serves it (:func:`check_paths`):
its run folder and cache under ``--runs``, its datasets under ``--datasets``, the app's own model."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import gradio as gr

from ..errors import ChronoEditError
from ..train.loop.config import TrainConfig, load_config
from ..train.state.run_folder import LOCK_NAME, RunLock
from .dataset import dataset_csvs
from .safety import readable, user_errors, within
from .session import Session

# the form's settings, passed as --key value; the rest come from the preset or the config file
KEY_SETTINGS = ("max_steps", "epochs", "learning_rate", "rank", "alpha", "save_every", "sample_every", "seed")
MODEL_KEYS = ("model", "dit", "text_encoder", "image_encoder", "vae", "tokenizer")
PROGRESS = re.compile(r"training:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LOG_LINES = 40
REFRESH_SECONDS = 1.5
KIT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the presets of a source checkout


class TrainProcess:
    """The one background training run the app may have at a time."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.argv: list[str] = []
        self.log: Path | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, argv: list[str], log: Path) -> None:
        if self.running:
            raise ChronoEditError(f"a training is running (pid {self.process.pid}); stop it or wait for it to end "
                                  "(one training at a time).")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.argv, self.log = argv, log

    def stop(self) -> None:
        if not self.running:
            raise ChronoEditError("no training is running.")
        self.process.send_signal(signal.SIGINT)  # the trainer saves a checkpoint, then exits

    def tail(self) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        lines = self.log.read_text(errors="replace").replace("\r\n", "\n").split("\n")
        lines = [line.rsplit("\r", 1)[-1] for line in lines]  # a progress bar's last state
        return "\n".join(lines[-LOG_LINES:])

    def status(self) -> str:
        if self.process is None:
            return "No training started from this page yet."
        text = self.tail()
        found = PROGRESS.findall(text)
        progress = f", step {found[-1][0]} of {found[-1][1]}" if found else ""
        code = self.process.poll()
        if code is None:
            return f"**running** (pid {self.process.pid}){progress}"
        if code == 0:
            return f"**finished**{progress}: the LoRA is in the run folder."
        if code == 128 + signal.SIGINT:
            return f"**stopped**{progress}: a checkpoint was saved; Resume continues from it."
        errors = [line for line in text.splitlines() if "error:" in line]
        return f"**failed** (exit code {code}): {errors[-1] if errors else 'see the log'}"


def train_command(session: Session, name: str, dataset: str | None, preset: str | None, config_file: str | None,
                  values: dict[str, str | None], extra: str, overwrite: bool, resume: bool = False) -> list[str]:
    """The ``chronoedit-lora train`` command line of the form, checked as the trainer checks it
    (``resume``: continue the run from its newest checkpoint; settings that only affect the future,
    such as max_steps, may differ)."""
    runs = session.folders.runs
    if runs is None:
        raise ChronoEditError("start the app with --runs DIR to train from the page (runs are written there).")
    if not RUN_NAME.match(name or ""):
        raise ChronoEditError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (it becomes a folder "
                              f"under {runs}).")
    if not dataset:
        raise ChronoEditError("choose a dataset (metadata.csv under --datasets).")
    dataset = str(readable(dataset, [session.folders.datasets], "dataset"))
    config = config_file or preset
    try:
        extra_args = shlex.split(extra or "")
    except ValueError as exc:
        raise ChronoEditError(f"more settings: {exc}.") from None
    overrides = {key: str(getattr(session.args, key)) for key in MODEL_KEYS if getattr(session.args, key, None)}
    overrides.update(dataset=dataset, output=str(runs / name), **{k: v for k, v in values.items() if v is not None})
    argv = ["train"] + (["--config", config] if config else [])
    argv += [part for key, value in overrides.items() for part in (f"--{key}", value)] + extra_args
    argv += ["--overwrite"] if overwrite else []
    argv += ["--resume"] if resume else []
    from ..cli import build_parser
    from ..commands.train import overrides_from

    args, leftover = build_parser().parse_known_args(argv)
    settings = load_config(args.config, overrides_from(args, leftover))  # every setting checked before starting
    check_paths(settings, session)
    check_unlocked(Path(settings.output))
    return [sys.executable, "-m", "chronoedit_lora.cli", *argv]


def check_paths(config: TrainConfig, session: Session) -> None:
    """Refuse a training that would read or write outside the folders the app serves for it (links
    resolved): the run folder (which ``overwrite`` clears), its cache and the checkpoint it resumes
    from under ``--runs``, every dataset (the preservation set too) under ``--datasets``, and no
    model but the app's own."""
    runs, datasets = session.folders.runs, session.folders.datasets
    if within(config.output, [runs], "--output") == runs:
        raise ChronoEditError(f"--output {config.output} is the --runs folder itself; give the run its own folder "
                              "under it (the run name).")
    for key, folder in (("cache_dir", runs), ("resume_from", runs), ("dataset", datasets),
                        ("sample_dataset", datasets), ("eval_dataset", datasets), ("preservation_dataset", datasets)):
        if getattr(config, key):
            within(getattr(config, key), [folder], f"--{key}")
    if config.allow_outside:
        raise ChronoEditError("--allow_outside lets a dataset name files outside its folder, which the app does not "
                              "serve; drop it (or train with the command line).")
    if Path(config.tracker_project).name != config.tracker_project or config.tracker_project in ("", ".", ".."):
        raise ChronoEditError(f"--tracker_project {config.tracker_project!r}: give a plain name (it becomes a folder "
                              "in the run's logs).")
    for key in MODEL_KEYS:
        app_value = getattr(session.args, key, None)
        if getattr(config, key) != (str(app_value) if app_value else None):
            raise ChronoEditError(f"--{key} {getattr(config, key)}: the page trains the app's own model "
                                  f"(--{key} {app_value}); drop --{key} from the settings and the config.")


def check_unlocked(folder: Path) -> None:
    """Refuse at once if another training holds the run folder's lock (the trainer takes the lock
    itself, so this only saves starting a process that would be refused)."""
    if (folder / LOCK_NAME).is_file():
        lock = RunLock(folder)
        lock.acquire()
        lock.release()


def setting(value: float | None) -> str | None:
    """A form number as a --key value: whole numbers without a decimal point (rank 8, not 8.0)."""
    if value is None:
        return None
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def shown(argv: list[str]) -> str:
    """The command as a user types it (``python -m chronoedit_lora.cli`` is ``chronoedit-lora``)."""
    return shlex.join(["chronoedit-lora", *argv[3:]])


def preset_values(path: str | None) -> list:
    """The key settings of a preset (TrainConfig's defaults without one)."""
    config = load_config(path, {}) if path else TrainConfig()
    return [getattr(config, key) for key in KEY_SETTINGS]


def build(session: Session) -> None:
    job = TrainProcess()
    presets = sorted(str(p) for p in KIT_CONFIGS.glob("*.toml")) if KIT_CONFIGS.is_dir() else []
    datasets = dataset_csvs(session.folders.datasets)
    with gr.Row():
        with gr.Column():
            name = gr.Textbox("my-lora", label=f"run name (a folder under {session.folders.runs})",
                              elem_id="train-name")
            dataset = gr.Dropdown(datasets, value=None, label="dataset (metadata.csv)", elem_id="train-dataset")
            with gr.Row():
                preset = gr.Dropdown(presets, value=None, label="base preset", elem_id="train-preset")
                config_file = gr.File(label="or a config file (.toml)", file_types=[".toml"], type="filepath",
                                      height=120)
            defaults = preset_values(None)
            helps = TrainConfig.field_help()
            with gr.Row():
                fields = [gr.Number(value, label=key, info=helps.get(key), elem_id=f"train-{key}", min_width=120)
                          for key, value in zip(KEY_SETTINGS, defaults)]
            extra = gr.Textbox("", label="more settings (--key value ...)", elem_id="train-extra")
            overwrite = gr.Checkbox(False, label="overwrite a previous run in this folder")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="train-stop")
                resume = gr.Button("Resume (newest checkpoint)", elem_id="train-resume")
        with gr.Column():
            status = gr.Markdown(job.status(), elem_id="train-status")
            command = gr.Code(label="command", language="shell", elem_id="train-command", max_lines=4)
            log = gr.Textbox(label="log (last lines)", lines=18, max_lines=18, autoscroll=True, elem_id="train-log")
    timer = gr.Timer(REFRESH_SECONDS)

    @user_errors
    def start_run(resume: bool, run_name, csv, base, uploaded, *rest):
        *numbers, more, replace = rest
        values = {key: setting(v) for key, v in zip(KEY_SETTINGS, numbers)}
        argv = train_command(session, run_name, csv, base, uploaded, values, more, replace and not resume, resume)
        job.start(argv, session.folders.history / "train-logs" / f"{run_name}.log")
        return job.status(), shown(job.argv), job.tail()

    @user_errors
    def stop_run():
        job.stop()
        return job.status()

    preset.change(user_errors(preset_values), preset, fields)
    form = [name, dataset, preset, config_file, *fields, extra, overwrite]
    start.click(lambda *values: start_run(False, *values), form, [status, command, log])
    resume.click(lambda *values: start_run(True, *values), form, [status, command, log])
    stop.click(stop_run, None, status)
    timer.tick(lambda: (job.status(), job.tail()), None, [status, log])
