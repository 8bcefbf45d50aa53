"""Every output format, one class each, in one dict; and the entry points that go through it.

``FORMATS`` maps each ``--format`` to its writer: ``fake`` (float weights on the grid), the packed safetensors
layouts tritonq also reads back (compressed-tensors - with W8A8 as ``int-quantized`` -, gptq, gptq_v2, awq)
and ``gguf`` (llama.cpp). ``tritonq quantize`` writes its run through them, one tensor at a time
(:class:`~tritonq.engine.formats.checkpoint.RunCheckpoint`); ``tritonq pack`` reads a fake output from disk
(:class:`~tritonq.engine.formats.checkpoint.FakeDirectory`) and writes it through the same classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import Tensor

from ...errors import TritonqError
from ..grid import GridSpec
from ..outputs import QUANT_JSON, atomic_output_dir, check_output_dir
from .awq import AwqFormat
from .base import OutputFormat, PackedFormat, method_of
from .checkpoint import FakeDirectory
from .compressed_tensors import CompressedTensorsFormat
from .fake import FakeFormat
from .gguf import GgufFormat
from .gptq import GptqFormat, GptqV2Format
from .records import QuantizedWeight
from .store import TensorStore

DEFAULT_FORMAT = "compressed-tensors"

FORMATS: dict[str, OutputFormat] = {
    fmt.name: fmt
    for fmt in (FakeFormat(), CompressedTensorsFormat(), GptqFormat(), GptqV2Format(), AwqFormat(), GgufFormat())
}
#: the packed safetensors layouts, which tritonq also reads back (serve, eval, read_packed)
PACKED: dict[str, PackedFormat] = {name: f for name, f in FORMATS.items() if isinstance(f, PackedFormat)}
#: what 'tritonq pack' writes from a fake output
PACK_FORMATS = tuple(name for name in FORMATS if name != FakeFormat.name)


def get_format(name: str) -> OutputFormat:
    """The format registered under ``name``; a clear error listing the choices otherwise."""
    if name not in FORMATS:
        raise TritonqError(f"unknown --format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def save_packed(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str = DEFAULT_FORMAT,
    overwrite: bool = False,
    layers: Mapping[str, QuantizedWeight] | None = None,
    shard_bytes: int | None = None,
) -> Path:
    """Pack a tritonq output directory (``--format fake``) into ``fmt`` at ``out_dir`` (``tritonq pack``).

    The integer records come from ``layers`` when the caller holds them, else they are rebuilt from
    ``quant_params.safetensors`` and checked bit exact against the float weights
    (:meth:`QuantizedWeight.from_grid`). The output appears atomically; ``shard_bytes`` splits the weights
    into shards with an index. Returns the output path.
    """
    if fmt not in PACK_FORMATS:
        raise TritonqError(f"unknown format {fmt!r}; 'tritonq pack' writes {', '.join(PACK_FORMATS)}")
    check_output_dir(out_dir, overwrite)  # unwritable, or not ours to replace: refused before packing
    writer = FORMATS[fmt]
    from ..online_hadamard import saved_record

    if saved_record(src_dir) is not None and not writer.holds_online_transform:
        raise TritonqError(f"{src_dir} was quantized with the online Hadamard (--rotate with --act-bits), which "
                           f"{fmt} cannot hold; pack it as compressed-tensors")
    ckpt = FakeDirectory(src_dir, layers)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer.write(ckpt, tmp, shard_bytes)
    return Path(out_dir)


def _quant_config(directory: Path) -> dict:
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise TritonqError(f"{directory} has no config.json; pass a packed checkpoint directory")
    config = json.loads(cfg_file.read_text())
    qcfg = config.get("quantization_config") or config.get("compression_config")
    if not qcfg:
        if (directory / QUANT_JSON).is_file():
            raise TritonqError(
                f"{directory} is a fake-quantized tritonq output, not a packed checkpoint; "
                f"run 'tritonq pack {directory} --output DIR' first"
            )
        raise TritonqError(
            f"{directory}/config.json has no quantization_config; it is not a packed checkpoint"
        )
    return qcfg


def checkpoint_format(directory: str | os.PathLike) -> str:
    """The :data:`PACKED` name of a packed checkpoint, from its ``config.json``; an error otherwise."""
    qcfg = _quant_config(Path(directory))
    for fmt in PACKED.values():
        if fmt.recognizes(qcfg):
            return fmt.name
    raise TritonqError(f"quant_method {method_of(qcfg)!r} is not supported; tritonq reads {', '.join(PACKED)}")


def read_packed(directory: str | os.PathLike) -> Iterator[tuple[str, GridSpec, QuantizedWeight]]:
    """Every quantized linear of a packed checkpoint as (name, grid, integer record), in file order."""
    d = Path(directory)
    fmt = PACKED[checkpoint_format(d)]
    yield from fmt.read(TensorStore(d), _quant_config(d))


def float_tensors(directory: str | os.PathLike, quantized: set[str]) -> Iterator[tuple[str, Tensor]]:
    """The non-quantized tensors of a packed checkpoint (embeddings, norms, lm_head, biases)."""
    d = Path(directory)
    packed_leaves = PACKED[checkpoint_format(d)].tensor_names
    store = TensorStore(d)
    for key in store.keys():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf in packed_leaves:
            continue
        if module in quantized and leaf == "bias":
            continue  # carried by the runtime layer
        yield key, store.get(key)
