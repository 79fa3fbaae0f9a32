"""What the web app exposes: loopback unless a login is set, only the given folders, bounded
uploads, and user errors as one line in the page (never a traceback)."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import ChronoEditError
from ..files import resolved_inside

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, auth: str | None) -> None:
    """Refuse to listen beyond this machine without a login."""
    if not is_loopback(host) and not auth:
        raise ChronoEditError(f"--host {host} makes the app reachable from other machines; give --auth USER:PASSWORD "
                              "(or --auth TOKEN) to require a login, or keep the default --host 127.0.0.1.")


def login(auth: str | None) -> Callable[[str, str], bool] | None:
    """Gradio's login check for ``--auth``: ``USER:PASSWORD``, or a bare ``TOKEN`` (any user name,
    the token as password). Compared in constant time."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if sep and not (user and password):
        raise ChronoEditError("--auth USER:PASSWORD needs both a user name and a password (or give a bare TOKEN).")
    if not sep:
        user, password = None, auth

    def check(given_user: str, given_password: str) -> bool:
        user_ok = user is None or hmac.compare_digest(given_user.encode(), user.encode())
        return hmac.compare_digest(given_password.encode(), password.encode()) and user_ok

    return check


def check_folder(flag: str, path: str | None) -> Path | None:
    """A folder given on the command line, which must exist."""
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir():
        raise ChronoEditError(f"{flag} {folder}: no such folder.")
    return folder.resolve()


def within(path: str | Path, folders: Sequence[Path | None], what: str = "file") -> Path:
    """``path`` (links resolved) if it lies inside one of ``folders``, else a user error: the page
    can only name files in the folders the app was started with (the rule of
    :func:`~chronoedit_lora.files.resolved_inside`)."""
    resolved = resolved_inside(path, folders)
    if resolved is None:
        roots = [str(folder.resolve()) for folder in folders if folder is not None]
        raise ChronoEditError(f"{what} {path} is outside the folders this app serves for it "
                              f"({', '.join(roots) or 'none given'}); choose a path inside.")
    return resolved


def listed(paths: Iterable[Path], folders: Sequence[Path | None]) -> list[Path]:
    """The ``paths`` a page may list or show: those :func:`within` accepts (a link to a file
    elsewhere is left out, never served)."""
    return [path for path in paths if resolved_inside(path, folders) is not None]


def readable(path: str | Path, folders: Sequence[Path | None], what: str = "file") -> Path:
    """:func:`within`, and a file."""
    resolved = within(path, folders, what)
    if not resolved.is_file():
        raise ChronoEditError(f"{what} {path}: file not found.")
    return resolved


def user_errors(fn: Callable) -> Callable:
    """Show a handler's errors in the page as one line: the kit's own message for a
    :class:`ChronoEditError`, the exception's type and message otherwise (its traceback goes to the
    server's console only)."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ChronoEditError as exc:
            raise gr.Error(str(exc) or type(exc).__name__, print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the page gets one line, the console the traceback
            traceback.print_exc()
            raise gr.Error(f"{type(exc).__name__}: {exc}", print_exception=False) from None

    return wrapped
