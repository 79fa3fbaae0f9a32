"""Judging LoRAs on held-out pairs: metrics, the quantile loss, a local VLM judge, reports (``chronoedit-lora eval``)."""
