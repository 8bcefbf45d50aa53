"""GGUF export for llama.cpp and ollama: tritonq's 4-bit, group-32 grids as Q4_1 / Q4_0 blocks.

A tritonq grid with 32 input weights per group is a ggml 4-bit block, so GPTQ, AWQ or BoA weights go
into a GGUF file without re-quantizing (``tritonq pack SRC --format gguf``, ``tritonq quantize --format
gguf``; the output directory holds one file, :data:`GGUF_FILE`):

* asymmetric grids, ``w = s * (q - z)``, are **Q4_1** blocks, ``w = d * q + m`` with ``d = s`` and
  ``m = -s * z``. Our scales are fp16 values, so ``d`` is exact; ``m`` is rounded to fp16 (ggml stores
  both halves), which moves all 32 weights of a block by the same ``|delta| <= 2^-11 |s z|``;
* symmetric grids have ``z = 8`` for every group, which is exactly Q4_0's fixed offset
  (``w = d * (q - 8)``), so they are **Q4_0** blocks with ``d = s``, bit exact.

Block layout (ggml ``block_q4_0`` / ``block_q4_1``, the ``gguf`` package's ``quants.py`` reads them the
same way): fp16 ``d`` (Q4_1: then fp16 ``m``), then 16 bytes whose byte ``j`` holds the code of weight
``j`` in its low nibble and of weight ``j + 16`` in its high nibble; blocks run along a row (the input
dimension), rows follow each other.

Everything else is written as llama.cpp's own converter (``convert_hf_to_gguf.py``, ``LlamaModel``)
writes a Llama checkpoint, through the ``gguf`` package: the ``llama.*`` hyper-parameters, the byte-level
BPE vocabulary (``tokenizer.ggml.model = gpt2``, the pre-tokenizer name llama.cpp knows, tokens with their
types, merges, special ids, chat template via ``gguf.SpecialVocab``), norms and 1-D tensors in F32 and the
other float matrices (embeddings, an untied ``lm_head``) in F16 (BF16 for a bf16 model), as the converter's
default ``--outtype auto`` does. ``q_proj`` / ``k_proj`` rows are permuted as the converter permutes them
for llama.cpp's rotary layout (pairs ``(i, i + head_dim/2)`` of a head become adjacent rows); a row
permutation leaves the blocks of each row intact, so codes, scales and zero points move with their row.

Where this differs from the converter: the pre-tokenizer name is read from the structure of
``tokenizer.json`` (the converter hashes the tokens of a test string), and only the structures listed in
:func:`pre_tokenizer_name` are accepted. Anything this writer cannot represent exactly - other bit widths or
group sizes, group act-order, other architectures, RoPE scaling, biases, SentencePiece vocabularies - is a
:class:`~tritonq.errors.TritonqError` before any work starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...errors import TritonqError, warn
from ..grid import GridSpec
from ..outputs import atomic_file, atomic_output_dir

GGUF_FILE = "model.gguf"
BLOCK = 32  # weights per Q4_0 / Q4_1 block (ggml QK4_0 = QK4_1 = 32)
Q4_0_OFFSET = 8  # Q4_0 dequantizes (q - 8) * d: our symmetric zero point at 4 bits
ARCHITECTURES = {"llama": "llama"}  # HF model_type -> GGUF general.architecture
ROPE_PERMUTED = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}
# Llama 3's split pattern as its tokenizer.json spells it (llama.cpp pre-tokenizer "llama-bpe")
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise TritonqError("--format gguf needs the gguf package: pip install 'tritonq[gguf]'") from None
    return gguf


# ---------------------------------------------------------------------------------------------------
# checks, before any work


def check_gguf_grid(spec: GridSpec, act_order_groups: str | None = None) -> None:
    """Refuse a grid that is not a ggml 4-bit block (32 weights, fixed order) with the fix in the message."""
    if spec.bits != 4 or spec.group_size != BLOCK:
        raise TritonqError(
            f"GGUF Q4_0/Q4_1 blocks hold {BLOCK} weights at 4 bits; this grid has {spec.bits} bits and group "
            f"size {spec.group_size}. Quantize with --bits 4 --group-size {BLOCK} for --format gguf, or choose "
            "--format compressed-tensors / gptq_v2 for this grid"
        )
    if act_order_groups == "dynamic":
        raise TritonqError(
            "GGUF blocks are 32 consecutive input weights and cannot hold group act-order (--act-order dynamic, "
            "a non-monotonic g_idx); use --act-order static (the default) or none for --format gguf"
        )


def _rope_theta(config: Mapping) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}  # the older spelling (transformers < 5)
    types = {params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None, "default"}
    if types:
        rope_type = sorted(types)[0]
        raise TritonqError(
            f"GGUF export writes plain RoPE; this model uses rope_type {rope_type!r} (RoPE scaling), which it "
            "does not convert yet. Export the fake-quantized output with llama.cpp's convert_hf_to_gguf.py instead"
        )
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta)


def check_gguf_model(config: Mapping) -> None:
    """Refuse an architecture (or a Llama variant) this writer does not lay out exactly."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise TritonqError(
            f"GGUF export supports the architectures {', '.join(ARCHITECTURES)}; this model is {model_type!r}. "
            "Choose --format compressed-tensors or gptq_v2, or convert the fake-quantized output with "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise TritonqError(
                f"GGUF export does not write Llama biases yet ({flag} is set in config.json); choose --format "
                "compressed-tensors or gptq_v2"
            )
    _rope_theta(config)


def pre_tokenizer_name(tokenizer_json: Mapping) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the pre-tokenizer of a byte-level BPE ``tokenizer.json``.

    Recognised: ByteLevel with GPT-2's pattern (``gpt-2``); Digits(individual) then ByteLevel (``smollm``,
    which splits digits first); Llama 3's Split then ByteLevel without its own pattern (``llama-bpe``).
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TritonqError(
            f"GGUF export writes byte-level BPE vocabularies (llama.cpp 'gpt2'); this tokenizer is "
            f"{model.get('type')!r}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}."
            " Convert the fake-quantized output with llama.cpp's convert_hf_to_gguf.py instead"
        )
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and parts[1].get("use_regex", True)):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True)
            and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT):
        return "llama-bpe"
    raise TritonqError(
        f"GGUF export does not know llama.cpp's name for this pre-tokenizer ({json.dumps(pre)[:200]}); "
        "it recognises GPT-2 byte-level, SmolLM (digits, then byte-level) and Llama 3. Convert the "
        "fake-quantized output with llama.cpp's convert_hf_to_gguf.py instead"
    )


def tokenizer_json_of(tokenizer) -> dict:
    """The ``tokenizer.json`` content of a loaded fast tokenizer; an error for a slow (Python) one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TritonqError(
            "GGUF export writes the vocabulary from a fast (tokenizers) tokenizer; this model's tokenizer is "
            f"{type(tokenizer).__name__}. Convert the fake-quantized output with llama.cpp's convert_hf_to_gguf.py"
        )
    return json.loads(backend.to_str())


def check_gguf_request(spec: GridSpec, config: Mapping, tokenizer_json: Mapping | None = None,
                       act_order_groups: str | None = None) -> None:
    """Everything ``--format gguf`` needs, checked from the config and tokenizer before calibration starts."""
    _gguf()
    check_gguf_grid(spec, act_order_groups)
    check_gguf_model(config)
    if tokenizer_json is not None:
        pre_tokenizer_name(tokenizer_json)


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
                permute: Tensor | None = None) -> _Planned:
    q = gguf.GGMLQuantizationType
    is_norm = tensor.dim() <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight")
    qtype = q.F32 if is_norm else _matrix_type(model_dtype, gguf, out_type)
    if qtype == q.F16 and tensor.is_floating_point() and tensor.abs().max() > torch.finfo(torch.float16).max:
        warn(f"{gname} has values beyond the fp16 range; writing it as F32")
        qtype = q.F32
    itemsize = 4 if qtype == q.F32 else 2

    def make() -> np.ndarray:
        t = tensor if permute is None else tensor[permute]
        return _float_array(t.contiguous(), qtype, gguf)

    return _Planned(gname, tuple(tensor.shape), qtype, tensor.numel() * itemsize, make)


def _q4_plan(gname: str, q, sym: bool, gguf, permute: Tensor | None, layer: str) -> _Planned:
    from .packed import _is_default_g_idx

    n, k = q.shape
    if not _is_default_g_idx(q.g_idx, BLOCK):
        raise TritonqError(
            f"{layer}: its g_idx is not k // {BLOCK} (group act-order); GGUF blocks are 32 consecutive weights. "
            "Re-quantize with --act-order static or none for --format gguf"
        )
    qtype = gguf.GGMLQuantizationType.Q4_0 if sym else gguf.GGMLQuantizationType.Q4_1
    per_block = 18 if sym else 20

    def make() -> np.ndarray:
        codes, scale, zero = q.codes, q.scale, q.zero
        if permute is not None:
            codes, scale, zero = codes[permute], scale[permute], zero[permute]
        return q4_blocks(codes, scale, zero, sym, layer)

    return _Planned(gname, (n, k), qtype, n * (k // BLOCK) * per_block, make)


def _tokenizer_json(directory: Path) -> dict:
    f = directory / "tokenizer.json"
    if not f.is_file():
        raise TritonqError(
            f"{directory} has no tokenizer.json; GGUF export writes the vocabulary from a fast (tokenizers) "
            "tokenizer saved beside the weights"
        )
    return json.loads(f.read_text(encoding="utf-8"))


def _add_vocab(writer, directory: Path, vocab_size: int, gguf) -> None:
    """Tokens, types, merges, special ids, BOS/EOS habits and chat template, as the converter's gpt2 path."""
    from transformers import AutoTokenizer

    pre = pre_tokenizer_name(_tokenizer_json(directory))
    tok = AutoTokenizer.from_pretrained(str(directory))
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise TritonqError(f"the tokenizer has ids up to {max(vocab.values())}, beyond vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    types = gguf.TokenType
    tokens, kinds = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is wider than the vocabulary: padding rows
            tokens.append(f"[PAD{i}]")
            kinds.append(types.UNUSED)
        else:
            tokens.append(by_id[i])
            kinds.append((types.CONTROL if added[i].special else types.USER_DEFINED) if i in added else types.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    special = gguf.SpecialVocab(str(directory), load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise TritonqError(f"{directory}/tokenizer.json has no BPE merges; llama.cpp cannot load a gpt2 vocabulary "
                           "without them")
    # what the tokenizer really does, rather than a flag some tokenizer_config files omit
    probe = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    special.add_special_token["bos"] = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] \
        and plain[:1] != [tok.bos_token_id]
    special.add_special_token["eos"] = tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id] \
        and plain[-1:] != [tok.eos_token_id]
    special.add_to_gguf(writer, quiet=True)


def _add_hparams(writer, config: Mapping, gguf, file_type: int) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_type("model")
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(file_type)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_file(path: Path, config: Mapping, vocab_dir: Path, name: str, plans: list[_Planned], file_type: int,
                extra: Mapping[str, object], gguf) -> None:
    """Header, metadata and tensor infos first, then each tensor produced and written one at a time."""
    writer = gguf.GGUFWriter(str(path), ARCHITECTURES[config["model_type"]])
    writer.add_name(name)
    writer.add_quantized_by("tritonq")
    _add_hparams(writer, config, gguf, file_type)
    _add_vocab(writer, vocab_dir, int(config["vocab_size"]), gguf)
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


def _float_plans(store, config: Mapping, skip: set[str], model_dtype: torch.dtype, gguf,
                 out_type: str | None) -> Iterator[_Planned]:
    name_map = _tensor_name_map(config, gguf)
    tied = bool(config.get("tie_word_embeddings"))
    for key in store.keys():
        if key in skip or (tied and key == "lm_head.weight"):
            continue
        if key.endswith(".bias"):
            raise TritonqError(f"{key}: GGUF export does not write biases yet; choose --format compressed-tensors")
        tensor = store.get(key)
        yield _float_plan(_gguf_name(name_map, key), tensor, model_dtype, gguf, out_type, _row_order(key, config))


def save_gguf(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    layers: Mapping[str, object] | None = None,
) -> Path:
    """Write a tritonq output directory (``--format fake``) as ``out_dir/model.gguf`` (Q4_1 or Q4_0 blocks).

    The integer records come from ``layers`` when given, else from ``quant_params.safetensors`` (rebuilt bit
    exactly, as for every packed format). All checks run before the file is started; the directory appears
    atomically. Returns the output directory.
    """
    from ... import __version__
    from .packed import (
        GGUF_FORMAT,
        TensorStore,
        _check_layer,
        _model_dtype,
        read_source,
        source_layers,
        write_packed_record,
    )

    gguf = _gguf()
    config, spec, meta = read_source(src_dir)
    src = Path(src_dir)
    check_gguf_request(spec, config, _tokenizer_json(src), meta.get("act_order_groups"))
    if meta.get("activations"):
        warn("GGUF has no setting for activation quantization; llama.cpp runs the weights with its own "
             "activation handling (8-bit blocks for Q4 dot products on the CPU)")
    names = list(meta["layers"])
    if layers is None:
        quantized = dict(source_layers(src, spec, names))
    else:
        if set(layers) != set(names):
            raise TritonqError(f"the records passed to save_gguf and {src}/quantization.json name different layers")
        for name in names:
            _check_layer(name, layers[name], spec)
        quantized = {name: layers[name] for name in names}
    name_map = _tensor_name_map(config, gguf)
    plans = [
        _q4_plan(_gguf_name(name_map, f"{name}.weight"), q, spec.sym, gguf, _row_order(f"{name}.weight", config), name)
        for name, q in quantized.items()
    ]
    for name, q in quantized.items():
        if q.bias is not None:
            raise TritonqError(f"{name}: GGUF export does not write biases yet; choose --format compressed-tensors")
    store = TensorStore(src)
    plans += list(_float_plans(store, config, {f"{n}.weight" for n in quantized}, _model_dtype(config), gguf, None))
    plans.sort(key=lambda p: _block_sort_key(p.name))
    file_type = gguf.LlamaFileType.MOSTLY_Q4_0 if spec.sym else gguf.LlamaFileType.MOSTLY_Q4_1
    grid = f"{spec.bits}-bit g{spec.group_size} {'sym' if spec.sym else 'asym'}"
    title = f"{meta.get('model', src.name)} tritonq {meta.get('method', '')} {grid}".replace("  ", " ")
    extra = {"tritonq.version": __version__, "tritonq.method": str(meta.get("method", "")),
             "tritonq.bits": spec.bits, "tritonq.group_size": spec.group_size, "tritonq.sym": spec.sym}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        _write_file(tmp / GGUF_FILE, config, src, title, plans, int(file_type), extra, gguf)
        write_packed_record(tmp, meta, GGUF_FORMAT)
    return Path(out_dir)


def save_float_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, out_type: str = "f32",
                    overwrite: bool = False, name: str | None = None) -> Path:
    """A float Hugging Face Llama checkpoint as one GGUF file (F32, F16 or BF16 matrices; norms F32).

    The same layout as :func:`save_gguf` without quantized blocks: the input of llama.cpp's own quantizer
    (``llama_model_quantize``) for side-by-side comparisons. Written to a temporary file, then renamed.
    """
    from .packed import TensorStore, _model_dtype

    gguf = _gguf()
    src = Path(model_dir)
    config = json.loads((src / "config.json").read_text())
    check_gguf_model(config)
    pre_tokenizer_name(_tokenizer_json(src))
    if out_type not in ("f32", "f16", "bf16"):
        raise TritonqError(f"out_type must be f32, f16 or bf16, got {out_type!r}")
    out = Path(out_file)
    if out.exists() and not overwrite:
        raise TritonqError(f"{out} exists; pass overwrite=True or choose another path")
    plans = sorted(_float_plans(TensorStore(src), config, set(), _model_dtype(config), gguf, out_type),
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
