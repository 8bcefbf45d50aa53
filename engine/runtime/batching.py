"""Continuous batching: every active request advances by one token per forward pass of the model.

One engine thread owns the model. Between steps it drops the requests that finished or were cancelled
and admits waiting ones (up to ``max_batch``), prefilled into their own KV caches together in one pass
(:func:`~tritonq.engine.runtime.ragged.ragged_prefill`, where the model gives each prompt its alone logits) or
one by one; then one pass decodes a token for every active request together (on the lean step,
:mod:`~tritonq.engine.runtime.lean_decode`, where it runs the model) (Orca, Yu et al. OSDI 2022,
iteration-level scheduling; vLLM's scheduler). Caches are ragged (:mod:`~tritonq.engine.runtime.ragged`):
no padding, no re-prefill when the batch changes, and a row's attention is computed as in a batch of one,
so under greedy decoding a request's tokens in a batch equal its tokens alone wherever the linears are
batch-invariant (a row's output does not depend on the other rows).

Each request keeps its own sampling state (temperature, top_p, a generator seeded by its seed),
``max_new_tokens``, stop ids and stop strings; its text goes out through the same
:class:`~tritonq.engine.runtime.serve.TextDeltas` as :func:`~tritonq.engine.runtime.serve.stream_text`.

Bounds. At most ``max_batch`` requests decode together; at most ``max_queue`` wait beyond the free batch
slots, and :meth:`BatchEngine.submit` refuses more with :class:`QueueFull` (the server's 429). A closed
engine, or one whose thread died, refuses with :class:`EngineUnavailable` (503). A forward pass that
raises fails the requests in it, not the engine.

A model whose forward ignores the ragged cache (checked once at start by
:func:`~tritonq.engine.runtime.ragged.ragged_forward_works`) is served one row at a time per step, each on
its own ``DynamicCache``: the same scheduling, without the shared pass.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ...errors import TritonqError, warn
from ...kernels import cpu_gemv
from .lean_decode import lean_decoder
from .prefix_cache import PrefixCache
from .ragged import RequestCache, prefill_together_works, ragged_forward, ragged_forward_works, ragged_prefill
from .serve import Completion, TextDeltas, _next_token, decode_one_token, decode_threads, prefill, stop_token_ids

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedTokenizerBase

_log = logging.getLogger("tritonq.server")

#: Prompt tokens prefilled in one pass when requests join together (padded ones too, rows x the longest, on
#: transformers' forward): bounds the pass's activations while sharing its Python and operator overhead.
PREFILL_TOKENS = 4096
#: Prompt positions whose keys and values the engine keeps for later prompts with the same start
#: (:mod:`~tritonq.engine.runtime.prefix_cache`; ``tritonq serve --prefix-cache-tokens``). SmolLM2-135M holds
#: 46 KB per position in float32, a 7B Llama with 8 KV heads 256 KB.
PREFIX_CACHE_TOKENS = 2048
Event = str | BaseException | None  # a text piece, the failure that ended the request, or None: finished


class QueueFull(Exception):
    """Too many requests wait; retry later (HTTP 429)."""


class EngineUnavailable(Exception):
    """The engine is closed or its thread failed (HTTP 503)."""


def check_bounds(max_batch: int, max_queue: int, prefix_cache_tokens: int = PREFIX_CACHE_TOKENS) -> None:
    """Raise if the batch, queue or prefix cache bound cannot work (checked before a server loads its model)."""
    if max_batch < 1:
        raise TritonqError(f"--max-batch must be at least 1 (got {max_batch}); 1 decodes one request at a time")
    if max_queue < 0:
        raise TritonqError(f"--max-queue must be 0 or more (got {max_queue}); 0 queues nothing beyond the batch")
    if prefix_cache_tokens < 0:
        raise TritonqError(f"--prefix-cache-tokens must be 0 or more (got {prefix_cache_tokens}); 0 turns the "
                           "prompt prefix cache off")


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: ``temperature`` 0 is greedy; ``seed`` seeds its own generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Generation:
    """One generation: its inputs, its ``state`` (text, tokens, ``finish_reason``) and the engine's bookkeeping.

    ``emit`` receives every event on the engine thread; it must not block.
    """

    ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop: list[str]
    emit: Callable[[Event], None]
    state: Completion = field(default_factory=Completion)
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0  # tokens sampled, a stop token included
    last: int = -1  # the token to feed at the next step
    cached: int = 0  # leading prompt tokens restored from the prefix cache, not prefilled
    cache: RequestCache | Cache | None = None  # RequestCache (batched) or a DynamicCache (one row at a time)
    deltas: TextDeltas | None = None
    generator: torch.Generator | None = None
    done: bool = False


def _dynamic_cache(model: nn.Module) -> Cache:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


class BatchEngine:
    """Serves ``model`` to concurrent requests, decoding up to ``max_batch`` of them in each forward pass."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_batch: int = 8,
                 max_queue: int = 32, prefix_cache_tokens: int = PREFIX_CACHE_TOKENS) -> None:
        check_bounds(max_batch, max_queue, prefix_cache_tokens)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.stop_ids = frozenset(stop_token_ids(model, tokenizer))
        why = ragged_forward_works(model)
        self.batched = why is None
        self.lean = lean_decoder(model) if self.batched else None  # tritonq's decode step where it runs the model
        # the lean forward feeds prompts of any lengths together by construction; transformers' forward, padded,
        # only where a check shows each prompt gets its alone logits
        self.prefill_together = self.lean is not None or (self.batched and prefill_together_works(model))
        # on the lean forward only: there a restored prefix is bit-identical to a prefill (prefix_cache.py)
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if self.lean is not None and prefix_cache_tokens \
            else None
        if why is not None:
            warn(f"{type(model).__name__} cannot decode requests in one pass ({why}); "
                 "requests are decoded one row at a time per step")
        self._waiting: collections.deque[Generation] = collections.deque()
        self._active: list[Generation] = []
        self._cond = threading.Condition()
        self._closing = False
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="tritonq-batch", daemon=True)
        self._thread.start()

    # -- the callers' side -------------------------------------------------------------------------

    def submit(self, ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
               stop: list[str] | None = None, emit: Callable[[Event], None] = lambda _: None) -> Generation:
        """Queue a generation; raises :class:`QueueFull` or :class:`EngineUnavailable` instead of waiting."""
        if not ids:
            raise TritonqError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise TritonqError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        request = Generation(list(ids), max_new_tokens, sampling, [s for s in (stop or []) if s], emit)
        request.state.prompt_tokens = len(ids)
        with self._cond:
            if self._failure is not None:
                raise EngineUnavailable(f"the generation engine failed ({self._failure}); restart the server")
            if self._closing:
                raise EngineUnavailable("the server is shutting down; retry on another server or after it restarts")
            free = max(0, self.max_batch - len(self._active))
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"the server is busy: {len(self._active)} requests are decoding (--max-batch "
                                f"{self.max_batch}) and {len(self._waiting)} are waiting (--max-queue "
                                f"{self.max_queue}); retry shortly")
            self._waiting.append(request)
            self._cond.notify()
        return request

    def cancel(self, request: Generation) -> None:
        """Stop ``request``: at once if it still waits, else before the next step. Its other rows are untouched."""
        request.cancelled.set()
        with self._cond:
            if request not in self._waiting:
                return
            self._waiting.remove(request)
        self._finish(request, "cancelled")

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, end the queued and active ones as cancelled, and stop the engine thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def load(self) -> tuple[int, int]:
        """(decoding, waiting) request counts, for messages and tests."""
        with self._cond:
            return len(self._active), len(self._waiting)

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        with decode_threads(self.model), cpu_gemv.generating():
            self._loop()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._waiting or self._active or self._closing):
                        self._cond.wait()
                    if self._closing:
                        break
                    joining = [self._waiting.popleft()
                               for _ in range(min(len(self._waiting), self.max_batch - len(self._active)))]
                    self._active.extend(joining)  # they hold their slots from now: submit counts them
                if joining:
                    self._join_all(joining)
                self._drop_cancelled()
                if self._active:
                    self._step()
        except BaseException as exc:  # a bug in the loop itself: fail everyone, refuse from now on
            _log.exception("the batch engine failed")
            with self._cond:
                self._failure = f"{type(exc).__name__}: {exc}".splitlines()[0]
            for request in self._drain():
                self._fail(request, exc)
            return
        for request in self._drain():
            self._finish(request, "cancelled")

    def _drain(self) -> list[Generation]:
        with self._cond:
            left = [*self._active, *self._waiting]
            self._active.clear()
            self._waiting.clear()
        return left

    def _join_all(self, joining: list[Generation]) -> None:
        """Prefill the joining requests (in the batch already) and take their first tokens: together in one pass
        where each prompt then gets its alone logits (the lean forward; else transformers' forward padded,
        :func:`~tritonq.engine.runtime.ragged.ragged_prefill`, where a check shows it), in groups of at most
        :data:`PREFILL_TOKENS` tokens; else one by one."""
        ready = [r for r in joining if self._prepare(r)]
        if not self.prefill_together:
            for request in ready:
                self._prefill_group([request])
            return
        group: list[Generation] = []
        for request in ready:
            longest = max([len(request.ids), *(len(r.ids) for r in group)])
            fed = sum(len(r.ids) for r in group) + len(request.ids) if self.lean else longest * (len(group) + 1)
            if group and fed > PREFILL_TOKENS:
                self._prefill_group(group)
                group = []
            group.append(request)
        if group:
            self._prefill_group(group)

    def _prepare(self, request: Generation) -> bool:
        """Set up a joining request's text and sampling state; False (finished) if it was cancelled."""
        if request.cancelled.is_set():
            self._finish(request, "cancelled")
            return False
        request.deltas = TextDeltas(self.tokenizer, request.stop, request.state)
        if request.sampling.seed is not None:
            request.generator = torch.Generator().manual_seed(request.sampling.seed)
        return True

    def _prefill_group(self, group: list[Generation]) -> None:
        for request in group:
            request.cache = RequestCache() if self.batched else _dynamic_cache(self.model)
            if self.prefix_cache is not None:
                request.cached = self.prefix_cache.restore(request.ids, request.cache)
        self._run_pass(group, lambda: self._prompt_logits(group))

    def _prompt_logits(self, group: list[Generation]) -> torch.Tensor:
        """The logits after each prompt of ``group`` (caches empty, or holding the prompt's first ``cached``
        tokens), ``[len(group), vocab]``."""
        ids, caches = [r.ids for r in group], [r.cache for r in group]
        if self.lean is not None:
            logits = self.lean.forward([r.ids[r.cached:] for r in group], caches)
            if self.prefix_cache is not None:
                for request in group:
                    self.prefix_cache.store(request.ids, request.cache)
            return logits
        if len(group) > 1:
            return ragged_prefill(self.model, ids, caches)
        if self.batched:
            return ragged_forward(self.model, ids, caches)
        return prefill(self.model, ids[0], caches[0])[None]

    def _run_pass(self, rows: list[Generation], logits_of: Callable[[], torch.Tensor]) -> None:
        """One forward pass for ``rows``, then one token each; a pass that raises fails every request in it
        (not the engine)."""
        try:
            with torch.inference_mode():
                logits = logits_of()
        except Exception as exc:
            for request in rows:
                self._fail(request, exc)
            return
        for request, row in zip(rows, logits, strict=True):
            self._accept(request, row)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._active if r.cancelled.is_set()]:
            self._finish(request, "cancelled")

    def _step(self) -> None:
        """One forward pass for every active request, then one token each."""
        rows = list(self._active)
        if self.lean is not None:
            self._run_pass(rows, lambda: self.lean.step([r.last for r in rows], [r.cache for r in rows]))
        elif self.batched:
            self._run_pass(rows, lambda: ragged_forward(self.model, [[r.last] for r in rows], [r.cache for r in rows]))
        else:
            self._run_pass(rows, lambda: torch.stack([decode_one_token(self.model, r.last, r.cache) for r in rows]))

    def _accept(self, request: Generation, logits: torch.Tensor) -> None:
        """Sample ``request``'s next token from ``logits`` and hand out its text; finish it if that ends it.
        A failure here (sampling, detokenizing) fails this request only."""
        try:
            self._take(request, logits)
        except Exception as exc:
            self._fail(request, exc)

    def _take(self, request: Generation, logits: torch.Tensor) -> None:
        s = request.sampling
        token = _next_token(logits, s.temperature, s.top_p, request.generator)
        request.produced += 1
        if token in self.stop_ids:
            self._finish(request, "stop")
            return
        piece = request.deltas.add(token)
        if piece:
            self._send(request, piece)
        if request.deltas.stopped:
            self._finish(request, "stop")
        elif request.produced >= request.max_new_tokens:
            self._finish(request, "length")
        else:
            request.last = token

    def _retire(self, request: Generation) -> bool:
        """Take ``request`` out of the batch and drop its cache; False when it had ended already."""
        if request.done:
            return False
        request.done = True
        with self._cond:
            if request in self._active:
                self._active.remove(request)
        request.cache = None
        return True

    def _finish(self, request: Generation, reason: str) -> None:
        if not self._retire(request):
            return
        request.state.finish_reason = reason
        if request.deltas is not None and not request.deltas.stopped:
            piece = request.deltas.flush()
            if piece:
                self._send(request, piece)
        self._send(request, None)

    def _fail(self, request: Generation, exc: BaseException) -> None:
        if self._retire(request):
            self._send(request, exc)

    def _send(self, request: Generation, event: Event) -> None:
        try:
            request.emit(event)
        except Exception:  # the receiver is gone (its event loop closed, say): nobody waits for this request
            request.cancelled.set()
