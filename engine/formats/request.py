"""What an output format is asked to hold, known before any work: the request every format checks at preflight.

:class:`FormatRequest` is defined beside the writer interface (``base.py``), which every format imports, so that
this entry, which dispatches through the registry, closes no import circle.
"""

from __future__ import annotations

from .base import FormatRequest

__all__ = ["FormatRequest", "check_request"]


def check_request(out_format: str, request: FormatRequest) -> None:
    """Refuse, with one error naming the rule and the fix, a request ``out_format`` cannot hold."""
    from .registry import get_format  # the registry imports every format; importing this module stays cheap

    get_format(out_format).check(request)
