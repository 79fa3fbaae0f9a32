"""The local web app (``chronoedit-lora ui``), built on Gradio: one module per tab, plus the loaded
model (:mod:`.session`), the history of edits and what the server exposes (:mod:`.safety`)."""
