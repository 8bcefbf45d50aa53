"""Decode tokens/s of several packed checkpoints in one process, timed interleaved (A B C A B C ...).

On a shared machine the load drifts between the fresh processes ``tritonq bench decode`` starts per side; timing the
checkpoints round by round in one process lets the drift hit them alike, and the per-round ratios to the first
checkpoint are the figure to quote (bench/RESULTS.md, ``--quantize-head``). Greedy decoding from a fixed prompt;
also times the lm_head alone on one token.

    python -m tritonq.bench.interleaved_decode OUT/ct-none OUT/ct-int8 OUT/ct-int4 --rounds 7 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PROMPT = "The quick brown fox jumps over the lazy dog. "


def run(dirs: list[str], rounds: int, new_tokens: int, prompt_tokens: int = 32) -> dict:
    """Per checkpoint: decode tokens/s (median, min, max) and lm_head ms; per-round ratios to ``dirs[0]``."""
    import torch

    from ..engine.runtime.serve import generate_tokens, load_packed_model, prompt_ids

    loaded = {d: load_packed_model(d, device="cpu", dtype="float32") for d in dirs}
    models = {d: model for d, (model, _) in loaded.items()}
    tokenizer = loaded[dirs[0]][1]
    ids = (prompt_ids(tokenizer, PROMPT) * prompt_tokens)[:prompt_tokens]
    rates: dict[str, list[float]] = {d: [] for d in dirs}
    head_ms: dict[str, list[float]] = {d: [] for d in dirs}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            list(generate_tokens(model, ids, 4))
        for _ in range(rounds):
            for d, model in models.items():
                tokens = generate_tokens(model, ids, new_tokens + 1)
                next(tokens)  # the prefill's token is not a decode step
                t0 = time.perf_counter()
                rates[d].append(sum(1 for _ in tokens) / (time.perf_counter() - t0))
                x = torch.randn(1, 1, model.config.hidden_size)
                t0 = time.perf_counter()
                for _ in range(20):
                    model.lm_head(x)
                head_ms[d].append((time.perf_counter() - t0) / 20 * 1e3)
    base = dirs[0]
    return {d: {"decode_tokens_per_s": {"median": statistics.median(v), "min": min(v), "max": max(v)},
                "lm_head_ms_median": statistics.median(head_ms[d]),
                "ratio_to_first_per_round": [a / b for a, b in zip(v, rates[base], strict=True)]}
            for d, v in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="packed checkpoint directories; ratios are to the first")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    print(json.dumps(run(args.dirs, args.rounds, args.new_tokens), indent=1))


if __name__ == "__main__":
    main()
