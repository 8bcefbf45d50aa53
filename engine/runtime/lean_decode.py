"""A decode step for Llama-family models on the CPU that runs the layers itself, on tritonq's CPU ops, instead of
transformers' module tree (issue 23 item 2: "cut per-token Python overhead ... a graph of the decode step").

Why: at one token per request a step's arithmetic outside the matmuls is tiny, so its cost is operator and
Python calls. transformers' Llama layer runs about fifty torch ops per token (two RMSNorms of seven ops, the
rotary embedding, cache concatenation, SDPA with its transposes, the gated MLP) through a dozen module calls;
on the 22-layer 2048/5632 Llama that was 6.8 ms of a 52 ms step. Here a layer is eleven calls: RMSNorm, the fused
q/k/v matmul, one :func:`~tritonq.kernels.cpu_attention.decode_attention` (rotary embedding, cache append and
attention for every row and head), the output projection and residual, RMSNorm, the fused gate/up matmul, one
SiLU-gated product, the down projection and residual (the step's structure is llama.cpp's graph, the code ours).

Rows are requests: each brings its own :class:`~tritonq.engine.runtime.ragged.RequestCache` and position, so
the same forward prefills and decodes one request (``tritonq generate``, ``bench decode``) or a continuous batch
(``tritonq serve``), prompts of different lengths together without padding. Every op computes a token's row
the same way whatever else is fed, so a request's logits in a batch are bit-identical to its logits alone.

What it takes: ``model_type`` llama, mistral or qwen2 (SmolLM2 and TinyLlama are llama) with SiLU MLPs, RMSNorm,
a full-width rotary embedding, float32 on the CPU, and tritonq's CPU ops built. :func:`lean_decoder` checks one
prompt against the model's own forward before it is used; any model it refuses decodes through transformers as
before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ...kernels import cpu_attention, cpu_gemv
from .fused import FusedMember
from .qlinear import QuantLinear
from .ragged import STRUCTURAL_TOLERANCE, RequestCache, relative_error

FAMILIES = ("llama", "mistral", "qwen2")
_CACHED = "_tritonq_lean_decoder"


def _op(w: Tensor, scale: Tensor, minv: Tensor, group: int, bias: Tensor | None) -> Callable[[Tensor], Tensor]:
    """tritonq's int4 op on these packed rows, for any number of rows (so a row's result never depends on how
    many rows share the call: prompts and decode steps alike)."""
    bias = None if bias is None else bias.float().contiguous()
    ops = cpu_gemv.compiled_ops()
    return lambda x: ops.int4_gemm(x, w, scale, minv, group, bias)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks (an online input rotation, say) that a direct op call would skip."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _linear(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``module`` as a function of a float32 ``[M, K]`` input: tritonq's int4 op directly where the module is a
    plain :class:`QuantLinear` on it, else the module itself."""
    if isinstance(module, QuantLinear) and module.cpu_kernel == "tritonq" and module.input_order is None \
            and module.rows_scale.dtype == torch.float16 and not _hooked(module):
        return _op(module.rows_weight, module.rows_scale, module.rows_min, module.cpu_group_size, module.bias)
    return module


def _concatenated(modules: list[nn.Module]) -> Callable[[Tensor], Tensor]:
    """The outputs of ``modules`` (which read one input) side by side: one call of the fused int4 matmul when
    they are its members in order, else each module and a concatenation."""
    shared = getattr(modules[0], "shared", None)
    if all(isinstance(m, FusedMember) and m.shared is shared for m in modules) and modules[0].start == 0 and all(
        a.stop == b.start for a, b in zip(modules, modules[1:])
    ) and modules[-1].stop == sum(m.out_features for m in modules) and shared.rows_scale.dtype == torch.float16 \
            and not any(_hooked(m) for m in modules):
        return _op(shared.rows_weight, shared.rows_scale, shared.rows_min, shared.group_size, shared.bias)
    functions = [_linear(m) for m in modules]
    return lambda x: torch.cat([f(x) for f in functions], dim=-1)


@dataclass
class _Layer:
    norm_in: Tensor
    eps_in: float
    qkv: Callable[[Tensor], Tensor]
    out: Callable[[Tensor], Tensor]
    norm_mlp: Tensor
    eps_mlp: float
    gate_up: Callable[[Tensor], Tensor]
    down: Callable[[Tensor], Tensor]
    window: int


def _norm(module: nn.Module) -> tuple[Tensor, float]:
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, Tensor) or eps is None or "RMSNorm" not in type(module).__name__:
        raise ValueError(f"{type(module).__name__} is not an RMSNorm with a weight")
    return weight.detach().float().contiguous(), float(eps)


class LeanDecoder:
    """The decode step of one model; build it with :func:`lean_decoder`."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        inner = model.model
        self.embed, self.head = model.get_input_embeddings(), model.get_output_embeddings()
        self.rotary = inner.rotary_emb
        self.final_norm, self.final_eps = _norm(inner.norm)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.layers: list[_Layer] = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if getattr(attn, "q_norm", None) is not None:
                raise ValueError("per-head q/k norms are not supported")
            window = getattr(attn, "sliding_window", None)
            if config.model_type == "mistral":
                window = getattr(config, "sliding_window", None)
            norm_in, eps_in = _norm(layer.input_layernorm)
            norm_mlp, eps_mlp = _norm(layer.post_attention_layernorm)
            self.layers.append(_Layer(
                norm_in, eps_in, _concatenated([attn.q_proj, attn.k_proj, attn.v_proj]), _linear(attn.o_proj),
                norm_mlp, eps_mlp, _concatenated([mlp.gate_proj, mlp.up_proj]), _linear(mlp.down_proj),
                int(window or 0)))
        self.scale = float(inner.layers[0].self_attn.scaling)
        self.head_dim = int(inner.layers[0].self_attn.head_dim)

    def step(self, tokens: list[int], rows: list[RequestCache]) -> Tensor:
        """Feed ``tokens[i]`` after what ``rows[i]`` holds; the next-token logits ``[rows, vocab]``."""
        return self.forward([[t] for t in tokens], rows)

    def forward(self, tokens: list[list[int]], rows: list[RequestCache]) -> Tensor:
        """Feed ``tokens[i]`` (a prompt, or one decoded token) after what ``rows[i]`` holds; the logits after each
        row's last token, ``[rows, vocab]``. Every op computes a token's row the same way whatever else is fed,
        so prompts prefilled together get the logits and caches they get alone."""
        counts = [len(t) for t in tokens]
        h = self.embed(torch.tensor([t for row in tokens for t in row])).float()
        lengths = [row.length for row in rows]
        positions = torch.tensor([n + j for n, c in zip(lengths, counts) for j in range(c)])
        cos, sin = self.rotary(h[None], positions[None])
        cos, sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        like = h.new_empty(1, self.kv_heads, 0, self.head_dim)
        for row, count in zip(rows, counts):
            row.make_room(len(self.layers), count, like)
        fed = None if all(c == 1 for c in counts) else counts
        for i, layer in enumerate(self.layers):
            x = cpu_attention.rms_norm(h, layer.norm_in, layer.eps_in)
            a = cpu_attention.decode_attention(layer.qkv(x), cos, sin, [row.keys[i] for row in rows],
                                               [row.values[i] for row in rows], lengths, self.heads,
                                               self.kv_heads, layer.window, self.scale, fed)
            h = h + layer.out(a)
            x = cpu_attention.rms_norm(h, layer.norm_mlp, layer.eps_mlp)
            h = h + layer.down(cpu_attention.silu_mul(layer.gate_up(x)))
        for row, count in zip(rows, counts):
            row.advance(len(self.layers), count)
        if fed is not None:  # the head reads each row's last token only
            h = h[torch.tensor(counts).cumsum(0) - 1]
        return self.head(cpu_attention.rms_norm(h.contiguous(), self.final_norm, self.final_eps)).float()


def lean_refusal(model: nn.Module) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (None when it can), before it is built."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        return f"model_type {kind!r} is not one of {FAMILIES}"
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"the model is {model.dtype} on {model.device}; the lean step runs float32 on the CPU"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if cpu_gemv.extension() is None:
        return f"tritonq's CPU kernels did not build ({cpu_gemv.unavailable_reason()})"
    inner = getattr(model, "model", None)
    if getattr(inner, "rotary_emb", None) is None or getattr(inner, "layers", None) is None:
        return "the model has no model.layers / model.rotary_emb"
    return None


def _matches_model(model: nn.Module, decoder: LeanDecoder) -> str | None:
    """None if lean steps reproduce the model's own forward on a short prompt (two rows of different lengths),
    else why not (:data:`~tritonq.engine.runtime.ragged.STRUCTURAL_TOLERANCE`; the ops' precision is tested
    against float64 references)."""
    ids = [1, 2, 3, 4, 5]
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0].float()
        first, second = RequestCache(), RequestCache()
        prompts = decoder.forward([ids[:3], ids[:2]], [first, second])
        step = decoder.step([ids[3], ids[2]], [first, second])
        again = decoder.step([ids[4]], [first])
    checks = ((prompts[0], reference[2]), (prompts[1], reference[1]), (step[0], reference[3]), (step[1], reference[2]),
              (again[0], reference[4]))
    for got, want in checks:
        error = relative_error(got, want)
        if error > STRUCTURAL_TOLERANCE:
            return f"its logits differ from the model's own forward (relative error {error:.3g})"
    return None


def _signature(model: nn.Module) -> tuple[int, ...]:
    return tuple(id(m) for m in model.modules())


def lean_decoder(model: nn.Module) -> LeanDecoder | None:
    """The model's :class:`LeanDecoder`, built and checked once per module tree (a swapped layer rebuilds it);
    None when the model is not one it runs (:func:`lean_refusal`) or its check fails."""
    cached = model.__dict__.get(_CACHED)
    signature = _signature(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    decoder = None
    if lean_refusal(model) is None:
        try:
            decoder = LeanDecoder(model)
            if _matches_model(model, decoder) is not None:
                decoder = None
        except Exception:  # a variant this step does not know: the model decodes through transformers
            decoder = None
    model.__dict__[_CACHED] = (signature, decoder)
    return decoder
