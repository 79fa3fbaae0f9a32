"""Read a diffusers/transformers component folder's ``config.json`` with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError


def read_config(path: str | Path) -> dict:
    """``config.json`` of the component folder ``path``; {} for a single file or a folder without one."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config}: invalid JSON ({exc}).") from None
