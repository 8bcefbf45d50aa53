"""What an output format is asked to hold, known before any work: the request every format checks at preflight.

:class:`FormatRequest` is defined beside the writer interface (``base.py``), which every format imports, so that
this entry, which dispatches through the registry, closes no import circle.
"""

from __future__ import annotations

from ...errors import TritonqError
from .base import FormatRequest

__all__ = ["FormatRequest", "check_request"]


def check_request(out_format: str, request: FormatRequest) -> None:
    """Refuse, with one error naming the rule and the fix, a request ``out_format`` cannot hold."""
    from .registry import get_format  # the registry imports every format; importing this module stays cheap

    fmt = get_format(out_format)
    if request.online_transform and not fmt.holds_online_transform:
        raise TritonqError(f"--format {out_format} cannot hold the online Hadamard that --rotate with --act-bits "
                           "applies at the down_proj input (its loaders would run another model); use --format "
                           "compressed-tensors or fake, or drop --act-bits for an offline-only rotation")
    fmt.check(request)
