"""The input image field of Edit and Compare: an upload reaches the handler as its file, undecoded,
and the handler decodes it with the kit's own checks (:func:`~chronoedit_lora.data.images.open_image`:
the pixel cap read from the header first, then a full decode). Gradio's own image field decodes the
upload before the handler runs, so a non-image or a 40000x40000 PNG ended in its generic error and a
traceback on the console."""

from __future__ import annotations

import gradio as gr
from gradio.data_classes import ImageData


class InputImage(gr.Image):
    """``gr.Image`` (the same page element) whose value is the uploaded file's path, not decoded here."""

    def get_block_name(self) -> str:
        return "image"  # the page draws it with gr.Image's own element

    def preprocess(self, payload: ImageData | None) -> str | None:
        return None if payload is None else payload.path
