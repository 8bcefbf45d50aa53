"""One AutoRound step, eager against ``--compile``, side by side in one process.

A step is what ``engine/methods/autoround.py`` repeats ``--iters`` times per block: every linear's fake weights
from its offsets and range factors, the block's forward on a batch of calibration windows, the MSE against the
block's float outputs and the gradients in every offset and factor. This times that step on one block of the
model, alternating eager and compiled steps so that both see the same machine state, and prints the median of
each and their ratio:

    python -m tritonq.bench.autoround_step [--model smollm2] [--block 5] [--batch 8] [--seqlen 512] [--steps 10]
        [--threads 1] [--bits 3] [--group-size 64]

The compile happens before the timed steps (its time is printed apart); on the CPU, set
``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` where oneDNN would pick AMX in a sandbox that forbids it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonq.bench.autoround_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    a = p.parse_args(argv)

    from ..engine.adapters import adapter_for
    from ..engine.data import calibration_windows, load_corpus, tokenize
    from ..engine.grid import GridSpec
    from ..engine.groups import block_forward
    from ..engine.methods.autoround import _StepLoss, _Tuned
    from ..engine.model_io import load_model, load_tokenizer
    from ..engine.stages import capture_block_inputs

    torch.set_num_threads(a.threads)
    model = load_model(a.model, torch.float32).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    adapter = adapter_for(model.config)
    corpus = load_corpus("pydoc")
    windows = calibration_windows(tokenize(load_tokenizer(a.model), corpus.text), a.batch, a.seqlen, 0, corpus.source)
    cpu = torch.device("cpu")
    chunk = capture_block_inputs(model, adapter, [windows], cpu)[0]
    blocks = adapter.block_list(model)
    hidden = chunk.hidden
    with torch.no_grad():  # the float model's input to --block, and the block's float output as the target
        for block in blocks[:a.block]:
            hidden = block_forward(block, hidden, chunk.kwargs)
        block = blocks[a.block]
        target = block_forward(block, hidden, chunk.kwargs)
    spec = GridSpec(bits=a.bits, group_size=a.group_size)
    names = adapter.linear_names()
    tuned = [_Tuned(n, block.get_submodule(n).weight, spec, n) for n in names]
    params = [q for t in tuned for q in t.params]
    linears = [t.fake_args for t in tuned]

    def step(loss: _StepLoss) -> float:
        start = time.perf_counter()
        loss(block, linears, hidden, target, chunk.kwargs, params)
        return time.perf_counter() - start

    eager, compiled = _StepLoss(False), _StepLoss.for_run(True)
    start = time.perf_counter()
    step(compiled)
    compile_s = time.perf_counter() - start
    if _StepLoss._failed:
        print("torch.compile failed on this machine (see the warning above); nothing to compare")
        return 1
    step(eager)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(a.steps):
        times["eager"].append(step(eager))
        times["compiled"].append(step(compiled))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"model {a.model} block {a.block}, batch {a.batch} x {a.seqlen}, W{a.bits} g{a.group_size}, "
          f"{a.threads} thread(s), {a.steps} steps each, alternating")
    print(f"first compiled step (compile included): {compile_s:.1f} s")
    print(f"eager step {med['eager']:.0f} ms, compiled step {med['compiled']:.0f} ms: "
          f"{med['eager'] / med['compiled']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
