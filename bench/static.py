"""``tritonq bench static``: what the compiler says about every kernel on every target. Compiled, not run.

Per kernel x config x dtype x target (from :mod:`tritonq.kernels.aot.catalog`, compiled by
:mod:`tritonq.kernels.aot.compile`): registers per thread, spills, shared memory, theoretical occupancy (warps
per SM from registers, shared memory and the target's limits, :func:`tritonq.kernels.aot.targets.occupancy`),
the share of 128-bit global loads and the tensor/matrix-core instruction count. Then the headline
shapes (issue 6): the int4 dequant-matmul on K x N = 4096 x 14336 and 8192 x 28672 at M = 1, 16, 64 and
the Hessian accumulation on 4096- and 11008-wide inputs, with the dispatcher's plan, bytes moved, FLOPs,
grid against the SM count (waves, tail) and the roofline lower bound ``max(bytes / HBM bandwidth,
FLOPs / peak)`` on H100 SXM and MI300X (figures and sources in :mod:`tritonq.kernels.aot.targets`).

Nothing is executed on a GPU: occupancy and load width say a kernel *can* approach the roofline, not
that it does (``../shared/docs/kernels_perf.md`` §7).

``python -m tritonq.bench.static --write-results`` also replaces the "Static (compiled, not run)"
section of ``bench/RESULTS.md`` with the tables, the command and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..kernels.aot import catalog
from ..kernels.aot import compile as aot
from ..kernels.aot.targets import ROOFLINE_TARGETS, TARGETS, get_target, occupancy

SECTION = "## Static (compiled, not run)"
HESSIAN_TOKENS = 2048  # tokens folded in per Hessian call for the headline bound (one 2048-token sequence)


@dataclass
class Row:
    combo: catalog.Combo
    report: aot.StaticReport
    problems: list[str]


def collect(targets: tuple[str, ...] | None = None) -> tuple[list[Row], list[str]]:
    """Compile every catalog combination for ``targets`` (cached) and check each report."""
    combos, excluded = catalog.combos(targets=targets)
    reports = aot.compile_jobs([catalog.job_for(c) for c in combos])
    rows = [Row(c, r, aot.problems(r)) for c, r in zip(combos, reports)]
    return rows, excluded


def _row_dict(row: Row) -> dict[str, Any]:
    r = row.report
    occ = aot.occupancy_of(r) if r.compiled else None
    share = r.share_128
    return {
        "kernel": r.kernel, "config": r.config, "dtype": r.dtype, "target": r.target,
        "case": row.combo.pick.case, "compiled": r.compiled, "error": r.error,
        "regs": r.regs, "local": r.local, "stack": r.stack, "spills": r.spills, "scratch": r.scratch,
        "shared": r.shared, "mma": r.mma,
        "warps_per_sm": occ.warps_per_sm if occ else None,
        "occupancy": round(occ.fraction, 3) if occ else None, "limiter": occ.limiter if occ else None,
        "share_128": None if share is None else round(share, 3),
        "arg_loads": {a: {str(w): n for w, n in d.items()} for a, d in r.arg_loads.items()},
        "problems": row.problems,
    }


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-2 else f"{s * 1e3:.2f} ms"


def _waves(grid: int, target: str, blocks_per_sm: int) -> tuple[float, float]:
    """(waves, tail): ``grid / (SMs x resident blocks)`` and the fill of the last wave (1.0 = full)."""
    slots = get_target(target).sm_count * max(blocks_per_sm, 1)
    waves = grid / slots
    tail = waves - math.floor(waves) if waves % 1 else 1.0
    return waves, tail


def headline(rows: list[Row]) -> list[dict[str, Any]]:
    """Dequant-matmul and Hessian headline shapes on the roofline targets (H100, MI300X)."""
    import torch

    from ..kernels import dequant_matmul as dm
    from ..kernels import hessian_accum as ha

    by_key = {(r.report.kernel.split("+")[0], r.report.config, r.report.dtype, r.report.target,
               tuple(r.combo.pick.variant)): r for r in rows}
    out: list[dict[str, Any]] = []
    gs = catalog.BENCH_SHAPES["group_size"]
    for tname in ROOFLINE_TARGETS:
        tgt = TARGETS[tname]
        cap = catalog._capability(tgt)
        for k, n in catalog.BENCH_SHAPES["matmul_kn"]:
            for m in catalog.BENCH_SHAPES["matmul_m"]:
                plan = dm.pick_config(m, k, n, gs, torch.float16, num_sms=tgt.sm_count, capability=cap)
                grid = dm.grid(plan, m, n, k)
                variant = (("atomic", grid[1] > 1), ("per_k", plan.per_k))
                row = by_key.get((f"dequant_{plan.kernel}", plan.config.label(), "fp16", tname, variant))
                # compulsory HBM traffic: nibbles, fp16 scale + zero per group, x, y (split-K partials stay in L2)
                nbytes = k * n / 2 + (k // gs) * n * 2 * 2 + 2 * m * k + 2 * m * n
                flops = 2 * m * k * n
                chosen = getattr(dm, f"{plan.kernel.upper()}_CTAS_PER_SM", None)
                out.append(_bound_row(f"dequant_{plan.kernel}", f"M={m} K={k} N={n}", "fp16", tname, plan.config,
                                      row, math.prod(grid), nbytes, flops, tgt.peak_flops_fp16,
                                      f"split_k={grid[1]}", chosen))
        for kw in catalog.BENCH_SHAPES["hessian_k"]:
            config = ha.pick_config(kw)
            bh = config.constexprs()["BLOCK_H"]
            nt = -(-kw // bh)
            pairs = nt * (nt + 1) // 2
            t = HESSIAN_TOKENS
            for dtype in ("bf16", "fp32"):
                esize = 2 if dtype == "bf16" else 4
                row = by_key.get(("hessian_accum", config.label(), dtype, tname, ()))
                # X once, H upper tiles read, both triangles written (fp32)
                nbytes = t * kw * esize + pairs * bh * bh * 4 + (2 * pairs - nt) * bh * bh * 4
                flops = 2 * t * bh * bh * pairs
                peak = tgt.peak_flops_fp16 if dtype == "bf16" else tgt.peak_flops_fp32
                out.append(_bound_row("hessian_accum", f"K={kw} T={t}", dtype, tname, config, row, pairs,
                                      nbytes, flops, peak, "upper-triangle tiles"))
    return out


def _bound_row(kernel: str, shape: str, dtype: str, tname: str, config, row: Row | None, grid: int,
               nbytes: float, flops: float, peak: float, note: str, chosen: int | None = None) -> dict[str, Any]:
    """One headline row. Residency is the theoretical occupancy, capped by the blocks per SM the
    dispatcher sizes its grid for (``chosen``, e.g. dequant_matmul.GEMV_CTAS_PER_SM) when it has one."""
    tgt = TARGETS[tname]
    rep = row.report if row else None
    occ = occupancy(tgt, config.num_warps, rep.regs, rep.shared) if rep and rep.compiled else None
    resident = occ.blocks_per_sm if occ else 1
    if chosen is not None:
        resident = min(resident, chosen)
    waves, tail = _waves(grid, tname, resident)
    t_mem = nbytes / tgt.hbm_bytes_per_s
    t_flop = flops / peak
    return {
        "kernel": kernel, "shape": shape, "dtype": dtype, "target": tname, "part": tgt.part,
        "config": config.label(), "note": note, "grid": grid,
        "blocks_per_sm": occ.blocks_per_sm if occ else None, "chosen_blocks_per_sm": chosen,
        "waves": round(waves, 2), "tail": round(tail, 2), "fills_sms": grid >= tgt.sm_count * resident,
        "bytes": nbytes, "flops": flops, "bound_s": max(t_mem, t_flop),
        "bound_by": "memory" if t_mem >= t_flop else "compute",
        "weights_128bit_only": _only_128(rep, "w_ptr") if kernel.startswith("dequant") else None,
        "spills": None if rep is None else bool(rep.local or rep.stack or rep.spills or rep.scratch),
    }


def _only_128(rep: aot.StaticReport | None, arg: str) -> bool | None:
    if rep is None or arg not in rep.arg_loads:
        return None
    return set(rep.arg_loads[arg]) == {128}


def _table(rows: list[Row], target: str) -> list[str]:
    lines = [f"### {target} ({TARGETS[target].part}, {TARGETS[target].sm_count} SMs)", "",
             "| kernel | dtype | config | regs | spill | smem | warps/SM (limit) | 128-bit loads | mma | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        r = row.report
        if r.target != target:
            continue
        if not r.compiled:
            lines.append(f"| {r.kernel} | {r.dtype} | {r.config} | - | - | - | - | - | - | does not compile |")
            continue
        occ = aot.occupancy_of(r)
        spill = r.local + r.stack if TARGETS[target].backend == "cuda" else r.spills + r.scratch
        share = "-" if r.share_128 is None else f"{100 * r.share_128:.0f}%"
        status = "ok" if not row.problems else "FAIL: " + "; ".join(p.split(": ", 1)[1].split(". Likely")[0]
                                                                    for p in row.problems)
        lines.append(f"| {r.kernel} | {r.dtype} | {r.config} | {r.regs} | {spill} | {r.shared} | "
                     f"{occ.warps_per_sm} ({occ.limiter}) | {share} | {r.mma} | {status} |")
    return lines + [""]


def _headline_table(hl: list[dict[str, Any]]) -> list[str]:
    lines = ["| kernel | shape | dtype | target | config | grid | blocks/SM max (chosen) | waves (tail) | bytes | "
             "FLOPs | lower bound | 128-bit W | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for h in hl:
        w128 = {True: "yes", False: "NO", None: "-"}[h["weights_128bit_only"]]
        lines.append(f"| {h['kernel']} | {h['shape']} | {h['dtype']} | {h['part']} | {h['config']} | {h['grid']} | "
                     f"{h['blocks_per_sm']} ({h['chosen_blocks_per_sm'] or '-'}) | {h['waves']} ({h['tail']}) | "
                     f"{_fmt_bytes(h['bytes'])} | "
                     f"{h['flops']:.3g} | {_fmt_time(h['bound_s'])} ({h['bound_by']}) | {w128} | {h['note']} |")
    return lines + [""]


def markdown(rows: list[Row], excluded: list[str], targets: tuple[str, ...], command: str) -> str:
    today = datetime.date.today().isoformat()
    n_fail = sum(1 for r in rows if r.problems)
    out = [SECTION, "",
           f"Command: `{command}` ({today}; Triton {_triton_version()}). Compiled, not run: nothing here was "
           "executed on a GPU. Occupancy is theoretical (registers, shared memory, warp/block limits); "
           "\"128-bit loads\" is the static share of global-load instructions that are 128 bits wide "
           "(`LDG.E.128` / `global_load_dwordx4`); \"mma\" counts tensor/matrix-core instructions.", "",
           f"{len(rows)} combinations compiled, {n_fail} with problems, {len(excluded)} excluded by the "
           "dispatchers.", ""]
    if excluded:
        out += ["Excluded by the dispatchers:", ""] + [f"- {e}" for e in excluded] + [""]
    problems = [p for r in rows for p in r.problems]
    if problems:
        out += ["Problems:", ""] + [f"- {p}" for p in problems] + [""]
    out += ["### Headline shapes (roofline lower bound on H100 SXM and MI300X)", "",
            "Bytes are compulsory HBM traffic (int4 weights, fp16 scale + zero per 128-group, x, y; for the "
            f"Hessian X once plus the fp32 H tiles read and written, T = {HESSIAN_TOKENS} tokens); the bound is "
            "max(bytes / bandwidth, FLOPs / peak). Waves = grid / (SMs x resident blocks per SM), where resident is "
            "the theoretical maximum capped by the blocks per SM the dispatcher sizes its grid for (chosen).", ""]
    out += _headline_table(headline(rows))
    for t in targets:
        out += _table(rows, t)
    return "\n".join(out)


def _triton_version() -> str:
    import triton

    return triton.__version__


def write_results(text: str, path: Path) -> None:
    """Replace (or append) the static section of ``bench/RESULTS.md``; other sections are kept."""
    old = path.read_text() if path.exists() else "# Results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + "\n" + (old[nxt + 1:] if nxt >= 0 else "")
    path.write_text(new)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``tritonq bench static [--json] [--target T]``; exit status 1 when a check fails."""
    targets = (args.target,) if getattr(args, "target", None) else tuple(TARGETS)
    for t in targets:
        get_target(t)
    rows, excluded = collect(targets)
    command = ("python -m tritonq.bench.static --write-results" if getattr(args, "write_results", False)
               else "tritonq bench static") + (f" --target {args.target}" if getattr(args, "target", None) else "")
    if getattr(args, "json", False):
        payload = {"compiled_not_run": True, "targets": list(targets), "excluded": excluded,
                   "rows": [_row_dict(r) for r in rows],
                   "headline": headline(rows) if set(ROOFLINE_TARGETS) <= set(targets) else []}
        json.dump(payload, sys.stdout, indent=1)
        print()
    else:
        text = markdown(rows, excluded, targets, command)
        print(text)
        if getattr(args, "write_results", False):
            write_results(text, Path(__file__).with_name("RESULTS.md"))
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tritonq.bench.static")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--target", default=None)
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    sys.exit(main(parser.parse_args()))
