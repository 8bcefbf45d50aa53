"""Load on ``tritonq serve``: N concurrent chat requests against each alone, then a flood past the bounds.

Starts the server in a subprocess on a free loopback port, then
1. sends ``--concurrent`` distinct greedy chat requests alone, one after another (the baseline: the median
   time of those that ran to ``--max-tokens``);
2. sends ``--concurrent`` *other* requests all at once: the wall time from the first send to the last reply,
   against the median alone time (issue 23's target is <= 2x); then each of them alone, untimed, to count how
   many together replies equal their alone reply;
   steps 1 and 2 repeat ``--rounds`` times, so that a load that drifts hits both sides. Every timed request is a
   question the server has not seen (a tag ``(#n)`` makes each one new): the server keeps prompts' keys and
   values (``--prefix-cache-tokens``, its prompt prefix cache), so a repeated prompt would skip its prefill, and
   here both timed sides find only the chat template's shared start kept; ``--prefix-cache-tokens 0`` turns the
   cache off;
3. sends ``--flood`` requests at once and counts the status codes (200 and 429 only, no failures).

Usage::

    python -m tritonq.bench.serve_load /tmp/batch/rtn4-ct [--concurrent 8] [--max-tokens 64] [--flood 64]
        [--max-batch 8] [--max-queue 32] [--prefix-cache-tokens N] [--rounds 3] [--json]
    python -m tritonq.bench.serve_load /tmp/batch/rtn4-ct --token-identity   # tokens alone vs batched, in-process

Only the standard library on the client side (urllib and threads), so it runs wherever the server does.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about rain.",
    "How do I reverse a list in Python?", "Name three prime numbers and say why they are prime.",
    "What causes the seasons on Earth?", "Give me a short recipe for pancakes.", "Who wrote Hamlet, and when?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 600.0) -> tuple[int, dict, float]:
    """(status, JSON body, seconds) of one POST; HTTP errors are results, not exceptions."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read()
    return status, json.loads(data or b"{}"), time.perf_counter() - t0


def _start(model: str, port: int, max_batch: int, max_queue: int, log,
           prefix_cache_tokens: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tritonq.cli", "serve", model, "--port", str(port), "--device", "cpu",
           "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
    if prefix_cache_tokens is not None:
        cmd += ["--prefix-cache-tokens", str(prefix_cache_tokens)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not start within 300 s") from None
            time.sleep(0.5)


def _chat(question: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run(args: argparse.Namespace) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with tempfile.TemporaryFile() as log:
        proc = _start(args.model, port, args.max_batch, args.max_queue, log, args.prefix_cache_tokens)
        try:
            _post(url, _chat("Hi", 4))  # warm-up: first-call costs stay out of the timings
            rounds = [_round(url, args.concurrent, args.max_tokens, r) for r in range(args.rounds)]
            bodies = _bodies(args.concurrent, args.max_tokens, None)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.flood) as pool:
                flood = list(pool.map(lambda i: _post(url, bodies[i % len(bodies)]), range(args.flood)))
            flood_wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    codes: dict[str, int] = {}
    for status, _, _ in flood:
        codes[str(status)] = codes.get(str(status), 0) + 1
    return {
        "model": args.model, "concurrent": args.concurrent, "max_tokens": args.max_tokens,
        "max_batch": args.max_batch, "max_queue": args.max_queue, "prefix_cache_tokens": args.prefix_cache_tokens,
        "rounds": rounds,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "flood": args.flood, "flood_status_counts": codes, "flood_wall_s": flood_wall,
    }


def _bodies(n: int, max_tokens: int, tag: int | None) -> list[dict]:
    """``n`` distinct chat requests; ``tag`` (appended as `` (#tag)``) makes each set new to the server's prefix
    cache."""
    asks = [QUESTIONS[i % len(QUESTIONS)] + (f" ({i})" if i >= len(QUESTIONS) else "") for i in range(n)]
    return [_chat(q + ("" if tag is None else f" (#{tag})"), max_tokens) for q in asks]


def _round(url: str, n: int, max_tokens: int, round_index: int) -> dict:
    """New requests alone, one after another (timed); other new requests all at once (timed), then each of those
    alone (untimed: the replies to compare). The ratio divides the wall time of all at once by the median alone
    time of the replies that ran to ``max_tokens`` (an early end-of-sequence would flatter it)."""
    baseline = [_post(url, body) for body in _bodies(n, max_tokens, 2 * round_index + 1)]
    bodies = _bodies(n, max_tokens, 2 * round_index + 2)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: _post(url, body), bodies))
    wall = time.perf_counter() - t0
    alone = [_post(url, body) for body in bodies]
    for status, data, _ in (*baseline, *alone, *together):
        if status != 200:
            raise SystemExit(f"a request failed with {status}: {data}")
    texts = [[d["choices"][0]["message"]["content"] for _, d, _ in side] for side in (alone, together)]
    tokens = [d["usage"]["completion_tokens"] for _, d, _ in baseline]
    full = [s for (_, _, s), k in zip(baseline, tokens, strict=True) if k == max_tokens]
    one = statistics.median(full or [s for _, _, s in baseline])
    return {
        "completion_tokens": tokens, "alone_s": [s for _, _, s in baseline], "one_alone_s": one,
        "sequential_sum_s": sum(s for _, _, s in baseline), "together_wall_s": wall, "ratio": wall / one,
        "together_completion_tokens": [d["usage"]["completion_tokens"] for _, d, _ in together],
        "identical_replies": sum(a == b for a, b in zip(*texts, strict=True)),
        "common_prefix_chars": [_common_prefix(a, b) for a, b in zip(*texts, strict=True)],
        "reply_chars": [len(a) for a in texts[0]],
    }


def token_identity(model_dir: str, n: int, max_tokens: int) -> dict:
    """In-process, end-of-sequence ignored: each of ``n`` greedy chat requests decoded for exactly
    ``max_tokens`` tokens alone and then all together in one batch; where each first differs (None: never).

    This isolates the batch-invariance of the model's linears: the ragged attention computes a row as in a
    batch of one, so any difference comes from a linear whose row output depends on the other rows."""
    import threading

    from ..engine.runtime.batching import BatchEngine
    from ..engine.runtime.serve import load_generation_model, prompt_ids

    model, tok = load_generation_model(model_dir, "cpu")
    engine = BatchEngine(model, tok, max_batch=n, max_queue=n)
    engine.stop_ids = frozenset()  # run every request to max_tokens
    asks = [prompt_ids(tok, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(n)]

    def submit_all(batch: list[list[int]]) -> list[list[int]]:
        done = [threading.Event() for _ in batch]
        failed: list[BaseException] = []

        def emitter(finished: threading.Event):
            def emit(event: object) -> None:
                if isinstance(event, BaseException):
                    failed.append(event)
                if not isinstance(event, str):
                    finished.set()
            return emit

        jobs = [engine.submit(ids, max_tokens, emit=emitter(d)) for ids, d in zip(batch, done, strict=True)]
        for d in done:
            d.wait()
        if failed:
            raise failed[0]
        return [j.state.tokens for j in jobs]

    try:
        alone = [submit_all([ids])[0] for ids in asks]
        together = submit_all(asks)
    finally:
        engine.close()
    first = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
             for x, y in zip(alone, together, strict=True)]
    return {"requests": n, "tokens_each": max_tokens, "batched_pass": engine.batched,
            "identical_requests": sum(f is None for f in first), "first_difference": first}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="packed checkpoint directory, as for tritonq serve")
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--flood", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alone-then-together rounds (the load drifts between them)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=32)
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="the server's prompt prefix cache (default: the server's); 0 turns it off")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--token-identity", action="store_true",
                   help="instead: in-process, --concurrent requests x --max-tokens tokens alone against batched")
    args = p.parse_args(argv)
    if args.token_identity:
        print(json.dumps(token_identity(args.model, args.concurrent, args.max_tokens)))
        return 0
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.concurrent} concurrent chat requests, max_tokens {args.max_tokens}")
    for i, r in enumerate(result["rounds"]):
        print(f"round {i}: one alone {r['one_alone_s']:.2f} s (all alone {r['sequential_sum_s']:.2f} s); together "
              f"{r['together_wall_s']:.2f} s = {r['ratio']:.2f}x; replies identical to alone "
              f"{r['identical_replies']} of {args.concurrent}; completion tokens {r['completion_tokens']}")
    print(f"median ratio {result['ratio_median']:.2f}x")
    print(f"{args.flood} at once: status counts {result['flood_status_counts']} in {result['flood_wall_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
