"""Ahead-of-time compilation of every catalogued kernel for every target (issue 6). No GPU needed.

The session fixture compiles each kernel x config x dtype x target once (worker processes, on-disk
cache keyed by source hash and configuration, see ``kernels/aot.py``; about 270 compiles, ~7 CPU-minutes
cold on a 2-core CPU with 2 workers, seconds when ``~/.cache/tritonq/aot`` is warm); the per-(kernel, target) tests
then fail with the checker's messages, which name kernel, config, dtype, target and the likely fix.
The negative tests compile kernels that are wrong on purpose (``aot_bad_kernels.py``) and check that
the failure is caught and worded that way.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from tritonq.kernels.aot import catalog
from tritonq.kernels.aot import compile as aot
from tritonq.kernels.aot.targets import TARGETS, get_target, occupancy
from tritonq.kernels.configs import LaunchConfig

BAD = str(Path(__file__).with_name("aot_bad_kernels.py"))


@pytest.fixture(scope="session")
def static_rows() -> dict[tuple[str, str], list[tuple[catalog.Combo, aot.StaticReport]]]:
    """Every catalog combination compiled once per run, grouped by (kernel, target)."""
    combos, _ = catalog.combos()
    reports = aot.compile_jobs([catalog.job_for(c) for c in combos])
    grouped: dict[tuple[str, str], list] = {}
    for combo, report in zip(combos, reports):
        grouped.setdefault((combo.entry.name, combo.target), []).append((combo, report))
    return grouped


# ------------------------------------------------------------------------------------- the catalog


def test_catalog_lists_every_kernel():
    listed = {(e.module, e.kernel) for e in catalog.ENTRIES}
    missing = catalog.discover_kernels() - listed
    assert not missing, f"jitted kernels missing from kernels/catalog.py ENTRIES: {sorted(missing)}"


@pytest.mark.parametrize("entry", catalog.ENTRIES, ids=lambda e: e.name)
def test_catalog_hooks_exist(entry):
    """Every attribute an entry names (kernel, configs, signature, LIMITS, exclusion hook) is defined by
    its module: a misspelt or missing exclusion hook must not read as "nothing excluded"."""
    mod = entry.load()
    missing = [name for name in entry.hooks() if not hasattr(mod, name)]
    assert not missing, f"{entry.name}: kernels/{entry.module}.py defines none of {missing}"
    assert entry.dtypes and set(entry.dtypes) <= {"fp16", "bf16", "fp32"}


def test_every_exclusion_hook_is_named_by_the_catalog():
    """The reverse: an ``excluded*`` function in a kernel module that no entry names is never consulted."""
    named = {(e.module, e.excluded) for e in catalog.ENTRIES if e.excluded}
    loaded = {e.module: e.load() for e in catalog.ENTRIES}
    defined = {(m, attr) for m, mod in loaded.items() for attr, obj in vars(mod).items()
               if attr.startswith("excluded") and callable(obj)}
    assert defined == named


def test_missing_hook_fails_loudly():
    import dataclasses

    entry = dataclasses.replace(catalog.get_entry("gptq_block"), excluded="excluded_nowhere")
    assert "excluded_nowhere" in entry.hooks()
    with pytest.raises(AttributeError):
        entry.exclusion("sm_90", "fp32", entry.all_configs()[0])


@pytest.mark.parametrize("entry", catalog.ENTRIES, ids=lambda e: e.name)
def test_dispatcher_picks_only_listed_configs(entry):
    configs = set(entry.all_configs())
    mod = entry.load()
    for tname, target in TARGETS.items():
        for dtype in entry.dtypes:
            for pick in entry.picks(mod, target, dtype):
                assert pick.config in configs, (
                    f"{entry.name}: the dispatcher picks {pick.config.label()} for {pick.case} on {tname}/{dtype}, "
                    f"which is not in {entry.module}.{entry.configs}; add it there")


@pytest.mark.parametrize("entry", catalog.ENTRIES, ids=lambda e: e.name)
def test_dispatcher_honours_exclusions(entry):
    """A combination the module's excluded() names must never be what its dispatcher picks there."""
    mod = entry.load()
    if entry.launcher_checks_exclusion:
        pytest.skip("the launcher consults excluded() at run time (see test_hessian_on_sm75_goes_to_the_reference)")
    for tname, target in TARGETS.items():
        for dtype in entry.dtypes:
            picked = {p.config for p in entry.picks(mod, target, dtype)}
            for config in entry.all_configs():
                reason = entry.exclusion(tname, dtype, config)
                assert not (reason and config in picked), (
                    f"{entry.name}: excluded() says {config.label()} cannot run on {tname}/{dtype} ({reason}) but "
                    "the dispatcher still picks it; make pick_config honour the exclusion")


def test_dequant_dispatch_avoids_gemm_on_sm75():
    """Triton 3.9 emits no tensor-core dot on sm_75 (fp16 or bf16): the dispatcher takes the GEMV there and
    the catalog compiles no GEMM for sm_75, while sm_80 still gets one."""
    from tritonq.kernels import dequant_matmul as dm

    for dtype in (torch.float16, torch.bfloat16):
        plan = dm.pick_config(64, 4096, 14336, 128, dtype, capability=(7, 5), num_sms=40)
        assert plan.kernel == "gemv"
    on_75, _ = catalog.combos(entries=(catalog.get_entry("dequant_gemm"),), targets=("sm_75",))
    on_80, _ = catalog.combos(entries=(catalog.get_entry("dequant_gemm"),), targets=("sm_80",))
    assert not on_75 and on_80


def test_hessian_on_sm75_goes_to_the_reference():
    from tritonq.kernels import hessian_accum

    assert hessian_accum.excluded("sm_75", "fp16", hessian_accum.CONFIGS[0])
    assert hessian_accum.excluded("sm_80", "fp16", hessian_accum.CONFIGS[0]) is None
    combos, printed = catalog.combos(entries=(catalog.get_entry("hessian_accum"),), targets=("sm_75",))
    assert combos and all(c.dtype == "fp32" for c in combos)
    assert any("sm_75" in line and "cuBLAS reference" in line for line in printed)
    # and the launcher's run-time check reads the same rule
    assert "excluded(target" in inspect.getsource(hessian_accum.kernel_usable)


# ------------------------------------------------------------------------------ the static matrix


@pytest.mark.slow  # the first test to use the fixture pays for every compile: ~7 CPU-minutes cold, seconds warm
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("kernel", [e.name for e in catalog.ENTRIES])
def test_compiles_clean(static_rows, kernel, target):
    """Compiles, no spills, fits shared memory, tensor/matrix cores for 16-bit dots, at least one block per SM."""
    rows = static_rows.get((kernel, target), [])
    failures = []
    for _, report in rows:
        failures += aot.problems(report)
        if report.compiled and aot.occupancy_of(report).blocks_per_sm < 1 and not aot.problems(report):
            failures.append(f"{report.kernel} [{report.config}] on {target}: zero resident blocks")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_int4_gemv_m1_sm90_headline(static_rows):
    """Issue 6: at M = 1 on sm_90 the packed weights are read only with 128-bit loads, nothing spills,
    and the grid fills every SM at the kernel's occupancy on 4096 x 14336 (split-K where it must)."""
    from tritonq.kernels import dequant_matmul as dm

    k, n = 4096, 14336
    h100 = get_target("sm_90")
    plan = dm.pick_config(1, k, n, 128, torch.float16, num_sms=h100.sm_count, capability=(9, 0))
    grid = dm.grid(plan, 1, n, k)
    variant = (("atomic", grid[1] > 1), ("per_k", plan.per_k))
    match = [r for c, r in static_rows[(f"dequant_{plan.kernel}", "sm_90")]
             if c.pick.config == plan.config and c.pick.variant == variant and r.dtype == "fp16"]
    assert match, f"the M=1 plan {plan} is not among the compiled combinations"
    rep = match[0]
    assert rep.compiled and not (rep.local or rep.stack), aot.problems(rep)
    assert set(rep.arg_loads.get("w_ptr", {})) == {128}, f"packed-weight loads by width: {rep.arg_loads}"
    occ = occupancy(h100, plan.config.num_warps, rep.regs, rep.shared)
    chosen = getattr(dm, f"{plan.kernel.upper()}_CTAS_PER_SM", occ.blocks_per_sm)  # what the grid is sized for
    assert occ.blocks_per_sm >= chosen, f"the dispatcher sizes for {chosen} blocks/SM, registers/smem allow {occ}"
    programs = grid[0] * grid[1] * grid[2]
    assert programs >= h100.sm_count * chosen, (
        f"grid {grid} = {programs} programs < {h100.sm_count} SMs x {chosen} resident blocks")


# ------------------------------------------------------------------------------- negative tests


def _bad_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONQ_AOT_CACHE", str(tmp_path))


def test_spilling_kernel_fails_with_a_named_fix(tmp_path, monkeypatch):
    _bad_jobs(tmp_path, monkeypatch)
    config = LaunchConfig.of(num_warps=1, num_stages=1, BLOCK_M=64, BLOCK_N=256)
    sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    job = aot.Job("spill_kernel", f"{BAD}:spill_kernel", sig, config.constexprs(), config, "fp16", "sm_90")
    (report,) = aot.compile_jobs([job])
    msgs = aot.problems(report)
    assert report.local + report.stack > 0, report
    assert any("spill" in m for m in msgs), msgs
    msg = next(m for m in msgs if "spill" in m)
    for part in ("spill_kernel", config.label(), "sm_90", "Likely fix"):
        assert part in msg, msg


def test_shared_memory_overflow_fails_with_a_named_fix(tmp_path, monkeypatch):
    _bad_jobs(tmp_path, monkeypatch)
    config = LaunchConfig.of(num_warps=4, num_stages=3, BM=64, BN=64, BK=128)
    sig = {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "K": "i32:16",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    job = aot.Job("big_dot", f"{BAD}:big_dot_kernel", sig, config.constexprs(), config, "fp32", "sm_86")
    (report,) = aot.compile_jobs([job])
    assert report.shared > get_target("sm_86").smem_per_block
    msgs = aot.problems(report)
    msg = next(m for m in msgs if "shared memory" in m)
    for part in ("big_dot", config.label(), "sm_86", "Likely fix"):
        assert part in msg, msg
    assert occupancy(get_target("sm_86"), 4, report.regs, report.shared).blocks_per_sm == 0


def test_fma_fallback_of_16bit_dot_is_reported(tmp_path, monkeypatch):
    """Triton 3.9 lowers a 16-bit tl.dot on sm_75 to FMA: the checker must flag it as a slow fallback."""
    _bad_jobs(tmp_path, monkeypatch)
    config = LaunchConfig.of(num_warps=4, num_stages=2, BM=32, BN=32, BK=32)
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32:16",
           "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    jobs = [aot.Job("small_dot", f"{BAD}:big_dot_kernel", sig, config.constexprs(), config, "bf16", t)
            for t in ("sm_75", "sm_80")]
    old, new = aot.compile_jobs(jobs)
    assert old.mma == 0 and new.mma > 0
    assert any("FMA" in m and "sm_75" in m for m in aot.problems(old))
    assert not aot.problems(new)


# --------------------------------------------------------------------------- parsers and limits


def test_sass_and_gcn_load_widths():
    sass = """
        /*0160*/              @!P0 LDG.E.U16 R0, desc[UR4][R4.64] ;
        /*0170*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0180*/                   LDG.E.64 R6, desc[UR4][R2.64+0x10] ;
        /*0190*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*01a0*/                   LDG.E R5, desc[UR4][R2.64] ;
    """
    assert aot.sass_load_widths(sass) == {16: 1, 128: 2, 64: 1, 32: 1}
    gcn = "\tglobal_load_dwordx4 v[0:3], v[4:5], off\n\tbuffer_load_ushort v1, v2, s[0:3], 0 offen\n"
    assert aot.gcn_load_widths(gcn) == {128: 1, 16: 1}


def test_amd_spill_metadata_is_a_failure():
    report = aot.StaticReport("k", "cfg", "fp16", "gfx942", 4, 2)
    asm = ("    .vgpr_count:     512\n    .vgpr_spill_count: 12\n    .sgpr_spill_count: 0\n"
           "    .private_segment_fixed_size: 48\n")
    aot._parse_amdgcn(asm, report)
    assert (report.regs, report.spills, report.scratch) == (512, 12, 48)
    msgs = aot.problems(report)
    assert msgs and "gfx942" in msgs[0] and "spill" in msgs[0] and "Likely fix" in msgs[0]


def test_occupancy_limits():
    h100, a10, mi300 = get_target("sm_90"), get_target("sm_86"), get_target("gfx942")
    assert occupancy(h100, 4, 32, 0).warps_per_sm == 64  # warp limit
    assert occupancy(h100, 4, 128, 0).warps_per_sm == 16  # 128 regs x 32 lanes x 16 warps = 64K
    assert occupancy(a10, 4, 32, 60 * 1024).blocks_per_sm == 1  # 100 KB per SM, 61 KB per block
    assert occupancy(mi300, 4, 128, 0).warps_per_sm == 16  # 512 // 128 = 4 waves per SIMD x 4 SIMDs
    assert occupancy(mi300, 4, 32, 70 * 1024).blocks_per_sm == 0  # over 64 KB of LDS
