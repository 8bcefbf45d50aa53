"""The lean CPU decode step (``engine/runtime/lean_decode.py``) and its ops (``kernels/cpu_attention.cpp``).

Oracles: float64 references for the ops (:mod:`tritonq.kernels.cpu_attention`), with stated tolerances: the
ops compute in float32 (relative error a few 2^-24 per addition; ``exp`` to about 2 ulp); transformers' own
forward for the whole step on float models of each supported family (Mistral with a window shorter than the
sequence, Qwen2 with q/k/v biases). Cache positions past a row's length hold NaN, so a read past the length shows.
Negative controls: a wrong window, swapped gate/up.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tritonq.engine.runtime.lean_decode import FAMILIES, LeanDecoder, lean_decoder, lean_refusal
from tritonq.engine.runtime.ragged import RequestCache, prefill_together_works, ragged_forward, ragged_prefill
from tritonq.engine.runtime.serve import generate_tokens
from tritonq.kernels import cpu_attention, cpu_gemv

pytestmark = pytest.mark.skipif(cpu_gemv.extension() is None, reason="the C++ extension did not build")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rms_norm_and_silu_mul_match_float64():
    x = torch.randn(5, 96, generator=_gen(0)) * 3
    w = torch.randn(96, generator=_gen(1))
    ref = cpu_attention.rms_norm_ref(x, w, 1e-5)
    got = cpu_attention.rms_norm(x, w, 1e-5).double()
    assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    gate_up = torch.randn(3, 2 * 80, generator=_gen(2)) * 4  # 80: a 16-lane body and a scalar tail
    ref = cpu_attention.silu_mul_ref(gate_up)
    got = cpu_attention.silu_mul(gate_up).double()
    assert float(((got - ref).abs() / ref.abs().clamp_min(1e-3)).max()) <= 1e-6
    swapped = cpu_attention.silu_mul_ref(torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1))
    assert float((got - swapped).abs().max()) > 1e-2  # negative control: the halves' order matters


def _attention_case(heads: int, kv_heads: int, d: int, lengths: list[int], seed: int, counts=None):
    counts = counts or [1] * len(lengths)
    tokens = sum(counts)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=_gen(seed))
    angles = torch.rand(tokens, d // 2, generator=_gen(seed + 1)) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    k_cache, v_cache = [], []
    for i, (n, fed) in enumerate(zip(lengths, counts)):
        k = torch.full((1, kv_heads, n + fed + 2, d), float("nan"))
        v = torch.full((1, kv_heads, n + fed + 2, d), float("nan"))
        k[:, :, :n] = torch.randn(1, kv_heads, n, d, generator=_gen(seed + 10 + i))
        v[:, :, :n] = torch.randn(1, kv_heads, n, d, generator=_gen(seed + 20 + i))
        k_cache.append(k)
        v_cache.append(v)
    return qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache


@pytest.mark.parametrize(("heads", "kv_heads", "d"), [(4, 4, 16), (8, 2, 32), (6, 3, 64), (2, 1, 40)])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("counts", [None, [3, 1, 6]])
def test_decode_attention_matches_float64_and_appends(heads, kv_heads, d, window, counts):
    """One token per row (decode) or several (prompts, causal among themselves), after ragged cached lengths."""
    lengths = [0, 5, 33]
    qkv, cos, sin, k_cache, v_cache = _attention_case(heads, kv_heads, d, lengths, heads * d + window, counts)
    before = [k.clone() for k in k_cache]
    ref, new_k, new_v = cpu_attention.decode_attention_ref(qkv, cos, sin, k_cache, v_cache, lengths, heads,
                                                           kv_heads, window, d ** -0.5, counts)
    out = cpu_attention.decode_attention(qkv, cos, sin, k_cache, v_cache, lengths, heads, kv_heads, window,
                                         d ** -0.5, counts)
    assert out.shape == (qkv.shape[0], heads * d) and torch.isfinite(out).all()  # nothing past a length was read
    scale = float(torch.stack([v[0, :, :n].abs().max() if n else v.new_ones(()) for v, n in zip(new_v, [
        c.shape[1] for c in new_v])]).max()) + float(max(v[0, :, :n].abs().max() if n else 0 for v, n in zip(
            v_cache, lengths)))
    assert float((out.double() - ref).abs().max()) <= 1e-5 * scale
    for i, n in enumerate(lengths):
        fed = new_k[i].shape[1]
        assert float((k_cache[i][0, :, n:n + fed].double() - new_k[i]).abs().max()) <= 1e-6 * float(
            new_k[i].abs().max())
        assert torch.equal(v_cache[i][0, :, n:n + fed], new_v[i].float())
        assert torch.equal(k_cache[i][:, :, :n], before[i][:, :, :n])  # older keys untouched
        assert torch.isnan(k_cache[i][:, :, n + fed:]).all()  # and nothing written past the new ones
    if window:  # negative control: attending to every key is not the windowed result on the long row
        full, _, _ = cpu_attention.decode_attention_ref(qkv, cos, sin, before, v_cache, lengths, heads, kv_heads,
                                                        0, d ** -0.5, counts)
        assert float((out[-1].double() - full[-1]).abs().max()) > 1e-3


def test_decode_attention_rows_are_batch_invariant_and_builds_agree():
    lengths = [7, 0, 19, 3]
    case = _attention_case(8, 2, 32, lengths, 5)
    together = cpu_attention.decode_attention(*case, lengths, 8, 2, 0, 0.2)
    for i in range(len(lengths)):
        qkv, cos, sin, k_cache, v_cache = _attention_case(8, 2, 32, lengths, 5)
        alone = cpu_attention.decode_attention(qkv[i:i + 1].contiguous(), cos[i:i + 1].contiguous(),
                                               sin[i:i + 1].contiguous(), k_cache[i:i + 1], v_cache[i:i + 1],
                                               lengths[i:i + 1], 8, 2, 0, 0.2)
        assert torch.equal(alone[0], together[i])
    prompt = _attention_case(8, 2, 32, [4, 0], 6, [5, 7])  # prompts fed together: each as alone
    both = cpu_attention.decode_attention(*prompt, [4, 0], 8, 2, 0, 0.2, [5, 7])
    qkv, cos, sin, k_cache, v_cache = _attention_case(8, 2, 32, [4, 0], 6, [5, 7])
    second = cpu_attention.decode_attention(qkv[5:].contiguous(), cos[5:].contiguous(), sin[5:].contiguous(),
                                            k_cache[1:], v_cache[1:], [0], 8, 2, 0, 0.2, [7])
    assert torch.equal(second, both[5:]) and torch.equal(k_cache[1][:, :, :7], prompt[3][1][:, :, :7])
    if cpu_gemv.extension(portable=True) is None:
        pytest.skip(f"the portable build failed: {cpu_gemv.unavailable_reason(True)}")
    qkv, cos, sin, k_cache, v_cache = _attention_case(8, 2, 32, lengths, 5)
    portable = cpu_attention.decode_attention(qkv, cos, sin, k_cache, v_cache, lengths, 8, 2, 0, 0.2, portable=True)
    assert torch.equal(portable, together)
    for d in (64, 128):  # the AVX-512 build keeps these widths' value sums in registers: the same roundings
        native, portable = (cpu_attention.decode_attention(*_attention_case(4, 2, d, lengths, d), lengths, 4, 2, 0,
                                                           d ** -0.5, portable=p) for p in (False, True))
        assert torch.equal(native, portable)
    x, w = torch.randn(3, 80, generator=_gen(3)), torch.randn(80, generator=_gen(4))
    assert torch.equal(cpu_attention.rms_norm(x, w, 1e-6), cpu_attention.rms_norm(x, w, 1e-6, portable=True))
    assert torch.equal(cpu_attention.silu_mul(x), cpu_attention.silu_mul(x, portable=True))


def test_decode_attention_refuses_a_full_cache():
    qkv, cos, sin, k_cache, v_cache = _attention_case(4, 2, 16, [2], 9)
    with pytest.raises(RuntimeError, match="capacity >= length"):
        cpu_attention.decode_attention(qkv, cos, sin, k_cache, v_cache, [5], 4, 2, 0, 0.25)


def _family_model(family: str, seed: int = 0, **extra):
    config_class = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[family]
    config = getattr(transformers, config_class)(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=259, max_position_embeddings=256, tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # RMSNorm weights away from 1, so a skipped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape))
    return model


@pytest.mark.parametrize(("family", "extra"), [("llama", {}), ("mistral", {"sliding_window": 3}),
                                               ("qwen2", {})])
def test_lean_steps_reproduce_the_model_s_forward(family, extra):
    model = _family_model(family, **extra)
    assert lean_refusal(model) is None
    decoder = lean_decoder(model)
    assert isinstance(decoder, LeanDecoder)
    ids = torch.randint(0, 259, (12,), generator=_gen(7)).tolist()
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0].double()
        long, short = RequestCache(), RequestCache()
        prompts = decoder.forward([ids[:5], ids[:2]], [long, short]).double()  # prompts together, unpadded
        scale = float(reference.abs().max())
        assert float((prompts - reference[[4, 1]]).abs().max()) <= 1e-5 * scale
        for i, tok in enumerate(ids[5:11]):  # the short row rides along, three positions behind
            step = decoder.step([tok, ids[2 + i]], [long, short]).double()
            scale = float(reference.abs().max())
            assert float((step[0] - reference[5 + i]).abs().max()) <= 1e-5 * scale
            assert float((step[1] - reference[2 + i]).abs().max()) <= 1e-5 * scale
    assert long.length == 11 and short.length == 8 and all(n == 11 for n in long.lengths.values())


def test_other_models_keep_transformers_decode():
    opt = transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=259,
        word_embed_proj_dim=64)).eval()
    assert "not one of" in lean_refusal(opt) and lean_decoder(opt) is None
    assert len(list(generate_tokens(opt, [1, 2, 3], 4))) == 4
    model = _family_model("llama").double()
    assert "float32" in lean_refusal(model) and lean_decoder(model) is None
    assert set(FAMILIES) == {"llama", "mistral", "qwen2"}


def test_generate_decodes_on_the_lean_step_and_rebuilds_after_a_swap(monkeypatch):
    model = _family_model("llama", seed=3)
    first = lean_decoder(model)  # built and checked (two steps of its own) before the count starts
    steps = []
    real = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, t, r: steps.append(len(r)) or real(self, t, r))
    ids = [5, 9, 2, 7]
    tokens = list(generate_tokens(model, ids, 6))
    assert steps == [1] * 5  # the prompt's pass gives the first token, lean steps the other five
    with torch.inference_mode():
        x = torch.tensor([ids + tokens[:-1]])
        assert model(input_ids=x).logits[0, len(ids) - 1:].argmax(-1).tolist() == tokens
    assert lean_decoder(model) is first
    model.model.layers[0].mlp.act_fn = torch.nn.SiLU()  # a swapped module: the decoder is rebuilt and checked
    assert lean_decoder(model) is not first and lean_decoder(model) is lean_decoder(model)


def test_prefill_together_gives_each_prompt_its_alone_logits_and_cache():
    from tritonq.bench.decode import random_llama, random_llama_config
    from tritonq.engine.runtime.cpu_head import use_cpu_head
    from tritonq.engine.runtime.fused import fuse_input_sharing_linears
    from tritonq.engine.runtime.qlinear import use_cpu_int4

    config = random_llama_config(2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=320)
    model = random_llama(config, "packed", torch.float32, seed=1, group_size=32)
    use_cpu_int4(model)
    fuse_input_sharing_linears(model)
    use_cpu_head(model)  # as load_packed_model does: the fp16 head op is batch-invariant (a BLAS head need not be)
    assert prefill_together_works(model)
    prompts = [torch.randint(0, 320, (n,), generator=_gen(n)).tolist() for n in (9, 3, 14)]
    rows = [RequestCache() for _ in prompts]
    with torch.inference_mode(), cpu_gemv.generating():
        together = ragged_prefill(model, prompts, rows)
        for prompt, row, logits in zip(prompts, rows, together):
            alone = RequestCache()
            assert torch.equal(ragged_forward(model, [prompt], [alone])[0], logits)
            assert row.length == len(prompt)
            assert all(torch.equal(alone.keys[i][:, :, :len(prompt)], row.keys[i][:, :, :len(prompt)])
                       for i in alone.keys)
    with pytest.raises(ValueError, match="empty"):
        ragged_prefill(model, prompts[:1], rows[:1])


def test_generating_runs_every_int4_row_on_the_op():
    codes = torch.randint(0, 16, (32, 64), generator=_gen(11), dtype=torch.uint8)
    scale = torch.rand(2, 32, generator=_gen(12)) * 0.05 + 0.01
    w, s, mn = cpu_gemv.pack_int4_rows(codes, scale, -scale * 8, 32)
    x = torch.randn(cpu_gemv.GEMM_ROWS + 9, 64, generator=_gen(13))
    op = cpu_gemv.int4_gemm(x, w, s, mn, 32)
    dense = torch.nn.functional.linear(x, cpu_gemv.dequantize_int4_rows(w, s, mn, 32))
    assert torch.equal(cpu_gemv.int4_linear(x, w, s, mn, 32), dense)  # evaluation: the stored grid
    with cpu_gemv.generating():
        assert torch.equal(cpu_gemv.int4_linear(x, w, s, mn, 32), op)  # generation: int8 activations, fast
    assert not torch.equal(op, dense)


def test_a_hooked_linear_is_called_as_a_module(monkeypatch):
    """A pre-hook on a packed linear (an online rotation of its input) must run in the lean step too."""
    from tritonq.bench.decode import random_llama, random_llama_config
    from tritonq.engine.runtime.fused import fuse_input_sharing_linears
    from tritonq.engine.runtime.qlinear import use_cpu_int4

    config = random_llama_config(2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=320)
    model = random_llama(config, "packed", torch.float32, seed=2, group_size=32)
    use_cpu_int4(model)
    fuse_input_sharing_linears(model)
    calls = []
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, args: calls.append(1))
    decoder = lean_decoder(model)
    assert decoder is not None
    calls.clear()
    with torch.inference_mode():
        decoder.forward([[3, 4, 5]], [RequestCache()])
    assert calls == [1]


def test_the_structural_check_refuses_a_model_that_ignores_its_cache():
    """Negative control of ``ragged_forward_works``' tolerance: attention that drops the cache is far off."""
    from tritonq.engine.runtime.ragged import STRUCTURAL_TOLERANCE, ragged_forward_works, relative_error

    model = _family_model("llama", seed=4)
    assert ragged_forward_works(model) is None
    for layer in model.model.layers:
        forward = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _f=forward, **k: _f(*a, **{**k, "cache": None})
    why = ragged_forward_works(model)
    assert why is not None and "relative error" in why
    assert relative_error(torch.tensor([1.0, float("nan")]), torch.ones(2)) == float("inf")
    assert 0 < STRUCTURAL_TOLERANCE < 1
