"""Architecture adapters: one small declaration per model family, and nothing else that knows names.

Each adapter says where the decoder blocks are, which modules run before the first block, the linears of
a block in dependency order (grouped by shared input, so a group shares one Hessian), and what the
methods built on the pipeline need to know about a block:

* ``tails``: linears that are the last operation of a sub-module (``o_proj`` of the attention, ``down_proj``
  of the MLP), so that once they are quantized the sub-module's output is their output and the pipeline
  can replay it instead of running attention or the MLP again (one forward per block);
* ``attention``: the attention sub-module, whose queries and keys after the rotary embedding can be
  observed through transformers' attention interface (``groups.Group.on_attention``);
* scale pairs (``scale_pairs``): smooth -> balance pairs through which a per-channel scale can be folded
  without changing the float block (AWQ, SmoothQuant, A-BoA), as llm-compressor's AWQ mappings declare them;
* the residual stream (``stream``, a :class:`ResidualStream`): the model-level modules (token embedding, final
  norm, ``lm_head``) and, per block, the norms that read the stream into linears and the linears that write
  into it. A transform of the whole stream before calibration (``Method.prepare``; e.g. the orthogonal
  rotation of QuaRot, Ashkboos et al. 2024, arXiv:2404.00456, or SpinQuant, Liu et al. 2024,
  arXiv:2405.16406) is written against these names alone.
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


def block_index(name: str, blocks: str) -> int | None:
    """The index of the decoder block that holds ``name`` (a module or tensor name), with ``blocks`` the dotted path of
    the blocks' ModuleList; None outside the blocks."""
    if not name.startswith(f"{blocks}."):
        return None
    index = name[len(blocks) + 1:].split(".", 1)[0]
    return int(index) if index.isdigit() else None


@dataclass(frozen=True)
class ResidualStream:
    """Everything that reads or writes the residual stream, by name (model-level names are the model's, per-block
    names are relative to a block).

    ``embedding(ids)`` (and ``positions``, where a learned position embedding is added) enter the stream; in
    every block each ``readers`` norm normalises the stream into its balance linears, and each ``writers``
    linear's output is added back to it; ``final_norm`` then ``lm_head`` read it last. ``norm`` says what the
    norms compute: ``"rms"`` (x / rms(x) * w: commutes with an orthogonal map of the stream once ``w`` is
    folded into the linears it feeds) or ``"layer"`` (LayerNorm subtracts the mean first, which does not).
    """

    embedding: str
    final_norm: str
    lm_head: str
    norm: str  # "rms" | "layer"
    readers: tuple[ScalePair, ...]  # per block: norm -> the linears it feeds
    writers: tuple[str, ...]  # per block: linears whose outputs are added to the stream
    positions: str | None = None  # a learned position embedding added to the stream (OPT)


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # every module that runs before block 0 (moved to the device for capture)
    linear_groups: tuple[tuple[str, ...], ...]  # in dependency order; a group shares its input
    tails: tuple[Tail, ...]
    attention: str  # the attention sub-module of a block
    input_pairs: tuple[ScalePair, ...]  # norm -> linears; linear -> linear pairs that need no head check
    value_pair: ScalePair  # v -> o: only where every value channel feeds exactly one o_proj column
    stream: ResidualStream | None  # None: the norms sit after the residual add (post-norm), no stream to transform
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

    def residual_stream(self) -> ResidualStream:
        """The residual stream's declaration; an error naming the reason where this variant has none."""
        if self.stream is None:
            raise TritonqError(f"{self.family} models of this variant normalise after the residual add (post-norm), "
                               "so no transform of the residual stream keeps them unchanged; use a pre-norm model")
        return self.stream


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_LLAMA_EMBEDDINGS = ("model.embed_tokens", "model.rotary_emb")
_LLAMA_TAILS = (Tail("self_attn.o_proj", "self_attn", True), Tail("mlp.down_proj", "mlp", False))
_LLAMA_STREAM = ResidualStream(
    embedding="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    norm="rms",
    readers=(ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    writers=("self_attn.o_proj", "mlp.down_proj"),
)
_LLAMA_PAIRS = (*_LLAMA_STREAM.readers, ScalePair("mlp.up_proj", ("mlp.down_proj",)))
_LLAMA_VALUE_PAIR = ScalePair("self_attn.v_proj", ("self_attn.o_proj",))

# OPT (pre-norm: every size but 350m): LayerNorms, and a learned position embedding added to the stream
_OPT_STREAM = ResidualStream(
    embedding="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    norm="layer",
    readers=(ScalePair("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ScalePair("final_layer_norm", ("fc1",))),
    writers=("self_attn.out_proj", "fc2"),
    positions="model.decoder.embed_positions",
)


def _llama_like(family: str) -> Adapter:
    return Adapter(family, (family,), "model.layers", _LLAMA_EMBEDDINGS, _LLAMA_GROUPS, _LLAMA_TAILS,
                   "self_attn", _LLAMA_PAIRS, _LLAMA_VALUE_PAIR, _LLAMA_STREAM)


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
        _OPT_STREAM.readers,  # fc1 -> fc2 has a ReLU between: not a scale pair
        ScalePair("self_attn.v_proj", ("self_attn.out_proj",)),
        _OPT_STREAM,
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

    # the norms act after the residual add (and 350m projects the embeddings in and out): no stream either
    return replace(adapter, input_pairs=(), stream=None)
