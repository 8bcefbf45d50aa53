"""BoA against a float64 transcription of dense GPTQ on the Kronecker Hessian, and its defining identities
(``../shared/docs/boa.md`` §10 oracles), plus end-to-end runs on tiny models of every family."""

import pytest
import torch
import torch.nn as nn
from test_gptq import _layer
from test_pipeline import FAMILIES, make_family_model
from tritonq.engine.adapters import adapter_for
from tritonq.engine.grid import GridSpec, fit_groups
from tritonq.engine.groups import Group
from tritonq.engine.methods import registry
from tritonq.engine.methods.boa import BoAOptions, boa_solve, rope_average, rotary_matrices, search_grids
from tritonq.engine.methods.gptq import GPTQOptions
from tritonq.engine.methods.gptq import solve as gptq_solve
from tritonq.engine.pipeline import quantize_blocks
from tritonq.errors import TritonqError


def _opts(**overrides) -> BoAOptions:
    return BoAOptions(**{"damp": 0.01, "row_damp": 0.01, "qparam": "minmax", **overrides})  # the oracles' grid


def _heads(heads=3, rows=8, d=48, seed=0):
    """Random head weights [G, r, d], a correlated input Hessian and correlated row Hessians per head."""
    gen = torch.Generator().manual_seed(seed)
    w, _, h_col = _layer(n=heads * rows, k=d, tokens=300, seed=seed)
    mix = torch.randn(heads, rows, rows, generator=gen) / rows**0.5 + torch.eye(rows)
    y = torch.randn(heads, 200, rows, generator=gen) @ mix * (0.3 + 2 * torch.rand(heads, 1, rows, generator=gen))
    h_row = y.transpose(1, 2) @ y / 200
    return w.reshape(heads, rows, d), h_col, h_row


def _damp(h, damp):
    return h.double() + damp * torch.diag(h).double().mean() * torch.eye(h.shape[0], dtype=torch.float64)


def _dense_gptq64(w, h, scale, zero, group, maxq, order=None):
    """GPTQ (Frantar et al. 2023, Alg. 1 with B = 1) in float64 on a flat vector ``w`` [n] with Hessian ``h``
    [n, n], in the index order ``order`` (default 0..n-1), every entry on its preset grid ``scale[i]``."""
    n = w.shape[0]
    order = torch.arange(n) if order is None else order
    w, h = w.double()[order].clone(), h.double()[order][:, order]
    s, z = scale.double()[order], zero.double()[order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for j in range(n):
        q[j] = s[j] * (torch.clamp(torch.round(w[j] / s[j]) + z[j], 0, maxq) - z[j])
        w[j + 1:] -= (w[j] - q[j]) / u[j, j] * u[j, j + 1:]
    out = torch.empty_like(q)
    out[order] = q
    return out


def _kron_reference(w, h_col, h_row, spec, opts, col_order=None, row_orders=None):
    """BoA's oracle: per head, dense GPTQ on kron(H_row + damp, H_col + damp) of the row-major flattened
    head, with the grids fitted per row on the original weights."""
    heads, rows, d = w.shape
    g = spec.effective_group(d)
    scale, zero = fit_groups(w.reshape(-1, d), spec)
    scale, zero = scale.reshape(heads, rows, -1), zero.reshape(heads, rows, -1)
    cols = torch.arange(d) // g
    hc = _damp(h_col, opts.damp)
    out = torch.empty(heads, rows, d, dtype=torch.float64)
    for i in range(heads):
        hk = torch.kron(_damp(h_row[i], opts.row_damp), hc)
        col = torch.arange(d) if col_order is None else col_order
        row = torch.arange(rows) if row_orders is None else row_orders[i]
        order = (row[:, None] * d + col[None, :]).reshape(-1)  # rows in turn, each in the column order
        flat = _dense_gptq64(w[i].reshape(-1), hk, scale[i][:, cols].reshape(-1), zero[i][:, cols].reshape(-1),
                             g, spec.maxq, order)
        out[i] = flat.reshape(rows, d)
    return out


def _kron_objective(w, q, h_col, h_row):
    e = (q - w).double()
    return float(torch.einsum("gid,de,gje,gij->", e, h_col.double(), e, h_row.double()))


@pytest.mark.parametrize("bits,group,sym,col,row", [
    (3, -1, False, False, False), (3, 16, False, False, False), (2, 16, True, False, False),
    (3, -1, False, True, True), (4, 16, False, True, False), (3, 16, False, False, True),
])
def test_boa_equals_dense_gptq_on_the_kronecker_hessian(bits, group, sym, col, row):
    w, h_col, h_row = _heads(seed=bits * 7 + max(group, 0) + col + 2 * row)
    spec = GridSpec(bits=bits, group_size=group, sym=sym)
    opts = _opts(act_order_col=col, act_order_row=row, block_size=16)
    res = boa_solve(w, h_col, h_row, spec, opts, "layer")
    col_order = torch.argsort(torch.diag(h_col), descending=True) if col else None
    row_orders = [torch.argsort(torch.diag(h), descending=True) for h in h_row] if row else None
    ref = _kron_reference(w, h_col, h_row, spec, opts, col_order, row_orders)
    # fp32 vs fp64 propagation may flip a rounding near a midpoint: most entries agree, objectives agree
    agree = (res.weight.double() - ref).abs() < 1e-4
    assert agree.float().mean() > 0.97
    hc, hr = _damp(h_col, opts.damp), torch.stack([_damp(h, opts.row_damp) for h in h_row])
    assert _kron_objective(w, res.weight, hc, hr) == pytest.approx(_kron_objective(w, ref, hc, hr), rel=0.03)
    # and the row factor is worth something: one-sided GPTQ (identity rows) does worse on the two-sided objective
    one_sided = boa_solve(w, h_col, None, spec, opts, "layer")
    assert _kron_objective(w, res.weight, hc, hr) < _kron_objective(w, one_sided.weight, hc, hr)


@pytest.mark.parametrize("group,col", [(-1, False), (-1, True), (16, True)])
def test_identity_row_factor_gives_gptq(group, col):
    w, h_col, _ = _heads(heads=2, rows=6, d=64, seed=11)
    spec = GridSpec(bits=3, group_size=group)
    h_row = 3.7 * torch.eye(6).expand(2, 6, 6).clone()
    res = boa_solve(w, h_col, h_row, spec, _opts(act_order_col=col, block_size=32), "layer")
    gptq = gptq_solve([w.reshape(12, 64)], h_col, spec, ["layer"],
                      GPTQOptions(act_order="static" if col else None, damp=0.01, block_size=32))[0]
    assert (res.weight.reshape(12, 64) - gptq.weight).abs().gt(1e-5).float().mean() < 0.005
    assert torch.equal(res.scale.reshape(12, -1), gptq.scale) and torch.equal(res.zero.reshape(12, -1), gptq.zero)


def test_scaling_either_factor_leaves_the_result():
    w, h_col, h_row = _heads(seed=12)
    spec = GridSpec(bits=3, group_size=16)
    base = boa_solve(w, h_col, h_row, spec, _opts(), "layer").weight
    scaled = boa_solve(w, 8.0 * h_col, 0.125 * h_row, spec, _opts(), "layer").weight
    assert (scaled - base).abs().gt(1e-4).float().mean() < 0.01


def test_result_lies_on_the_recorded_grid_and_dead_columns_are_zero():
    w, h_col, h_row = _heads(seed=13)
    h_col[:, 5] = 0
    h_col[5, :] = 0
    spec = GridSpec(bits=3, group_size=16)
    res = boa_solve(w, h_col, h_row, spec, _opts(act_order_row=True, act_order_col=True), "layer")
    assert torch.all(res.weight[..., 5] == 0)
    idx = res.g_idx.long()
    codes = res.weight / res.scale[..., idx] + res.zero[..., idx]
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= 0 and codes.max() <= spec.maxq


@pytest.mark.parametrize("rule", ["mmse", "hessian"])
def test_grid_search_beats_minmax_on_its_own_score(rule):
    w, _, h_col = _layer(n=16, k=64, seed=14)
    spec = GridSpec(bits=3, group_size=32)
    hd = _damp(h_col, 0.01).float()
    s, z = search_grids(w, spec, rule, hd)
    s0, z0 = search_grids(w, spec, "minmax")

    def score(scale, zero):
        from tritonq.engine.grid import fake_quantize
        idx = torch.arange(64) // 32
        e = (fake_quantize(w, scale[:, idx], zero[:, idx], spec.maxq) - w).double()
        if rule == "mmse":
            return e.abs().pow(2.4).reshape(16, 2, 32).sum(-1)
        eg = e.reshape(16, 2, 32)
        blocks = torch.stack([hd[i * 32:(i + 1) * 32, i * 32:(i + 1) * 32] for i in range(2)]).double()
        return torch.einsum("ngi,gij,ngj->ng", eg, blocks, eg)

    assert torch.all(score(s, z) <= score(s0, z0) * (1 + 1e-6))
    assert float(score(s, z).sum()) < float(score(s0, z0).sum())
    assert torch.equal(s, s.half().float())  # scales stay fp16-representable, as the packers need


def test_rope_average_is_symmetric_and_identity_rotation_keeps_the_covariance():
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 100, 8, generator=gen)
    cov = x.transpose(1, 2) @ x
    assert torch.allclose(rope_average(cov, torch.eye(8).expand(5, 8, 8)), cov, atol=1e-5)
    angle = torch.rand(7, generator=gen) * 6
    rot = torch.zeros(7, 8, 8)
    for t in range(7):  # 2-d rotations of pairs (i, i + 4), as rotate_half
        for i in range(4):
            c, s = torch.cos(angle[t] * (i + 1)), torch.sin(angle[t] * (i + 1))
            rot[t, i, i], rot[t, i, i + 4], rot[t, i + 4, i], rot[t, i + 4, i + 4] = c, -s, s, c
    avg = rope_average(cov, rot)
    assert torch.allclose(avg, avg.transpose(1, 2))
    assert torch.linalg.eigvalsh(avg).min() > -1e-4
    expected = sum(rot[t].t() @ cov @ rot[t] for t in range(7)) / 7
    assert torch.allclose(avg, expected, atol=1e-4)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_rotary_matrices_rotate_pre_rope_queries_into_the_observed_ones(tmp_path):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _load(make_family_model(tmp_path / "float", "llama"))
    adapter = adapter_for(model.config)
    block = adapter.block_list(model)[0]
    group = Group(block, 0, adapter.linear_groups[0], adapter, model.config, GridSpec(), torch.device("cpu"), set())
    rot = rotary_matrices(group, 20)
    pre = torch.randn(1, 4, 20, 16)
    cos, sin = model.model.rotary_emb(pre, torch.arange(20)[None])
    post, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
    assert torch.allclose(torch.einsum("tij,bhtj->bhti", rot, pre), post, atol=1e-5)


def _batches(vocab=256, n=4, seqlen=48, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return list(torch.split(torch.randint(0, vocab, (n, seqlen), generator=gen), batch))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("options", [{}, {"block_v": False, "act_order_col": False},  # the defaults before issue 22
                                     {"block_v": True, "act_order_col": True, "act_order_row": True,
                                      "qparam": "hessian"}])
def test_boa_end_to_end_on_every_family(tmp_path, family, options):
    model = _load(make_family_model(tmp_path / "float", family))
    before = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    adapter = adapter_for(model.config)
    spec = GridSpec(bits=3, group_size=32)
    with torch.no_grad():
        report = quantize_blocks(model, adapter, registry.make_method("boa", options), spec, torch.device("cpu"),
                                 _batches(), progress=False)
    assert len(report.layers) == model.config.num_hidden_layers * sum(map(len, adapter.linear_groups))
    for name, mod in model.named_modules():
        if name in report.layers:
            rec = report.layers[name]
            w = mod.weight.data
            assert torch.isfinite(w).all(), name
            assert not torch.equal(w, before[name]), name
            idx = rec.g_idx.long()
            codes = w / rec.scale[:, idx] + rec.zero[:, idx]
            assert torch.allclose(codes, codes.round(), atol=1e-3), name


def test_bad_options_are_clear_errors():
    with pytest.raises(TritonqError, match="--qparam must be one of"):
        BoAOptions(qparam="awq")
    with pytest.raises(TritonqError, match="--row-damp must be in"):
        BoAOptions(row_damp=0)
    with pytest.raises(TritonqError, match="does not take"):
        registry.make_method("boa", {"act_order": "static"})


def test_block_v_hessians_equal_those_from_the_models_causal_attention(tmp_path, monkeypatch):
    """The value factors built in query chunks equal sum_h (A_h X)^T (A_h X) with the attention
    probabilities of transformers' eager attention (causal mask included, boa.md §9.1)."""
    from transformers import AutoModelForCausalLM
    from tritonq.engine.methods import boa as boa_module

    src = make_family_model(tmp_path / "float", "llama")
    eager = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _batches(n=2, seqlen=40, batch=2)[0]
    seen = {}
    block0 = eager.model.layers[0]
    handle = block0.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        probs = eager(input_ids=ids, output_attentions=True).attentions[0]  # [B, H, T, T]
    handle.remove()
    assert torch.all(probs.triu(1) == 0)
    ax = torch.einsum("bhtu,bud->bhtd", probs.double(), seen["x"].double())
    expected = torch.einsum("bgrti,bgrtj->gij", ax.reshape(2, 2, 2, 40, -1), ax.reshape(2, 2, 2, 40, -1))
    expected = expected * 2.0 / (2 * 40 * 2)

    class Capture(boa_module.BoA):
        def quantize(self, group, state, force=None):
            if isinstance(state, boa_module.AttentionStats) and group.index == 0:
                self.value = state.value_hessians()
            return super().quantize(group, state, force)

    monkeypatch.setattr(boa_module, "VALUE_CHUNK", 16)  # several chunks, the last one partial
    model = _load(src)
    method = Capture(BoAOptions(block_v=True))
    with torch.no_grad():
        quantize_blocks(model, adapter_for(model.config), method, GridSpec(bits=4, group_size=32),
                        torch.device("cpu"), [ids], progress=False)
    torch.testing.assert_close(method.value.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group, rule", [(-1, "hessian"), (16, "minmax")])
def test_auto_grid_is_the_hessian_search_per_channel_and_minmax_with_groups(group, rule):
    """``--qparam auto`` (the default since issue 22) gives exactly the result of the rule it stands for, and
    that result differs from the other rule's (so the choice is not a no-op)."""
    seed = int(torch.randint(0, 10_000, ()))
    w, h_col, h_row = _heads(heads=2, rows=6, d=64, seed=seed)
    spec = GridSpec(bits=3, group_size=group)
    assert BoAOptions().grid_rule(spec) == rule and BoAOptions(qparam="mmse").grid_rule(spec) == "mmse"
    auto = boa_solve(w, h_col, h_row, spec, _opts(qparam="auto"), "layer")
    named = boa_solve(w, h_col, h_row, spec, _opts(qparam=rule), "layer")
    other = boa_solve(w, h_col, h_row, spec, _opts(qparam="minmax" if rule == "hessian" else "hessian"), "layer")
    assert torch.equal(auto.weight, named.weight) and torch.equal(auto.scale, named.scale)
    assert not torch.equal(auto.scale, other.scale)
