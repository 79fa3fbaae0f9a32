"""User-facing error types: the CLI prints these as one clear message, without a traceback."""


class ChronoEditError(Exception):
    """Base class for errors caused by user input (paths, files, options), not by bugs."""


class CheckpointError(ChronoEditError, ValueError):
    """A checkpoint file or folder is missing, corrupt, incomplete or of the wrong kind."""


def listing(label: str, items: list[str], shown: int = 10) -> str:
    """``"N <label>: a, b, …"`` with the first ``shown`` items, for error messages."""
    more = " …" if len(items) > shown else ""
    return f"{len(items)} {label}: " + ", ".join(items[:shown]) + more
