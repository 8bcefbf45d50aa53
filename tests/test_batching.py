"""Continuous batching (issue 23 item 4): ``engine/runtime/ragged.py`` and ``engine/runtime/batching.py``.

The engine tests run a tiny random Llama whose linears compute row by row (``_row_by_row``), so a row's
logits cannot depend on the other rows: there, a request's tokens in a batch must equal its tokens alone
bit for bit, and equal :func:`~tritonq.engine.runtime.serve.generate_tokens`'s. The end-of-sequence row of
``lm_head`` is zero, so greedy replies run to their ``max_new_tokens``. A forward hook that sleeps a few
milliseconds keeps requests in flight long enough for others to join while they decode. The HTTP tests
drive ``tritonq serve`` in a subprocess (``serving`` from test_serve).
"""

from __future__ import annotations

import json
import threading
import time
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tritonq.engine.runtime import batching
from tritonq.engine.runtime.batching import BatchEngine, EngineUnavailable, QueueFull, Sampling
from tritonq.engine.runtime.lean_decode import LeanDecoder
from tritonq.engine.runtime.ragged import RequestCache, ragged_forward, ragged_forward_works
from tritonq.engine.runtime.serve import Completion, generate_tokens, stream_text

from .helpers import tiny_config, tiny_tokenizer
from .test_pipeline import FAMILIES

EOS = 257
WAIT_S = 120.0


def _row_by_row(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.stack([F.linear(r, linear.weight, linear.bias) for r in rows])
    return out.reshape(*x.shape[:-1], -1)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a random 2-block Llama with batch-invariant (row-by-row) linears; EOS never wins."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config(max_position_embeddings=512)).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.forward = types.MethodType(_row_by_row, mod)
    return model, tiny_tokenizer()


@pytest.fixture
def slow(tiny, monkeypatch):
    """Each forward pass of the tiny model sleeps 5 ms: decodes last long enough for others to join. Records
    the rows of every pass: the base model's (prefills, alone or together) and the lean decode step's."""
    model = tiny[0]
    passes: list[int] = []

    def hook(_, args, kwargs, output):
        passes.append(kwargs["input_ids"].shape[0])
        time.sleep(0.005)

    step = LeanDecoder.step

    def slow_step(self, tokens, rows):
        passes.append(len(rows))
        time.sleep(0.005)
        return step(self, tokens, rows)

    monkeypatch.setattr(LeanDecoder, "step", slow_step)
    handle = model.model.register_forward_hook(hook, with_kwargs=True)
    yield passes
    handle.remove()


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Client:
    """One submitted generation and what it received."""

    def __init__(self, engine: BatchEngine, ids: list[int], max_new: int, **kw) -> None:
        self.pieces: list[str] = []
        self.failure: BaseException | None = None
        self.finished = threading.Event()
        self.job = engine.submit(ids, max_new, emit=self._event, **kw)

    def _event(self, event) -> None:
        if isinstance(event, str):
            self.pieces.append(event)
        else:
            self.failure = event
            self.finished.set()

    def wait(self) -> Completion:
        assert self.finished.wait(WAIT_S), "the engine never finished the request"
        return self.job.state


def _alone(engine: BatchEngine, ids: list[int], max_new: int, **kw) -> Client:
    client = Client(engine, ids, max_new, **kw)
    client.wait()
    return client


def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ragged_passes_reproduce_each_family(family):
    """Prefill then decode through per-row caches gives the model's own logits (Mistral with a 3-token window)."""
    import transformers

    cls_name, extra = FAMILIES[family]
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=259,
                  max_position_embeddings=512)
    if family != "opt":
        common.update(intermediate_size=128, num_key_value_heads=2)
    if family == "mistral":
        extra = {**extra, "sliding_window": 3}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**common, **extra)).eval()
    assert ragged_forward_works(model) is None
    ids = torch.randint(0, 259, (11,)).tolist()
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0]
        long, short = RequestCache(), RequestCache()
        got = [ragged_forward(model, [ids[:6]], [long])[0]]
        ragged_forward(model, [ids[:2]], [short])
        for i, tok in enumerate(ids[6:]):  # the short row rides along, one position behind each step
            step = ragged_forward(model, [[tok], [ids[2 + i]]], [long, short])
            got.append(step[0])
            torch.testing.assert_close(step[1], reference[2 + i], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(got), reference[5:], rtol=1e-4, atol=1e-5)
    assert long.length == 11 and short.length == 7
    assert model.config._attn_implementation == "sdpa"  # restored after every ragged pass


def test_requests_join_and_leave_between_steps_with_their_alone_outputs(tiny, slow):
    model, tok = tiny
    engine = BatchEngine(model, tok, max_batch=4)
    try:
        assert engine.batched
        asks = [(_prompt(1, 7), 40), (_prompt(2, 3), 6), (_prompt(3, 12), 15), (_prompt(4, 5), 9)]
        alone = [_alone(engine, ids, n).job.state.tokens for ids, n in asks]
        slow.clear()
        first = Client(engine, *asks[0])
        _until(lambda: len(first.job.state.tokens) >= 5, "the first request never started")
        others = [Client(engine, *a) for a in asks[1:]]  # join while the first decodes
        states = [c.wait() for c in (first, *others)]
        passes = list(slow)  # rows of each forward pass of the batched run
    finally:
        engine.close()
    for (ids, n), state, want in zip(asks, states, alone, strict=True):
        assert state.tokens == want and len(want) == n and state.finish_reason == "length"
        assert want == list(generate_tokens(model, ids, n))
    assert max(passes) >= 3  # several requests shared passes
    decode_passes = len(passes) - len(asks)  # one prefill each
    assert decode_passes < sum(n for _, n in asks) - len(asks)  # fewer passes than tokens: shared steps
    assert passes[-1] == 1  # the long request finished alone once the others had left


def test_stop_strings_and_max_tokens_per_request_stream_as_stream_text_does(tiny, slow):
    model, tok = tiny
    ids = [_prompt(10 + i, 4 + i) for i in range(3)]
    texts = [tok.decode(list(generate_tokens(model, p, 24)), skip_special_tokens=True) for p in ids]
    stops = [[texts[0][6:8]], [texts[1][9:10], "never there"], None]
    engine = BatchEngine(model, tok, max_batch=3)
    try:
        clients = [Client(engine, p, n, stop=s) for p, n, s in zip(ids, (24, 24, 5), stops, strict=True)]
        states = [c.wait() for c in clients]
    finally:
        engine.close()
    for p, n, s, client, state in zip(ids, (24, 24, 5), stops, clients, states, strict=True):
        want_state = Completion()
        want = list(stream_text(model, tok, p, n, stop=s, state=want_state))
        assert client.pieces == want  # the same pieces, held back the same way
        assert "".join(client.pieces) == state.text == want_state.text
        assert state.finish_reason == want_state.finish_reason
        assert state.tokens == want_state.tokens
    assert states[0].finish_reason == states[1].finish_reason == "stop"
    assert states[0].text == texts[0][: texts[0].find(stops[0][0])]
    assert states[2].finish_reason == "length" and len(states[2].tokens) == 5


def test_sampling_state_is_per_request(tiny, slow):
    """A seeded sampled request gives its alone tokens beside greedy neighbours (its own generator)."""
    model, tok = tiny
    hot = Sampling(temperature=0.9, top_p=0.95, seed=7)
    ids = _prompt(20, 6)
    want = list(generate_tokens(model, ids, 16, temperature=0.9, top_p=0.95, seed=7))
    engine = BatchEngine(model, tok, max_batch=4)
    try:
        clients = [Client(engine, _prompt(21, 5), 16), Client(engine, ids, 16, sampling=hot),
                   Client(engine, _prompt(22, 9), 16), Client(engine, ids, 16, sampling=hot)]
        states = [c.wait() for c in clients]
    finally:
        engine.close()
    assert states[1].tokens == states[3].tokens == want
    assert want != list(generate_tokens(model, ids, 16))  # sampling did change the reply


def test_cancelling_one_request_leaves_the_others_intact(tiny, slow):
    model, tok = tiny
    asks = [(_prompt(30 + i, 5), 30) for i in range(3)]
    engine = BatchEngine(model, tok, max_batch=3)
    try:
        clients = [Client(engine, *a) for a in asks]
        _until(lambda: len(clients[1].job.state.tokens) >= 4, "the requests never started")
        engine.cancel(clients[1].job)
        states = [c.wait() for c in clients]
    finally:
        engine.close()
    for (ids, n), state in zip(asks, states, strict=True):
        assert state.tokens == list(generate_tokens(model, ids, n))[: len(state.tokens)]
    assert states[0].finish_reason == states[2].finish_reason == "length"
    assert states[1].finish_reason == "cancelled" and 4 <= len(states[1].tokens) < 30
    assert "".join(clients[1].pieces) == states[1].text


def test_queue_bound_refuses_and_close_refuses_with_a_reason(tiny, slow):
    model, tok = tiny
    engine = BatchEngine(model, tok, max_batch=1, max_queue=1)
    try:
        running = Client(engine, _prompt(40, 4), 60)
        _until(lambda: len(running.job.state.tokens) >= 1, "the first request never started")
        queued = Client(engine, _prompt(41, 4), 4)
        with pytest.raises(QueueFull, match=r"--max-queue 1"):
            Client(engine, _prompt(42, 4), 4)
        engine.cancel(queued.job)  # a queued request that is cancelled leaves the queue at once
        assert queued.wait().finish_reason == "cancelled" and queued.job.state.tokens == []
        assert engine.load[1] == 0
    finally:
        engine.close()
    assert running.wait().finish_reason == "cancelled"
    with pytest.raises(EngineUnavailable, match="shutting down"):
        Client(engine, _prompt(43, 4), 4)


def test_a_failed_pass_fails_its_requests_and_the_engine_serves_on(tiny):
    model, tok = tiny
    engine = BatchEngine(model, tok, max_batch=2)
    fail = {"at": None, "n": 0}

    def fault(*_):
        fail["n"] += 1
        if fail["n"] == fail["at"]:
            raise RuntimeError("injected fault")

    handle = model.get_input_embeddings().register_forward_hook(fault)  # every pass embeds once, lean steps too
    try:
        ids = _prompt(50, 6)
        want = _alone(engine, ids, 8).job.state.tokens
        fail.update(at=fail["n"] + 4)  # a decode pass of the next request
        broken = _alone(engine, ids, 8)
        assert isinstance(broken.failure, RuntimeError) and "injected fault" in str(broken.failure)
        assert _alone(engine, ids, 8).job.state.tokens == want
    finally:
        handle.remove()
        engine.close()


def test_a_model_that_cannot_batch_is_served_one_row_at_a_time(tiny, slow, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(batching, "ragged_forward_works", lambda _: "stand-in refusal")
    with pytest.warns(UserWarning, match="one row at a time"):
        engine = BatchEngine(model, tok, max_batch=4)
    try:
        assert not engine.batched
        asks = [(_prompt(60 + i, 3 + i), 6 + i) for i in range(3)]
        states = [c.wait() for c in [Client(engine, *a) for a in asks]]
    finally:
        engine.close()
    for (ids, n), state in zip(asks, states, strict=True):
        assert state.tokens == list(generate_tokens(model, ids, n))
    assert max(slow) == 1


def test_bounds_are_checked_before_the_model_loads(tmp_path):
    from tritonq.cli import main

    assert main(["serve", str(tmp_path / "absent"), "--max-batch", "0"]) == 2
    assert main(["serve", str(tmp_path / "absent"), "--max-queue", "-1"]) == 2


# ---------------------------------------------------------------------------------------------------
# over HTTP: `tritonq serve --max-batch --max-queue` in a subprocess


@pytest.fixture(scope="module")
def packed_long(tmp_path_factory):
    """The server tests' tiny packed Llama whose replies never end early (test_server_errors.packed)."""
    pytest.importorskip("fastapi")
    from .test_server_errors import packed

    return packed.__wrapped__(tmp_path_factory)


def _post_all(url: str, bodies: list[dict], path: str = "/v1/chat/completions") -> list:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with httpx.Client(timeout=WAIT_S, limits=httpx.Limits(max_connections=len(bodies))) as client, \
            ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post(f"{url}{path}", json=body), bodies))


def test_64_concurrent_requests_get_200s_and_429s_and_the_server_serves_on(packed_long):
    from .test_serve import serving

    # 96 tokens keep a request busy for tenths of a second, while the 64 arrive within a few hundredths
    body = {"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 96, "temperature": 0}
    with serving(packed_long, "--max-batch", "2", "--max-queue", "4") as url:
        replies = _post_all(url, [body] * 64)
        after = _post_all(url, [body])[0]
    codes = [r.status_code for r in replies]
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= 6  # at least a full batch and a full queue were taken
    for r in replies:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 96
        else:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
            assert "--max-queue 4" in err["message"] and "\n" not in err["message"]
            assert int(r.headers["retry-after"]) >= 1
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 96


def test_concurrent_streams_with_stop_strings_match_their_whole_replies(packed_long):
    import httpx

    from .test_serve import _sse, serving

    asks = [{"messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 20, "temperature": 0}
            for i in range(3)]
    with serving(packed_long, "--max-batch", "3") as url:
        whole = _post_all(url, asks)
        texts = [r.json()["choices"][0]["message"]["content"] for r in whole]
        asks = [{**a, "stop": [t[4:6]]} for a, t in zip(asks, texts, strict=True)]
        stopped = _post_all(url, asks)

        def stream(body: dict) -> list:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                              timeout=WAIT_S) as r:
                assert r.status_code == 200
                return _sse(r)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:
            streams = list(pool.map(stream, asks))
    for ask, text, reply, chunks in zip(asks, texts, stopped, streams, strict=True):
        cut = text[: text.find(ask["stop"][0])]
        assert reply.json()["choices"][0]["message"]["content"] == cut
        assert reply.json()["choices"][0]["finish_reason"] == "stop"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == cut
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_client_leaving_its_stream_leaves_the_other_streams_intact(packed_long):
    import httpx

    from .test_serve import serving

    asks = [{"messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 48, "temperature": 0}
            for i in range(3)]

    def stream(body: dict, leave_after: int | None = None) -> str:
        text, seen = "", 0
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=WAIT_S) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                seen += 1
                text += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                if seen == leave_after:
                    break  # closes the connection mid-stream
        return text

    from concurrent.futures import ThreadPoolExecutor

    with serving(packed_long, "--max-batch", "3") as url:
        alone = [r.json()["choices"][0]["message"]["content"] for r in [_post_all(url, [a])[0] for a in asks]]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(stream, asks, [None, 5, None]))
    assert got[0] == alone[0] and got[2] == alone[2]
    assert alone[1].startswith(got[1]) and len(got[1]) < len(alone[1])


def test_a_closed_engine_answers_503(tiny):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from tritonq.engine.runtime.openai_server import create_app

    model, tok = tiny
    app = create_app(model, tok, "tiny", max_batch=2, max_queue=2)
    app.state.engine.close()
    r = TestClient(app).post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error" and int(r.headers["retry-after"]) >= 1


def test_an_engine_whose_loop_fails_fails_its_requests_and_refuses_with_503s_reason(tiny, slow, monkeypatch):
    model, tok = tiny
    engine = BatchEngine(model, tok, max_batch=2)
    try:
        running = Client(engine, _prompt(70, 4), 60)
        _until(lambda: len(running.job.state.tokens) >= 2, "the request never started")

        def bug() -> None:
            raise AssertionError("a bug in the loop")

        monkeypatch.setattr(engine, "_drop_cancelled", bug)
        running.wait()
        assert isinstance(running.failure, AssertionError)
        with pytest.raises(EngineUnavailable, match="engine failed .*a bug in the loop"):
            Client(engine, _prompt(71, 4), 4)
    finally:
        engine.close()


def test_a_chunk_after_cached_tokens_is_masked_causally(tiny):
    """Several queries after a non-empty row cache (not what the engine sends, but the attention must not
    assume an empty cache): the logits equal the model's own forward on the whole sequence."""
    model, _ = tiny
    ids = _prompt(80, 9)
    cache = RequestCache()
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ragged_forward(model, [ids[:5]], [cache])
        got = ragged_forward(model, [ids[5:]], [cache])[0]
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-5)
