"""What a GGUF file needs besides the weights, and the checks before any work: llama.cpp's vocabulary and
hyper-parameters, written as llama.cpp's own converter (``convert_hf_to_gguf.py``, ``LlamaModel``) writes them
through the ``gguf`` package.

The vocabulary is byte-level BPE (``tokenizer.ggml.model = gpt2``): tokens with their types, merges, special
ids, BOS/EOS habits and chat template (``gguf.SpecialVocab``). Where this differs from the converter: the
pre-tokenizer name is read from the structure of ``tokenizer.json`` (the converter hashes the tokens of a test
string), and only the structures listed in :func:`pre_tokenizer_name` are accepted. Anything the writer cannot
represent exactly - grids other than ggml's blocks, group act-order, other architectures, RoPE scaling, biases,
SentencePiece vocabularies - is a :class:`~tritonq.errors.TritonqError` before calibration starts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ...errors import TritonqError
from ..grid import GridSpec

BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block (ggml QK4_0 = QK4_1 = QK8_0 = 32)
ARCHITECTURES = {"llama": "llama"}  # HF model_type -> GGUF general.architecture
# Llama 3's split pattern as its tokenizer.json spells it (llama.cpp pre-tokenizer "llama-bpe")
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def gguf_lib():
    try:
        import gguf
    except ImportError:
        raise TritonqError("--format gguf needs the gguf package: pip install 'tritonq[gguf]'") from None
    return gguf


def ggml_type_name(spec: GridSpec) -> str | None:
    """The ggml block type that holds a grid exactly, None when none does: 4-bit g32 symmetric is Q4_0
    (``w = d (q - 8)``), asymmetric Q4_1 (``w = d q + m``), 8-bit g32 symmetric Q8_0 (``w = d q``, q signed)."""
    if spec.group_size != BLOCK:
        return None
    if spec.bits == 4:
        return "Q4_0" if spec.sym else "Q4_1"
    if spec.bits == 8 and spec.sym:
        return "Q8_0"
    return None


def check_gguf_grid(spec: GridSpec, act_order_groups: str | None = None) -> None:
    """Refuse a grid that is not a ggml block (32 weights, fixed order) with the fix in the message."""
    if ggml_type_name(spec) is None:
        raise TritonqError(
            f"GGUF Q4_0/Q4_1 blocks hold {BLOCK} weights at 4 bits; this grid has {spec.bits} bits and group "
            f"size {spec.group_size}. Quantize with --bits 4 --group-size "
            f"{BLOCK} for --format gguf (8-bit layers fit Q8_0 when symmetric with group size {BLOCK}), or choose "
            "--format compressed-tensors / gptq_v2 for this grid"
        )
    if act_order_groups == "dynamic":
        raise TritonqError(
            "GGUF blocks are 32 consecutive input weights and cannot hold group act-order (--act-order dynamic, "
            "a non-monotonic g_idx); use --act-order static (the default) or none for --format gguf"
        )


def rope_theta(config: Mapping) -> float:
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
    rope_theta(config)


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


def tokenizer_json_in(directory: Path) -> dict:
    f = directory / "tokenizer.json"
    if not f.is_file():
        raise TritonqError(
            f"{directory} has no tokenizer.json; GGUF export writes the vocabulary from a fast (tokenizers) "
            "tokenizer saved beside the weights"
        )
    return json.loads(f.read_text(encoding="utf-8"))


def add_vocab(writer, directory: Path, vocab_size: int, gguf) -> None:
    """Tokens, types, merges, special ids, BOS/EOS habits and chat template, as the converter's gpt2 path."""
    from transformers import AutoTokenizer

    pre = pre_tokenizer_name(tokenizer_json_in(directory))
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


def add_hparams(writer, config: Mapping, gguf, file_type: int) -> None:
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
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(file_type)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
