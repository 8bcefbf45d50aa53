"""User-facing errors: the CLI prints their message in one line and exits non-zero, no traceback."""


class TritonqError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""
