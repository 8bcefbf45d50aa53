"""Offline rotations of a float model before calibration (``--rotate {none,hadamard,random}``, issue 24 item 1).

An orthogonal change of basis of the residual stream leaves a pre-norm model's function unchanged once every
RMSNorm weight is folded into the linears it feeds (the invariance of SliceGPT, Ashkboos et al. 2024,
arXiv:2401.15024), yet it spreads the outlier channels of activations and weights over all channels, so a grid
loses less on them (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456; SpinQuant, Liu et al. 2024, arXiv:2405.16406).
:func:`rotate_model` does, in float64, on the model in memory, before any method's ``prepare``:

1. untie the embeddings where ``lm_head`` shares them (``lm_head`` takes the final norm, the embedding does not);
2. fold each norm: ``W (x / rms(x) * g) = (W diag(g)) (x / rms(x))``, the norm keeps weight 1; the final norm
   goes into ``lm_head``;
3. rotate the stream by ``Q``: embedding rows ``E Q``, each reading linear ``W Q`` (its input is ``Q^T x``), each
   writing linear ``Q^T W`` and its bias, ``lm_head`` ``W Q``: ``rms(Q^T x) = rms(x)``, so the norms commute;
4. rotate the values per head by ``H`` (head-dim wide): each KV head's rows of ``v_proj`` (and bias) become
   ``H^T W_v``, and the columns of ``o_proj`` that read any query head become ``W_o H``. Attention mixes the values
   along tokens only, so each head's output is ``H^T`` of the original; with grouped-query attention every query
   head of a KV group reads the same rotated values, so one ``H`` for all heads keeps it exact.

The modules are named only through the adapter (``ResidualStream``, ``value_pair``). LayerNorm (OPT) subtracts the
mean, which does not commute with a rotation: refused before anything loads (:func:`check_rotatable`). The output
is an ordinary checkpoint of the rotated model, so every format, ``eval``, ``generate`` and ``serve`` run it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import TritonqError
from .adapters import Adapter
from .orthogonal import ROTATION_KINDS, Rotation, rotation_matrix


@dataclass(frozen=True)
class RotationSpec:
    """The run's rotation: ``kind`` one of ``ROTATION_KINDS`` and the seed of its signs / random matrices."""

    kind: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ROTATION_KINDS:
            raise TritonqError(f"unknown --rotate {self.kind!r}; use one of {', '.join(ROTATION_KINDS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TritonqError(f"--rotate-seed must be a non-negative integer, not {self.seed!r}")

    @property
    def active(self) -> bool:
        return self.kind != "none"


def check_rotatable(adapter: Adapter) -> None:
    """Refuse, naming the reason, a model whose residual stream a rotation cannot transform exactly."""
    stream = adapter.residual_stream()  # post-norm variants: an error naming it
    if stream.norm != "rms":
        raise TritonqError(f"--rotate needs RMSNorm models: {adapter.family}'s LayerNorm subtracts the mean, which "
                           "does not commute with a rotation; use a Llama-like model or --rotate none")
    if stream.positions is not None:
        raise TritonqError(f"--rotate does not rotate {adapter.family}'s learned position embedding; use --rotate none")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


ROWS_PER_STEP = 8192  # rows multiplied at a time: the float64 copies of a large vocabulary stay small


def _times_q(param: torch.Tensor, q: torch.Tensor) -> None:
    """``param <- param Q`` in float64, a slice of rows at a time (embeddings and ``lm_head`` are the big ones)."""
    for start in range(0, param.shape[0], ROWS_PER_STEP):
        rows = param.data[start:start + ROWS_PER_STEP]
        rows.copy_((rows.double() @ q).to(param.dtype))


def fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """RMSNorm then linear: ``W (x / rms(x) * g) == (W diag(g)) (x / rms(x))``; the norm keeps weight 1."""
    g = norm.weight.data.double()
    for lin in linears:
        _set(lin.weight, lin.weight.data.double() * g[None, :])
    norm.weight.data.fill_(1.0)


def untie_embeddings(model: nn.Module, adapter: Adapter) -> bool:
    """Give ``lm_head`` its own copy of tied embeddings (they are about to differ); True where they were tied."""
    stream = adapter.residual_stream()
    embed, head = model.get_submodule(stream.embedding), model.get_submodule(stream.lm_head)
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def rotate_residual(model: nn.Module, adapter: Adapter, q: torch.Tensor) -> None:
    """Fold the norms, then rotate the residual stream by the orthogonal ``q`` [hidden, hidden] (float64 products)."""
    stream = adapter.residual_stream()
    untie_embeddings(model, adapter)
    embed, head = model.get_submodule(stream.embedding), model.get_submodule(stream.lm_head)
    with torch.no_grad():
        for block in adapter.block_list(model):
            for pair in stream.readers:
                readers = [block.get_submodule(n) for n in pair.balance]
                fold_norm(block.get_submodule(pair.smooth), readers)
                for lin in readers:  # y = W x with x -> Q^T x
                    _times_q(lin.weight, q)
            for name in stream.writers:  # the output joins the stream: out -> Q^T out
                lin = block.get_submodule(name)
                _set(lin.weight, q.T @ lin.weight.data.double())
                if lin.bias is not None:
                    _set(lin.bias, q.T @ lin.bias.data.double())
        fold_norm(model.get_submodule(stream.final_norm), [head])
        _times_q(head.weight, q)
        _times_q(embed.weight, q)


def rotate_heads(model: nn.Module, adapter: Adapter, h: torch.Tensor) -> None:
    """Rotate every value head by the orthogonal ``h`` [head_dim, head_dim]: ``v_proj`` rows per KV head ``H^T W``,
    ``o_proj`` columns per query head ``W H`` (float64 products)."""
    geo = adapter.geometry(model.config)
    v_name, (o_name,) = adapter.value_pair.smooth, adapter.value_pair.balance
    d = geo.head_dim
    with torch.no_grad():
        for block in adapter.block_list(model):
            v, o = block.get_submodule(v_name), block.get_submodule(o_name)
            w = v.weight.data.double().reshape(geo.kv_heads, d, -1)  # [kv, d, hidden]
            _set(v.weight, (h.T @ w).reshape(geo.kv_heads * d, -1))
            if v.bias is not None:
                _set(v.bias, (v.bias.data.double().reshape(geo.kv_heads, d) @ h).reshape(-1))
            w = o.weight.data.double().reshape(o.out_features, geo.heads, d)  # [hidden, heads, d]
            _set(o.weight, (w @ h).reshape(o.out_features, geo.heads * d))


@dataclass(frozen=True)
class RotationRecord:
    """What :func:`rotate_model` did: the matrices' sizes and constructions (``quantization.json``'s ``rotation``)."""

    spec: RotationSpec
    residual: Rotation
    heads: Rotation

    def describe(self) -> dict:
        return {"seed": self.spec.seed, "residual": self.residual.describe(), "heads": self.heads.describe()}

    def log_line(self) -> str:
        return (f"rotate {self.spec.kind} (seed {self.spec.seed}): residual stream {self.residual.matrix.shape[0]} = "
                f"{self.residual.construction}; value heads {self.heads.matrix.shape[0]} = {self.heads.construction}")


def rotate_model(model: nn.Module, adapter: Adapter, spec: RotationSpec) -> RotationRecord:
    """Apply ``spec``'s rotation to the float ``model`` in place (module docstring); the matrices come from one
    generator seeded by ``spec.seed``: the residual rotation first, then the heads'."""
    if not spec.active:
        raise TritonqError("rotate_model was called with --rotate none; nothing to rotate")
    check_rotatable(adapter)
    geo = adapter.geometry(model.config)
    hidden = model.get_submodule(adapter.residual_stream().embedding).weight.shape[1]
    gen = torch.Generator().manual_seed(spec.seed)
    residual = rotation_matrix(hidden, spec.kind, gen)
    heads = rotation_matrix(geo.head_dim, spec.kind, gen)
    rotate_residual(model, adapter, residual.matrix)
    rotate_heads(model, adapter, heads.matrix)
    return RotationRecord(spec, residual, heads)
