"""The rest of a CPU decode step beside the matmuls: RMSNorm, the SiLU-gated product, and attention of one new
token per row over that row's own KV cache, C++ (``cpu_attention.cpp``, built with :mod:`cpu_gemv`'s extension)
beside float64 PyTorch references.

At one token per row these tensors are tiny, so a step's cost outside the matmuls is the number of operator
calls, not arithmetic: transformers' Llama layer runs about fifty torch ops per token (norms, rotary, cache
concatenation, SDPA and its transposes). :func:`decode_attention` replaces the rotary embedding, the cache append
and the attention of every row and head with one call; :func:`rms_norm` and :func:`silu_mul` are one call each.
The engine's lean decode step (``engine/runtime/lean_decode.py``) runs on them.

Layouts (float32, contiguous):

* ``qkv`` ``[B, (Hq + 2 Hkv) * D]``: the fused q/k/v projection of one token per row, before the rotary
  embedding (query heads, then key heads, then value heads);
* ``cos``, ``sin`` ``[B, D]``: the row's rotary embedding (transformers' ``rotary_emb`` output at its position);
* ``k_cache[b]``, ``v_cache[b]`` ``[1, Hkv, capacity, D]`` (a :class:`~tritonq.engine.runtime.ragged.RequestCache`
  layer buffer): row ``b``'s keys (already rotated) and values, of which
  ``lengths[b]`` are held; the op writes the new ones at ``lengths[b]`` (the caller grows the buffer and then
  counts the token).

Attention is Vaswani et al.'s softmax(q k^T * scale) v per query head, on its key/value head (grouped-query
attention, Ainslie et al. 2023), over the last ``window`` keys when a sliding window is set (Mistral). Every row
and head goes through the same operations whatever the number of rows, so batched decoding is batch-invariant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cpu_gemv import compiled_ops


def rms_norm(x: Tensor, weight: Tensor, eps: float, portable: bool = False) -> Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` per row of ``x`` ``[M, D]`` (float32)."""
    return compiled_ops(portable).rms_norm(x, weight, float(eps))


def silu_mul(gate_up: Tensor, portable: bool = False) -> Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` ``[M, 2I]`` (float32); ``[M, I]``."""
    return compiled_ops(portable).silu_mul(gate_up)


def decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: list[Tensor], v_cache: list[Tensor],
                     lengths: list[int], heads: int, kv_heads: int, window: int, scale: float,
                     counts: list[int] | None = None, portable: bool = False) -> Tensor:
    """Append each row's rotated keys and its values to its cache, then attend causally; ``[N, heads * D]`` for
    the ``N`` tokens fed (see the module docstring for the layouts). Row ``b`` feeds ``counts[b]`` tokens (one
    each when None: a decode step; a prompt otherwise). ``window`` <= 0: every cached key."""
    return compiled_ops(portable).decode_attention(qkv, cos, sin, k_cache, v_cache, lengths, counts or [], heads,
                                                   kv_heads, window, float(scale))


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x64 = x.double()
    return weight.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))


def silu_mul_ref(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotate_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` on the last dimension."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def decode_attention_ref(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: list[Tensor], v_cache: list[Tensor],
                         lengths: list[int], heads: int, kv_heads: int, window: int, scale: float,
                         counts: list[int] | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Float64 :func:`decode_attention`: (output, each row's new keys ``[Hkv, n, D]``, new values), the caches
    left untouched."""
    d = cos.shape[-1]
    counts = counts or [1] * len(lengths)
    out, new_keys, new_values, first = [], [], [], 0
    for b, fed in enumerate(counts):
        tokens = qkv[first:first + fed].double().view(fed, heads + 2 * kv_heads, d).transpose(0, 1)
        c, s = cos[first:first + fed].double(), sin[first:first + fed].double()
        q = rotate_ref(tokens[:heads], c, s)  # [H, fed, D]
        k_new = rotate_ref(tokens[heads:heads + kv_heads], c, s)
        v_new = tokens[heads + kv_heads:]
        n = lengths[b]
        keys = torch.cat([k_cache[b][0, :, :n].double(), k_new], dim=1)
        values = torch.cat([v_cache[b][0, :, :n].double(), v_new], dim=1)
        group = heads // kv_heads
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        for t in range(fed):
            total = n + t + 1
            lo = max(0, total - window) if window > 0 else 0
            probs = torch.softmax(torch.einsum("hd,hjd->hj", q[:, t], keys[:, lo:total]) * scale, dim=-1)
            out.append(torch.einsum("hj,hjd->hd", probs, values[:, lo:total]).reshape(-1))
        new_keys.append(k_new)
        new_values.append(v_new)
        first += fed
    return torch.stack(out), new_keys, new_values
