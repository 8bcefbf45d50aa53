"""An OpenAI-compatible HTTP API over one packed model loaded by :mod:`tritonq.engine.runtime.serve`.

Endpoints: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, with server-sent-event
streaming as in https://platform.openai.com/docs/api-reference/chat/streaming, on FastAPI. One lock
serialises requests on the single model. Errors have the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``. This module imports FastAPI, so only the server
imports it (``pip install 'tritonq[serve]'``).
"""

# No ``from __future__ import annotations``: FastAPI reads the request models of the handlers
# from their real (not stringified) annotations.

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn as nn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ...errors import TritonqError
from .serve import Completion, prompt_ids, stream_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class ChatMessage(BaseModel):
    role: str
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored
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


# ---------------------------------------------------------------------------------------------------
# response shapes: the two endpoints differ only in where the text sits in a choice


def _text_body(text: str) -> dict:
    return {"text": text, "logprobs": None}


def _message_body(text: str) -> dict:
    return {"message": {"role": "assistant", "content": text}}


def _delta_body(text: str) -> dict:
    return {"delta": {"content": text}}


def _role_body() -> dict:
    return {"delta": {"role": "assistant", "content": ""}}


def _empty_text_body() -> dict:
    return _text_body("")


def _empty_delta_body() -> dict:
    return {"delta": {}}


@dataclass(frozen=True)
class ResponseShape:
    """How one endpoint wraps text: the whole reply, each streamed piece, and the stream's two ends."""

    id_prefix: str
    object: str
    chunk_object: str
    whole: Callable[[str], dict]  # choice body of the non-streaming reply
    piece: Callable[[str], dict]  # choice body of one streamed text delta
    opening: Callable[[], dict] | None  # choice body of a chunk sent before any text, if any
    closing: Callable[[], dict]  # choice body of the last chunk, which carries finish_reason and usage


COMPLETION = ResponseShape("cmpl", "text_completion", "text_completion", _text_body, _text_body, None,
                           _empty_text_body)
CHAT = ResponseShape("chatcmpl", "chat.completion", "chat.completion.chunk", _message_body, _delta_body,
                     _role_body, _empty_delta_body)


def _choice(body: dict, finish_reason: str | None) -> dict:
    return {"index": 0, **body, "finish_reason": finish_reason}


def _usage(state: Completion) -> dict:
    done = len(state.tokens)
    return {"prompt_tokens": state.prompt_tokens, "completion_tokens": done, "total_tokens": state.prompt_tokens + done}


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": kind, "param": param, "code": code}},
    )


def _sse(chunks: Iterator[dict]) -> StreamingResponse:
    def body() -> Iterator[str]:
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(model: nn.Module, tokenizer: "PreTrainedTokenizerBase", model_id: str) -> FastAPI:
    """The FastAPI application serving one model; requests run one at a time under a lock."""
    lock = threading.Lock()
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    app = FastAPI(title="tritonq", description=f"OpenAI-compatible server for {model_id}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", loc or None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(TritonqError)
    async def _tritonq(request: Request, exc: TritonqError) -> JSONResponse:
        return _error(400, str(exc))

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

    def run(ids: list[int], max_new: int, req: _Common, state: Completion) -> Iterator[str]:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        with lock:
            yield from stream_text(
                model, tokenizer, ids, max_new,
                temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop, state=state,
            )

    def reply(shape: ResponseShape, req: _Common, ids: list[int], max_new: int):
        """One response of ``shape``: a JSON body, or the same content as a stream of SSE chunks."""
        state = Completion()
        head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time()),
                "model": model_id}
        deltas = run(ids, max_new, req, state)
        if not req.stream:
            for _ in deltas:
                pass
            return {**head, "choices": [_choice(shape.whole(state.text), state.finish_reason)], "usage": _usage(state)}
        head["object"] = shape.chunk_object

        def chunks() -> Iterator[dict]:
            if shape.opening is not None:
                yield {**head, "choices": [_choice(shape.opening(), None)]}
            for delta in deltas:
                yield {**head, "choices": [_choice(shape.piece(delta), None)]}
            yield {**head, "choices": [_choice(shape.closing(), state.finish_reason)], "usage": _usage(state)}

        return _sse(chunks())

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
        return reply(COMPLETION, req, ids, budget(ids, req.max_tokens))

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        check_model(req.model)
        ids = prompt_ids(tokenizer, messages=[m.model_dump() for m in req.messages])
        return reply(CHAT, req, ids, budget(ids, req.max_completion_tokens or req.max_tokens))

    return app
