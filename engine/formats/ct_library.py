"""The parts of the compressed-tensors library tritonq uses, imported on first use, and its target matching.

Kept apart so that the ``pack-quantized`` format (``compressed_tensors.py``) and the W8A8 ``int-quantized``
layout (``ct_int8.py``) share them without importing each other.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from types import SimpleNamespace

from ...errors import TritonqError


def matches(name: str, targets: Iterable[str], *, linear: bool) -> bool:
    """compressed-tensors target matching: a module name, a ``re:`` regex, or (``linear``) the class Linear."""
    for t in targets:
        if (linear and t == "Linear") or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


@functools.cache
def compressed_tensors_lib() -> SimpleNamespace:
    """The parts of compressed-tensors we use, imported on first use (importing tritonq stays cheap)."""
    try:
        import compressed_tensors
        from compressed_tensors.base import QUANTIZATION_METHOD
        from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as exc:
        raise TritonqError(
            f"the compressed-tensors format needs the compressed-tensors library ({exc}); "
            "run 'pip install \"compressed-tensors>=0.18\"' or choose --format gptq_v2"
        ) from None
    return SimpleNamespace(
        version=compressed_tensors.__version__,
        method=QUANTIZATION_METHOD,
        compressor=PackedQuantizationCompressor,
        int_compressor=IntQuantizationCompressor,
        pack=pack_to_int32,
        unpack=unpack_from_int32,
        Args=QuantizationArgs,
        Config=QuantizationConfig,
        Scheme=QuantizationScheme,
    )
