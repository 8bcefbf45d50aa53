"""Average bits per weight, counted one way everywhere: ``tritonq report`` and ``--method auto``'s budget.

For one linear of ``N`` rows (outputs) and ``K`` columns (inputs) with ``G`` groups per row (``K / group_size``,
1 per channel), the bits a format stores are (:func:`linear_bits`):

* codes: ``N * K * bits``;
* scales: ``N * G * 16`` (fp16 / bf16 in every format tritonq writes);
* zero points, as the format stores them: ``fake`` and ``compressed-tensors`` pack an asymmetric zero at ``bits``
  bits per group and store none for a symmetric grid (its zero is implied); ``gptq`` / ``gptq_v2`` always pack
  ``qzeros`` at ``bits`` bits per group (symmetric too) and add ``g_idx``, 32 bits per input column; ``awq`` packs
  4-bit zeros per group; ``gguf`` stores no zero in Q4_0 / Q8_0 (symmetric) and an fp16 minimum per block of 32 in
  Q4_1 (asymmetric);
* a linear the run leaves in float (a recipe's ``skip``): 16 bits per weight.

Not counted: biases (not weights), compressed-tensors' ``weight_shape`` (two integers), and the ``g_idx`` it
writes only for group act-order. The average is over the linear weights of the decoder blocks
(:func:`average_bits`): embeddings and ``lm_head`` stay float in every run and would only dilute the comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import TritonqError
from .grid import GridSpec

FLOAT_BITS = 16  # a linear left in float, as the 16-bit checkpoints store it
SCALE_BITS = 16
G_IDX_BITS = 32
FORMATS = ("fake", "compressed-tensors", "gptq", "gptq_v2", "awq", "gguf")


def linear_bits(spec: GridSpec | None, rows: int, cols: int, fmt: str = "fake") -> int:
    """Bits one ``rows x cols`` linear takes in format ``fmt`` (module docstring); ``spec`` None: left in float."""
    if fmt not in FORMATS:
        raise TritonqError(f"cannot count bits for format {fmt!r}; known: {', '.join(FORMATS)}")
    if spec is None:
        return FLOAT_BITS * rows * cols
    groups = rows * spec.groups_for(cols)
    total = rows * cols * spec.bits + groups * SCALE_BITS
    if fmt in ("gptq", "gptq_v2"):
        total += groups * spec.bits + cols * G_IDX_BITS
    elif fmt == "awq":
        total += groups * 4
    elif fmt == "gguf":
        total += 0 if spec.sym else groups * SCALE_BITS
    elif not spec.sym:  # fake (counted as compressed-tensors, what it packs to by default) and compressed-tensors
        total += groups * spec.bits
    return total


def average_bits(grids: Mapping[str, GridSpec | None], shapes: Mapping[str, tuple[int, int]],
                 fmt: str = "fake") -> float:
    """Bits per weight over every linear in ``shapes`` (name -> (rows, cols)); a name missing from ``grids`` or
    mapped to None is left in float."""
    weights = sum(r * c for r, c in shapes.values())
    if not weights:
        raise TritonqError("no linear weights to count bits over")
    return sum(linear_bits(grids.get(name), r, c, fmt) for name, (r, c) in shapes.items()) / weights


def block_linear_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of every linear of every decoder block (the model's names), from a
    ``config.json`` dict, read off a meta skeleton: nothing is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import adapter_for

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    adapter = adapter_for(cfg)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    shapes = {}
    for i, block in enumerate(adapter.block_list(skeleton)):
        for name in adapter.linear_names():
            lin = block.get_submodule(name)
            shapes[f"{adapter.blocks}.{i}.{name}"] = (lin.out_features, lin.in_features)
    return shapes
