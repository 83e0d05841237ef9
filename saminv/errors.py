"""Errors that saminv's commands and scripts report as one clear line with a non-zero exit (never a traceback)."""

from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn


class InputError(Exception):
    """Bad user input: a path, an image, a checkpoint or an option. ``str(e)`` is the whole message."""

    exit_code = 2


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (raises SystemExit)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def reports_errors(fn: Callable) -> Callable:
    """Wrap a CLI command or a script's ``main``: an InputError becomes ``error: <message>`` on stderr and exit
    code ``e.exit_code`` (2), Ctrl-C ``error: interrupted`` and exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper
