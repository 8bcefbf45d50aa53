"""The package's one error type and one warning channel, below both ``kernels/`` and ``engine/``.

``TritonqError``: a problem with the user's input or environment; its message names the problem and the
fix, and the CLI prints it in one line and exits with status 2, without a traceback.
``warn``: every tritonq warning goes through it (category :class:`TritonqWarning`), so the CLI shows
each one as a single ``tritonq: warning: ...`` line and a caller can filter them by category.
``Terminated``: SIGTERM turned into an exception (a ``KeyboardInterrupt``), so the cleanup of Ctrl-C runs.
"""

from __future__ import annotations

import warnings


class TritonqError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where tritonq handles it (a save, the CLI) so that it cleans up as for Ctrl-C."""


class TritonqWarning(UserWarning):
    """Something the user should know that does not stop the work (damping raised, a slow path taken)."""


def warn(message: str, stacklevel: int = 2) -> None:
    """Emit a tritonq warning (the one channel: no prints to stderr for warnings elsewhere)."""
    warnings.warn(message, TritonqWarning, stacklevel=stacklevel + 1)
