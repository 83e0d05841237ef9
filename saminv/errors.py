"""Errors that the CLI reports as one clear line with a non-zero exit (never a traceback)."""


class InputError(Exception):
    """Bad user input: a path, an image, a checkpoint or an option. ``str(e)`` is the whole message."""

    exit_code = 2
