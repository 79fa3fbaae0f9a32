"""The web app: checks, the model loaded once, five tabs, and the server (loopback, folders, upload
bound and login from :mod:`.safety`)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from ..errors import ChronoEditError
from ..files import check_writable_folder
from ..settings import check_device, check_range
from .safety import check_folder, check_host, login

if TYPE_CHECKING:  # gradio and the model load only once the inputs are checked
    import gradio as gr

    from .session import Folders, Session

# Offline and private: no usage statistics, no web fonts, no share link, no server-side rendering (node).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
CSS = "#edit-status pre, #edit-status code { white-space: pre-wrap; word-break: break-all; }"  # long commands wrap


def folders_of(args: argparse.Namespace) -> Folders:
    """The folders the app serves, checked (the history is created if needed)."""
    from .session import Folders

    history = check_writable_folder(args.history, "--history")
    return Folders(check_folder("--runs", args.runs), check_folder("--loras", args.loras),
                   check_folder("--datasets", args.datasets), history.resolve())


def build_app(session: Session) -> gr.Blocks:
    """The page: Edit, Compare, Runs, Train and Dataset tabs over one loaded model."""
    import gradio as gr

    from . import compare, dataset, edit, runs, train

    with gr.Blocks(title="chronoedit-lora", analytics_enabled=False) as app:
        gr.Markdown(f"### chronoedit-lora · model `{session.args.model or session.args.dit}` on "
                    f"{session.pipe.device} ({session.args.dtype})")
        with gr.Tabs() as tabs:
            with gr.Tab("Edit", id="edit"):
                edit_loras = edit.build(session)
            with gr.Tab("Compare", id="compare"):
                compare_loras = compare.build(session)
            with gr.Tab("Runs", id="runs"):
                runs.build(session, tabs, edit_loras[0])
            with gr.Tab("Train", id="train"):
                train.build(session)
            with gr.Tab("Dataset", id="dataset"):
                dataset.build(session)
        edit.watch_pages(session, app)
        lora_lists = edit_loras + compare_loras  # LoRAs written since the server started appear on reload
        app.load(lambda: [gr.Dropdown(choices=session.lora_choices()) for _ in lora_lists], None, lora_lists)
    return app


def serve(args: argparse.Namespace, block: bool = True) -> tuple[gr.Blocks, str] | None:
    """Check everything, load the model, start the server; returns ``(app, url)`` when not ``block``."""
    check_host(args.host, args.auth)
    auth = login(args.auth)
    if args.sequence_parallel:
        raise ChronoEditError("--sequence-parallel splits one edit across torchrun processes; the web app is one "
                              "process: drop the flag (or use scripts/infer.py under torchrun).")
    check_range("--port", args.port, 1, 65535)
    check_range("--max-upload-mb", args.max_upload_mb, 0, low_inclusive=False)
    folders = folders_of(args)
    check_device(args.device)
    enhancer = None
    if args.prompt_enhancer:
        from ..plugins import load_callable

        enhancer = load_callable(args.prompt_enhancer, "--prompt-enhancer")

    import gradio as gr

    from ..commands.model_args import model_options
    from ..pipeline import ChronoEditPipeline
    from .session import Session

    pipe = ChronoEditPipeline.from_pretrained(**model_options(args), offload=args.offload)
    app = build_app(Session(pipe, args, folders, enhancer))
    app.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    _, url, _ = app.launch(server_name=args.host, server_port=args.port, auth=auth, allowed_paths=folders.served(),
                           max_file_size=int(args.max_upload_mb * 1024 * 1024), share=False, inbrowser=False,
                           ssr_mode=False, mcp_server=False, pwa=False, show_error=False, theme=theme, css=CSS,
                           prevent_thread_lock=True,
                           quiet=True)
    print(f"chronoedit-lora ui: open {url} (Ctrl-C stops it)", flush=True)
    if not block:
        return app, url
    try:
        app.block_thread()
    finally:
        app.close()
    return None
