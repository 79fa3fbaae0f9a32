"""The Edit tab: an image and an instruction in, the edit beside the input (a before/after slider),
its clip and reasoning frames, PNG and MP4 downloads; each edit saved to the history with its
settings and the equivalent ``chronoedit-lora edit`` command."""

from __future__ import annotations

import shlex
import time

import gradio as gr

from ..commands.edit import DEFAULTS, PRESETS
from ..errors import ChronoEditError
from ..step_cache import METHODS, PRESETS as CACHE_PRESETS
from . import history
from .safety import user_errors
from .session import Session

LORA_SLOTS = 3
AUTO_SCHEDULER = "model default"
NO_PRESET = "none"
NO_STEP_CACHE = "off"
STEP_CACHES = [NO_STEP_CACHE] + [f"{method}:{level}" for method in METHODS for level in CACHE_PRESETS[method]]
# edit settings written to each history entry's settings.json (beside the full command)
SIDECAR_SETTINGS = ("preset", "steps", "cfg", "shift", "scheduler", "seed", "height", "width",
                    "temporal_reasoning_steps", "negative_prompt", "guidance", "vae_tiling", "dtype", "rope",
                    "step_cache", "cache_calibration", "context_cache")


def number(value: float | str | None, name: str, integer: bool = False, optional: bool = False) -> float | int | None:
    """A form number, or a one-line error naming the field."""
    if value is None or value == "":
        if optional:
            return None
        raise ChronoEditError(f"{name}: enter a number.")
    try:
        parsed = float(value)
    except ValueError:
        raise ChronoEditError(f"{name}: {value!r} is not a number.") from None
    if integer and not parsed.is_integer():
        raise ChronoEditError(f"{name} must be a whole number, got {value}.")
    return int(parsed) if integer else parsed


def form_settings(preset: str, steps, cfg, step_cache: str, shift, scheduler: str, seed, height, width) -> dict:
    """Edit-command settings (argparse names) from the fields Edit and Compare share."""
    return {"preset": None if preset == NO_PRESET else preset, "steps": number(steps, "steps", integer=True),
            "step_cache": None if step_cache == NO_STEP_CACHE else step_cache,
            "cfg": number(cfg, "cfg"), "shift": number(shift, "shift", optional=True),
            "scheduler": None if scheduler == AUTO_SCHEDULER else scheduler, "seed": number(seed, "seed", integer=True),
            "height": number(height, "height", integer=True) or None,
            "width": number(width, "width", integer=True) or None}


def settings_fields(prefix: str) -> list[gr.components.Component]:
    """preset, steps, cfg, step cache, shift, scheduler, seed, height, width: the shared sampling fields."""
    preset = gr.Dropdown([NO_PRESET, *PRESETS], value=NO_PRESET, label="preset", elem_id=f"{prefix}-preset")
    with gr.Row():
        steps = gr.Number(DEFAULTS["steps"], precision=0, label="steps", elem_id=f"{prefix}-steps")
        cfg = gr.Number(DEFAULTS["cfg"], label="cfg", elem_id=f"{prefix}-cfg")
        step_cache = gr.Dropdown(STEP_CACHES, value=NO_STEP_CACHE, label="step cache (mag: ui --cache-calibration)",
                                 elem_id=f"{prefix}-step-cache")
        shift = gr.Textbox("", label="shift (empty: the model's)", elem_id=f"{prefix}-shift")
        scheduler = gr.Dropdown([AUTO_SCHEDULER, "unipc", "euler"], value=AUTO_SCHEDULER, label="scheduler",
                                elem_id=f"{prefix}-scheduler")
    with gr.Row():
        seed = gr.Number(0, precision=0, label="seed", elem_id=f"{prefix}-seed")
        height = gr.Number(0, precision=0, label="height (0: auto)", elem_id=f"{prefix}-height")
        width = gr.Number(0, precision=0, label="width (0: auto)", elem_id=f"{prefix}-width")

    def apply_preset(name: str):
        values = {**DEFAULTS, **PRESETS.get(name, {})}
        return values["steps"], values["cfg"], "" if values["shift"] is None else values["shift"]

    preset.change(apply_preset, preset, [steps, cfg, shift])
    return [preset, steps, cfg, step_cache, shift, scheduler, seed, height, width]


def input_image(**options) -> gr.Image:
    """The input image field of Edit and Compare. Its value is the uploaded file's path, not decoded
    by Gradio: the handler decodes it with the kit's own checks (``session.start``: the pixel cap
    read from the header first), so a non-image or a 40000x40000 PNG is the kit's one-line message
    (gr.Image's own preprocessing decoded it first, ending in Gradio's generic error and a traceback)."""
    image = gr.Image(type="filepath", **options)
    image.preprocess = lambda payload: None if payload is None else payload.path  # this field only
    return image


def lora_slot(session: Session, prefix: str, index: int) -> tuple[gr.Dropdown, gr.Slider]:
    with gr.Row():
        lora = gr.Dropdown(session.lora_choices(), value=None, label=f"LoRA {index + 1}", scale=3,
                           elem_id=f"{prefix}-lora-{index}")
        scale = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="scale", scale=2, elem_id=f"{prefix}-scale-{index}")
    return lora, scale


def cancels_page_job(session: Session, button: gr.Button, event: gr.events.Dependency) -> None:
    """``button`` stops this page's running job (``event``) before its next denoising step."""
    def cancel(request: gr.Request) -> None:
        session.cancel(request.session_hash)

    button.click(cancel, None, None, cancels=[event], queue=False)


def watch_pages(session: Session, app: gr.Blocks) -> None:
    """A page that is closed (or reloaded) has its running job stopped and its queued ones refused."""
    def closed(request: gr.Request) -> None:
        session.page_closed(request.session_hash)

    app.unload(closed)


def build(session: Session) -> list[gr.Dropdown]:
    """The tab; returns its LoRA slots (refreshed on page load, filled by "Use in Edit")."""
    def history_items() -> list[tuple[str, str]]:
        return [(str(entry.edit), entry.settings().get("instruction", "")[:60])
                for entry in history.entries(session.folders.history)]

    with gr.Row():
        with gr.Column():
            image = input_image(label="input image", sources=["upload", "clipboard"], height=280, elem_id="edit-image")
            prompt = gr.Textbox(label="instruction", lines=2, elem_id="edit-prompt",
                                placeholder="The user wants to ... (say what changes and what stays)")
            enhance = gr.Checkbox(False, label=f"rewrite the instruction first ({session.args.prompt_enhancer})",
                                  visible=session.enhancer is not None)
            fields = settings_fields("edit")
            with gr.Row():
                reasoning = gr.Number(0, precision=0, label="temporal reasoning steps", elem_id="edit-reasoning")
                negative = gr.Textbox("", label="negative prompt (cfg > 1)")
            slots = [lora_slot(session, "edit", i) for i in range(LORA_SLOTS)]
            with gr.Row():
                run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="edit-cancel")
                refresh = gr.Button("Refresh LoRA list", size="sm")
        with gr.Column():
            slider = gr.ImageSlider(label="before / after", type="pil", elem_id="edit-result", height=360)
            status = gr.Markdown(elem_id="edit-status")
            frames = gr.Gallery(label="clip frames (reasoning frames, then the edit)", columns=8, height=140,
                                elem_id="edit-frames", object_fit="contain", visible=False)
            video = gr.Video(label="clip", elem_id="edit-video", height=200)
            downloads = gr.File(label="downloads (PNG, MP4)", file_count="multiple", elem_id="edit-downloads")
    with gr.Accordion("history", open=False):
        gallery = gr.Gallery(history_items, label=f"saved edits ({session.folders.history})", columns=8, height=200,
                             elem_id="edit-history", object_fit="contain")  # filled on page load and after each edit
        details = gr.JSON(label="settings of the chosen edit", elem_id="edit-history-settings")

    @user_errors
    def run_edit(request: gr.Request, image_path, instruction, rewrite, preset, steps, cfg, step_cache, shift,
                 scheduler, seed, height, width, reasoning_steps, negative_prompt, *lora_values, progress=gr.Progress()):
        with session.job(request.session_hash) as cancelled:
            source = session.start(image_path, instruction)
            text = session.enhancer(source, instruction) if rewrite and session.enhancer else instruction
            loras = session.lora_specs(list(zip(lora_values[::2], lora_values[1::2])))
            reasoning_count = number(reasoning_steps, "temporal reasoning steps", integer=True)
            args = session.edit_args(prompt=text, negative_prompt=negative_prompt or "", lora=loras,
                                     temporal_reasoning_steps=reasoning_count,
                                     **form_settings(preset, steps, cfg, step_cache, shift, scheduler, seed, height,
                                                     width))
            started = time.perf_counter()
            result = session.edit(source, args, cancelled,
                                  lambda i, n: progress((i, n), desc="denoising", unit="steps"))
        seconds = time.perf_counter() - started
        entry = history.save(session.folders.history, source, result.frames)
        args.image, args.output, args.video = str(entry.folder / history.INPUT), str(entry.edit), str(entry.clip)
        command = shlex.join(session.command(args))
        history.write_settings(entry, {"instruction": instruction, "prompt": text, "seconds": round(seconds, 3),
                                       "size": list(result.image.size), "loras": loras,
                                       "settings": {key: getattr(args, key) for key in SIDECAR_SETTINGS},
                                       "command": command})
        before = source.convert("RGB").resize(result.image.size)
        frame_items = [(frame, f"frame {i}") for i, frame in enumerate(result.frames)]
        note = (f"**{result.image.width}x{result.image.height}** in {seconds:.1f} s, saved to `{entry.folder}`"
                + (f"\n\nprompt used: {text}" if text != instruction else "") + f"\n\n```\n{command}\n```")
        return (before, result.image), note, gr.Gallery(frame_items, visible=args.temporal_reasoning_steps > 0), \
            str(entry.clip), [str(entry.edit), str(entry.clip)], history_items()

    def show_settings(event: gr.SelectData):
        entries = history.entries(session.folders.history)
        return entries[event.index].settings() if event.index < len(entries) else None

    lora_inputs = [component for slot in slots for component in slot]
    edit_event = run.click(run_edit, [image, prompt, enhance, *fields, reasoning, negative, *lora_inputs],
                           [slider, status, frames, video, downloads, gallery],
                           concurrency_limit=1, concurrency_id="model")
    cancels_page_job(session, cancel, edit_event)
    refresh.click(lambda: [gr.Dropdown(choices=session.lora_choices()) for _ in slots], None,
                  [lora for lora, _ in slots], queue=False)
    gallery.select(show_settings, None, details, queue=False)
    return [lora for lora, _ in slots]
