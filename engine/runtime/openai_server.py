"""An OpenAI-compatible HTTP API over one packed model loaded by :mod:`tritonq.engine.runtime.serve`.

Endpoints: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, with server-sent-event
streaming as in https://platform.openai.com/docs/api-reference/chat/streaming, on FastAPI. Concurrent
requests are decoded together, one forward pass per step, by a
:class:`~tritonq.engine.runtime.batching.BatchEngine` (continuous batching: a request joins after its
prefill and leaves when it ends). This module imports FastAPI, so only the server imports it
(``pip install 'tritonq[serve]'``).

Default length. A request without ``max_tokens`` (or with ``null``) gets at most
``DEFAULT_MAX_TOKENS``: 16 new tokens on ``/v1/completions``, OpenAI's documented default for that
endpoint, and 256 on ``/v1/chat/completions``, where OpenAI and vLLM let a reply run to the end of the
context. On one model serving one request at a time that was minutes of work nobody asked for (issue 20: the next
2-token request waited 288 s); 256 tokens hold a usual chat answer, and a client that wants more says so,
up to the context.

Abandoned work. A request whose client goes is cancelled in the engine: a non-streaming request watches
the ASGI receive channel for ``http.disconnect``; a stream cancels whenever its response ends (done, client
gone, failed). A cancelled request leaves the batch before the next step (the others go on untouched), and
one cancelled while it queued never starts.

Load. At most ``max_batch`` requests decode at once and ``max_queue`` more wait; past that a request gets a
429 with ``Retry-After`` at once, and while the server shuts down (or if its engine thread died) a 503, so
a client is never left hanging on an overloaded server.

Errors. Every error has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, FastAPI's
own 404/405/422 and unexpected failures included: ``invalid_request_error`` with a 4xx where the request
is at fault, ``server_error`` with a 500 otherwise. Everything a request can get wrong (JSON, types, an
empty prompt, the seed range, the context budget) is checked before any header is sent; a failure inside
a stream, after the 200, ends it with an ``error`` event and ``[DONE]`` rather than a dropped connection.

(Past ~400 lines because the one-line error messages and the cancellation are this layer's own work; the
request models with ``validation_error`` are the part to move out if it grows.)
"""

# No ``from __future__ import annotations``: FastAPI reads the request models of the handlers
# from their real (not stringified) annotations.

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

import anyio
import torch.nn as nn
from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ...errors import TritonqError
from .batching import PREFIX_CACHE_TOKENS, BatchEngine, EngineUnavailable, Generation, QueueFull, Sampling
from .serve import Completion, prompt_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256}
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the range torch.Generator.manual_seed takes
_log = logging.getLogger("tritonq.server")


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


_FIELDS = frozenset().union(*(m.model_fields for m in (CompletionRequest, ChatRequest, ChatMessage)))


class ApiError(Exception):
    """A refused request: the HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


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


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_body(status, message, param, code), headers=headers)


# ---------------------------------------------------------------------------------------------------
# request errors in one line each


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _param(loc: tuple) -> str | None:
    """``messages[0].content`` from pydantic's ``('body', 'messages', 0, 'content')``; union-member tags
    such as ``'list[str]'`` (not field names) end the path."""
    path = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELDS:
            path += f".{part}" if path else part
        else:
            break
    return path or None


def _invalid_json(error: dict, doc: object) -> str:
    """Where the parse failed as line and column (FastAPI gives a character offset in ``loc``)."""
    pos, where = error["loc"][-1], ""
    if isinstance(doc, str) and isinstance(pos, int):
        line, column = doc.count("\n", 0, pos) + 1, pos - doc.rfind("\n", 0, pos)
        where = f" at line {line}, column {column} (character {pos})"
    return f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'JSON decode error')}{where}; " \
           "send one JSON object"


def validation_error(errors: list[dict], doc: object) -> tuple[str, str | None]:
    """One line and the ``param`` for FastAPI's validation errors (the first field that failed)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return _invalid_json(first, doc), None
    param = _param(tuple(first.get("loc", ())))
    if param is None:  # the body itself: empty, not JSON, or not an object
        if first.get("type") == "missing":
            return "the body is empty; send a JSON object with the endpoint's fields", None
        return (f"the body must be a JSON object with the endpoint's fields (content-type application/json); "
                f"got {_shown(first.get('input'))}"), None
    if first.get("type") == "missing":
        return f"{param} is required", param
    # a union (prompt: str | list[str]) fails once per member: name every alternative
    msgs = [e["msg"] for e in errors if _param(tuple(e.get("loc", ()))) == param]
    said = "; or ".join(dict.fromkeys(msgs))
    return f"{param}: {said} (got {_shown(first.get('input'))})", param


# ---------------------------------------------------------------------------------------------------
# generation in the batch engine, cancelled when its client goes

RETRY_AFTER_S = 1  # a full queue drains by a request every few tokens; a second is a fair first retry


def _submit(engine: BatchEngine, ids: list[int], max_new: int, req: "_Common") -> tuple[Generation, AsyncIterator]:
    """Queue a generation; its events arrive on the returned receiver, in this event loop. Refusals become
    429 (queue full) or 503 (shutting down, engine failed) before any header is sent."""
    loop = asyncio.get_running_loop()
    send, receive = anyio.create_memory_object_stream[object](math.inf)

    def deliver(event: object) -> None:  # on the event loop
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            send.send_nowait(event)
            if event is None or isinstance(event, BaseException):
                send.close()

    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    try:
        job = engine.submit(ids, max_new, Sampling(req.temperature, req.top_p, req.seed), stop,
                            emit=lambda event: loop.call_soon_threadsafe(deliver, event))
    except QueueFull as exc:
        raise ApiError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except EngineUnavailable as exc:
        raise ApiError(503, str(exc), code="service_unavailable",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return job, receive


async def _cancel_on_disconnect(request: Request, cancel: Callable[[], None]) -> None:
    """Call ``cancel`` once the client closes the connection (the body is read: only the disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    cancel()


async def _run_whole(request: Request, engine: BatchEngine, job: Generation, receive: AsyncIterator) -> None:
    """Wait for a non-streaming generation; cancel it if the client disconnects. A failure is raised."""
    failure: BaseException | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_on_disconnect, request, partial(engine.cancel, job))
        async with receive:
            async for event in receive:
                if isinstance(event, BaseException):
                    failure = event
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


class EventStream(StreamingResponse):
    """Server-sent events of a generation in the engine; however the response ends (done, client gone,
    failed), the generation is cancelled, so its batch row is free for the next step."""

    def __init__(self, events: AsyncIterator[str], cancel: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):  # the client went while we wrote (ASGI spec 2.4 servers)
            pass
        finally:
            self._cancel()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(model: nn.Module, tokenizer: "PreTrainedTokenizerBase", model_id: str, max_batch: int = 8,
               max_queue: int = 32, prefix_cache_tokens: int = PREFIX_CACHE_TOKENS) -> FastAPI:
    """The FastAPI application serving one model: up to ``max_batch`` requests decode together, up to
    ``max_queue`` more wait, prompts' keys and values are kept for ``prefix_cache_tokens`` positions (see
    :class:`~tritonq.engine.runtime.batching.BatchEngine`)."""
    engine = BatchEngine(model, tokenizer, max_batch, max_queue, prefix_cache_tokens)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await to_thread.run_sync(engine.close)  # later requests get 503; active ones end as cancelled

    app = FastAPI(title="tritonq", description=f"OpenAI-compatible server for {model_id}", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_error(list(exc.errors()), exc.body)
        return _error(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            allowed = (headers or {}).get("Allow", "another method")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
        elif exc.status_code == 404:
            message = (f"no route {request.url.path}; this server has /v1/models, /v1/completions and "
                       "/v1/chat/completions")
        elif exc.status_code == 400:  # FastAPI could not read the body (not UTF-8, say)
            message = f"{exc.detail}; send one JSON object, encoded in UTF-8"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message, headers=headers)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(TritonqError)
    async def _tritonq(request: Request, exc: TritonqError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"the server failed: {type(exc).__name__}: {exc}".splitlines()[0])

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {model_id!r}", "model",
                           "model_not_found")

    def budget(ids: list[int], max_tokens: int | None, default: int, param: str) -> int:
        if not ids:
            raise ApiError(400, "the prompt is empty (no tokens); give at least one token", "prompt")
        room = context - len(ids) if context else 1 << 30
        if room <= 0:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the context holds {context}", "prompt")
        if max_tokens is None:
            return min(default, room)
        if max_tokens > room:
            raise ApiError(400, f"{param} {max_tokens} + {len(ids)} prompt tokens exceed the context of {context} "
                                f"tokens; ask for at most {room}", param)
        return max_tokens

    async def tokens(prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        from jinja2 import TemplateError

        try:
            return await to_thread.run_sync(partial(prompt_ids, tokenizer, prompt, messages))
        except TemplateError as exc:
            raise ApiError(400, f"the chat template refused the messages: {exc}", "messages") from None

    async def reply(shape: ResponseShape, req: _Common, ids: list[int], max_new: int, request: Request):
        """One response of ``shape``: a JSON body, or the same content as a stream of SSE chunks."""
        head = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time()),
                "model": model_id}
        job, receive = _submit(engine, ids, max_new, req)
        state: Completion = job.state
        if not req.stream:
            await _run_whole(request, engine, job, receive)
            return {**head, "choices": [_choice(shape.whole(state.text), state.finish_reason)], "usage": _usage(state)}
        head["object"] = shape.chunk_object

        async def events() -> AsyncIterator[str]:
            if shape.opening is not None:
                yield _sse({**head, "choices": [_choice(shape.opening(), None)]})
            async with receive:
                async for item in receive:
                    if isinstance(item, BaseException):
                        _log.error("generation failed in a stream: %s: %s", type(item).__name__, item)
                        message = f"generation failed: {type(item).__name__}: {item}".splitlines()[0]
                        yield _sse(_error_body(500, message))
                        yield _sse("[DONE]")
                        return
                    if item is not None:
                        yield _sse({**head, "choices": [_choice(shape.piece(item), None)]})
            yield _sse({**head, "choices": [_choice(shape.closing(), state.finish_reason)], "usage": _usage(state)})
            yield _sse("[DONE]")

        return EventStream(events(), partial(engine.cancel, job))

    @app.get("/v1/models")
    def list_models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "tritonq"}],
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request is supported; send a string", "prompt")
        ids = await tokens(prompts[0])
        max_new = budget(ids, req.max_tokens, DEFAULT_MAX_TOKENS["completions"], "max_tokens")
        return await reply(COMPLETION, req, ids, max_new, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        ids = await tokens(messages=[m.model_dump() for m in req.messages])
        asked, param = req.max_completion_tokens, "max_completion_tokens"
        if asked is None:
            asked, param = req.max_tokens, "max_tokens"
        return await reply(CHAT, req, ids, budget(ids, asked, DEFAULT_MAX_TOKENS["chat"], param), request)

    return app
