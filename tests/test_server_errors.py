"""The OpenAI-compatible server under bad requests and abandoned clients (issue 20, items 8 and 9).

Everything goes through the HTTP API of ``tritonq serve`` in a subprocess (``serving`` from test_serve).
The model is the tests' tiny random Llama with a 16384-token context and the end-of-sequence row of
``lm_head`` set to zero: its logit is then 0 while the largest of the other 258 is positive, so greedy
decoding never ends a reply early, and a request for ``LONG`` tokens keeps the model busy for tens of
seconds here unless the server stops it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from tritonq.cli import main

from .helpers import make_fake_dir
from .test_serve import _free_port, serving

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CONTEXT = 16384
LONG = 16000  # new tokens asked by the requests that are then abandoned
EOS = 257  # tests/helpers.tiny_config
QUICK_S = 5.0  # a 2-token completion takes well under 0.5 s here; 5 s leaves room for a loaded machine
GREEDY = {"temperature": 0}
ASK = {"messages": [{"role": "user", "content": "Tell me everything"}], **GREEDY}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("server-errors")
    fake = make_fake_dir(root / "fake", bits=4, group_size=32, config_overrides={"max_position_embeddings": CONTEXT})
    weights = load_file(fake / "model.safetensors")
    weights["lm_head.weight"][EOS] = 0
    save_file(weights, fake / "model.safetensors", metadata={"format": "pt"})
    assert main(["pack", str(fake), "--format", "gptq_v2", "--output", str(root / "long-ct")]) == 0
    return root / "long-ct"


@pytest.fixture(scope="module")
def server(packed):
    with serving(packed) as url:
        yield url


def _two_tokens(url: str) -> float:
    """Seconds for a 2-token greedy completion, which must succeed."""
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, **GREEDY}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    return time.monotonic() - t0


def test_default_max_tokens_is_capped(server):
    """No ``max_tokens`` (or ``null``): 256 new tokens on chat, 16 on completions, never to the end of the context."""
    from tritonq.engine.runtime.openai_server import DEFAULT_MAX_TOKENS

    for body in (ASK, {**ASK, "max_tokens": None}):
        r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS["chat"] == 256
        assert r.json()["choices"][0]["finish_reason"] == "length"
    for body in ({"prompt": "hi", **GREEDY}, {"prompt": "hi", "max_tokens": None, **GREEDY}):
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=300)
        assert r.json()["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS["completions"] == 16


def test_abandoned_stream_does_not_delay_the_next_request(server):
    with httpx.Client(timeout=60) as client, client.stream(
        "POST", f"{server}/v1/chat/completions", json={**ASK, "max_tokens": LONG, "stream": True}
    ) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 20:
                break  # leaving both blocks closes the connection mid-stream
    assert seen == 20
    assert _two_tokens(server) < QUICK_S


def test_abandoned_request_does_not_delay_the_next_request(server):
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s of a reply that needs tens of seconds
        httpx.post(f"{server}/v1/chat/completions", json={**ASK, "max_tokens": LONG}, timeout=httpx.Timeout(60, read=2))
    assert time.monotonic() - t0 >= 2
    assert _two_tokens(server) < QUICK_S


def test_requests_queued_behind_an_abandoned_one_run_in_turn(server):
    """Two clients give up on long replies at once; both are dropped, and the next request runs at once."""
    from concurrent.futures import ThreadPoolExecutor

    def give_up(_: int) -> str:
        try:
            httpx.post(f"{server}/v1/chat/completions", json={**ASK, "max_tokens": LONG},
                       timeout=httpx.Timeout(60, read=1.5))
        except httpx.ReadTimeout:
            return "gave up"
        return "finished"

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(give_up, range(2))) == ["gave up", "gave up"]
    assert _two_tokens(server) < QUICK_S


JSON = {"content-type": "application/json"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]

# (case, method, path, body, status, param, words the message must hold)
CASES = [
    ("empty prompt, streaming", "POST", COMP, {"prompt": "", "stream": True}, 400, "prompt", "empty"),
    ("empty prompt", "POST", COMP, {"prompt": ""}, 400, "prompt", "empty"),
    ("seed beyond 64 bits", "POST", COMP, {"prompt": "hi", "seed": 2**64}, 400, "seed", "18446744073709551615"),
    ("seed beyond 64 bits, streaming", "POST", CHAT, {"messages": HI, "seed": -(2**64), "stream": True}, 400, "seed",
     "greater than"),
    ("GET on a POST route", "GET", COMP, None, 405, None, "use POST"),
    ("GET on the chat route", "GET", CHAT, None, 405, None, "use POST"),
    ("unknown route", "POST", "/v1/embeddings", {"input": "hi"}, 404, None, "/v1/chat/completions"),
    ("malformed JSON", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"},]}', 400, None,
     "line 1, column 49"),
    ("body not UTF-8", "POST", COMP, b'{"prompt": "\xff\xfe"}', 400, None, "JSON"),
    ("empty body", "POST", CHAT, b"", 400, None, "empty"),
    ("body a JSON list", "POST", CHAT, [1, 2], 400, None, "JSON object"),
    ("body sent as text/plain", "POST", COMP, "text/plain", 400, None, "application/json"),
    ("messages missing", "POST", CHAT, {"model": "x"}, 400, "messages", "required"),
    ("messages empty", "POST", CHAT, {"messages": []}, 400, "messages", "at least 1"),
    ("message without content", "POST", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content",
     "required"),
    ("content as parts", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     400, "messages[0].content", "valid string"),
    ("unknown role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role",
     "'user'"),
    ("prompt a number", "POST", COMP, {"prompt": 5}, 400, "prompt", "valid list"),
    ("prompt token ids", "POST", COMP, {"prompt": [1, 2, 3]}, 400, "prompt", "valid string"),
    ("two prompts", "POST", COMP, {"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("max_tokens a word", "POST", COMP, {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", "'many'"),
    ("max_tokens 0", "POST", COMP, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("max_tokens beyond the context", "POST", COMP, {"prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens",
     "at most 16382"),
    ("max_completion_tokens beyond the context", "POST", CHAT, {"messages": HI, "max_completion_tokens": 10**6}, 400,
     "max_completion_tokens", "exceed"),
    ("temperature 9", "POST", CHAT, {"messages": HI, "temperature": 9}, 400, "temperature", "less than"),
    ("temperature NaN", "POST", COMP, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", "nan"),
    ("stop not strings", "POST", COMP, {"prompt": "hi", "stop": [1]}, 400, "stop", "valid string"),
    ("n 3", "POST", COMP, {"prompt": "hi", "n": 3}, 400, "n", "less than"),
    ("unknown model", "POST", CHAT, {"messages": HI, "model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize(("case", "method", "path", "body", "status", "param", "words"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, case, method, path, body, status,
                                                                      param, words):
    if body == "text/plain":
        kw = {"content": b'{"prompt": "hi"}', "headers": {"content-type": "text/plain"}}
    elif isinstance(body, bytes):
        kw = {"content": body, "headers": JSON}
    else:
        kw = {} if body is None else {"json": body}
    t0 = time.monotonic()
    r = httpx.request(method, f"{server}{path}", timeout=60, **kw)
    seconds = time.monotonic() - t0
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert words in err["message"] and "\n" not in err["message"]
    assert seconds < QUICK_S  # refused before any generation
    if status == 405:
        assert r.headers["allow"] == "POST"
    if case == "unknown model":
        assert err["code"] == "model_not_found"
    assert _two_tokens(server) < QUICK_S


def test_a_failure_inside_a_stream_ends_it_with_an_error_event(packed):
    """The model fails at its third forward pass (after the 200 headers of a stream went out): the stream
    ends with an OpenAI error event and ``[DONE]``, a non-streaming request gets a 500 in the OpenAI shape,
    and the model's lock is free again. The app runs in-process (uvicorn on a thread) to inject the fault."""
    import uvicorn
    from tritonq.engine.runtime.openai_server import create_app
    from tritonq.engine.runtime.serve import load_generation_model

    model, tokenizer = load_generation_model(str(packed), "cpu")
    calls = {"n": 0, "fail": True}

    def fault(*_) -> None:
        calls["n"] += 1
        if calls["fail"] and calls["n"] % 3 == 0:
            raise RuntimeError("injected fault\nsecond line")

    model.register_forward_hook(fault)
    port = _free_port()
    app = create_app(model, tokenizer, packed.name)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)
        body = {"prompt": "hi", "max_tokens": 8, **GREEDY}
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "injected fault" in err["message"] and "\n" not in err["message"]
        assert set(err) == {"message", "type", "param", "code"}
        calls["n"] = 0
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        calls["fail"] = False
        assert _two_tokens(url) < QUICK_S
    finally:
        server.should_exit = True
        thread.join(timeout=30)
