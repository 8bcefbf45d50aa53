"""A paper estimate (not a measurement) of GPTQ W4 g128 on Llama-3.1-8B on 1, 2 and 4 H100s, per stage.

``python -m tritonq.bench.paper_estimate --profile OUT/quantization.json --cpu-gemm-gflops G [--nsamples N ...]``

Per stage, ``t = F / (P x e)``: F the stage's FLOPs (or bytes) for Llama-3.1-8B, P the H100 SXM datasheet peak
that stage runs on (``kernels/aot/targets.py``: 989 TFLOP/s dense fp16, 67 TFLOP/s fp32, 3.35 TB/s), and
``e = e_gpu x f_cpu``: ``e_gpu`` the share of the datasheet peak a large GEMM of that kind reaches on the GPU
(the stated assumption), times ``f_cpu``, the share of this CPU's own GEMM rate the same stage reached in a
measured tritonq run (``--profile``: ``quantization.json`` "seconds" of a CPU run on the default model, whose
FLOPs this script counts the same way). So a stage that wastes time here (hooks, small ops, the sequential
column loop) is assumed to waste the same share there. Disk and PCIe stages are bytes over an assumed rate.
The solve is given two ways, because its CPU share (a sequential column loop) says little about a GPU: "profile"
(``e = E_FP32 x f_cpu``) and "kernels" (the factor and the updates at ``E_FP32`` of the fp32 peak, plus a
latency of ``STEP`` per dependent column step of the ``gptq_block`` kernel and ``LAUNCH`` per launch).

Ranks (``torchrun``, the lead's issue-21 design): the calibration windows are split (forward and Hessian /R),
every rank loads every block, the solves go per linear to ranks by greedy bin-packing on their cost (each owner
factors its own Hessian), Hessians are reduced and results broadcast over NVLink, rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tritonq.engine.memory import ModelShape

# H100 SXM datasheet (kernels/aot/targets.py)
PEAK_FP16 = 989e12
PEAK_FP32 = 67e12
HBM = 3.35e12
# assumptions, stated in bench/RESULTS.md
E_GEMM_FP16 = 0.6  # cuBLAS fp16 GEMMs of 16k x 4096 x 14336: a share of dense peak large GEMMs commonly reach
E_HESSIAN = 0.4  # our Triton X^T X: mma.sync (~75% of Hopper peak at best, kernels_perf.md), 64x64 tiles, 2 stages
E_FP32 = 0.5  # cuSOLVER Cholesky / triangular solve and fp32 trailing GEMMs at K = 4096..14336
DISK = 2e9  # bytes/s: one NVMe read or written sequentially (cold page cache)
NVLINK = 200e9  # bytes/s: NCCL reduce / broadcast bus bandwidth between H100s (well under NVLink 4's 450 GB/s)
LAUNCH = 20e-6  # s per kernel launch of the solve (gptq_block + trailing update), Python included
STEP = 1e-6  # s per dependent column step inside gptq_block (load a U row, round, update the tile: latency-bound)


def linear_rows(s: ModelShape) -> list[tuple[str, int, list[int]]]:
    """(name, K, rows of each linear) per linear group of a block (``ModelShape.groups`` stacks the rows)."""
    h, i, d = s.hidden, s.intermediate, s.head_dim
    return [("q/k/v", h, [s.heads * d, s.kv_heads * d, s.kv_heads * d]),
            ("o", s.heads * d, [h]), ("gate/up", h, [i, i]), ("down", i, [h])]


def linear_params(s: ModelShape) -> int:
    return sum(k * n for _, k, rows in linear_rows(s) for n in rows)


LLAMA_31_8B = ModelShape(32, 4096, 14336, 32, 8, 128, 128256, tied=False)
SMOLLM2_135M = ModelShape(30, 576, 1536, 9, 3, 64, 49152, tied=True)


def stage_flops(s: ModelShape, nsamples: int, seqlen: int) -> dict[str, float]:
    """FLOPs of the calibration forward, the Hessian products and the GPTQ solves of a whole model."""
    tokens = nsamples * seqlen
    attention = 2 * 2 * nsamples * seqlen * seqlen * s.heads * s.head_dim  # QK^T and PV (full, no causal skip)
    forward = s.layers * (2 * tokens * linear_params(s) + attention)
    hessian = s.layers * sum(tokens * k * k for _, k, _ in linear_rows(s))  # upper triangle of 2 T K^2, mirrored
    solve = s.layers * sum(2 * k**3 / 3 + sum(rows) * k * k for _, k, rows in linear_rows(s))  # chol + trsm; updates
    return {"forward": forward, "hessian": hessian, "solve": solve}


def cpu_fractions(profile: dict, cpu_gemm: float, nsamples: int, seqlen: int) -> dict[str, float]:
    """Share of this CPU's GEMM rate each stage reached in the profiled run (``quantization.json`` seconds)."""
    secs = profile["seconds"]
    flops = stage_flops(SMOLLM2_135M, nsamples, seqlen)
    measured = {"forward": secs["quantize_forward"], "hessian": secs["quantize_observe"],
                "solve": secs["quantize_solve"]}
    return {k: min(1.0, flops[k] / measured[k] / cpu_gemm) for k in flops}


def _bin_pack(costs: list[float], ranks: int) -> float:
    """Greedy bin-packing (largest first onto the least loaded rank): the most loaded rank's total."""
    loads = [0.0] * ranks
    for c in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += c
    return max(loads)


def estimate(shape: ModelShape, nsamples: int, seqlen: int, ranks: int, frac: dict[str, float],
             split_rows: bool = False) -> dict[str, float]:
    """Seconds per stage; ``split_rows``: a linear's rows spread over the ranks too (GPTQ's rows are independent
    given the Hessian), instead of one linear per rank."""
    f = stage_flops(shape, nsamples, seqlen)
    weights = 2 * (linear_params(shape) * shape.layers + 2 * shape.vocab * shape.hidden)  # bf16 on disk
    out = {"load": weights / DISK}
    out["forward"] = f["forward"] / ranks / (PEAK_FP16 * E_GEMM_FP16 * frac["forward"])
    out["hessian"] = f["hessian"] / ranks / (PEAK_FP16 * E_HESSIAN * frac["hessian"])
    out["solve (profile)"] = shape.layers * _solve(shape, ranks, PEAK_FP32 * E_FP32 * frac["solve"], 0.0, split_rows)
    out["solve (kernels)"] = shape.layers * _solve(shape, ranks, PEAK_FP32 * E_FP32, STEP, split_rows)
    hessian_bytes = 4 * sum(k * k for _, k, _ in linear_rows(shape))
    result_bytes = 2 * sum(k * n for _, k, rows in linear_rows(shape) for n in rows)
    out["reduce + broadcast"] = 0.0 if ranks == 1 else shape.layers * (hessian_bytes + result_bytes) / NVLINK
    packed = shape.layers * linear_params(shape) * (0.5 + 2.5 / 128) + 2 * 2 * shape.vocab * shape.hidden
    out["write"] = packed / DISK
    fixed = sum(v for k, v in out.items() if not k.startswith("solve"))
    out["total (profile)"] = fixed + out["solve (profile)"]
    out["total (kernels)"] = fixed + out["solve (kernels)"]
    return out


def _solve(shape: ModelShape, ranks: int, rate: float, step: float, split_rows: bool) -> float:
    """Seconds of one block's GPTQ solves: per group (in order: true-sequential), the factor ``2/3 K^3`` on each
    owner, the ``N K^2`` updates of its linears bin-packed over the ranks (or its rows split), and per 128-column
    lazy block two launches plus 128 dependent column steps of ``step`` seconds each (the in-block loop)."""
    total = 0.0
    for _, k, rows in linear_rows(shape):
        updates = [n * k * k / rate for n in rows]
        total += 2 * k**3 / 3 / rate + (sum(updates) / ranks if split_rows else _bin_pack(updates, ranks))
        total += (k // 128) * (2 * LAUNCH + 128 * step)
    return total


def table(profile: dict, cpu_gemm: float, profile_nsamples: int, profile_seqlen: int,
          calibrations: list[tuple[int, int]]) -> str:
    frac = cpu_fractions(profile, cpu_gemm, profile_nsamples, profile_seqlen)
    stages = ["load", "forward", "hessian", "solve (kernels)", "solve (profile)", "reduce + broadcast", "write",
              "total (kernels)", "total (profile)"]
    lines = ["| calibration | H100s | " + " | ".join(stages) + " | llm-compressor (measured by them) |",
             "| --- | --- | " + " | ".join("---" for _ in stages) + " | --- |"]
    theirs = {1: 745.03, 2: 372.20, 4: 264.07}
    for nsamples, seqlen in calibrations:
        for ranks in (1, 2, 4):
            est = estimate(LLAMA_31_8B, nsamples, seqlen, ranks, frac)
            lines.append(f"| {nsamples} x {seqlen} | {ranks} | " + " | ".join(f"{est[s]:.1f}" for s in stages)
                         + f" | {theirs[ranks]:.0f} s |")
    split = {r: estimate(LLAMA_31_8B, *calibrations[0], r, frac, split_rows=True) for r in (1, 2, 4)}
    fl = stage_flops(LLAMA_31_8B, *calibrations[0])
    notes = ["CPU-profile shares f_cpu: " + ", ".join(f"{k} {v:.2f}" for k, v in frac.items()),
             f"Llama-3.1-8B FLOPs at {calibrations[0][0]} x {calibrations[0][1]}: "
             + ", ".join(f"{k} {v:.3g}" for k, v in fl.items()),
             f"with each linear's rows split over the ranks ({calibrations[0][0]} x {calibrations[0][1]}): solve "
             + " / ".join(f"{split[r]['solve (kernels)']:.1f}-{split[r]['solve (profile)']:.1f}" for r in (1, 2, 4))
             + " s, total " + " / ".join(f"{split[r]['total (kernels)']:.1f}-{split[r]['total (profile)']:.1f}"
                                        for r in (1, 2, 4)) + " s on 1 / 2 / 4 H100s"]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def measure_gemm_gflops(repeats: int = 10) -> float:
    """This CPU's fp32 GEMM rate (GFLOP/s) on the profiled model's shapes (one chunk of 8 x 512 tokens through
    576 -> 1536 and 1536 -> 576), in this process's threads: the denominator of ``f_cpu``."""
    import time

    import torch

    rates = []
    for k, n in ((576, 1536), (1536, 576)):
        x, w = torch.randn(4096, k), torch.randn(k, n)
        x @ w
        t0 = time.perf_counter()
        for _ in range(repeats):
            x @ w
        rates.append(2 * 4096 * k * n * repeats / (time.perf_counter() - t0) / 1e9)
    return sum(rates) / len(rates)


def profile_run(nsamples: int, seqlen: int) -> dict:
    """GPTQ W4 on the default model on this CPU, with this CPU's GEMM rate measured just before and after."""
    import tempfile

    from tritonq.engine.api import QuantizeOptions, quantize

    before = measure_gemm_gflops()
    with tempfile.TemporaryDirectory(prefix="tritonq-profile-") as tmp:
        summary = quantize(QuantizeOptions(output=f"{tmp}/out", model="smollm2", method="gptq", nsamples=nsamples,
                                           seqlen=seqlen, progress=False, device="cpu"))
    after = measure_gemm_gflops()
    return {"seconds": summary.seconds, "gemm_before": before, "gemm_after": after, "gemm_gflops": (before + after) / 2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonq.bench.paper_estimate", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=None, help="quantization.json of a GPTQ CPU run on smollm2 (default: run one "
                   "now, 32 x 512, timing the GEMM rate before and after it in the same process)")
    p.add_argument("--profile-nsamples", type=int, default=32)
    p.add_argument("--profile-seqlen", type=int, default=512)
    p.add_argument("--cpu-gemm-gflops", type=float, default=None,
                   help="this CPU's fp32 GEMM rate with the profile's threads (default: measure it now)")
    args = p.parse_args(argv)
    if args.cpu_gemm_gflops is None and args.profile is not None:
        args.cpu_gemm_gflops = measure_gemm_gflops()
        print(f"measured fp32 GEMM rate: {args.cpu_gemm_gflops:.1f} GFLOP/s")
    if args.profile is None:
        profile = profile_run(args.profile_nsamples, args.profile_seqlen)
        args.cpu_gemm_gflops = profile["gemm_gflops"]
        print(f"profile seconds: {profile['seconds']}; fp32 GEMM rate before/after: {profile['gemm_before']:.1f} / "
              f"{profile['gemm_after']:.1f} GFLOP/s")
    else:
        profile = json.loads(Path(args.profile).read_text())
    print(table(profile, args.cpu_gemm_gflops * 1e9, args.profile_nsamples, args.profile_seqlen,
                [(128, 2048), (512, 2048)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
