"""The fake-quantized output (``--format fake``, the default): float weights on the grid plus the grid itself.

The directory is what ``save_pretrained`` writes for the model (its weights lie exactly on the grid), the
tokenizer, ``quant_params.safetensors`` (scale, zero, g_idx and the grid of every quantized linear) and
``quantization.json`` (the run's record). Any Hugging Face tool loads it as a float model; ``tritonq pack``
turns it into every packed layout, rebuilding the integer codes bit exactly from the grid.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..outputs import QUANT_JSON
from .base import OutputFormat
from .checkpoint import Checkpoint, write_quant_params
from .records import QUANT_PARAMS
from .store import ShardedWriter


class FakeFormat(OutputFormat):
    """Float weights on the grid, any grid per layer (nothing to refuse)."""

    name = "fake"
    holds_online_transform = True  # quantization.json records it

    def write(self, ckpt: Checkpoint, out: Path, shard_bytes: int | None = None) -> None:
        writer = ShardedWriter(out, shard_bytes)
        for key in ckpt.float_keys():
            writer.add(key, ckpt.tensor(key))
        writer.close()
        (out / "config.json").write_text(ckpt.config_text())
        ckpt.write_side_files(out)
        write_quant_params(out / QUANT_PARAMS, ckpt)
        (out / QUANT_JSON).write_text(json.dumps(ckpt.meta, indent=2) + "\n")
