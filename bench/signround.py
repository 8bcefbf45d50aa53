"""``python -m tritonq.bench.signround``: AutoRound's fake quantization, forward + backward of one linear, the
Triton kernels (``kernels.signround_qdq``, one launch each way) against the reference's autograd on the same
device, with achieved bandwidth and the two paths' agreement.

On a GPU: timed with ``triton.testing.do_bench`` on decoder-block linears (Llama-3-8B's 4096 x 4096 and
14336 x 4096 at group 128, per channel on 4096 x 14336; SmolLM2-135M's gate/up 1536 x 576 at group 64), in one
run, ratio = reference time / kernel time. The bytes are the compulsory traffic of one step: the forward reads
w and V and writes the output, the backward reads w, V and grad_out and writes grad_V (28 bytes per weight;
the factors are negligible). Without a GPU: tiny shapes, the kernels in the Triton interpreter
(``TRITON_INTERPRET=1``), checked against the reference -- a proof that the bench works, not a speed
measurement, and it says so; without the interpreter it stops with a one-line message. ``--static`` prints the
kernels' compiled-not-run figures (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .. import kernels
from .quant_time import _timer

# (N out_features, K in_features, group): the linears AutoRound's block loop sees
GPU_SHAPES = [(4096, 4096, 128), (14336, 4096, 128), (4096, 14336, -1), (1536, 576, 64)]
CPU_SHAPES = [(40, 192, 64), (12, 600, -1)]
BYTES_PER_WEIGHT = 28  # forward: w, V in, out; backward: w, V, grad_out in, grad_V out (fp32)


def bench_shape(device: torch.device, n: int, k: int, group: int, bits: int = 3, sym: bool = False) -> dict:
    """One linear: forward + backward per path, the time and how far the kernel is from the reference."""
    timer = _timer(device)
    gen = torch.Generator(device=device).manual_seed(n + k)
    width = k if group == -1 else group
    w = torch.randn(n, k, device=device, generator=gen) * 0.02
    v = (torch.rand(n, k, device=device, generator=gen) - 0.5).requires_grad_()
    mf = (0.5 + 0.5 * torch.rand(n, k // width, device=device, generator=gen)).requires_grad_()
    xf = (0.5 + 0.5 * torch.rand(n, k // width, device=device, generator=gen)).requires_grad_()
    grad_out = torch.randn(n, k, device=device, generator=gen)
    results = {}

    def step(force: str) -> None:
        out = kernels.signround_qdq(w, v, mf, xf, group, 2**bits - 1, sym, force=force)
        results[force] = (out.detach(), *torch.autograd.grad(out, (v, mf, xf), grad_out))

    t_ref = timer(lambda: step("ref"))
    t_ker = timer(lambda: step("triton"))
    ref, ker = results["ref"], results["triton"]
    factor_diff = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(ker[2:], ref[2:]))
    return {"N": n, "K": k, "group": group, "bits": bits, "ref_s": t_ref, "kernel_s": t_ker, "speedup": t_ref / t_ker,
            "kernel_GBps": BYTES_PER_WEIGHT * n * k / t_ker / 1e9, "forward_equal": bool(torch.equal(ker[0], ref[0])),
            "grad_offsets_equal": bool(torch.equal(ker[1], ref[1])), "factor_grad_rel_diff": factor_diff}


STATIC_CASES = ("group=64", "group=128", "per channel K=4096")  # catalog picks shown in the static tables
STATIC_TARGETS = ("sm_80", "sm_90", "sm_100", "gfx942")
# (N, K, group, catalog case) of the roofline rows: a Llama-sized linear, SmolLM2-135M's gate/up, per channel
STATIC_SHAPES = ((4096, 4096, 128, "group=128"), (1536, 576, 64, "group=64"), (4096, 14336, -1, "per channel K=4096"))


def static_tables() -> str:
    """Compiled, not run: the catalog's builds of both kernels on every target (cached by ``kernels.aot``), as
    markdown: a summary line, registers / spills / shared memory / occupancy / load widths, then grids, waves and
    the compulsory-traffic lower bound (forward 12 B per weight, backward 16 B) on the headline shapes."""
    from ..kernels import signround
    from ..kernels.aot import catalog
    from ..kernels.aot import compile as aot
    from ..kernels.aot.targets import ROOFLINE_TARGETS, get_target

    entries = tuple(e for e in catalog.ENTRIES if e.module == "signround")
    combos, _ = catalog.combos(entries=entries)
    reports = aot.compile_jobs([catalog.job_for(c) for c in combos])
    spilled = sum(r.local + r.stack + r.spills + r.scratch for r in reports)
    lines = [f"{len(combos)} builds, {sum(bool(aot.problems(r)) for r in reports)} with problems, {spilled} bytes "
             "spilled.", "", "| kernel | case | target | config | regs | spills | shared B | blocks/SM (limiter) | "
             "128-bit loads of w, V (, grad_out) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_case = {(c.entry.name, c.target, c.pick.case): r for c, r in zip(combos, reports)}
    for entry in entries:
        streamed = ["w_ptr", "v_ptr"] + (["g_ptr"] if "bwd" in entry.name else [])
        for case in STATIC_CASES:
            for target in STATIC_TARGETS:
                r = by_case[(entry.name, target, case)]
                occ = aot.occupancy_of(r)
                wide = all(set(r.arg_loads.get(a, {})) == {128} for a in streamed)
                lines.append(f"| {entry.name} | {case} | {target} | {r.config} | {r.regs} | "
                             f"{r.local + r.stack + r.spills + r.scratch} | {r.shared} | {occ.blocks_per_sm} "
                             f"({occ.limiter}) | {'all' if wide else 'NOT all'} |")
    lines += ["", "| shape (N x K, group) | kernel | part | grid (groups x row tiles) | waves | compulsory bytes | "
              "lower bound |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, k, group, case in STATIC_SHAPES:
        width = k if group == -1 else group
        grid = (k // width, -(-n // signround.pick_config(width).constexprs()["BLOCK_N"]))
        for entry, per_weight in zip(entries, (12, 16)):
            for target in ROOFLINE_TARGETS:
                tgt = get_target(target)
                waves = grid[0] * grid[1] / (tgt.sm_count * aot.occupancy_of(by_case[(entry.name, target, case)])
                                             .blocks_per_sm)
                nbytes = per_weight * n * k
                label = "per channel" if group == -1 else f"g{group}"
                lines.append(f"| {n} x {k}, {label} | {entry.name} | {tgt.part} | {grid[0]} x {grid[1]} | "
                             f"{waves:.2f} | {nbytes / 1e6:.1f} MB | {nbytes / tgt.hbm_bytes_per_s * 1e6:.1f} us |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonq.bench.signround", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--static", action="store_true", help="compiled, not run: the kernels' static tables")
    args = parser.parse_args(argv)
    if args.static:
        print(static_tables())
        return 0
    on_gpu = torch.cuda.is_available()
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        print("no GPU: rerun with TRITON_INTERPRET=1 to run the kernels in the interpreter "
              "(tiny shapes; a correctness proof, not a speed measurement)")
        return 1
    device = torch.device("cuda" if on_gpu else "cpu")
    rows = [bench_shape(device, n, k, g) for n, k, g in (GPU_SHAPES if on_gpu else CPU_SHAPES)]
    name = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter: NOT a speed measurement)"
    if args.json:
        print(json.dumps({"device": name, "rows": rows}, indent=2))
        return 0
    print(f"device: {name}")
    for r in rows:
        group = "per channel" if r["group"] == -1 else f"g{r['group']}"
        print(f"N={r['N']:<6} K={r['K']:<6} {group:<11} ref {r['ref_s'] * 1e3:9.3f} ms  kernel "
              f"{r['kernel_s'] * 1e3:9.3f} ms  ratio {r['speedup']:6.2f}x  kernel {r['kernel_GBps']:7.1f} GB/s  "
              f"forward equal {r['forward_equal']}  grad V equal {r['grad_offsets_equal']}  "
              f"factor grads rel diff {r['factor_grad_rel_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
