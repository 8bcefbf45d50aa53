"""Perplexity on non-overlapping windows (the GPTQ/AWQ protocol, ``../shared/docs/awq_family.md`` §10).

Per window: mean cross-entropy of the ``seqlen - 1`` shifted positions; PPL = exp(mean over windows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import TritonqError


@dataclass
class PerplexityResult:
    perplexity: float
    windows: int
    tokens: int
    seqlen: int


def perplexity(
    model: nn.Module, windows: torch.Tensor, device: torch.device, progress: bool = True
) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows`` [n, seqlen] of token ids (model moved to ``device``)."""
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise TritonqError(f"perplexity needs windows [n >= 1, seqlen >= 2] of token ids, got {tuple(windows.shape)}; "
                           "build them with engine.data.evaluation_windows")
    model.to(device)
    nll = 0.0
    with torch.no_grad():
        for ids in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            ids = ids.unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean")
            nll += float(loss)
    n, seqlen = windows.shape
    return PerplexityResult(math.exp(nll / n), n, n * seqlen, seqlen)


def streamed_perplexity(weights, adapter, windows: torch.Tensor, device: torch.device,
                        block_tensors: Callable[[int], dict[str, torch.Tensor]] | None = None, act=None,
                        progress: bool = True) -> PerplexityResult:
    """Perplexity of a model streamed block by block (``engine/streaming.py``), its blocks' weights given by
    ``block_tensors(i)`` (a quantize run's work directory) or read from the checkpoint (None). Nothing holds the
    whole model; ``act``: activation quantization of every block linear.

    Layer-major: every window goes through block ``i`` before block ``i + 1`` loads, one window at a time, so
    each window sees exactly the operations of :func:`perplexity`'s full forward (the same numbers). The part
    after the last block (final norm, ``lm_head``) runs as the model's own forward with every block replaying
    the window's final hidden states."""
    from ..activations import apply_activation_quant
    from ..stages import capture_block_inputs

    n, seqlen = windows.shape
    model = weights.model
    blocks = adapter.block_list(model)
    with torch.no_grad():
        chunks = capture_block_inputs(weights, adapter, [w.unsqueeze(0) for w in windows], device)
        returns_tuple = False
        for i in tqdm(range(len(blocks)), desc="perplexity (streamed)", unit="block", disable=not progress):
            prefix = f"{adapter.blocks}.{i}"
            block = weights.load(prefix, device, None if block_tensors is None else block_tensors(i))
            originals = {name: block.get_submodule(name) for name in adapter.linear_names()}
            if act is not None:  # activation quantization as the run applies it, on this block's linears
                apply_activation_quant(block, act, list(originals))
            for c in chunks:
                out = block(c.hidden.to(device), **c.kwargs)
                returns_tuple = isinstance(out, tuple)
                c.hidden = out[0] if returns_tuple else out
            if act is not None:  # the plain linears back, so the skeleton keeps the checkpoint's names
                for name, module in originals.items():
                    parent_name, _, leaf = name.rpartition(".")
                    setattr(block.get_submodule(parent_name) if parent_name else block, leaf, module)
            weights.release(prefix)
        head = _modules_outside_blocks(model, adapter.blocks)
        for name in head:
            weights.load(name, device)
        nll = 0.0
        try:
            for ids, c in zip(windows, chunks):
                for block in blocks:
                    block.forward = _replayer(c.hidden, returns_tuple)
                ids = ids.unsqueeze(0).to(device)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                nll += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean"))
        finally:
            for block in blocks:
                block.__dict__.pop("forward", None)
            for name in head:
                weights.release(name)
    return PerplexityResult(math.exp(nll / n), n, n * seqlen, seqlen)


def _modules_outside_blocks(model: nn.Module, blocks: str) -> list[str]:
    """Every module outside the decoder blocks that holds weights or buffers of its own (embeddings, final norm,
    lm_head, the rotary embedding)."""
    names = []
    for name, module in model.named_modules(remove_duplicate=False):
        if name == blocks or name.startswith(blocks + "."):
            continue
        own = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False)]
        if own:
            names.append(name)
    return names


def _replayer(hidden: torch.Tensor, as_tuple: bool) -> Callable:
    def forward(*_args, **_kwargs):
        return (hidden,) if as_tuple else hidden
    return forward
