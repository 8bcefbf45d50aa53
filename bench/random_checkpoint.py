"""Random Llama checkpoints of any shape, written tensor by tensor, for measuring big-model paths here.

``python -m tritonq.bench.random_checkpoint --layers 32 --hidden 4096 --intermediate 14336 --vocab 128256
--heads 32 --kv-heads 8 --dtype bfloat16 --out DIR`` writes Llama-3.1-8B's shape (about 16 GB) without ever
holding more than one tensor: each is drawn from N(0, 0.02) (norms are 1) with one seeded generator, in the
order ``save_pretrained`` writes them, and goes straight to disk through the streaming
:class:`~tritonq.engine.formats.store.ShardedWriter` in 5 GB shards under Hugging Face's names. ``config.json``
comes from ``LlamaConfig.save_pretrained``; the tokenizer is SmolLM2's (ids < 49152, so ``--vocab`` must be at
least that unless ``--no-tokenizer``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..engine.formats.store import ShardedWriter
from ..errors import TritonqError

SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size ("5GB")
ROWS_PER_DRAW = 4096  # rows drawn at a time: a float32 temporary stays small for a [128256, 4096] embedding


def llama_tensors(layers: int, hidden: int, intermediate: int, vocab: int, heads: int,
                  kv_heads: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Name and shape of every tensor of an untied Llama, in ``save_pretrained``'s order."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "mlp.gate_proj.weight", (intermediate, hidden)
        yield p + "mlp.up_proj.weight", (intermediate, hidden)
        yield p + "mlp.down_proj.weight", (hidden, intermediate)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """N(0, std) in ``dtype``, drawn a block of rows at a time (only ``dtype``'s bytes are held whole)."""
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(shape[0], -1)
    for start in range(0, shape[0], ROWS_PER_DRAW):
        block = rows[start:start + ROWS_PER_DRAW]
        block.copy_(torch.randn(block.shape, generator=gen).mul_(std))
    return out


def write_random_llama(out: Path, *, layers: int, hidden: int, intermediate: int, vocab: int, heads: int,
                       kv_heads: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0, tokenizer: bool = True,
                       max_positions: int = 4096, rope_theta: float = 10000.0,
                       shard_bytes: int = SHARD_BYTES) -> int:
    """Write the checkpoint; returns its tensor bytes."""
    from transformers import LlamaConfig

    if hidden % heads or heads % kv_heads:
        raise TritonqError(f"--hidden {hidden} must split into --heads {heads}, a multiple of --kv-heads {kv_heads}")
    tok = None
    if tokenizer:
        from ..engine.model_io import load_tokenizer

        tok = load_tokenizer("smollm2")
        if len(tok) > vocab:
            raise TritonqError(f"the SmolLM2 tokenizer has {len(tok)} ids but --vocab is {vocab}; "
                               f"pass --vocab >= {len(tok)} or --no-tokenizer")
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, rope_theta=rope_theta, tie_word_embeddings=False,
                         rms_norm_eps=1e-5)
    config.dtype = str(dtype).split(".")[1]
    config.architectures = ["LlamaForCausalLM"]
    gen = torch.Generator().manual_seed(seed)
    writer = ShardedWriter(out, shard_bytes)
    for name, shape in llama_tensors(layers, hidden, intermediate, vocab, heads, kv_heads):
        t = torch.ones(shape, dtype=dtype) if len(shape) == 1 else random_tensor(shape, dtype, gen)
        writer.add(name, t)
        del t
    writer.close()
    config.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return writer.total_bytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tritonq.bench.random_checkpoint", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--intermediate", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer (then any --vocab works)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    size = write_random_llama(Path(a.out), layers=a.layers, hidden=a.hidden, intermediate=a.intermediate,
                              vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads, dtype=getattr(torch, a.dtype),
                              seed=a.seed, tokenizer=not a.no_tokenizer, max_positions=a.max_positions,
                              rope_theta=a.rope_theta)
    print(f"wrote {size / 1e9:.2f} GB of tensors to {a.out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
