"""Ragged KV caches: one forward pass over several requests, each attending to its own cache.

A batched decode step feeds ``B`` rows of one new token each, at different positions, into a Hugging Face
model. Each row's keys and values live in its own :class:`RequestCache` (ragged lengths, no padding, no
re-prefill when the batch changes). :class:`RaggedCache` is the ``Cache`` the model sees for one pass: its
``update`` appends each row's new K/V to that row's cache and hands the attention a :class:`Ragged` list of
per-row tensors, and :func:`ragged_attention`, registered with transformers' ``AttentionInterface``, runs
SDPA (transformers' own ``sdpa_attention_forward``) row by row, so a row's attention is computed exactly as
in a batch of one. The linears, norms and MLPs run batched. The idea is vLLM's and TGI's (ragged / paged
attention with per-request positions); the code is ours.

Every family the tests build (Llama, Mistral, Qwen2, Qwen3, OPT) reads ``position_ids`` and calls
``cache.update`` then the attention interface; :func:`ragged_forward_works` checks that on the loaded model
(one prompt decoded ragged against the model's own forward) so a model that does not is refused up front.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
import torch.nn as nn
from transformers import Cache

RAGGED = "tritonq_ragged"


class Ragged(list):
    """Per-row tensors ``[1, heads, length_i, head_dim]`` of one layer: what the attention gets as keys/values.
    ``fed[i]``: how many of the pass's positions row ``i`` really feeds (the rest pads a shorter prompt)."""

    fed: list[int] | None = None


class RequestCache:
    """One request's keys and values, per layer, in buffers that grow by doubling (amortised O(1) appends)."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    @property
    def length(self) -> int:
        """Tokens held (all layers hold the same number between passes)."""
        return self.lengths.get(0, 0)

    def reserve(self, layer: int, new: int, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value buffers ``[1, heads, room, head_dim]`` with room for ``new`` more tokens,
        grown by doubling; a layer's first buffers take heads, size and dtype from ``key``/``value``."""
        used = self.lengths.get(layer, 0)
        buf_k, buf_v = self.keys.get(layer), self.values.get(layer)
        if buf_k is None or used + new > buf_k.shape[2]:
            key, value = (key, value) if buf_k is None else (buf_k, buf_v)
            if key is None or value is None:
                raise ValueError(f"layer {layer} has no cache yet: prefill the request first")
            room = max(2 * (buf_k.shape[2] if buf_k is not None else 0), used + new, 16)
            grown_k = key.new_empty(*key.shape[:2], room, key.shape[3])
            grown_v = value.new_empty(*value.shape[:2], room, value.shape[3])
            if buf_k is not None:
                grown_k[:, :, :used] = buf_k[:, :, :used]
                grown_v[:, :, :used] = buf_v[:, :, :used]
            buf_k, buf_v = self.keys[layer], self.values[layer] = grown_k, grown_v
        return buf_k, buf_v

    def make_room(self, layers: int, new: int = 1, like: torch.Tensor | None = None) -> None:
        """Room for ``new`` more tokens in every one of ``layers``; an empty cache creates its buffers from
        ``like`` ``[1, heads, 0, head_dim]``. Layers are appended in lockstep, so their buffers grow together:
        checking layer 0 is enough until it is full."""
        if 0 not in self.keys or self.lengths[0] + new > self.keys[0].shape[2]:
            for layer in range(layers):
                self.reserve(layer, new, like, like)
                self.lengths.setdefault(layer, 0)

    def advance(self, layers: int, new: int = 1) -> None:
        """Count ``new`` tokens written into every layer's buffers in place (the lean decode step's attention
        op writes them)."""
        for layer in range(layers):
            self.lengths[layer] += new

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``key``/``value`` ``[1, heads, n, head_dim]`` to ``layer``; the layer's whole K/V as views."""
        used, new = self.lengths.get(layer, 0), key.shape[2]
        buf_k, buf_v = self.reserve(layer, new, key, value)
        buf_k[:, :, used:used + new] = key
        buf_v[:, :, used:used + new] = value
        self.lengths[layer] = used + new
        return buf_k[:, :, :used + new], buf_v[:, :, :used + new]


class RaggedCache(Cache):
    """The cache of one forward pass over ``rows`` (row ``i`` of the batch is ``rows[i]``)."""

    def __init__(self, rows: list[RequestCache], fed: list[int] | None = None) -> None:
        super().__init__(layers=[])
        self.rows, self.fed = rows, fed

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[Ragged, Ragged]:
        keys, values = Ragged(), Ragged()
        for i, row in enumerate(self.rows):
            n = key_states.shape[2] if self.fed is None else self.fed[i]  # a padded prompt keeps its own tokens
            k, v = row.append(layer_idx, key_states[i:i + 1, :, :n], value_states[i:i + 1, :, :n])
            keys.append(k)
            values.append(v)
        keys.fed = values.fed = self.fed
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # rows differ in length: positions come in as position_ids, never from here
        return 0


def _window_mask(q_len: int, k_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal sliding-window mask ``[1, 1, q_len, k_len]`` (True = attend) for queries at the end of the keys."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    return ((k_pos <= q_pos) & (q_pos - k_pos < window))[None, None]


def ragged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor | Ragged, value: torch.Tensor | Ragged,
                     attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention for :class:`RaggedCache` passes: SDPA per row on that row's own keys; any other call is plain SDPA.

    Each row's queries are the last ``q_len`` positions of its keys. For a prefill from an empty cache SDPA's
    ``is_causal`` is the causal mask and one decoded token needs none; a sliding window (Mistral, Qwen2) keeps
    the last ``window`` keys of a decoded token, and several queries after cached keys or past a window get an
    explicit mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(key, Ragged):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    window = kwargs.pop("sliding_window", None)
    out = []
    for i, (k, v) in enumerate(zip(key, value, strict=True)):
        q_len = query.shape[2] if key.fed is None else key.fed[i]
        mask, k_len = None, k.shape[2]
        if q_len == 1:
            if window is not None and k_len > window:
                k, v = k[:, :, -window:], v[:, :, -window:]
        elif k_len != q_len or (window is not None and k_len > window):  # SDPA's is_causal aligns top-left
            mask = _window_mask(q_len, k_len, window or k_len, query.device)
        row = sdpa_attention_forward(module, query[i:i + 1, :, :q_len], k, v, mask, **kwargs)[0]
        if q_len < query.shape[2]:  # a padded prompt: its pad positions get zeros (their outputs are not used)
            row = torch.nn.functional.pad(row, (0, 0, 0, 0, 0, query.shape[2] - q_len))
        out.append(row)
    return torch.cat(out), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(RAGGED, ragged_attention)


@contextlib.contextmanager
def _ragged_implementation(model: nn.Module) -> Iterator[None]:
    """The model's attention is :func:`ragged_attention` inside the block and its own again after it.

    No mask function is registered for it, so transformers builds no mask for these passes (the rows bring
    their own causality)."""
    _register()
    before = model.config._attn_implementation
    model.config._attn_implementation = RAGGED
    try:
        yield
    finally:
        model.config._attn_implementation = before


@functools.cache
def _forward_arguments(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def ragged_forward(model: nn.Module, tokens: list[list[int]], rows: list[RequestCache]) -> torch.Tensor:
    """One forward pass: row ``i`` feeds ``tokens[i]`` after what ``rows[i]`` holds; the logits of each row's
    last position, ``[rows, vocab]``. All rows feed the same number of tokens (one per row to decode, or one
    row alone to prefill)."""
    device = model.device
    ids = torch.tensor(tokens, device=device)
    starts = torch.tensor([[row.length] for row in rows], device=device)
    positions = starts + torch.arange(ids.shape[1], device=device)
    args = _forward_arguments(type(model))
    kw = {"cache" if "cache" in args else "past_key_values": RaggedCache(rows)}
    if "logits_to_keep" in args:
        kw["logits_to_keep"] = 1
    with _ragged_implementation(model):
        logits = model(input_ids=ids, position_ids=positions, use_cache=True, **kw).logits
    return logits[:, -1]


def ragged_prefill(model: nn.Module, prompts: list[list[int]], rows: list[RequestCache]) -> torch.Tensor:
    """Prefill several empty requests in one forward pass; the logits after each prompt, ``[rows, vocab]``.

    Prompts of different lengths are padded on the right to the longest. Each row's cache keeps only its own
    tokens, its attention runs on its own queries only (exactly the call it gets alone), and its logits are taken
    at its last token; the pads come after the prompt, so no real position reads them. With batch-invariant
    linears a request's logits are then those it gets prefilled alone, for the cost of one pass's Python and
    operator overhead instead of one per request."""
    if any(row.length for row in rows):
        raise ValueError("ragged_prefill takes empty request caches")
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([p + [p[-1]] * (longest - len(p)) for p in prompts], device=model.device)
    positions = torch.arange(longest, device=model.device).expand(len(prompts), longest)
    fed = [len(p) for p in prompts]
    inner = getattr(model, model.base_model_prefix)
    args = _forward_arguments(type(inner))
    kw = {"cache" if "cache" in args else "past_key_values": RaggedCache(rows, fed)}
    with _ragged_implementation(model):
        hidden = inner(input_ids=ids, position_ids=positions, use_cache=True, **kw).last_hidden_state
    last = hidden[torch.arange(len(prompts)), torch.tensor(fed) - 1]
    return model.get_output_embeddings()(last[:, None])[:, -1]


def prefill_together_works(model: nn.Module) -> bool:
    """Whether :func:`ragged_prefill` gives two prompts of different lengths bit for bit the logits and caches
    of each prefilled alone (batch-invariant linears and a plain output head); checked once per server."""
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    try:
        with torch.inference_mode():
            together = [RequestCache(), RequestCache()]
            logits = ragged_prefill(model, prompts, together)
            for i, prompt in enumerate(prompts):
                alone = RequestCache()
                if not torch.equal(ragged_forward(model, [prompt], [alone])[0], logits[i]):
                    return False
                if any(not torch.equal(alone.keys[layer][:, :, :len(prompt)],
                                       together[i].keys[layer][:, :, :len(prompt)]) for layer in alone.keys):
                    return False
    except Exception:  # a model whose base model or head does not fit: prefill one request at a time
        return False
    return True


def ragged_forward_works(model: nn.Module) -> str | None:
    """None if ragged passes reproduce the model's own forward on a short prompt (prefill, then a batch of two
    rows decoding); else why not, in a few words."""
    ids = [1, 2, 3, 4]
    try:
        with torch.inference_mode():
            reference = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
            first, second = RequestCache(), RequestCache()
            prefill = ragged_forward(model, [ids[:3]], [first])[0]
            ragged_forward(model, [ids[:2]], [second])
            step = ragged_forward(model, [[ids[3]], [ids[2]]], [first, second])
    except Exception as exc:  # any failure means: not this model; the caller falls back to one row at a time
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    for got, want in ((prefill, reference[2]), (step[0], reference[3]), (step[1], reference[2])):
        error = relative_error(got, want)
        if error > STRUCTURAL_TOLERANCE:
            return ("per-row positions or caches are ignored by its forward (logits differ from the model's own: "
                    f"relative error {error:.3g})")
    return None


#: Relative L2 error of logits that tells a structural mismatch (ignored positions or caches, a wrong rotary
#: embedding, a missing bias: order one) from rounding: float models agree to 1e-5, but int8-activation ops turn
#: rounding differences into flipped codes, which moved a random 22-layer 2048-wide Llama's logits by about 2%
#: (a 1e-2 max-abs bound refused it, and its server decoded one request at a time).
STRUCTURAL_TOLERANCE = 0.1


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``|got - want| / |want|`` (L2, float32; infinite when ``got`` is not finite)."""
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-12))
