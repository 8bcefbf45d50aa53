"""Architecture adapters: one small declaration per model family, and nothing else that knows names.

Each adapter says where the decoder blocks are, which modules run before the first block, the linears of
a block in dependency order (grouped by shared input, so a group shares one Hessian), and what the
methods built on the pipeline need to know about a block:

* ``tails``: linears that are the last operation of a sub-module (``o_proj`` of the attention, ``down_proj``
  of the MLP), so that once they are quantized the sub-module's output is their output and the pipeline
  can replay it instead of running attention or the MLP again (one forward per block);
* ``attention``: the attention sub-module, whose queries and keys after the rotary embedding can be
  observed through transformers' attention interface (``pipeline.Group.on_attention``);
* scale pairs (``scale_pairs``): smooth -> balance pairs through which a per-channel scale can be folded
  without changing the float block (AWQ, SmoothQuant, A-BoA), as llm-compressor's AWQ mappings declare them.
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
class Tail:
    """``linear`` is the last operation of ``parent``: ``parent(x) == linear(input of linear)``."""

    linear: str
    parent: str
    returns_tuple: bool  # the parent returns (output, attention weights), as transformers' attention modules


@dataclass(frozen=True)
class ScalePair:
    """Dividing the output channels of ``smooth`` by ``s`` and multiplying the input columns of every
    ``balance`` linear by ``s`` leaves the float block unchanged (``smooth`` is a norm or a linear)."""

    smooth: str
    balance: tuple[str, ...]


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # modules that run before block 0 (moved to the device for capture)
    linear_groups: tuple[tuple[str, ...], ...]  # in dependency order; a group shares its input
    tails: tuple[Tail, ...]
    attention: str  # the attention sub-module of a block
    input_pairs: tuple[ScalePair, ...]  # norm -> linears; linear -> linear pairs that need no head check
    value_pair: ScalePair  # v -> o: only where every value channel feeds exactly one o_proj column
    rotary: bool = True

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def linear_names(self) -> list[str]:
        return [name for group in self.linear_groups for name in group]

    def tail_of(self, linear: str) -> Tail | None:
        return next((t for t in self.tails if t.linear == linear), None)

    def geometry(self, config) -> AttentionGeometry:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return AttentionGeometry(heads=heads, kv_heads=kv_heads, head_dim=head_dim, rotary=self.rotary)

    def scale_pairs(self, config) -> tuple[ScalePair, ...]:
        """The smooth -> balance pairs of one block of this config.

        v -> o is declared only without grouped-query attention: with GQA one value channel feeds
        ``heads / kv_heads`` columns of o_proj, which would all need the same scale (llm-compressor's AWQ
        likewise maps v -> o only when the shapes match).
        """
        geo = self.geometry(config)
        pairs = list(self.input_pairs)
        if geo.kv_heads == geo.heads:
            pairs.insert(1, self.value_pair)
        return tuple(pairs)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_EMBEDDINGS = ("model.embed_tokens", "model.rotary_emb")
_LLAMA_TAILS = (Tail("self_attn.o_proj", "self_attn", True), Tail("mlp.down_proj", "mlp", False))
_LLAMA_PAIRS = (
    ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalePair("mlp.up_proj", ("mlp.down_proj",)),
)
_LLAMA_VALUE_PAIR = ScalePair("self_attn.v_proj", ("self_attn.o_proj",))


def _llama_like(family: str) -> Adapter:
    return Adapter(family, (family,), "model.layers", _LLAMA_EMBEDDINGS, _LLAMA_GROUPS, _LLAMA_TAILS,
                   "self_attn", _LLAMA_PAIRS, _LLAMA_VALUE_PAIR)


ADAPTERS: tuple[Adapter, ...] = (
    _llama_like("llama"),
    _llama_like("mistral"),
    _llama_like("qwen2"),
    _llama_like("qwen3"),  # q_norm / k_norm act on q/k outputs (per head), not on the folded inputs
    Adapter(
        "opt",
        ("opt",),
        "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        (Tail("self_attn.out_proj", "self_attn", True),),  # fc1/fc2 sit in the block itself: no parent to replay
        "self_attn",
        (ScalePair("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
         ScalePair("final_layer_norm", ("fc1",))),  # fc1 -> fc2 has a ReLU between: not a scale pair
        ScalePair("self_attn.v_proj", ("self_attn.out_proj",)),
        rotary=False,
    ),
)

SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> Adapter:
    """The adapter of a transformers config; a clear error listing the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
                # OPT-350m normalises after the residual: the norm -> linear pairs do not hold there
                return _opt_post_norm(adapter)
            return adapter
    raise TritonqError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _opt_post_norm(adapter: Adapter) -> Adapter:
    from dataclasses import replace

    return replace(adapter, input_pairs=())
