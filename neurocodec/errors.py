"""Errors caused by what a user gave us (a file, a config, codes). The CLI prints them on one line."""


class UserError(ValueError):
    """Bad input: reported as a one-line message and a non-zero exit, never a traceback."""


class AudioError(UserError):
    """Unreadable, empty or non-finite audio."""


class CodesError(UserError):
    """Codes of the wrong shape, type or range for the model."""
