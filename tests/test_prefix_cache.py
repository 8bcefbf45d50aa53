"""The prompt prefix cache (``engine/runtime/prefix_cache.py``): restored keys and values give the logits and the
tokens of a full prefill bit for bit, on a packed random Llama whose linears run tritonq's int4 op."""

from __future__ import annotations

import pytest
import torch
from tritonq.engine.runtime.batching import BatchEngine
from tritonq.engine.runtime.lean_decode import lean_decoder
from tritonq.engine.runtime.prefix_cache import PrefixCache, common_prefix
from tritonq.engine.runtime.ragged import RequestCache
from tritonq.kernels import cpu_gemv

from .helpers import tiny_tokenizer

VOCAB = 320


@pytest.fixture(scope="module")
def packed():
    from tritonq.bench.decode import random_llama, random_llama_config
    from tritonq.engine.runtime.cpu_head import use_cpu_head
    from tritonq.engine.runtime.fused import fuse_input_sharing_linears
    from tritonq.engine.runtime.qlinear import use_cpu_int4

    config = random_llama_config(2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=VOCAB)
    model = random_llama(config, "packed", torch.float32, seed=2, group_size=32)
    use_cpu_int4(model)
    fuse_input_sharing_linears(model)
    use_cpu_head(model)
    decoder = lean_decoder(model)
    assert decoder is not None
    return model, decoder


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill(decoder, ids: list[int], cache: RequestCache, fed_from: int = 0) -> torch.Tensor:
    with torch.inference_mode(), cpu_gemv.generating():
        return decoder.forward([ids[fed_from:]], [cache])[0]


def _kept(decoder, prompt: list[int], prefixes: PrefixCache) -> torch.Tensor:
    """Prefill ``prompt`` alone, keep it in ``prefixes``; its logits."""
    cache = RequestCache()
    logits = _prefill(decoder, prompt, cache)
    prefixes.store(prompt, cache)
    return logits


def test_a_restored_prefix_gives_the_full_prefill_s_logits_cache_and_next_steps(packed):
    _, decoder = packed
    system = _ids(1, 23)
    first, second = system + _ids(2, 6), system + _ids(3, 9)
    prefixes = PrefixCache(4096)
    _kept(decoder, first, prefixes)

    full, restored = RequestCache(), RequestCache()
    want = _prefill(decoder, second, full)
    n = prefixes.restore(second, restored)
    assert n == len(system) == common_prefix(first, second) and prefixes.hits == n
    got = _prefill(decoder, second, restored, fed_from=n)
    assert torch.equal(got, want)
    assert restored.length == full.length == len(second)
    for layer in full.keys:
        assert torch.equal(restored.keys[layer][:, :, :len(second)], full.keys[layer][:, :, :len(second)])
        assert torch.equal(restored.values[layer][:, :, :len(second)], full.values[layer][:, :, :len(second)])
    with torch.inference_mode(), cpu_gemv.generating():  # decode steps after it agree too
        for token in _ids(4, 5):
            assert torch.equal(decoder.step([token], [restored])[0], decoder.step([token], [full])[0])


def test_the_same_prompt_again_feeds_its_last_token(packed):
    _, decoder = packed
    prompt = _ids(5, 12)
    prefixes = PrefixCache(4096)
    want = _kept(decoder, prompt, prefixes)
    again = RequestCache()
    assert prefixes.restore(prompt, again) == len(prompt) - 1  # the last token is fed: its logits are the output
    assert torch.equal(_prefill(decoder, prompt, again, fed_from=len(prompt) - 1), want)
    other_start = [(prompt[0] + 1) % VOCAB, *prompt[1:]]
    assert prefixes.restore(other_start, RequestCache()) == 0  # shares no leading token: nothing restored


def test_a_wrong_restored_prefix_changes_the_logits(packed):
    """Negative control: the equality above is not vacuous (restored values are what the output reads)."""
    _, decoder = packed
    prompt = _ids(7, 15)
    prefixes = PrefixCache(4096)
    want = _kept(decoder, prompt, prefixes)
    for layers in prefixes._entries.values():
        layers[0][1].mul_(1.5)  # corrupt layer 0's kept values
    corrupt = RequestCache()
    n = prefixes.restore(prompt, corrupt)
    assert not torch.equal(_prefill(decoder, prompt, corrupt, fed_from=n), want)


def test_least_recently_used_prompts_leave_first_within_the_bound(packed):
    _, decoder = packed
    prefixes = PrefixCache(30)
    prompts = [_ids(10 + i, 10) for i in range(3)]
    for prompt in prompts:
        _kept(decoder, prompt, prefixes)
    assert len(prefixes) == 3 and prefixes.held_tokens == 30
    assert prefixes.restore(prompts[0], RequestCache()) == 9  # used: now the most recent
    fourth = _ids(20, 10)
    _kept(decoder, fourth, prefixes)
    assert prefixes.held_tokens <= 30 and len(prefixes) == 3
    assert prefixes.restore(prompts[1], RequestCache()) <= common_prefix(prompts[1], fourth)  # evicted
    assert prefixes.restore(prompts[0], RequestCache()) == 9
    too_long = _ids(30, 31)
    _kept(decoder, too_long, prefixes)  # longer than the whole bound: not kept
    assert tuple(too_long) not in prefixes._entries
    with pytest.raises(ValueError, match="0 or more"):
        PrefixCache(-1)


def test_the_engine_s_replies_are_the_same_with_the_cache_on_and_off(packed):
    model, _ = packed
    tok = tiny_tokenizer()
    system = _ids(40, 20)
    asks = [system + _ids(41 + i, 4 + i) for i in range(3)]

    def replies(tokens: int) -> tuple[list[list[int]], BatchEngine]:
        engine = BatchEngine(model, tok, max_batch=4, prefix_cache_tokens=tokens)
        engine.stop_ids = frozenset()  # every reply runs to its max_new_tokens
        try:
            out = []
            for ids in asks:  # one after another: each later prompt finds the earlier ones kept
                job = engine.submit(ids, 6)
                _wait(job)
                out.append(job.state.tokens)
            return out, engine
        finally:
            engine.close()

    on, engine_on = replies(4096)
    off, engine_off = replies(0)
    assert on == off and all(len(t) == 6 for t in on)
    assert engine_off.prefix_cache is None
    assert engine_on.prefix_cache.hits >= 2 * len(system)  # the later prompts restored the shared start


def _wait(job, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not job.done:
        assert time.monotonic() < deadline, "the engine never finished the request"
        time.sleep(0.001)


def test_a_negative_bound_is_refused_before_the_model_loads(tmp_path):
    from tritonq.cli import main

    assert main(["serve", str(tmp_path / "absent"), "--prefix-cache-tokens", "-1"]) == 2
