"""``tritonq bench matmul``: the int4 dequant-matmul against fp16 ``torch.matmul`` on the same GPU.

Method (docs/kernels_perf.md §5): Llama-like K x N shapes (4096x4096, 4096x14336, 14336x4096,
8192x28672), M in {1, 2, 4, 8, 16, 64, 256}, int4 with g128 fp16 scales and zeros. Each case is timed
with a cold L2: enough copies of the weights (packed and fp16 alike) to exceed twice the L2 size are
cycled, as vLLM's ``benchmark_machete.py`` does. The calls are captured in one CUDA graph so that launch
overhead is not measured (decode runs under CUDA graphs in practice); the time per call is the graph
replay time divided by the number of calls. Kernel configurations are tuned (and cached) before capture.
The roofline is the bytes a call must move (packed weights + scales + zeros + x + y) over the measured
device-to-device copy bandwidth (read + write), which is what a streaming read can reach; the spec-sheet
peak is higher (H100 SXM: 3.35 TB/s vs ~3.0 TB/s measured, kernels_perf.md §2).

W8A8 rows (``kernels/int8_matmul.py``: the per-token activation quantization kernel, then the int8 GEMM with
the scales in the epilogue) are timed the same way against fp16 ``torch.matmul`` and ``torch._int_mm`` (int8
GEMM alone, no quantization or scales; M > 16 only, its CUDA requirement), with warm weights (one copy).

Without a GPU the kernels run in the Triton interpreter on tiny shapes to show that the command works
and the results are right; those timings are interpreter wall times, not speed measurements, and the
report says so.

``--cpu-int4`` times what a packed model runs on the CPU instead: ``QuantLinear`` repacked for each CPU
int4 op (tritonq's ``kernels/cpu_gemv``, int8 activations; PyTorch's ``aten._weight_int4pack_mm_for_cpu``,
bf16 activations, scales and zeros) against a float32 ``nn.Linear`` of the same dequantized weights, on the
first three Llama shapes at small M (decode). Warm weights: on a CPU whose last-level cache holds the matrix
(this workplace's reports 480 MiB) that times cache bandwidth, not memory; ``bench decode`` streams a whole
model. Each side is called until 0.2 s have passed, and the median over ``--runs`` such timings is reported with
its min and max.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

SHAPES_KN = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
MS = (1, 2, 4, 8, 16, 64, 256)
GROUP = 128
TARGET_M1_SPEEDUP = 3.0  # issue 4: at M = 1 on the large shapes
LARGE = ((4096, 14336), (14336, 4096), (8192, 28672))
CPU_SHAPES_KN = ((256, 128), (640, 72))
CPU_MS = (1, 3, 16)
CPU_INT4_SHAPES_KN = SHAPES_KN[:3]
CPU_INT4_MS = (1, 4, 16)
CPU_INT4_GROUP = 128


def _weights(K: int, N: int, dtype: torch.dtype, device: str, seed: int):
    from ..kernels.pack import pack_int4

    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    scales = (torch.rand(K // GROUP, N, generator=g) * 0.01 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (K // GROUP, N), generator=g).to(dtype)
    return pack_int4(codes).to(device), scales.to(device), zeros.to(device)


def _bytes_int4(M: int, K: int, N: int) -> int:
    return K * N // 2 + 2 * (K // GROUP) * N * 2 + 2 * M * K + 2 * M * N


def _bytes_fp16(M: int, K: int, N: int) -> int:
    return 2 * K * N + 2 * M * K + 2 * M * N


def _graph_time_us(calls, reps: int = 20) -> float:
    """Capture ``calls`` (a list of zero-argument functions) in one CUDA graph; microseconds per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up outside the graph (compilation, tuning, allocator)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (reps * len(calls))


def _copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (read + write), 1 GiB buffers, CUDA-graph timed."""
    n = 2**29
    a = torch.empty(n, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    us = _graph_time_us([lambda: b.copy_(a)], reps=10)
    return 2 * 2 * n / (us * 1e-6)


def _cuda_bench(as_json: bool, plot: str | None = None) -> int:
    from ..kernels.dequant_matmul import dequant_matmul, dequant_matmul_ref

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    bw = _copy_bandwidth()
    rows = []
    if not as_json:
        print(f"{props.name}: {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, "
              f"copy bandwidth {bw / 1e12:.2f} TB/s; int4 g{GROUP} asym fp16, cold L2, CUDA graphs")
        print(f"{'M':>4} {'K':>6} {'N':>6} {'int4 us':>9} {'fp16 us':>9} {'speedup':>8} {'int4 %bw':>9} "
              f"{'fp16 %bw':>9}")
    for K, N in SHAPES_KN:
        packed_bytes = _bytes_int4(0, K, N)
        copies_q = max(2, -(-2 * l2 // packed_bytes))
        copies_f = max(2, -(-2 * l2 // (2 * K * N)))
        qs = [_weights(K, N, torch.float16, "cuda", seed=i) for i in range(copies_q)]
        wf = [torch.randn(K, N, device="cuda", dtype=torch.float16) for _ in range(copies_f)]
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            qw, s, z = qs[0]
            err = (dequant_matmul(x, qw, s, z, group_size=GROUP).float()
                   - dequant_matmul_ref(x, qw, s, z, group_size=GROUP).float()).abs().max().item()
            t_q = _graph_time_us([lambda w=w, x=x: dequant_matmul(x, *w, group_size=GROUP) for w in qs])
            t_f = _graph_time_us([lambda w=w, x=x: torch.matmul(x, w) for w in wf])
            row = {"M": M, "K": K, "N": N, "int4_us": t_q, "fp16_us": t_f, "speedup": t_f / t_q,
                   "int4_roofline_frac": _bytes_int4(M, K, N) / bw / (t_q * 1e-6),
                   "fp16_roofline_frac": _bytes_fp16(M, K, N) / bw / (t_f * 1e-6), "max_abs_err": err}
            rows.append(row)
            if not as_json:
                print(f"{M:>4} {K:>6} {N:>6} {t_q:>9.2f} {t_f:>9.2f} {row['speedup']:>7.2f}x "
                      f"{100 * row['int4_roofline_frac']:>8.1f}% {100 * row['fp16_roofline_frac']:>8.1f}%")
        del qs, wf
        torch.cuda.empty_cache()
    m1 = [r for r in rows if r["M"] == 1 and (r["K"], r["N"]) in LARGE]
    met = all(r["speedup"] >= TARGET_M1_SPEEDUP for r in m1)
    result = {"device": props.name, "mode": "cuda", "copy_bandwidth_Bps": bw, "group_size": GROUP,
              "rows": rows, "target_m1_speedup": TARGET_M1_SPEEDUP, "target_met": met,
              "w8a8_rows": _w8a8_cuda_rows(True)}
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        worst = min((r["speedup"] for r in m1), default=float("nan"))
        print(f"M=1 large shapes: worst speedup {worst:.2f}x, target {TARGET_M1_SPEEDUP}x "
              f"{'met' if met else 'NOT met'}")
        _w8a8_cuda_rows(False)
    if plot:
        from .plots import plot_matmul_speedup

        print(f"wrote {plot_matmul_speedup(result, plot)}", file=sys.stderr)
    return 0


def _interpreter_check(as_json: bool) -> int:
    from ..kernels.dequant_matmul import dequant_matmul, dequant_matmul_ref

    note = ("no GPU: Triton interpreter on tiny shapes; checks that the kernels run and match the "
            "reference. Times are interpreter wall times, NOT a speed measurement.")
    if not as_json:
        print(note)
        print(f"{'kernel':>6} {'M':>3} {'K':>5} {'N':>5} {'max |err|':>10} {'max |ref|':>10} {'wall s':>7}")
    rows, ok = [], True
    for K, N in CPU_SHAPES_KN:
        qw, s, z = _weights(K, N, torch.float16, "cpu", seed=K)
        for M in CPU_MS:
            x = torch.randn(M, K, dtype=torch.float16)
            ref = dequant_matmul_ref(x, qw, s, z, group_size=GROUP).float()
            for kernel in ("gemv", "gemm"):
                t0 = time.perf_counter()
                y = dequant_matmul(x, qw, s, z, group_size=GROUP, force="triton", kernel=kernel).float()
                wall = time.perf_counter() - t0
                err = (y - ref).abs().max().item()
                good = err <= 2.0**-9 * (1.0 + ref.abs().max().item())
                ok &= good
                rows.append({"kernel": kernel, "M": M, "K": K, "N": N, "max_abs_err": err,
                             "max_abs_ref": ref.abs().max().item(), "interpreter_wall_s": wall, "ok": good})
                if not as_json:
                    print(f"{kernel:>6} {M:>3} {K:>5} {N:>5} {err:>10.2e} {ref.abs().max().item():>10.2e} "
                          f"{wall:>7.2f}{'' if good else '  MISMATCH'}")
    w8a8, w8a8_ok = _w8a8_interpreter_rows(as_json)
    ok &= w8a8_ok
    if as_json:
        print(json.dumps({"mode": "interpreter", "speed_measured": False, "note": note, "rows": rows,
                          "w8a8_rows": w8a8, "all_match": ok}, indent=1))
    else:
        print("all results match the reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


def _seconds_per_call(fn, x: torch.Tensor, budget_s: float = 0.2) -> float:
    fn(x)  # warm-up: first-touch of the output, the op's own setup
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            return elapsed / calls


def _spread_us(side: str, seconds: list[float]) -> dict:
    """``{side}_us`` (median), ``{side}_us_min`` and ``{side}_us_max`` of per-call times, in microseconds."""
    from statistics import median

    return {f"{side}_us": 1e6 * median(seconds), f"{side}_us_min": 1e6 * min(seconds),
            f"{side}_us_max": 1e6 * max(seconds)}


def _spread_text(row: dict, side: str) -> str:
    return f"{row[f'{side}_us']:.0f} [{row[f'{side}_us_min']:.0f}, {row[f'{side}_us_max']:.0f}]"


def cpu_int4_bench(as_json: bool, shapes=CPU_INT4_SHAPES_KN, ms=CPU_INT4_MS, runs: int = 5,
                   budget_s: float = 0.2) -> int:
    """Both CPU int4 ops (through ``QuantLinear``: tritonq's ``kernels/cpu_gemv`` and PyTorch's
    ``aten._weight_int4pack_mm_for_cpu``) against float32 ``nn.Linear``, side by side; see the module docstring.

    Each case also checks the numerics: each op's output against the float64 product with the layer's own
    dequantized weights, relative to the output's scale (int8 or bf16 activations: a few 2^-8)."""
    from ..engine.formats.records import PackedLinear
    from ..engine.runtime.qlinear import QuantLinear
    from ..kernels.pack import pack_int4

    threads = torch.get_num_threads()
    ops = ("tritonq", "aten")
    note = (f"CPU, {threads} threads: QuantLinear on tritonq's op (int8 activations) and on "
            f"aten._weight_int4pack_mm_for_cpu (bf16 activations), g{CPU_INT4_GROUP} asym, against float32 "
            f"nn.Linear, warm weights (in cache); median [min, max] of {runs} timings of >= {budget_s} s each")
    if not as_json:
        print(note)
        print(f"{'K':>6} {'N':>6} {'M':>3} {'tritonq us':>22} {'aten us':>22} {'fp32 us':>22} {'vs fp32':>8} "
              f"{'vs aten':>8} {'rel err':>8}")
    rows, ok = [], True
    with torch.inference_mode():
        for K, N in shapes:
            g = torch.Generator().manual_seed(K * 7 + N)
            codes = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
            scales = (torch.rand(K // CPU_INT4_GROUP, N, generator=g) * 0.01 + 0.001).half()
            zeros = torch.randint(0, 16, (K // CPU_INT4_GROUP, N), generator=g).half()
            packed = PackedLinear(pack_int4(codes), scales, zeros, None, CPU_INT4_GROUP, K, N)
            del codes
            layers = {op: QuantLinear(packed) for op in ops}
            for op, layer in layers.items():
                if not layer.use_cpu_int4(op):
                    raise RuntimeError(f"the CPU int4 op {op} refused {K}x{N}: {layer.cpu_int4_refused}")
            dense = torch.nn.Linear(K, N, bias=False)
            dense.weight.copy_(layers["aten"].dequantized_weight().float())
            for M in ms:
                x = torch.randn(M, K, generator=g)
                ref = x.double() @ dense.weight.double().t()
                rel = max(((layers[op](x).double() - ref).abs().max() / ref.abs().max()).item() for op in ops)
                good = rel <= 2.0**-6
                ok &= good
                times = {op: [_seconds_per_call(layers[op], x, budget_s) for _ in range(runs)] for op in ops}
                t_fp32 = [_seconds_per_call(dense, x, budget_s) for _ in range(runs)]
                row = {"K": K, "N": N, "M": M, "threads": threads, **_spread_us("int4", times["tritonq"]),
                       **_spread_us("aten", times["aten"]), **_spread_us("fp32", t_fp32), "rel_err": rel, "ok": good}
                row["speedup"] = row["fp32_us"] / row["int4_us"]
                row["speedup_vs_aten"] = row["aten_us"] / row["int4_us"]
                rows.append(row)
                if not as_json:
                    a, b, c = (_spread_text(row, side) for side in ("int4", "aten", "fp32"))
                    print(f"{K:>6} {N:>6} {M:>3} {a:>22} {b:>22} {c:>22} {row['speedup']:>7.2f}x "
                          f"{row['speedup_vs_aten']:>7.2f}x {rel:>8.1e}{'' if good else '  MISMATCH'}")
    if as_json:
        print(json.dumps({"mode": "cpu-int4", "speed_measured": True, "note": note, "rows": rows,
                          "all_match": ok}, indent=1))
    else:
        print("all results match the reference" if ok else "MISMATCH against the reference")
    return 0 if ok else 1


def _w8a8_cuda_rows(as_json: bool) -> list[dict]:
    from ..kernels.int8_matmul import w8a8_linear_ref, w8a8_linear_triton

    rows = []
    if not as_json:
        print("W8A8 (per-token int8 activations, per-channel int8 weights), warm weights, CUDA graphs")
        print(f"{'M':>4} {'K':>6} {'N':>6} {'w8a8 us':>9} {'fp16 us':>9} {'_int_mm us':>10} {'vs fp16':>8}")
    for K, N in SHAPES_KN:
        wq = torch.randint(-128, 128, (N, K), dtype=torch.int8, device="cuda")
        ws = torch.rand(N, device="cuda") * 0.01
        wf = torch.randn(K, N, device="cuda", dtype=torch.float16)
        wt = wq.t()  # [K, N] column-major view: what _int_mm takes as its second operand
        for M in MS:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            err = (w8a8_linear_triton(x, wq, ws).float() - w8a8_linear_ref(x, wq, ws).float()).abs().max().item()
            t_q = _graph_time_us([lambda x=x, wq=wq, ws=ws: w8a8_linear_triton(x, wq, ws)])
            t_f = _graph_time_us([lambda x=x, wf=wf: torch.matmul(x, wf)])
            t_i = None
            if M > 16:
                xq = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
                t_i = _graph_time_us([lambda xq=xq, wt=wt: torch._int_mm(xq, wt)])
            row = {"M": M, "K": K, "N": N, "w8a8_us": t_q, "fp16_us": t_f, "int_mm_us": t_i,
                   "speedup_vs_fp16": t_f / t_q, "max_abs_err": err}
            rows.append(row)
            if not as_json:
                ti = f"{t_i:>10.2f}" if t_i is not None else f"{'-':>10}"
                print(f"{M:>4} {K:>6} {N:>6} {t_q:>9.2f} {t_f:>9.2f} {ti} {row['speedup_vs_fp16']:>7.2f}x")
    return rows


def _w8a8_interpreter_rows(as_json: bool) -> tuple[list[dict], bool]:
    from ..kernels.int8_matmul import w8a8_linear_ref, w8a8_linear_triton

    if not as_json:
        print("W8A8 (per-token quantization kernel + int8 GEMM), interpreter, against the reference; "
              "torch._int_mm needs CUDA and is not run here")
    rows, ok = [], True
    for K, N in CPU_SHAPES_KN:
        g = torch.Generator().manual_seed(K)
        wq = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        ws = torch.rand(N, generator=g) * 0.01
        for M in CPU_MS:
            x = torch.randn(M, K, generator=g)
            ref = w8a8_linear_ref(x, wq, ws)
            t0 = time.perf_counter()
            y = w8a8_linear_triton(x, wq, ws)
            wall = time.perf_counter() - t0
            err = (y - ref).abs().max().item()
            good = err <= 1e-5 * (1.0 + ref.abs().max().item())
            ok &= good
            rows.append({"kernel": "w8a8", "M": M, "K": K, "N": N, "max_abs_err": err, "interpreter_wall_s": wall,
                         "ok": good})
            if not as_json:
                print(f"{'w8a8':>6} {M:>3} {K:>5} {N:>5} {err:>10.2e} {ref.abs().max().item():>10.2e} "
                      f"{wall:>7.2f}{'' if good else '  MISMATCH'}")
    return rows, ok


def main(args) -> int:
    as_json = bool(getattr(args, "json", False))
    plot = getattr(args, "plot", None)
    if getattr(args, "cpu_int4", False):
        if plot:
            from ..errors import TritonqError

            raise TritonqError("--plot draws the GPU rows; it does not apply to --cpu-int4")
        return cpu_int4_bench(as_json, runs=getattr(args, "runs", 5))
    gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    if plot:  # checked before the long part
        from ..errors import TritonqError
        from .plots import check_png_path, require_matplotlib

        if not gpu:
            raise TritonqError("--plot needs a CUDA GPU: without one, bench matmul only checks the kernels in the "
                               "Triton interpreter and times nothing (plot a GPU run's --json output with "
                               "'tritonq plot matmul RESULT.json -o FILE.png')")
        require_matplotlib()
        check_png_path(plot)
    if gpu:
        return _cuda_bench(as_json, plot)
    if "tritonq.kernels.dequant_matmul" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != "1":
        # triton.jit decided at import time that the kernels are compiled; rerun interpreted
        import subprocess

        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "tritonq.cli", "bench", "matmul"] + (["--json"] if as_json else [])
        return subprocess.call(cmd, env=env)
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (decided at decoration)
    return _interpreter_check(as_json)
