"""The Compare tab: one input, several variants in one click (LoRA off and on, a scale sweep, a
run's checkpoints, two LoRAs side by side) as one labelled grid, optionally each on top of one fixed
LoRA (e.g. the distill LoRA). LoRAs stay unfused hooks, so each variant only rescales or swaps them."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..errors import ChronoEditError
from ..train.loop.samples import grid_image
from . import runs
from .edit import cancels_page_job, form_settings, input_image, settings_fields
from .safety import user_errors
from .session import Session

OFF_ON, SWEEP, CHECKPOINTS, PAIR = "LoRA off / on", "scale sweep", "checkpoints of a run", "two LoRAs side by side"
MODES = (OFF_ON, SWEEP, CHECKPOINTS, PAIR)
MAX_VARIANTS = 12

Variant = tuple[str, list[tuple[str, float]]]  # label, (LoRA path, scale) pairs


def parse_scales(text: str) -> list[float]:
    """``"0, 0.5, 1"`` -> [0.0, 0.5, 1.0]."""
    try:
        scales = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ChronoEditError(f"scales {text!r}: give numbers separated by commas, e.g. 0, 0.5, 1.") from None
    if not scales:
        raise ChronoEditError("scales: give at least one, e.g. 0, 0.5, 1.")
    return scales


def variants(mode: str, lora_a: str | None, scale_a: float, lora_b: str | None, scale_b: float, scales: str,
             run: str | None) -> list[Variant]:
    """The variants a mode asks for, each labelled."""
    def need(path: str | None, name: str) -> str:
        if not path:
            raise ChronoEditError(f"{mode}: choose {name} first.")
        return path

    if mode == OFF_ON:
        a = need(lora_a, "LoRA A")
        found = [("no LoRA", []), (f"{Path(a).stem} x{scale_a:g}", [(a, scale_a)])]
    elif mode == SWEEP:
        a = need(lora_a, "LoRA A")
        found = [(f"{Path(a).stem} x{s:g}", [(a, s)]) for s in parse_scales(scales)]
    elif mode == CHECKPOINTS:
        loras = runs.checkpoint_loras(Path(need(run, "a run")))
        if not loras:
            raise ChronoEditError(f"run {run} has no checkpoint LoRAs yet.")
        found = [("base", [])] + [(label, [(str(path), scale_a)]) for label, path in loras]
    elif mode == PAIR:
        a, b = need(lora_a, "LoRA A"), need(lora_b, "LoRA B")
        found = [(f"A: {Path(a).stem} x{scale_a:g}", [(a, scale_a)]),
                 (f"B: {Path(b).stem} x{scale_b:g}", [(b, scale_b)])]
    else:
        raise ChronoEditError(f"unknown comparison {mode!r}; choose one of {', '.join(MODES)}.")
    if len(found) > MAX_VARIANTS:
        raise ChronoEditError(f"{len(found)} variants asked for; at most {MAX_VARIANTS} per grid.")
    return found


def build(session: Session) -> list[gr.Dropdown]:
    """The tab; returns its LoRA choices (refreshed on page load)."""
    with gr.Row():
        with gr.Column():
            image = input_image(label="input image", height=240, elem_id="compare-image")
            prompt = gr.Textbox(label="instruction", lines=2, elem_id="compare-prompt")
            mode = gr.Radio(list(MODES), value=OFF_ON, label="compare", elem_id="compare-mode")
            with gr.Row():
                lora_a = gr.Dropdown(session.lora_choices(), value=None, label="LoRA A", elem_id="compare-lora-a")
                scale_a = gr.Number(1.0, label="scale A", elem_id="compare-scale-a")
            with gr.Row():
                lora_b = gr.Dropdown(session.lora_choices(), value=None, label="LoRA B", elem_id="compare-lora-b")
                scale_b = gr.Number(1.0, label="scale B")
            with gr.Row():  # e.g. the distill LoRA a LoRA was trained on, under every variant
                lora_base = gr.Dropdown(session.lora_choices(), value=None, label="under every variant",
                                        elem_id="compare-lora-base")
                scale_base = gr.Number(1.0, label="its scale", elem_id="compare-scale-base")
            scales = gr.Textbox("0, 0.5, 1", label="scales (sweep)", elem_id="compare-scales")
            run = gr.Dropdown(runs.list_runs(session.folders.runs), value=None, label="run (checkpoints)",
                              elem_id="compare-run")
            fields = settings_fields("compare")
            with gr.Row():
                go = gr.Button("Compare", variant="primary", elem_id="compare-run-button")
                cancel = gr.Button("Cancel", variant="stop", elem_id="compare-cancel")
        with gr.Column():
            grid = gr.Image(type="pil", label="grid", elem_id="compare-grid", format="png")
            cells = gr.Gallery(label="variants", columns=4, height=220, elem_id="compare-cells", object_fit="contain")
            status = gr.Markdown(elem_id="compare-status")

    @user_errors
    def compare(request: gr.Request, image_path, instruction, chosen_mode, a, sa, b, sb, base, sbase, scale_text,
                run_folder, *form, progress=gr.Progress()):
        def report(number: int):
            return lambda i, n: progress((number * n + i, len(asked) * n), desc=f"variant {number + 1} of {len(asked)}")

        with session.job(request.session_hash) as cancelled:
            source = session.start(image_path, instruction)
            settings = form_settings(*form)
            asked = variants(chosen_mode, a, float(sa or 0), b, float(sb or 0), scale_text, run_folder)
            results = []
            for number, (label, loras) in enumerate(asked):
                specs = session.lora_specs([(base, float(sbase or 0)), *loras])  # the fixed LoRA under every variant
                args = session.edit_args(prompt=instruction, lora=specs, **settings)
                results.append((label, session.edit(source, args, cancelled, report(number)).image))
        size = results[0][1].size
        picture = grid_image([(source.convert("RGB").resize(size), *(edit for _, edit in results))],
                             ("input", *(label for label, _ in results)))
        return picture, [(edit, label) for label, edit in results], f"{len(results)} variants, {size[0]}x{size[1]}"

    event = go.click(compare, [image, prompt, mode, lora_a, scale_a, lora_b, scale_b, lora_base, scale_base, scales, run,
                               *fields], [grid, cells, status], concurrency_limit=1, concurrency_id="model")
    cancels_page_job(session, cancel, event)
    return [lora_a, lora_b, lora_base]
