"""Tiny checkpoints for tests: a random Llama saved as a tritonq output directory (``--format fake``).

``make_fake_dir`` writes exactly what ``tritonq quantize`` writes (the contract in ``engine/formats.py``):
a Hugging Face checkpoint whose quantized linears lie on the grid, ``quantization.json`` and
``quant_params.safetensors``, plus a byte-level tokenizer with a chat template, so the generate and
serve paths can run on it. Everything is built offline in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tritonq.engine.grid import GridSpec, fit_groups, quantize_codes

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=259,
        max_position_embeddings=256,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
        dtype="float32",
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_tokenizer():
    """Byte-level BPE with no merges: 256 byte tokens + <s>, </s>, <pad> (ids 256, 257, 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llama(path: Path) -> Path:
    """A one-block random Llama (hidden 64, context 256) with the tiny tokenizer, saved at ``path``: the CLI
    tests' model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (Radford et al. 2019, ``encoder.py``)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def make_fake_dir(
    path: str | Path,
    *,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = False,
    act_order: bool = False,
    seed: int = 0,
    config_overrides: dict | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """Write a tiny random Llama fake-quantized with the tritonq grid; returns the directory.

    ``act_order=True`` forms groups over a random column permutation, so ``g_idx`` is non-monotonic
    (GPTQ ``desc_act``). Module names listed in ``skip`` stay float (not quantized).
    """
    from transformers import LlamaForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_config(**(config_overrides or {}))
    model = LlamaForCausalLM(config).eval()
    spec = GridSpec(bits=bits, group_size=group_size, sym=sym)
    params: dict[str, torch.Tensor] = {}
    names = []
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(config.num_hidden_layers):
        for leaf in LINEARS:
            name = f"model.layers.{i}.{leaf}"
            if name in skip:
                continue
            lin = model.get_submodule(name)
            w = lin.weight.data.float()
            n, k = w.shape
            g = k if group_size == -1 else group_size
            perm = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perm] = (torch.arange(k) // g).to(torch.int32)
            scale, zero = fit_groups(w[:, perm], spec, name)
            idx = g_idx.long()
            q = quantize_codes(w, scale[:, idx], zero[:, idx], spec.maxq)
            lin.weight.data = scale[:, idx] * (q - zero[:, idx])
            params[f"{name}.scale"] = scale.contiguous()
            params[f"{name}.zero"] = zero.contiguous()
            params[f"{name}.g_idx"] = g_idx
            names.append(name)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    save_file(params, str(path / "quant_params.safetensors"))
    meta = {
        "method": "rtn",
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "act_order": act_order,
        "tritonq_version": "test",
        "layers": names,
    }
    (path / "quantization.json").write_text(json.dumps(meta, indent=2))
    return path
