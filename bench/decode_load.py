"""Decode speed on a busy CPU: tritonq's CPU path against the previous one, side by side in one process.

``python -m tritonq.bench.decode_load [--layers 22] [--busy 1] [--rounds 3] [--tokens 32]`` builds the random
Llama of ``bench decode`` (TinyLlama's 2048/5632 shapes, RTN 4-bit) once per configuration, with the same
seed, then times greedy KV-cached decoding of each in turn, ``--rounds`` times, while ``--busy`` processes
spin on the CPU (a server shares its machine). Configurations:

* ``tritonq``: what ``generate`` and ``serve`` run (``generate_tokens``): tritonq's int4 op, q/k/v and gate/up
  fused, the fp16 head, the lean decode step and :func:`~tritonq.engine.runtime.serve.decode_threads` (torch's
  ops on one thread, the op's pool on all);
* ``tritonq-omp``: the same model through transformers' forward with torch's ops on every thread too (no
  ``decode_threads``);
* ``aten``: the path before (``aten._weight_int4pack_mm_for_cpu``, a float32 head, torch's threads).

Reported: decode tokens/s, median [min, max] over the rounds. Interleaving the configurations inside each
round lets a drifting load hit all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ("tritonq", "tritonq-omp", "aten")


def build(config_name: str, layers: int, group_size: int):
    from ..engine.runtime.cpu_head import use_cpu_head
    from ..engine.runtime.fused import fuse_input_sharing_linears
    from ..engine.runtime.qlinear import use_cpu_int4
    from .decode import random_llama, random_llama_config

    config = random_llama_config(layers)
    model = random_llama(config, "packed", torch.float32, group_size=group_size)
    if config_name == "aten":
        use_cpu_int4(model, "aten")
    else:
        use_cpu_int4(model, "tritonq")
        fuse_input_sharing_linears(model)
        use_cpu_head(model)
    return model


def decode_rate(model, ids: list[int], tokens: int, policy: bool) -> float:
    import contextlib

    from transformers import DynamicCache

    from ..engine.runtime.serve import decode_one_token, decode_threads, generate_tokens, prefill

    if policy:  # exactly what generate and serve run (the lean step where it applies, under decode_threads)
        stream = generate_tokens(model, ids, tokens + 1)
        next(stream)  # the prompt's token
        start = time.perf_counter()
        produced = sum(1 for _ in stream)
        return produced / (time.perf_counter() - start)
    with torch.inference_mode(), (decode_threads(model) if policy else contextlib.nullcontext()):
        cache = DynamicCache(config=model.config)
        logits = prefill(model, ids, cache)
        tok = int(logits.argmax())
        start = time.perf_counter()
        for _ in range(tokens):
            tok = int(decode_one_token(model, tok, cache).argmax())
        return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--busy", type=int, default=1, help="spinning processes started beside the bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    models = {name: build(name, args.layers, args.group_size) for name in names}
    ids = torch.randint(0, 32000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rates: dict[str, list[float]] = {name: [] for name in names}
    try:
        time.sleep(1.0)
        for _ in range(args.rounds):
            for name in names:
                rates[name].append(decode_rate(models[name], ids, args.tokens, policy=name == "tritonq"))
    finally:
        for proc in busy:
            proc.kill()
    print(f"{args.layers} layers, g{args.group_size}, torch threads {torch.get_num_threads()}, "
          f"{args.busy} busy process(es), {args.rounds} rounds of {args.tokens} tokens")
    print("| configuration | decode tok/s, median [min, max] |\n| --- | --- |")
    for name in names:
        r = rates[name]
        print(f"| {name} | {statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
