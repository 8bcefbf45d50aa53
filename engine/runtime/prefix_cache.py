"""Prompt prefix caching for the batch engine: the keys and values of prompts already prefilled are kept, and a
new prompt that starts with the same tokens copies them instead of recomputing them.

Chat requests share long prefixes: a chat template's system prompt (SmolLM2's is most of a short question's
prompt), few-shot examples, a conversation resent with one more turn, a retried request. vLLM's automatic
prefix caching and llama.cpp's server (``cache_prompt``) keep them for the same reason. Here the unit is a whole
prompt: each prefilled prompt's keys and values are copied into the cache (least recently used first out, up to
``max_tokens`` positions in all), and a later prompt restores the longest common prefix with any kept prompt.

Why this is exact: a position's key and value depend only on the tokens up to it, and the lean forward
(:mod:`~tritonq.engine.runtime.lean_decode`) computes every token's row the same way whatever else is fed in
the pass, so a restored prefix holds the very values a full prefill would write, and the prompt's logits and
tokens are bit-identical to an uncached prefill (tested). At least the prompt's last token is always fed:
its logits give the first new token.
"""

from __future__ import annotations

import collections

import torch

from .ragged import RequestCache


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Keys and values of recent prompts, at most ``max_tokens`` positions in all (0 keeps nothing)."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be 0 or more (got {max_tokens})")
        self.max_tokens = max_tokens
        # prompt tokens -> per-layer (keys, values) [1, kv_heads, len, head_dim]; least recently used first
        self._entries: collections.OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = \
            collections.OrderedDict()
        self._held = 0
        self.hits = 0  # prompt tokens restored instead of prefilled, since the start

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def held_tokens(self) -> int:
        return self._held

    def restore(self, ids: list[int], cache: RequestCache) -> int:
        """Copy into the empty ``cache`` the keys and values of the longest prefix of ``ids`` that a kept prompt
        shares (never all of ``ids``: the last token is fed for its logits); how many positions it copied."""
        best, found = 0, None
        for prompt, layers in self._entries.items():
            shared = common_prefix(prompt, ids)
            if shared > best:
                best, found = shared, (prompt, layers)
        best = min(best, len(ids) - 1)
        if found is None or best <= 0:
            return 0
        prompt, layers = found
        self._entries.move_to_end(prompt)
        like = layers[0][0][:, :, :0]
        cache.make_room(len(layers), len(ids), like)  # room for the whole prompt: the pass appends the rest
        for layer, (keys, values) in enumerate(layers):
            cache.keys[layer][:, :, :best] = keys[:, :, :best]
            cache.values[layer][:, :, :best] = values[:, :, :best]
        cache.advance(len(layers), best)
        self.hits += best
        return best

    def store(self, ids: list[int], cache: RequestCache) -> None:
        """Keep a copy of the keys and values of prompt ``ids``, which ``cache`` holds (right after its
        prefill), evicting the least recently used prompts beyond ``max_tokens``."""
        key = tuple(ids)
        if len(key) > self.max_tokens or cache.length < len(key):
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        layers = [(cache.keys[i][:, :, :len(key)].clone(), cache.values[i][:, :, :len(key)].clone())
                  for i in range(len(cache.keys))]
        self._entries[key] = layers
        self._held += len(key)
        while self._held > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self._held -= len(old)
