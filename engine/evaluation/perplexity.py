"""Perplexity on non-overlapping windows (the GPTQ/AWQ protocol, ``../shared/docs/awq_family.md`` §10).

Per window: mean cross-entropy of the ``seqlen - 1`` shifted positions; PPL = exp(mean over windows).
"""

from __future__ import annotations

import math
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
