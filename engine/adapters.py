"""Architecture adapters: one small declaration per model family, and nothing else that knows names.

Each adapter says where the decoder blocks are, which modules run before the first block, the linears of
a block in dependency order (grouped by shared input, so a group shares one Hessian), the norms that feed
them (for scale folding in AWQ-style methods) and how to read the attention geometry from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import TritonqError


@dataclass(frozen=True)
class AttentionGeometry:
    heads: int
    kv_heads: int
    head_dim: int
    rotary: bool


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # modules that run before block 0 (moved to the device for capture)
    linear_groups: tuple[tuple[str, ...], ...]  # in dependency order; a group shares its input
    norms: tuple[str, ...]  # norm feeding linear_groups[0], norm feeding the MLP group
    rotary: bool = True

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def linear_names(self) -> list[str]:
        return [name for group in self.linear_groups for name in group]

    def geometry(self, config) -> AttentionGeometry:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return AttentionGeometry(heads=heads, kv_heads=kv_heads, head_dim=head_dim, rotary=self.rotary)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_EMBEDDINGS = ("model.embed_tokens", "model.rotary_emb")
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama",), "model.layers", _LLAMA_EMBEDDINGS, _LLAMA_GROUPS, _LLAMA_NORMS),
    Adapter("mistral", ("mistral",), "model.layers", _LLAMA_EMBEDDINGS, _LLAMA_GROUPS, _LLAMA_NORMS),
    Adapter("qwen2", ("qwen2",), "model.layers", _LLAMA_EMBEDDINGS, _LLAMA_GROUPS, _LLAMA_NORMS),
    Adapter("qwen3", ("qwen3",), "model.layers", _LLAMA_EMBEDDINGS, _LLAMA_GROUPS, _LLAMA_NORMS),
    Adapter(
        "opt",
        ("opt",),
        "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        ("self_attn_layer_norm", "final_layer_norm"),
        rotary=False,
    ),
)

SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> Adapter:
    """The adapter of a transformers config; a clear error listing the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise TritonqError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
