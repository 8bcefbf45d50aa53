"""Run packed int4 models: load, prefill/decode/generate, ``tritonq generate`` and ``tritonq serve``.

Generation is a chain of small functions as in gpt-fast's ``generate.py`` (``prefill``,
``decode_one_token``, ``generate_tokens``) over a Hugging Face model whose quantized linears are
:class:`~tritonq.engine.qlinear.QuantLinear`. The server speaks the OpenAI HTTP API
(``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, server-sent-event streaming as in
https://platform.openai.com/docs/api-reference/chat/streaming) on FastAPI + uvicorn; one lock
serialises requests on the single model.
"""

# No ``from __future__ import annotations``: FastAPI reads the request models of the handlers
# defined inside ``create_app`` from their real (not stringified) annotations.

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import TritonqError

# ---------------------------------------------------------------------------------------------------
# loading


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto`` -> CUDA if present else CPU; dtype ``auto`` -> float16 on CUDA, float32 on the CPU."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TritonqError(f"device {device} requested but CUDA is not available; pass --device cpu")
    if dtype in (None, "auto"):
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in ("float32", "float16", "bfloat16"):
        raise TritonqError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return dev, getattr(torch, dtype)


def load_packed_model(directory: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                      cache_dense: bool | None = None):
    """A Hugging Face causal LM from a packed checkpoint (any format ``engine.formats`` reads).

    The skeleton is built with parameters on the meta device; quantized linears become
    ``QuantLinear`` with the packed tensors; only the remaining float tensors are loaded.
    Returns ``(model, tokenizer)`` on ``device`` in eval mode. ``cache_dense`` (default: on off CUDA)
    lets each ``QuantLinear`` keep its dequantized weight after first use, for usable CPU speed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .formats import float_tensors, load_packed_layers
    from .qlinear import QuantLinear, parameters_on_meta, swap_linears

    path = Path(directory)
    if not path.is_dir():
        raise TritonqError(f"model directory {path} does not exist")
    dev, dt = resolve_device_dtype(device, dtype)
    layers = load_packed_layers(path)
    if not layers:
        raise TritonqError(f"{path} has a quantization_config but no packed linears")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we load the packed layers ourselves
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    swap_linears(model, layers, dt)
    state = {k: t.to(dt) if t.is_floating_point() else t for k, t in float_tensors(path, set(layers))}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) or getattr(
        config.get_text_config(), "tie_word_embeddings", False
    ):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise TritonqError(
            f"{path} lacks tensors for {len(missing)} parameters (e.g. {missing[0]}); "
            "the checkpoint is incomplete"
        )
    model.to(dev).eval()
    cache = dev.type != "cuda" if cache_dense is None else cache_dense
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.cache_dense = cache
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The float model behind a packed one: every QuantLinear replaced by a dense ``nn.Linear``.

    Used as the float baseline of ``tritonq bench decode`` (same shapes, same device and dtype).
    """
    import copy

    from .qlinear import QuantLinear

    dense = copy.deepcopy(model)
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                device=mod.qweight.device,
                dtype=mod.scales.dtype,
            )
            lin.weight.data = mod.dequantized_weight()
            if mod.bias is not None:
                lin.bias.data = mod.bias.clone()
            parent, _, leaf = name.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, lin)
    return dense


# ---------------------------------------------------------------------------------------------------
# generation


def stop_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def prompt_ids(tokenizer, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a plain prompt, or of chat messages through the tokenizer's chat template."""
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return tokenizer(text)["input_ids"]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    return tokenizer(prompt)["input_ids"]


def _next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    if temperature <= 0:
        return int(logits.argmax(dim=-1))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def prefill(model, ids: list[int], cache) -> torch.Tensor:
    x = torch.tensor([ids], device=model.device)
    return model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1]


def decode_one_token(model, token: int, cache) -> torch.Tensor:
    x = torch.tensor([[token]], device=model.device)
    return model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1]


@torch.inference_mode()
def generate_tokens(
    model,
    ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: set[int] | frozenset = frozenset(),
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new tokens (KV-cached); stops after yielding a stop token."""
    from transformers import DynamicCache

    if not ids:
        raise TritonqError("the prompt is empty; give at least one token")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = DynamicCache(config=model.config)
    logits = prefill(model, ids, cache)
    for i in range(max_new_tokens):
        tok = _next_token(logits, temperature, top_p, generator)
        yield tok
        if tok in stop_ids or i == max_new_tokens - 1:
            return
        logits = decode_one_token(model, tok, cache)


@dataclass
class Completion:
    """Incremental text of one request; ``finish_reason`` is set once generation ends."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None


def stream_text(
    model,
    tokenizer,
    ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    state: Completion | None = None,
) -> Iterator[str]:
    """Yield text deltas; holds back partial UTF-8 and anything that could begin a stop string."""
    state = state if state is not None else Completion()
    state.prompt_tokens = len(ids)
    stop = [s for s in (stop or []) if s]
    stop_ids = stop_token_ids(model, tokenizer)
    sent = 0
    state.finish_reason = "length"
    for tok in generate_tokens(
        model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_ids=stop_ids
    ):
        if tok in stop_ids:
            state.finish_reason = "stop"
            break
        state.tokens.append(tok)
        text = tokenizer.decode(state.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        hit = min((p for p in (text.find(s) for s in stop) if p >= 0), default=-1)
        if hit >= 0:
            state.text = text[:hit]
            state.finish_reason = "stop"
            if hit > sent:
                yield text[sent:hit]
            return
        hold = max((len(s) - 1 for s in stop), default=0)
        safe = max(sent, len(text) - hold)
        state.text = text
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    state.text = tokenizer.decode(state.tokens, skip_special_tokens=True)
    if len(state.text) > sent:
        yield state.text[sent:]


# ---------------------------------------------------------------------------------------------------
# tritonq generate


def generate_command(args) -> int:
    """``tritonq generate DIR --prompt P [--max-new-tokens N]``: greedy continuation and tokens/s."""
    if args.max_new_tokens < 1:
        raise TritonqError("--max-new-tokens must be at least 1")
    model, tokenizer = load_packed_model(args.model, args.device, args.dtype)
    chat = bool(getattr(tokenizer, "chat_template", None))
    ids = (
        prompt_ids(tokenizer, messages=[{"role": "user", "content": args.prompt}])
        if chat
        else prompt_ids(tokenizer, args.prompt)
    )
    state = Completion()
    t0 = time.perf_counter()
    first = None
    for delta in stream_text(model, tokenizer, ids, args.max_new_tokens, state=state):
        first = first or time.perf_counter()
        sys.stdout.write(delta)
        sys.stdout.flush()
    _sync(model)
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    n = len(state.tokens) + (state.finish_reason == "stop")
    tps = n / (t1 - t0) if t1 > t0 else float("inf")
    print(
        f"[{n} tokens in {t1 - t0:.2f} s: {tps:.1f} tokens/s; prompt {len(ids)} tokens"
        f"{', chat template' if chat else ''}; device {model.device}, {model.dtype}]",
        file=sys.stderr,
    )
    return 0


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


# ---------------------------------------------------------------------------------------------------
# tritonq serve: OpenAI-compatible HTTP API


def create_app(model, tokenizer, model_id: str):
    """The FastAPI application serving one model; requests run one at a time under a lock."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    class ChatMessage(BaseModel):
        role: str
        content: str

    class _Common(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str | None = None
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        stream: bool = False
        stop: str | list[str] | None = None
        seed: int | None = None
        n: int = Field(1, ge=1, le=1)

    class CompletionRequest(_Common):
        prompt: str | list[str]
        max_tokens: int | None = Field(16, ge=1)

    class ChatRequest(_Common):
        messages: list[ChatMessage] = Field(min_length=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    lock = threading.Lock()
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    app = FastAPI(title="tritonq", description=f"OpenAI-compatible server for {model_id}")

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(
            status_code=status,
            content={"error": {"message": message, "type": kind, "param": param, "code": code}},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", loc or None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(TritonqError)
    async def _tritonq(request: Request, exc: TritonqError) -> JSONResponse:
        return error(400, str(exc))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise HTTPException(404, f"model {name!r} does not exist; this server serves {model_id!r}")

    def budget(ids: list[int], max_tokens: int | None) -> int:
        room = context - len(ids) if context else 1 << 30
        if room <= 0:
            raise HTTPException(400, f"the prompt has {len(ids)} tokens; the context holds {context}")
        if max_tokens is not None and max_tokens > room:
            raise HTTPException(
                400,
                f"max_tokens {max_tokens} + {len(ids)} prompt tokens exceed the context of {context} tokens",
            )
        return max_tokens if max_tokens is not None else room

    def usage(state: Completion) -> dict:
        done = len(state.tokens)
        return {
            "prompt_tokens": state.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": state.prompt_tokens + done,
        }

    def run(ids, max_new, req, state) -> Iterator[str]:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        with lock:
            yield from stream_text(
                model,
                tokenizer,
                ids,
                max_new,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=req.seed,
                stop=stop,
                state=state,
            )

    def sse(chunks: Iterator[dict]) -> StreamingResponse:
        def body() -> Iterator[str]:
            for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/v1/models")
    def list_models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "tritonq"}],
        }

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise HTTPException(400, "one prompt per request is supported")
        ids = prompt_ids(tokenizer, prompts[0])
        max_new = budget(ids, req.max_tokens)
        rid, created, state = f"cmpl-{uuid.uuid4().hex}", int(time.time()), Completion()
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_id}
        if req.stream:

            def chunks() -> Iterator[dict]:
                for delta in run(ids, max_new, req, state):
                    yield {
                        **head,
                        "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": None}],
                    }
                yield {
                    **head,
                    "choices": [
                        {"index": 0, "text": "", "logprobs": None, "finish_reason": state.finish_reason}
                    ],
                    "usage": usage(state),
                }

            return sse(chunks())
        for _ in run(ids, max_new, req, state):
            pass
        return {
            **head,
            "choices": [
                {"index": 0, "text": state.text, "logprobs": None, "finish_reason": state.finish_reason}
            ],
            "usage": usage(state),
        }

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        check_model(req.model)
        ids = prompt_ids(tokenizer, messages=[m.model_dump() for m in req.messages])
        max_new = budget(ids, req.max_completion_tokens or req.max_tokens)
        rid, created, state = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), Completion()
        head = {"id": rid, "object": "chat.completion", "created": created, "model": model_id}
        if req.stream:
            head["object"] = "chat.completion.chunk"

            def chunks() -> Iterator[dict]:
                yield {
                    **head,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                }
                for delta in run(ids, max_new, req, state):
                    yield {
                        **head,
                        "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}],
                    }
                yield {
                    **head,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": state.finish_reason}],
                    "usage": usage(state),
                }

            return sse(chunks())
        for _ in run(ids, max_new, req, state):
            pass
        return {
            **head,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": state.text},
                    "finish_reason": state.finish_reason,
                }
            ],
            "usage": usage(state),
        }

    return app


def serve_command(args) -> int:
    """``tritonq serve DIR [--host 127.0.0.1] [--port 8000]``."""
    try:
        import uvicorn
    except ImportError:
        raise TritonqError("tritonq serve needs FastAPI and uvicorn: pip install 'tritonq[serve]'") from None
    model, tokenizer = load_packed_model(args.model, args.device, args.dtype)
    model_id = Path(args.model).resolve().name
    app = create_app(model, tokenizer, model_id)
    print(
        f"serving {model_id} on http://{args.host}:{args.port}/v1 ({model.device}, {model.dtype})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
