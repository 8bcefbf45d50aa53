"""GGUF export for llama.cpp and ollama: tritonq grids of 32 input weights as ggml Q4_0 / Q4_1 / Q8_0 blocks.

A tritonq grid with 32 input weights per group is a ggml block, so GPTQ, AWQ or BoA weights go into a GGUF file
without re-quantizing (``tritonq pack SRC --format gguf``, ``tritonq quantize --format gguf``; the output
directory holds one file, :data:`GGUF_FILE`). Each tensor gets the ggml type of its own grid:

* asymmetric 4-bit grids, ``w = s * (q - z)``, are **Q4_1** blocks, ``w = d * q + m`` with ``d = s`` and
  ``m = -s * z``. Our scales are fp16 values, so ``d`` is exact; ``m`` is rounded to fp16 (ggml stores both
  halves), which moves all 32 weights of a block by the same ``|delta| <= 2^-11 |s z|``;
* symmetric 4-bit grids have ``z = 8`` for every group, exactly Q4_0's fixed offset (``w = d * (q - 8)``), so
  they are **Q4_0** blocks with ``d = s``, bit exact;
* symmetric 8-bit grids (``z = 128``) are **Q8_0** blocks, ``w = d * (q - 128)`` with the signed code stored,
  bit exact. ggml has no 8-bit block with a zero point in files, so asymmetric 8-bit grids are refused.

Block layout (ggml ``block_q4_0`` / ``block_q4_1`` / ``block_q8_0``; the ``gguf`` package's ``quants.py`` reads
them the same way): fp16 ``d`` (Q4_1: then fp16 ``m``), then the codes: for Q4 16 bytes whose byte ``j`` holds
weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble, for Q8_0 32 int8. Blocks run along a row
(the input dimension), rows follow each other. Norms and 1-D tensors are F32, other float matrices F16 (BF16 for
a bf16 model), as the converter's ``--outtype auto``; ``q_proj`` / ``k_proj`` rows are permuted as the converter
permutes them for llama.cpp's rotary layout (pairs ``(i, i + head_dim/2)`` of a head become adjacent rows); a row
permutation leaves the blocks of each row intact. Vocabulary, hyper-parameters and the checks are in
:mod:`~tritonq.engine.formats.gguf_vocab`.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ...errors import TritonqError, warn
from ..grid import GridSpec
from ..outputs import atomic_file
from .base import OutputFormat, distinct_grids, write_packed_record
from .gguf_vocab import (
    ARCHITECTURES,
    BLOCK,
    add_hparams,
    add_vocab,
    check_gguf_grid,
    check_gguf_model,
    ggml_type_name,
    gguf_lib,
    pre_tokenizer_name,
    tokenizer_json_in,
)
from .records import is_default_g_idx, model_dtype
from .store import TensorStore

if TYPE_CHECKING:
    from .base import FormatRequest
    from .checkpoint import Checkpoint

GGUF_FILE = "model.gguf"
Q4_0_OFFSET = 8  # Q4_0 dequantizes (q - 8) * d: our symmetric zero point at 4 bits
Q8_0_OFFSET = 128  # Q8_0 stores signed codes: our symmetric zero point at 8 bits
ROPE_PERMUTED = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 weights


# ---------------------------------------------------------------------------------------------------
# blocks


def rope_row_order(rows: int, heads: int) -> Tensor:
    """Old row index of every new row of llama.cpp's rotary layout (``convert_hf_to_gguf`` ``permute``).

    Within a head of ``d`` rows, new row ``2 i + j`` (``i < d/2``, ``j`` in 0, 1) is old row ``j d/2 + i``:
    the halves that HF's ``rotate_half`` pairs become adjacent, as ggml's rope rotates neighbours.
    """
    if rows % (2 * heads):
        raise TritonqError(f"{rows} rows do not split into {heads} heads of an even size")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def q4_blocks(codes: Tensor, scale: Tensor, zero: Tensor, sym: bool, name: str = "layer") -> np.ndarray:
    """Q4_0 (``sym``) or Q4_1 blocks of codes [N, K] with one scale and zero per 32 weights: uint8 [N, K/32*B].

    Q4_0: ``d = scale`` (exact, our scales are fp16 values); Q4_1: ``d = scale``, ``m = -scale * zero``
    rounded to fp16 (``B`` = 18 or 20 bytes per block).
    """
    n, k = codes.shape
    if k % BLOCK or tuple(scale.shape) != (n, k // BLOCK) or tuple(zero.shape) != (n, k // BLOCK):
        raise TritonqError(f"{name}: GGUF blocks need in_features % {BLOCK} == 0 and one scale per block")
    d = scale.double().to(torch.float16)
    if not torch.equal(d.double(), scale.double()):
        raise TritonqError(f"{name}: scales are not fp16 values; re-run 'tritonq quantize' to get a packable output")
    c = codes.to(torch.int64).reshape(n, k // BLOCK, BLOCK)
    qs = (c[..., : BLOCK // 2] | (c[..., BLOCK // 2 :] << 4)).to(torch.uint8)  # [N, G, 16]
    halves = [d]
    if sym:
        if not bool((zero == Q4_0_OFFSET).all()):
            raise TritonqError(f"{name}: a symmetric grid for Q4_0 needs every zero point at {Q4_0_OFFSET}")
    else:
        halves.append((-scale.double() * zero.double()).to(torch.float16))
    head = torch.stack(halves, dim=-1).contiguous().view(torch.uint8)  # [N, G, 2 or 4] little-endian halves
    return torch.cat([head, qs], dim=-1).reshape(n, -1).numpy()


def q8_blocks(codes: Tensor, scale: Tensor, zero: Tensor, name: str = "layer") -> np.ndarray:
    """Q8_0 blocks of 8-bit codes [N, K] with one scale per 32 weights (zero 128): uint8 [N, K/32*34].

    ``d = scale`` (exact, fp16 values), then the 32 signed codes ``q - 128`` as int8."""
    n, k = codes.shape
    if k % BLOCK or tuple(scale.shape) != (n, k // BLOCK) or tuple(zero.shape) != (n, k // BLOCK):
        raise TritonqError(f"{name}: GGUF blocks need in_features % {BLOCK} == 0 and one scale per block")
    if not bool((zero == Q8_0_OFFSET).all()):
        raise TritonqError(f"{name}: a symmetric grid for Q8_0 needs every zero point at {Q8_0_OFFSET}")
    d = scale.double().to(torch.float16)
    if not torch.equal(d.double(), scale.double()):
        raise TritonqError(f"{name}: scales are not fp16 values; re-run 'tritonq quantize' to get a packable output")
    qs = (codes.to(torch.int16) - Q8_0_OFFSET).to(torch.int8).reshape(n, k // BLOCK, BLOCK).view(torch.uint8)
    head = d.unsqueeze(-1).contiguous().view(torch.uint8)  # [N, G, 2] little-endian half
    return torch.cat([head, qs], dim=-1).reshape(n, -1).numpy()


# ---------------------------------------------------------------------------------------------------
# the file


@dataclass
class _Planned:
    """One tensor of the file: its GGUF name, numpy shape, ggml type, size and how to produce its bytes."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    make: Callable[[], np.ndarray]


def _float_array(t: Tensor, qtype, gguf) -> np.ndarray:
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return t.float().numpy()
    if qtype == q.F16:
        return t.to(torch.float16).numpy()
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)  # BF16: raw 16-bit patterns


def _matrix_type(model_dtype: torch.dtype, gguf, out_type: str | None = None):
    """The ggml type of float matrices: the converter's ``--outtype auto`` (BF16 for bf16, else F16)."""
    q = gguf.GGMLQuantizationType
    if out_type is not None:
        return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16}[out_type]
    return q.BF16 if model_dtype == torch.bfloat16 else q.F16


def _float_plan(gname: str, tensor: Tensor, model_dtype: torch.dtype, gguf, out_type: str | None,
                permute: Tensor | None = None, reread: Callable[[], Tensor] | None = None) -> _Planned:
    """``reread``: how to get the tensor again when the file reaches it, so the plan does not hold it (the
    float tensors of a big model -- embeddings, lm_head -- would otherwise sit in memory for the whole write)."""
    q = gguf.GGMLQuantizationType
    is_norm = tensor.dim() <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight")
    qtype = q.F32 if is_norm else _matrix_type(model_dtype, gguf, out_type)
    if qtype == q.F16 and tensor.is_floating_point() and tensor.abs().max() > torch.finfo(torch.float16).max:
        warn(f"{gname} has values beyond the fp16 range; writing it as F32")
        qtype = q.F32
    itemsize = 4 if qtype == q.F32 else 2
    held = tensor if reread is None else None

    def make() -> np.ndarray:
        t = held if reread is None else reread()
        t = t if permute is None else t[permute]
        return _float_array(t.contiguous(), qtype, gguf)

    return _Planned(gname, tuple(tensor.shape), qtype, tensor.numel() * itemsize, make)


def _quant_plan(gname: str, name: str, ckpt: Checkpoint, spec: GridSpec, gguf,
                permute: Tensor | None) -> _Planned:
    """The plan of one quantized linear: its shape and block type from its grid parameters, its bytes (the
    record rebuilt from the grid, then the blocks) only when the file reaches it."""
    scale, _, g_idx = ckpt.params(name)
    n, k = scale.shape[0], g_idx.numel()
    if not is_default_g_idx(g_idx, BLOCK):
        raise TritonqError(
            f"{name}: its g_idx is not k // {BLOCK} (group act-order); GGUF blocks are 32 consecutive weights. "
            "Re-quantize with --act-order static or none for --format gguf"
        )
    kind = ggml_type_name(spec)
    check_gguf_grid(spec)

    def make() -> np.ndarray:
        q = ckpt.record(name)
        codes, scale, zero = q.codes, q.scale, q.zero
        if permute is not None:
            codes, scale, zero = codes[permute], scale[permute], zero[permute]
        if kind == "Q8_0":
            return q8_blocks(codes, scale, zero, name)
        return q4_blocks(codes, scale, zero, spec.sym, name)

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    return _Planned(gname, (n, k), qtype, n * (k // BLOCK) * _BLOCK_BYTES[kind], make)


def _write_file(path: Path, config: Mapping, vocab_dir: Path, name: str, plans: list[_Planned], file_type: int,
                extra: Mapping[str, object], gguf) -> None:
    """Header, metadata and tensor infos first, then each tensor produced and written one at a time."""
    writer = gguf.GGUFWriter(str(path), ARCHITECTURES[config["model_type"]])
    writer.add_name(name)
    writer.add_quantized_by("tritonq")
    add_hparams(writer, config, gguf, file_type)
    add_vocab(writer, vocab_dir, int(config["vocab_size"]), gguf)
    for key, value in extra.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    dtypes = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    for p in plans:
        if p.qtype in dtypes:
            writer.add_tensor_info(p.name, p.shape, np.dtype(dtypes[p.qtype]), p.nbytes)
        else:  # raw bytes with their ggml type: shape in elements, as gguf's quant_shape_from_byte_shape gives
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in plans:
        data = p.make()
        if data.nbytes != p.nbytes:
            raise TritonqError(f"{p.name}: produced {data.nbytes} bytes, planned {p.nbytes} (a tritonq bug)")
        writer.write_tensor_data(data)
    writer.close()


def _tensor_name_map(config: Mapping, gguf):
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))


def _gguf_name(name_map, key: str) -> str:
    gname = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise TritonqError(f"tensor {key!r} has no GGUF name in the llama layout; GGUF export cannot place it")
    return gname


def _row_order(key: str, config: Mapping) -> Tensor | None:
    """The rotary row permutation of a q_proj / k_proj weight, None for every other tensor."""
    module = key.removesuffix(".weight")
    for leaf, heads_key in ROPE_PERMUTED.items():
        if module.endswith("." + leaf):
            heads = int(config.get(heads_key) or config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
            return rope_row_order(heads * head_dim, heads)
    return None


def _float_plans(keys: list[str], get: Callable[[str], Tensor], config: Mapping, skip: set[str],
                 dtype: torch.dtype, gguf, out_type: str | None) -> Iterator[_Planned]:
    name_map = _tensor_name_map(config, gguf)
    tied = bool(config.get("tie_word_embeddings"))
    for key in keys:
        if key in skip or (tied and key == "lm_head.weight"):
            continue
        if key.endswith(".bias"):
            raise TritonqError(f"{key}: GGUF export does not write biases yet; choose --format compressed-tensors")
        yield _float_plan(_gguf_name(name_map, key), get(key), dtype, gguf, out_type, _row_order(key, config),
                          reread=functools.partial(get, key))


class GgufFormat(OutputFormat):
    """``--format gguf``: one ``model.gguf`` of ggml blocks, a tensor type per layer grid (Q4_0, Q4_1, Q8_0)."""

    name = "gguf"
    head_block = BLOCK  # --quantize-head: output.weight / token_embd.weight as Q8_0 (or Q4_1) blocks

    def check(self, request: FormatRequest) -> None:
        gguf_lib()
        for spec in distinct_grids(request.layer_grids.values()):
            check_gguf_grid(spec, request.act_order_groups)
        check_gguf_model(request.config)
        if request.activations is not None:  # llama.cpp would run it weight-only: a different model, said up front
            raise TritonqError(f"GGUF has no setting for activation quantization ({request.activations.bits}-bit "
                               f"{request.activations.scheme} inputs); "
                               "llama.cpp would run these weights on unquantized inputs. Use --format "
                               "compressed-tensors for a W4A8/W8A8 model, or quantize without --act-bits "
                               "(and with a weight-only method, not AWRQ or SmoothQuant)")
        if request.tokenizer_json is None:
            raise TritonqError("GGUF export writes the vocabulary from a fast (tokenizers) tokenizer; this model has "
                               "none. Convert the fake-quantized output with llama.cpp's convert_hf_to_gguf.py")
        pre_tokenizer_name(request.tokenizer_json)

    def write(self, ckpt: Checkpoint, out: Path, shard_bytes: int | None = None, float_type: str | None = None) -> None:
        """All checks run before the file is started; a quantized layer's record is rebuilt when its turn comes.

        ``float_type`` (f32, f16, bf16): the type of the float matrices (embeddings, lm_head) instead of the
        converter's ``--outtype auto``; ``bench decode`` writes them in the dtype its packed side runs."""
        from ... import __version__

        if shard_bytes is not None:
            raise TritonqError("GGUF is written as one file; a shard size applies to the safetensors formats only")
        gguf = gguf_lib()
        config, meta = ckpt.config, ckpt.meta
        with tempfile.TemporaryDirectory(prefix="tritonq-vocab-") as scratch:
            vocab_dir = ckpt.vocabulary_dir(Path(scratch))
            pre_tokenizer_name(tokenizer_json_in(vocab_dir))
            check_gguf_model(config)
            for spec in distinct_grids(ckpt.grids.values()):
                check_gguf_grid(spec, meta.get("act_order_groups"))
            if meta.get("activations"):  # 'tritonq pack' of such an output: the preflight of quantize refuses it
                warn("GGUF has no setting for activation quantization; llama.cpp runs the weights with its own "
                     "activation handling (8-bit blocks for Q4 dot products on the CPU)")
            keys = ckpt.float_keys()
            for name in ckpt.grids:
                if f"{name}.bias" in keys:
                    raise TritonqError(f"{name}: GGUF export does not write biases yet; choose --format "
                                       "compressed-tensors")
            name_map = _tensor_name_map(config, gguf)
            plans = [_quant_plan(_gguf_name(name_map, f"{name}.weight"), name, ckpt, spec, gguf,
                                 _row_order(f"{name}.weight", config))
                     for name, spec in ckpt.grids.items()]
            skip = {f"{n}.weight" for n in ckpt.grids}
            plans += list(_float_plans(keys, ckpt.tensor, config, skip, model_dtype(config), gguf, float_type))
            plans.sort(key=lambda p: _block_sort_key(p.name))
            bits, group_size, sym = int(meta["bits"]), int(meta["group_size"]), bool(meta["sym"])
            file_type = gguf.LlamaFileType.MOSTLY_Q4_0 if sym else gguf.LlamaFileType.MOSTLY_Q4_1
            grid = f"{bits}-bit g{group_size} {'sym' if sym else 'asym'}"
            title = f"{meta.get('model', ckpt.label)} tritonq {meta.get('method', '')} {grid}".replace("  ", " ")
            extra = {"tritonq.version": __version__, "tritonq.method": str(meta.get("method", "")),
                     "tritonq.bits": bits, "tritonq.group_size": group_size, "tritonq.sym": sym}
            _write_file(out / GGUF_FILE, config, vocab_dir, title, plans, int(file_type), extra, gguf)
        write_packed_record(out, meta, self.name)


def save_float_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, out_type: str = "f32",
                    overwrite: bool = False, name: str | None = None) -> Path:
    """A float Hugging Face Llama checkpoint as one GGUF file (F32, F16 or BF16 matrices; norms F32).

    The same layout as :class:`GgufFormat` without quantized blocks: the input of llama.cpp's own quantizer
    (``llama_model_quantize``) for side-by-side comparisons. Written to a temporary file, then renamed.
    """
    gguf = gguf_lib()
    src = Path(model_dir)
    config = json.loads((src / "config.json").read_text())
    check_gguf_model(config)
    pre_tokenizer_name(tokenizer_json_in(src))
    if out_type not in ("f32", "f16", "bf16"):
        raise TritonqError(f"out_type must be f32, f16 or bf16, got {out_type!r}")
    out = Path(out_file)
    if out.exists() and not overwrite:
        raise TritonqError(f"{out} exists; pass overwrite=True or choose another path")
    store = TensorStore(src)
    plans = sorted(_float_plans(store.keys(), store.get, config, set(), model_dtype(config), gguf, out_type),
                   key=lambda p: _block_sort_key(p.name))
    ft = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type]
    with atomic_file(out) as tmp:
        _write_file(tmp, config, src, name or src.name, plans, int(ft), {}, gguf)
    return out


def _block_sort_key(gname: str) -> tuple:
    """Global tensors first, then blocks in numeric order (the converter's order, readable in dumps)."""
    parts = gname.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0, 0, gname)
