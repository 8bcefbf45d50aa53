"""BoA: attention-aware two-sided GPTQ (Kim et al., "BoA: Attention-aware Post-training Quantization without
Backpropagation", ICML 2025, arXiv:2406.13474), following ``../shared/docs/boa.md`` §1-4 and §9-10.

q_proj and k_proj are quantized against the error of the attention scores, a Kronecker-factored Hessian
``H_row ⊗ H_col`` per head (boa.md §1):

* ``H_col``: the shared input covariance of q/k/v (the GPTQ Hessian, :class:`.hessian.HessianAccumulator`);
* ``H_row`` of query head ``h``: the covariance of the post-RoPE keys of its KV group, rotated back and
  averaged over the calibration positions, ``mean_t R_t^T Cov(k) R_t`` (boa.md §1.3); of KV head ``g``: the
  same from the queries of its group, averaged over the group's query heads. Models without rotary
  embeddings (OPT) use the plain covariances. Qwen3's per-head q_norm/k_norm sit before RoPE: its
  statistics are post-norm and the norm's Jacobian is ignored, as upstream does.

The solve (boa.md §2) is GPTQ's sequential rule on the row-major flattened head: every row is swept over
its columns with ``U_col`` (the upper Cholesky factor of ``H_col^-1``, GPTQ's lazy blocks, the shared core
:func:`.hessian.blocked_quantize`), and its total residual ``w_i - q_i`` is then propagated to the later
rows with coefficients ``U_row[i, i'] / U_row[i, i]``. Because ``chol((A ⊗ B)^-1) = chol(A^-1) ⊗ chol(B^-1)``
this is exactly dense GPTQ on the Kronecker Hessian (tested against a float64 transcription). All heads of
q and k share ``U_col`` and are one batch. On CUDA the sweep of a block of rows runs in one Triton launch
and the cross-row compensation of the block is one batched matrix product (``kernels/boa_rows.py``).

v_proj is one-sided GPTQ on ``H_col`` (``--no-block-v``), or with ``--block-v`` (the default) on per-KV-head
Hessians of the attention-weighted inputs ``A_h X`` averaged over the group's query heads (boa.md §3), accumulated
in chunks of query positions so the ``[heads, L, L]`` probabilities never exist at once; the causal mask is
applied explicitly (boa.md §9.1; sliding windows are not applied: they only matter beyond the window,
longer than our calibration windows). o_proj and the MLP are GPTQ through :func:`.gptq.solve`.

Grids (``--qparam``, boa.md §4) are fitted per output row (and group) on the original weights before the
solve and stay fixed (the static-group rule with ``--group-size``, which upstream BoA lacks; TurboBoA
instead fits groups lazily). They apply to q/k/v; o_proj and the MLP keep GPTQ's grid (min-max, or the
shrink search of ``--mse``). ``minmax`` is the spec's grid (so ``--mse`` applies there too); ``mmse`` and
``hessian`` are upstream's 200 candidates (shrink ``1 - k/100``, zero floored and ceiled) scored by
``sum |q - w|^2.4`` or by ``(q - w) H_col (q - w)^T`` on the group's diagonal block of the damped ``H_col``;
``auto`` (the default) is ``hessian`` per channel and ``minmax`` with groups.

Where we differ from the released code: column act-order and ``--block-v`` are on by default, chosen on
calibration-side evidence (bench/RESULTS.md, issue 22); damping defaults to GPTQ's tritonq default (0.1) on
``H_col`` and upstream's 0.01 on ``H_row``; dead inputs get ``H_jj = 1`` as in GPTQ (upstream uses 1/seqlen:
the value is immaterial because the weight column is zeroed); Cholesky failures retry with more damping a
bounded number of times (boa.md §9.4).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ... import kernels
from ...errors import TritonqError
from ...kernels.grid_rule import minmax_scale_zero
from ..grid import GridSpec, default_g_idx, fake_quantize, fit_groups, group_block_error, keep_better
from ..hessian import HessianAccumulator, blocked_quantize, check_block_size, check_finite, inverse_cholesky
from .base import LayerResult, Method
from .gptq import GPTQOptions
from .gptq import solve as gptq_solve

if TYPE_CHECKING:
    from ..distributed import Collective
    from ..groups import Group

QPARAMS = ("auto", "minmax", "mmse", "hessian")
SHRINK_STEPS = 100  # upstream's candidate ranges p = 1 - k/100, k = 0..99
SEARCH_NORM = 2.4  # GPTQ's error norm, used by the mmse score
ROW_BLOCK = 16  # rows per call of the row sweep; one batched GEMM carries their residuals to the later rows
VALUE_CHUNK = 128  # query positions per chunk of the block_v attention
ROPE_CHUNK = 256  # positions per chunk of the RoPE average


@dataclass(frozen=True)
class BoAOptions:
    # act_order_col, block_v and qparam=auto: chosen on held-out pydoc and the Vim manual at 3 bits, as GPTQ's
    # defaults were (bench/RESULTS.md, "Defaults chosen on calibration-side evidence"; --no-FLAG turns a flag off)
    act_order_col: bool = field(default=True, metadata={
        "help": "quantize columns by decreasing input-Hessian diagonal (grids stay on the original groups)"})
    act_order_row: bool = field(default=False, metadata={
        "help": "quantize each head's rows of q/k by decreasing row-Hessian diagonal"})
    qparam: str = field(default="auto", metadata={
        "help": "grid per output row of q/k/v, fixed before the solve: minmax, mmse (|err|^2.4 search), "
                "hessian (H-weighted search), or auto: hessian per channel, minmax with groups",
        "choices": QPARAMS, "const": "hessian"})
    block_v: bool = field(default=True, metadata={
        "help": "v_proj against each head's attention output (per-KV-head attention-weighted Hessians)"})
    damp: float = field(default=0.1, metadata={"help": "damping, a fraction of the mean Hessian diagonal"})
    row_damp: float = field(default=0.01, metadata={
        "help": "damping of the q/k row Hessians, a fraction of their mean diagonal"})
    block_size: int = field(default=128, metadata={"help": "lazy-update block width (columns)"})

    def __post_init__(self) -> None:
        if self.qparam not in QPARAMS:
            raise TritonqError(f"--qparam must be one of {', '.join(QPARAMS)}, got {self.qparam!r}")
        for flag, value in (("--damp", self.damp), ("--row-damp", self.row_damp)):
            if not 0 < value < 10:
                raise TritonqError(f"{flag} must be in (0, 10), got {value}")
        check_block_size(self.block_size)

    def grid_rule(self, spec: GridSpec) -> str:
        """The q/k/v grid rule for ``spec``: ``auto`` is the H-weighted search per channel, where one range spans
        the whole row and its choice matters most, and min-max with groups (what won on calibration-side text)."""
        if self.qparam != "auto":
            return self.qparam
        return "hessian" if spec.group_size == -1 else "minmax"


def _role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class AttentionStats:
    """What BoA observes for the q/k/v group of one block: the shared input Hessian, the second moments of
    the post-RoPE queries [heads, D, D] and keys [kv_heads, D, D], and with ``block_v`` the per-KV-head
    Hessians of the attention-weighted inputs [kv_heads, d, d]."""

    def __init__(self, group: Group, block_v: bool) -> None:
        geo = group.adapter.geometry(group.config)
        self.geo = geo
        d, dev = group.linears[0].in_features, group.device
        self.inputs = HessianAccumulator(d, dev, group.collective)
        self.cov_q = torch.zeros(geo.heads, geo.head_dim, geo.head_dim, device=dev)
        self.cov_k = torch.zeros(geo.kv_heads, geo.head_dim, geo.head_dim, device=dev)
        self.qk_tokens = 0
        self.positions = 0
        attention = group.block.get_submodule(group.adapter.attention)
        # OPT scales the queries inside the projection and calls the attention with scaling 1
        self.score_scale = float(getattr(attention, "scaling", geo.head_dim**-0.5)) if geo.rotary else 1.0
        self.value = torch.zeros(geo.kv_heads, d, d, device=dev) if block_v else None
        self.value_tokens = 0
        self._x: torch.Tensor | None = None

    def reduce(self, collective: Collective) -> None:
        """Every rank's statistics: the input Hessian merged (``HessianAccumulator.reduce``), the fp32 moment sums
        added in rank order in fp64 (``Collective.sum``) and rounded once, the token counts summed."""
        if collective.world == 1:
            return
        self.inputs.reduce(collective)
        self.cov_q = collective.sum(self.cov_q).to(self.cov_q.dtype)
        self.cov_k = collective.sum(self.cov_k).to(self.cov_k.dtype)
        self.qk_tokens = collective.sum_count(self.qk_tokens)
        self.positions = int(collective.max(torch.tensor([self.positions]))[0])
        if self.value is not None:
            self.value = collective.sum(self.value).to(self.value.dtype)
            self.value_tokens = collective.sum_count(self.value_tokens)

    def on_input(self, x: torch.Tensor) -> None:
        self.inputs.add(x)
        if self.value is not None:
            self._x = x

    def on_attention(self, query: torch.Tensor, key: torch.Tensor) -> None:
        q, k = query.float(), key.float()
        self.cov_q += torch.einsum("bhti,bhtj->hij", q, q)
        self.cov_k += torch.einsum("bhti,bhtj->hij", k, k)
        self.qk_tokens += q.shape[0] * q.shape[2]
        self.positions = max(self.positions, q.shape[2])
        if self.value is not None:
            self._add_value(q, k)

    def _add_value(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Accumulate ``sum_h (A_h X)^T (A_h X)`` per KV group, one chunk of query positions at a time."""
        x = self._x.float()
        b, heads, t, _ = q.shape
        kv, rep = self.geo.kv_heads, heads // self.geo.kv_heads
        keys = k.repeat_interleave(rep, dim=1)  # transformers' repeat_kv layout: head h reads group h // rep
        for t0 in range(0, t, VALUE_CHUNK):
            t1 = min(t0 + VALUE_CHUNK, t)
            scores = torch.einsum("bhtd,bhud->bhtu", q[:, :, t0:t1], keys) * self.score_scale
            future = torch.arange(t, device=q.device)[None, :] > torch.arange(t0, t1, device=q.device)[:, None]
            probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
            ax = torch.einsum("bhtu,bud->bhtd", probs, x).reshape(b, kv, rep, t1 - t0, -1)
            self.value += torch.einsum("bgrti,bgrtj->gij", ax, ax)
        self.value_tokens += b * t * rep
        self._x = None

    def value_hessians(self) -> torch.Tensor:
        """Per-KV-head block_v Hessians, GPTQ's scale ``2/T`` (mean over the group's query heads)."""
        return self.value * (2.0 / max(self.value_tokens, 1))

    def row_factors(self, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
        """Row Hessians of q_proj [heads, D, D] (from keys) and k_proj [kv_heads, D, D] (from queries)."""
        geo = self.geo
        rep = geo.heads // geo.kv_heads
        n = max(self.qk_tokens, 1)
        keys = self.cov_k / n
        queries = (self.cov_q / n).reshape(geo.kv_heads, rep, geo.head_dim, geo.head_dim).mean(dim=1)
        if geo.rotary:
            rot = rotary_matrices(group, self.positions).to(keys.device)
            keys, queries = rope_average(keys, rot), rope_average(queries, rot)
        return keys.repeat_interleave(rep, dim=0), queries


def rotary_matrices(group: Group, positions: int) -> torch.Tensor:
    """``R_t`` [positions, D, D] with ``post = R_t pre``, built by applying the model's own rotary embedding
    (its class and ``apply_rotary_pos_emb``, from the attention's modeling module) to the unit vectors, so the
    layout (rotate_half pairs) and any rope scaling are the model's (boa.md §9.8)."""
    attention = group.block.get_submodule(group.adapter.attention)
    module = sys.modules[type(attention).__module__]
    classes = [v for n, v in vars(module).items() if n.endswith("RotaryEmbedding") and isinstance(v, type)]
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if len(classes) != 1 or apply is None:
        raise TritonqError(f"BoA cannot build the rotary matrices of {module.__name__} (expected one "
                           "*RotaryEmbedding class and apply_rotary_pos_emb); this architecture is not supported")
    rope = classes[0](config=group.config)
    head_dim = group.adapter.geometry(group.config).head_dim
    pos = torch.arange(positions)[None]
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos)
    basis = torch.eye(head_dim)[None, :, None, :].expand(1, head_dim, positions, head_dim)  # basis[0, j, t] = e_j
    rotated, _ = apply(basis, basis, cos.float(), sin.float())  # rotated[0, j, t] = R_t e_j
    return rotated[0].permute(1, 2, 0).contiguous()


def rope_average(cov: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """``mean_t R_t^T C_g R_t`` for every head ``g`` of ``cov`` [G, D, D], over ``rot`` [T, D, D] in chunks."""
    out = torch.zeros_like(cov)
    for t0 in range(0, rot.shape[0], ROPE_CHUNK):
        r = rot[t0:t0 + ROPE_CHUNK]
        out += torch.einsum("tji,gjk,tkl->gil", r, cov, r)
    out /= rot.shape[0]
    return 0.5 * (out + out.transpose(1, 2))


def search_grids(weight: torch.Tensor, spec: GridSpec, rule: str, hessian: torch.Tensor | None = None,
                 layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Grids [N, groups] of ``weight`` [N, K] by ``rule`` (boa.md §4): ``minmax`` is the spec's own fit;
    ``mmse``/``hessian`` search upstream's 200 candidates (best strictly smaller score, from +inf)."""
    if rule == "minmax":
        return fit_groups(weight, spec, layer)
    n, k = weight.shape
    groups = spec.groups_for(k, layer)
    g = spec.effective_group(k)
    w = weight.float().reshape(n, groups, g)
    lo = w.amin(dim=2).clamp(max=0.0)
    hi = w.amax(dim=2).clamp(min=0.0)
    blocks = None
    if rule == "hessian":
        if hessian is None:
            raise TritonqError("the hessian grid needs the layer's input Hessian")
        h = hessian.float()
        blocks = torch.stack([h[i * g:(i + 1) * g, i * g:(i + 1) * g] for i in range(groups)])
    best = torch.full((n, groups), float("inf"), device=w.device)
    scale = torch.zeros_like(best)
    zero = torch.zeros_like(best)
    for step in range(SHRINK_STEPS):
        p = 1.0 - step / SHRINK_STEPS
        s, z_round = minmax_scale_zero(p * lo, p * hi, spec.maxq, spec.sym)
        if spec.sym:
            candidates = (z_round,)
        else:
            z0 = -(p * lo) / s
            candidates = tuple(torch.clamp(f(z0), 0, spec.maxq) for f in (torch.floor, torch.ceil))
        for z in candidates:
            err = fake_quantize(w, s[..., None], z[..., None], spec.maxq) - w
            if blocks is None:
                score = err.abs().pow(SEARCH_NORM).sum(dim=2)
            else:
                score = group_block_error(err, blocks)
            best, (scale, zero) = keep_better(best, score, (scale, zero), (s, z))
    return scale, zero


@dataclass
class HeadResult:
    weight: torch.Tensor  # [G, r, d] fake-quantized, original row and column order
    scale: torch.Tensor  # [G, r, groups]
    zero: torch.Tensor  # [G, r, groups]
    g_idx: torch.Tensor  # [d]
    loss: float


def _dead_filtered(hessian: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's dead-input rule on a copy: ``H_jj = 1`` and ``W[..., j] = 0`` where ``H_jj == 0``."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w = w.clone()
    w[..., dead] = 0.0
    return h, w


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    return h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)


def boa_solve(weight: torch.Tensor, h_col: torch.Tensor, h_row: torch.Tensor | None, spec: GridSpec,
              options: BoAOptions, label: str, force: str | None = None) -> HeadResult:
    """BoA of heads ``weight`` [G, r, d] sharing ``h_col`` [d, d], with row Hessians ``h_row`` [G, r, r]
    (``None``: one-sided, plain GPTQ of all rows with these grids). Steps of boa.md §2."""
    check_finite(h_col, label)
    if h_row is not None:
        check_finite(h_row, f"{label} (row factor)")
    heads, rows, d = weight.shape
    h, w = _dead_filtered(h_col, weight.float().to(h_col.device))
    original_h, original = h, w
    g_idx = default_g_idx(d, spec).to(w.device)
    groups = spec.groups_for(d, label)
    rule = options.grid_rule(spec)
    scale, zero = search_grids(w.reshape(heads * rows, d), spec, rule, _damped(h, options.damp), label)
    scale, zero = scale.reshape(heads, rows, groups), zero.reshape(heads, rows, groups)

    col_perm = None
    work_g_idx = g_idx
    if options.act_order_col:
        col_perm = torch.argsort(torch.diag(h), descending=True)
        w, h, work_g_idx = w[..., col_perm], h[col_perm][:, col_perm], g_idx[col_perm]
    col_factor = inverse_cholesky(h, options.damp, label)
    u_col = col_factor.upper
    row_perm = None
    if h_row is not None:
        h_row = h_row.float().to(w.device)
        if options.act_order_row:
            row_perm = torch.argsort(torch.diagonal(h_row, dim1=1, dim2=2), dim=1, descending=True)
            gather = row_perm[..., None]
            w = torch.gather(w, 1, gather.expand(-1, -1, d))
            scale = torch.gather(scale, 1, gather.expand(-1, -1, groups))
            zero = torch.gather(zero, 1, gather.expand(-1, -1, groups))
            h_row = torch.stack([hr[p][:, p] for hr, p in zip(h_row, row_perm)])
        u_row = torch.stack([inverse_cholesky(hr, options.row_damp, f"{label} head {i} (row factor)").upper
                             for i, hr in enumerate(h_row)])
        q = two_sided_sweep(w, u_col.contiguous(), u_row, scale, zero, work_g_idx, spec, force)
    else:
        res = blocked_quantize(w.reshape(heads * rows, d), u_col, spec, work_g_idx, options.block_size,
                               (scale.reshape(heads * rows, groups), zero.reshape(heads * rows, groups)), force=force)
        q = res.weight.reshape(heads, rows, d)
    if col_perm is not None:
        q = q[..., torch.argsort(col_perm)]
    if row_perm is not None:
        inverse = torch.argsort(row_perm, dim=1)[..., None]
        q = torch.gather(q, 1, inverse.expand(-1, -1, d))
        scale = torch.gather(scale, 1, inverse.expand(-1, -1, groups))
        zero = torch.gather(zero, 1, inverse.expand(-1, -1, groups))
    loss = _objective(original, q, _damped(original_h, col_factor.damp),
                      None if h_row is None else h_row, options.row_damp, row_perm)
    return HeadResult(q, scale, zero, g_idx, loss)


def _objective(w: torch.Tensor, q: torch.Tensor, h_col: torch.Tensor, h_row: torch.Tensor | None,
               row_damp: float, row_perm: torch.Tensor | None) -> float:
    """Half the two-sided objective ``tr(dW H_col dW^T H_row)`` with damped factors, ``H_row`` scaled to mean
    diagonal 1 (so it is in GPTQ's loss units; identity rows for one-sided layers)."""
    e = (q - w).double()
    ec = e @ h_col.double().to(e.device)
    if h_row is None:
        return 0.5 * float((ec * e).sum())
    hr = torch.stack([_damped(x, row_damp) for x in h_row.double()])
    if row_perm is not None:  # h_row is in working row order; bring it back to the original rows
        inv = torch.argsort(row_perm, dim=1)
        hr = torch.stack([x[p][:, p] for x, p in zip(hr, inv)])
    hr = hr / torch.diagonal(hr, dim1=1, dim2=2).mean(dim=1)[:, None, None]
    return 0.5 * float(torch.einsum("gid,gij,gjd->", ec, hr, e))


def two_sided_sweep(w: torch.Tensor, u_col: torch.Tensor, u_row: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor, g_idx: torch.Tensor, spec: GridSpec, force: str | None = None) -> torch.Tensor:
    """Rows of every head in turn: GPTQ sweep of row ``i`` of all heads with ``u_col``, then the later rows
    ``i'`` take ``-= U_row[i, i'] / U_row[i, i] * (w_i - q_i)`` (boa.md §2 step 5), lazily: inside a block
    of :data:`ROW_BLOCK` rows one kernel call (``kernels.boa_sweep_rows``), after it one batched GEMM for all
    later rows (``kernels.trailing_update``). Returns q [G, r, d]."""
    w = w.float().contiguous().clone()
    heads, rows, d = w.shape
    coef = (u_row / torch.diagonal(u_row, dim1=1, dim2=2)[..., None]).contiguous()  # U[i, i'] / U[i, i]
    scale, zero = scale.contiguous(), zero.contiguous()
    g_idx = g_idx.to(device=w.device, dtype=torch.int32).contiguous()
    q = torch.empty_like(w)
    with _one_thread(not kernels.use_triton(w, force)):
        for r0 in range(0, rows, ROW_BLOCK):
            r1 = min(r0 + ROW_BLOCK, rows)
            q[:, r0:r1], delta = kernels.boa_sweep_rows(w, u_col, coef, scale, zero, g_idx, r0, r1 - r0,
                                                        spec.effective_group(d), spec.maxq, spec.sym, force=force)
            if r1 < rows:
                kernels.trailing_update(w[:, r1:], coef[:, r0:r1, r1:].transpose(1, 2), delta, force=force)
    return q


@contextmanager
def _one_thread(active: bool) -> Iterator[None]:
    """Run the CPU reference single-threaded: its matrices are [heads, ...] slivers, and handing each tiny
    product to a thread pool costs more than the product (7x slower with 2 threads on a busy 2-core host)."""
    if not active:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BoA(Method):
    name = "boa"
    summary = ("BoA: attention-aware two-sided GPTQ for q/k, GPTQ elsewhere (Kim et al. 2025); at 4 bits no better "
               "than GPTQ on SmolLM2-135M (bench/RESULTS.md)")
    Options = BoAOptions
    data_parallel = "replicated"  # q and k are solved together: every rank runs the same solve on reduced stats

    def act_order_groups(self) -> str | None:
        """``--act-order-col`` reorders columns with every group's grid fixed first (GPTQ's static groups):
        ``g_idx`` stays trivial. ``--act-order-row`` reorders rows, which no ``g_idx`` records."""
        return "static" if self.options.act_order_col else None

    def _gptq_options(self) -> GPTQOptions:
        o = self.options
        return GPTQOptions(act_order="static" if o.act_order_col else None, damp=o.damp, block_size=o.block_size)

    def reduce(self, state: AttentionStats | HessianAccumulator, collective: Collective) -> Any:
        state.reduce(collective)
        return state

    def observe(self, group: Group) -> Any:
        roles = [_role(n) for n in group.names]
        if "q_proj" in roles and "k_proj" in roles:
            stats = AttentionStats(group, self.options.block_v)
            group.on_input(group.names[0], stats.on_input)
            group.on_attention(stats.on_attention)
            return stats
        acc = HessianAccumulator(group.linears[0].in_features, group.device, group.collective)
        group.on_input(group.names[0], acc.add)
        return acc

    def quantize(self, group: Group, state: Any, force: str | None = None) -> list[LayerResult]:
        tokens = state.inputs.tokens if isinstance(state, AttentionStats) else state.tokens
        if tokens == 0:
            raise TritonqError(f"BoA saw no calibration tokens for {group.label}; give calibration data")
        weights = [lin.weight.data for lin in group.linears]
        if not isinstance(state, AttentionStats):
            return gptq_solve(weights, state.hessian, group.spec, group.full_names, self._gptq_options(), force=force)
        return self._attention(group, state, weights, force)

    def _attention(self, group: Group, stats: AttentionStats, weights: list[torch.Tensor],
                   force: str | None) -> list[LayerResult]:
        geo, spec = stats.geo, group.spec
        roles = [_role(n) for n in group.names]
        by_role = dict(zip(roles, weights))
        names = dict(zip(roles, group.full_names))
        d, dh = weights[0].shape[1], geo.head_dim
        if geo.heads % geo.kv_heads or by_role["q_proj"].shape[0] != geo.heads * dh or \
                by_role["k_proj"].shape[0] != geo.kv_heads * dh:
            raise TritonqError(f"BoA: the q/k shapes of {group.label} do not match {geo.heads} heads and "
                               f"{geo.kv_heads} KV heads of size {dh}; this model is not supported")
        for name in group.full_names:
            spec.groups_for(d, name)
        h_col = stats.inputs.hessian
        row_q, row_k = stats.row_factors(group)
        qk = torch.cat([by_role["q_proj"].float().reshape(geo.heads, dh, d),
                        by_role["k_proj"].float().reshape(geo.kv_heads, dh, d)]).to(h_col.device)
        res = boa_solve(qk, h_col, torch.cat([row_q, row_k]), spec, self.options, f"{names['q_proj']} (+k_proj)",
                        force)
        out = {}
        for role, sl in (("q_proj", slice(0, geo.heads)), ("k_proj", slice(geo.heads, None))):
            n = by_role[role].shape[0]
            out[role] = LayerResult(res.weight[sl].reshape(n, d), res.scale[sl].reshape(n, -1),
                                    res.zero[sl].reshape(n, -1), res.g_idx, {"loss": res.loss / 2})
        if "v_proj" in by_role:
            wv = by_role["v_proj"].float().to(h_col.device)
            if self.options.block_v:
                parts = [boa_solve(wv.reshape(geo.kv_heads, dh, d)[g:g + 1], hv, None, spec, self.options,
                                   f"{names['v_proj']} head {g}", force)
                         for g, hv in enumerate(stats.value_hessians())]
                cat = [torch.cat([getattr(p, a) for p in parts]).reshape(wv.shape[0], -1)
                       for a in ("weight", "scale", "zero")]
                out["v_proj"] = LayerResult(*cat, parts[0].g_idx, {"loss": sum(p.loss for p in parts)})
            else:
                r = boa_solve(wv[None], h_col, None, spec, self.options, names["v_proj"], force)
                out["v_proj"] = LayerResult(r.weight[0], r.scale[0], r.zero[0], r.g_idx, {"loss": r.loss})
        missing = [role for role in roles if role not in out]
        if missing:
            raise TritonqError(f"BoA does not know the linear {missing[0]} of {group.label}")
        return [out[role] for role in roles]
