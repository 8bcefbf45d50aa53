"""What an output format is asked to hold, known before any work: the request every format checks at preflight."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..activations import ActSpec
from ..grid import GridSpec


@dataclass(frozen=True)
class FormatRequest:
    """A quantize run as an output format sees it before calibration starts."""

    layer_grids: Mapping[str, GridSpec]  # every linear that will be quantized (the model's names) -> its grid
    config: dict  # the model's config.json as a dict
    tokenizer_json: dict | None  # the tokenizer's tokenizer.json (formats that embed the vocabulary need it)
    act_order_groups: str | None  # None, "static" or "dynamic" (Method.act_order_groups)
    activations: ActSpec | None  # the run's activation quantization, None for weight-only


def check_request(out_format: str, request: FormatRequest) -> None:
    """Refuse, with one error naming the rule and the fix, a request ``out_format`` cannot hold."""
    if out_format == "fake":
        return
    if out_format == "gguf":
        from .gguf import check_gguf_request

        for spec in set(request.layer_grids.values()):
            check_gguf_request(spec, request.config, request.tokenizer_json, request.act_order_groups)
        return
    from .packed import get_format

    get_format(out_format)  # an unknown name fails here; the packed formats check their layers at save time
