"""Captioner and prompt-enhancer plugins (``--captioner`` / ``--prompt-enhancer`` MODULE:CALLABLE).

A captioner is ``f(before: Image, after: Image, hint: str | None) -> str``; a prompt enhancer is
``f(image: Image, instruction: str) -> str``. :mod:`.qwen_vl` implements both on a local
transformers vision-language model.
"""
