"""``--quantize-head``: the lm_head and the input embedding table as integer tables in the packed output.

On small models the float lm_head and embeddings are most of the bytes a decode step reads (issue 23 item 3).
``int8``: the lm_head int8 symmetric per output channel; ``int4``: the lm_head 4-bit groups of 32, asymmetric.
In both, the embedding table int8 symmetric per row (a row is what one token gathers). All on the run's grid
(:mod:`~tritonq.engine.grid`: min-max ranges, fp16 scales; the shrink search when the run has ``--mse``).

**Round to nearest, no GPTQ.** GPTQ on the head would need the Hessian of the final hidden states (one more
pass over the calibration windows through the whole model) and a solve over every vocabulary row; RTN needs
neither and the measured cost is small at 8 bits (bench/RESULTS.md). The embedding has no Hessian at all.

**Tied embeddings are untied.** A quantized head gets its own table: the output's ``config.json`` says
``tie_word_embeddings: false``, the lm_head is written as a quantized linear and the embedding as a table of its
own, so every loader sees an ordinary untied model. At ``int8`` the two tables hold the same codes; the disk
keeps both, and ``load_packed_model`` shares one table between them in memory.

:class:`HeadCheckpoint` wraps the :class:`~tritonq.engine.formats.checkpoint.Checkpoint` a run writes: it adds
the two tables to ``grids`` and rounds them when the writer asks, so the formats write them through their usual
per-layer path. Formats declare how they hold the tables (:attr:`OutputFormat.head_block`): compressed-tensors
as they are (per channel), GGUF in blocks of 32 (the per-row int8 scale repeated per Q8_0 block, bit exact);
the others refuse.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ...errors import TritonqError, warn
from ..grid import GridSpec, codes_of, default_g_idx, fit_groups
from .base import OutputFormat
from .checkpoint import Checkpoint
from .records import QuantizedWeight, layout_key

HEAD_MODES = ("none", "int8", "int4")
INT8_ROWS = GridSpec(bits=8, group_size=-1, sym=True)  # int8 per output channel (lm_head) or per row (embedding)
INT4_HEAD = GridSpec(bits=4, group_size=32, sym=False)
RECORD_KEY = "quantize_head"  # quantization.json's entry


def head_grids(mode: str, mse: bool = False) -> tuple[GridSpec, GridSpec]:
    """``(lm_head grid, embedding grid)`` of a ``--quantize-head`` mode (not ``none``)."""
    if mode not in HEAD_MODES[1:]:
        raise TritonqError(f"unknown --quantize-head {mode!r}; choose one of {', '.join(HEAD_MODES)}")
    head = INT8_ROWS if mode == "int8" else INT4_HEAD
    return GridSpec(head.bits, head.group_size, head.sym, mse), GridSpec(8, -1, True, mse)


def check_head_format(fmt: OutputFormat, mode: str) -> None:
    """Refuse a format that cannot hold the tables, naming the ones that can."""
    if mode != "none" and fmt.head_block is None:
        raise TritonqError(f"--format {fmt.name} cannot hold a quantized lm_head and embedding table "
                           f"(--quantize-head {mode}); use --format compressed-tensors or gguf, "
                           "or --quantize-head none")


def check_head_model(mode: str, config: dict, head_block: int | None) -> None:
    """The hidden size must split into the head's groups (and into GGUF's blocks of 32)."""
    if mode == "none":
        return
    hidden = int(config.get("hidden_size") or 0)
    for group in {g for g in (head_grids(mode)[0].group_size, head_block) if g and g > 0}:
        if hidden % group:
            raise TritonqError(f"--quantize-head {mode} needs the hidden size ({hidden}) to be a multiple of {group}; "
                               "use --quantize-head none for this model")


def round_table(name: str, weight: Tensor, spec: GridSpec) -> QuantizedWeight:
    """Round-to-nearest record of a float table [N, K] on ``spec`` (the grid every method uses)."""
    scale, zero = fit_groups(weight.float(), spec, name)
    g_idx = default_g_idx(weight.shape[1], spec)
    return QuantizedWeight(codes_of(weight, scale, zero, g_idx, spec.maxq), scale, zero, g_idx)


def in_blocks_spec(spec: GridSpec, block: int) -> GridSpec:
    """A per-channel grid as groups of ``block`` (``block`` -1: unchanged)."""
    if spec.group_size != -1 or block == -1:
        return spec
    return GridSpec(spec.bits, block, spec.sym, spec.mse)


def in_blocks(q: QuantizedWeight, spec: GridSpec, block: int) -> QuantizedWeight:
    """A per-channel record re-expressed with groups of ``block`` (the scale and zero repeated): the same weights."""
    blocked = in_blocks_spec(spec, block)
    if blocked is spec:
        return q
    reps = q.shape[1] // block
    return QuantizedWeight(q.codes, q.scale.repeat_interleave(reps, dim=1), q.zero.repeat_interleave(reps, dim=1),
                           default_g_idx(q.shape[1], blocked), q.bias)


class HeadCheckpoint(Checkpoint):
    """``inner`` with its lm_head and embedding table quantized (RTN), written as two more quantized layers.

    ``embedding`` / ``lm_head``: the model's module names (the adapter's residual stream); ``block``: the format's
    :attr:`OutputFormat.head_block`. The records are rounded on first use and kept (GGUF asks twice)."""

    def __init__(self, inner: Checkpoint, mode: str, embedding: str, lm_head: str, block: int,
                 note: str | None = None) -> None:
        self.inner = inner
        self.label = inner.label
        self.embedding, self.lm_head, self.block = embedding, lm_head, block
        mse = bool(inner.meta.get("mse", False))
        head_spec, embed_spec = head_grids(mode, mse)
        keys = set(inner.float_keys())
        self._source = {embedding: f"{embedding}.weight"}
        self._source[lm_head] = f"{lm_head}.weight" if f"{lm_head}.weight" in keys else f"{embedding}.weight"
        for key in self._source.values():
            if key not in keys:
                raise TritonqError(f"--quantize-head: the checkpoint has no {key}; this model's head cannot be "
                                   "quantized, use --quantize-head none")
        tied = self._source[lm_head] != f"{lm_head}.weight"
        self._specs = {lm_head: head_spec, embedding: embed_spec}
        self._records: dict[tuple, QuantizedWeight] = {}
        self.grids = {**inner.grids, **{n: in_blocks_spec(s, block) for n, s in self._specs.items()}}
        self.config = {**inner.config, "tie_word_embeddings": False}
        record = {"mode": mode, "rounding": "rtn", "tied_in_source": tied,
                  "tables": {n: {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
                             for n, s in self._specs.items()},
                  "note": "lm_head and embedding written as separate tables (tie_word_embeddings false)"}
        if note:
            record["loaders"] = note
        self.meta = {**inner.meta, RECORD_KEY: record}

    def config_text(self) -> str:
        return Checkpoint.config_text(self)

    def float_keys(self) -> list[str]:
        return self.inner.float_keys()

    def tensor(self, key: str) -> Tensor:
        return self.inner.tensor(key)

    def params(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        if name not in self._specs:
            return self.inner.params(name)
        q = self.record(name)
        return q.scale, q.zero, q.g_idx

    def record(self, name: str) -> QuantizedWeight:
        if name not in self._specs:
            return self.inner.record(name)
        key = (self._source[name], layout_key(self._specs[name]))  # an int8 head of a tied model: rounded once
        if key not in self._records:
            q = round_table(name, self.inner.tensor(self._source[name]), self._specs[name])
            self._records[key] = in_blocks(q, self._specs[name], self.block)
        return self._records[key]

    def write_side_files(self, out: Path) -> None:
        self.inner.write_side_files(out)

    def vocabulary_dir(self, scratch: Path) -> Path:
        return self.inner.vocabulary_dir(scratch)


def with_quantized_head(ckpt: Checkpoint, mode: str, adapter, fmt: OutputFormat) -> Checkpoint:
    """``ckpt`` as ``fmt`` writes it under ``--quantize-head mode`` (``ckpt`` itself for ``none``)."""
    if mode == "none":
        return ckpt
    check_head_format(fmt, mode)
    if adapter.stream is None:
        raise TritonqError(f"--quantize-head is not supported for {adapter.family} models of this kind "
                           "(no declared embedding and lm_head); use --quantize-head none")
    if fmt.head_note:
        warn(f"--quantize-head with --format {fmt.name}: {fmt.head_note}")
    return HeadCheckpoint(ckpt, mode, adapter.stream.embedding, adapter.stream.lm_head, fmt.head_block, fmt.head_note)
