"""``tritonq bench decode DIR``: decode tokens/s of a packed model against its float original.

The float original is the same model with every ``QuantLinear`` replaced by a dense ``nn.Linear``
holding the dequantized weights (same architecture, device and dtype), so the comparison isolates
the int4 dequant-matmul against a dense matmul, as marlin's ``bench.py`` compares with a dense
baseline. Both models decode the same prompt greedily for ``--max-new-tokens`` tokens without
stopping at end-of-sequence; one untimed warm-up run precedes each timed run. The packed model runs
its real path (no dense cache), so off CUDA this measures the PyTorch reference of the kernel.
"""

from __future__ import annotations

import json
import time

from ..engine.serve import dequantized_copy, generate_tokens, load_packed_model, prompt_ids, synchronize

PROMPT = "The history of quantization in signal processing"


def _decode_rate(model, ids: list[int], new_tokens: int) -> dict:
    def run(n: int) -> tuple[float, float, list[int]]:
        synchronize(model)
        t0 = time.perf_counter()
        it = generate_tokens(model, ids, n)
        out = [next(it)]
        synchronize(model)
        t1 = time.perf_counter()
        out.extend(it)
        synchronize(model)
        return t1 - t0, time.perf_counter() - t1, out

    run(min(4, new_tokens))  # warm-up: kernels compiled/tuned, caches allocated
    prefill_s, decode_s, out = run(new_tokens)
    steps = max(len(out) - 1, 1)
    return {"prefill_ms": 1e3 * prefill_s, "decode_tokens_per_s": steps / decode_s if decode_s else float("inf"),
            "tokens": out}


def main(args) -> int:
    model, tokenizer = load_packed_model(args.model, args.device, args.dtype, cache_dense=False)
    ids = prompt_ids(tokenizer, PROMPT)
    n = max(int(args.max_new_tokens), 2)
    packed = _decode_rate(model, ids, n)
    weight_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    dense = dequantized_copy(model)
    del model
    float_ = _decode_rate(dense, ids, n)
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    same = sum(a == b for a, b in zip(packed["tokens"], float_["tokens"], strict=True))
    result = {
        "device": str(dense.device), "dtype": str(dense.dtype).removeprefix("torch."),
        "prompt_tokens": len(ids), "new_tokens": n,
        "packed": {k: v for k, v in packed.items() if k != "tokens"},
        "float": {k: v for k, v in float_.items() if k != "tokens"},
        "speedup": packed["decode_tokens_per_s"] / float_["decode_tokens_per_s"],
        "matching_greedy_tokens": same,
        "packed_buffer_mib": weight_bytes / 2**20, "float_param_mib": dense_bytes / 2**20,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"decode on {result['device']} ({result['dtype']}), prompt {len(ids)} tokens, {n} new tokens")
    for name in ("packed", "float"):
        r = result[name]
        print(f"  {name:6s}  {r['decode_tokens_per_s']:8.1f} tokens/s   prefill {r['prefill_ms']:7.1f} ms")
    print(f"  speedup {result['speedup']:.2f}x; greedy tokens identical: {same}/{n}")
    return 0
