"""The one list of tritonq's Triton kernels, with the launch configurations the engine can pick.

Every ``@triton.jit`` kernel in ``tritonq.kernels`` must appear in :data:`ENTRIES`; ``tests/test_aot.py``
finds every jitted function in the kernel modules and fails on one that is missing, then compiles each
entry ahead of time for every target in :mod:`tritonq.kernels.aot.targets`
(see :mod:`tritonq.kernels.aot.compile`).
A new kernel is not done until it is listed here. Device helpers (``@triton.jit`` functions only ever compiled
inside a module's kernels) are named in that module's ``DEVICE_HELPERS`` instead, or live in ``grid_fit``.

An entry names, by attribute, the jitted kernel, the tuple of configs its launcher may use, the
``aot_signature``-style function that gives Triton's argument types and, optionally, the module's
exclusion hook; the dtypes it compiles are the module's declared ``LIMITS.dtypes``. A named attribute
the module does not define is an error (``tests/test_aot.py:test_catalog_hooks_exist``), not a silent
"no exclusions". Its ``picks`` function runs the module's dispatch rule (``pick_config`` and the
autotuner's ``candidates``) over the shapes the benchmarks use (:data:`BENCH_SHAPES`) *for a given
target* and returns the :class:`Pick` list: which config, which constexpr variant, for which case.
The static tests compile exactly those picks, so the list and the dispatcher cannot drift apart;
``TRITONQ_AOT_FULL=1`` also compiles every config in the module's tuple.

How a kernel module excludes a target (the dispatcher-exclusion contract)
--------------------------------------------------------------------------
A combination that does not compile, spills, overflows shared memory, or lowers ``tl.dot`` on fp16/bf16
without tensor/matrix cores (Triton 3.9 emits FMA for every 16-bit ``tl.dot`` on sm_75) fails the tests
unless the dispatcher never picks it on that target. To say so, a kernel module defines::

    def excluded(target: str, dtype: str, config: LaunchConfig) -> str | None:
        '''A reason why the launcher never runs ``config`` on ``target`` for ``dtype``, else None.'''

(``target`` is a name from ``targets.TARGETS``: "sm_75" ... "gfx942"; the entry names it in its
``excluded`` field, and a module with several kernels may define one such function per kernel), and makes
its launcher consult it: the runtime target is :func:`runtime_target` of the device. The catalog
drops excluded picks and prints their reasons in ``tritonq bench static``; the agreement test checks
that a dispatcher which takes the target (``pick_config(..., capability=...)``) never picks an
excluded combination. A dispatcher that already routes around a target by itself (dequant_matmul:
bf16 on sm_75 never takes the GEMM) needs no ``excluded``: its picks for that target simply omit it.

Integer hints: ``assume`` records what the JIT specializes on at the benchmark shapes (multiples of 16
get ``tt.divisibility=16``; unit strides become the constant 1), so the AOT code is the code a GPU
would run at those shapes; see the :mod:`tritonq.kernels.aot.compile` docstring.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...errors import TritonqError
from ..configs import LaunchConfig
from .targets import TARGETS, Target

KERNELS_PACKAGE = __package__.rpartition(".")[0]  # the kernels this catalog lists sit one folder up


@dataclass(frozen=True)
class Pick:
    """One launch the dispatcher makes: config, the kernel's constexpr variant, and why (the case)."""

    config: LaunchConfig
    case: str
    variant: tuple[tuple[str, Any], ...] = ()
    dtype: str = ""


# Shapes the benchmarks and the headline report use (issue 6). Hessian widths are K of the inputs.
BENCH_SHAPES: dict[str, Any] = {
    "matmul_kn": ((4096, 14336), (8192, 28672)),
    "matmul_m": (1, 16, 64),
    "matmul_m_dispatch": (1, 2, 4, 8, 16, 64, 256),  # every GEMV bucket, both GEMM buckets, prefill
    "group_size": 128,
    "hessian_k": (4096, 11008),
    "hessian_k_small": (576,),  # the offline default model (SmolLM2-135M hidden size)
    # columns per in-block launch: each BLOCK_B; engine/hessian.py splits a wider --block-size into these
    "gptq_block": (128, 256),
}


@dataclass(frozen=True)
class KernelEntry:
    """One jitted kernel: where it lives, what it takes, and how its dispatcher picks configs."""

    name: str
    module: str  # under tritonq.kernels
    kernel: str  # attribute of the jitted function
    configs: str  # attribute of the tuple of LaunchConfigs the launcher may use
    signature: str  # attribute of ``f(dtype, config, **variant) -> (signature, constexprs)``
    picks: Callable[[Any, Target, str], list[Pick]]  # (module, target, dtype) -> picks on bench shapes
    excluded: str | None = None  # attribute of ``(target, dtype, config) -> reason | None``; None: no hook
    assume: dict[str, str] = field(default_factory=dict)  # arg -> "16" or "1" at the bench shapes
    # True when the launcher itself consults ``excluded`` at run time and falls back to the reference
    # (pick_config does not take the target); the catalog then drops and prints those picks.
    launcher_checks_exclusion: bool = False

    def load(self) -> Any:
        return importlib.import_module(f"{KERNELS_PACKAGE}.{self.module}")

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtypes to compile: what the module's Triton path declares it takes (``LIMITS.dtypes``)."""
        return tuple(self.load().LIMITS.dtypes)

    def hooks(self) -> tuple[str, ...]:
        """Every attribute this entry names on its module."""
        named = (self.kernel, self.configs, self.signature, "LIMITS", self.excluded)
        return tuple(name for name in named if name is not None)

    def all_configs(self) -> tuple[LaunchConfig, ...]:
        return tuple(getattr(self.load(), self.configs))

    def exclusion(self, target: str, dtype: str, config: LaunchConfig) -> str | None:
        if self.excluded is None:
            return None
        # no default: a hook named here but missing from the module must fail, not read as "never excluded"
        return getattr(self.load(), self.excluded)(target, dtype, config)

    def aot_signature(self, dtype: str, config: LaunchConfig, variant: tuple = ()) -> tuple[dict, dict]:
        sig, consts = getattr(self.load(), self.signature)(dtype, config, **dict(variant))
        sig = dict(sig)
        for arg, hint in self.assume.items():
            if arg in sig and sig[arg] != "constexpr" and ":" not in sig[arg]:
                sig[arg] = f"{sig[arg]}:{hint}"
        return sig, consts


def _capability(target: Target) -> tuple[int, int]:
    """Compute capability a CUDA target reports; AMD parts report 9.x through HIP (gfx90a 9.0, gfx942 9.4)."""
    if target.backend == "cuda":
        return divmod(int(target.arch), 10)
    return (9, 4) if target.arch == "gfx942" else (9, 0)


def _picks_hessian(mod: Any, target: Target, dtype: str) -> list[Pick]:
    ks = BENCH_SHAPES["hessian_k"] + BENCH_SHAPES["hessian_k_small"]
    return [Pick(mod.pick_config(k), f"K={k}", (), dtype) for k in ks]


def _picks_gptq_block(mod: Any, target: Target, dtype: str) -> list[Pick]:
    return [Pick(mod.pick_config(b), f"block={b}", (), dtype) for b in BENCH_SHAPES["gptq_block"]]


def _picks_update(mod: Any, target: Target, dtype: str) -> list[Pick]:
    return [Pick(mod.pick_update_config(), "lazy update", (), dtype)]


def _dequant_plans(mod: Any, target: Target, dtype: str, ms: tuple[int, ...], kernel: str):
    """(case, plan, variant) for the dispatcher and its autotuning neighbours on the bench shapes."""
    import torch

    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    gs = BENCH_SHAPES["group_size"]
    out = []
    for k, n in BENCH_SHAPES["matmul_kn"]:
        for m in ms:
            base = mod.pick_config(m, k, n, gs, tdtype, num_sms=target.sm_count, capability=_capability(target))
            # the autotuner's neighbours, as it times them without a forced kernel
            cands = mod.candidates(base, m, k, n, gs, tdtype, False, target.sm_count, _capability(target),
                                   forced=False)
            for i, plan in enumerate(cands):
                if plan.kernel != kernel:
                    continue
                split = mod.grid(plan, m, n, k)[1]
                variant = (("atomic", split > 1), ("per_k", plan.per_k))
                tag = "dispatch" if i == 0 else "autotune"
                out.append((f"M={m} K={k} N={n} {tag} split={split}", plan, variant))
    return out


def _picks_dequant(kernel: str) -> Callable[[Any, Target, str], list[Pick]]:
    def picks(mod: Any, target: Target, dtype: str) -> list[Pick]:
        plans = _dequant_plans(mod, target, dtype, BENCH_SHAPES["matmul_m_dispatch"], kernel)
        return [Pick(plan.config, case, variant, dtype) for case, plan, variant in plans]

    return picks


def _picks_awq(mod: Any, target: Target, dtype: str) -> list[Pick]:
    groups = sorted({64, BENCH_SHAPES["group_size"]})  # SmolLM2's group and the common one
    return [Pick(mod.pick_config(g), f"group={g}", (("GROUP", g),), dtype) for g in groups]


def _picks_awq_linear(mod: Any, target: Target, dtype: str) -> list[Pick]:
    groups = sorted({64, BENCH_SHAPES["group_size"]})
    return [Pick(mod.pick_linear_config(g), f"group={g}", (("GROUP", g),), dtype) for g in groups]


def _picks_awq_clip(mod: Any, target: Target, dtype: str) -> list[Pick]:
    groups = sorted({64, BENCH_SHAPES["group_size"]})
    return [Pick(mod.pick_config(g), f"group={g}", (("GROUP", g),), dtype) for g in groups]


def _picks_boa(mod: Any, target: Target, dtype: str) -> list[Pick]:
    return [Pick(mod.pick_config(), "q/k heads (one config)", (), dtype)]


def _picks_int8_gemm(mod: Any, target: Target, dtype: str) -> list[Pick]:
    picks = {}
    for m in BENCH_SHAPES["matmul_m_dispatch"]:
        config = mod.pick_gemm_config(m)
        picks.setdefault(config, Pick(config, f"M={m}", (("HAS_BIAS", False),), dtype))
    return list(picks.values())


def _picks_int8_quant(mod: Any, target: Target, dtype: str) -> list[Pick]:
    return [Pick(mod.pick_quant_config(), "per-token rows (one config)", (), dtype)]


def _picks_signround(mod: Any, target: Target, dtype: str) -> list[Pick]:
    """AutoRound's fake quantization: the groups AutoRound runs with (SmolLM2's 64, the common 128, 32) and
    one group per row (K = 4096, the 512-column chunks); the symmetric grid at 128."""
    cases = [(g, f"group={g}") for g in (32, 64, BENCH_SHAPES["group_size"])] + [(4096, "per channel K=4096")]
    picks = [Pick(mod.pick_config(g), case, (("SYM", False),), dtype) for g, case in cases]
    return picks + [Pick(mod.pick_config(128), "group=128 sym", (("SYM", True),), dtype)]


def _picks_hadamard(mod: Any, target: Target, dtype: str) -> list[Pick]:
    """The power-of-two parts of the widths the online Hadamard sees: 64 (SmolLM2's head dim), 128 (its 1536 = 12 x 128;
    Llama's head dim), 512 and 4096 (Llama-style hidden widths)."""
    return [Pick(mod.pick_config(p), f"P={p}", (("P", p),), dtype) for p in (64, 128, 512, 4096)]


_DEQUANT_ASSUME = {"M": "16", "N": "16", "K": "16", "group_size": "16", "tiles_per_split": "16",
                   "stride_xm": "16", "stride_om": "16"}

ENTRIES: tuple[KernelEntry, ...] = (
    KernelEntry("hessian_accum", "hessian_accum", "hessian_accum_kernel", "CONFIGS", "aot_signature",
                _picks_hessian, excluded="excluded", launcher_checks_exclusion=True,
                assume={"T": "16", "K": "16", "stride_xt": "16", "stride_h": "16"}),
    KernelEntry("gptq_block", "gptq_block", "gptq_block_kernel", "BLOCK_CONFIGS", "aot_signature",
                _picks_gptq_block,
                # c0 and ncols are multiples of the 128-column block at the bench shapes
                assume={"N": "16", "c0": "16", "ncols": "16", "stride_w": "16", "stride_u": "16", "stride_q": "16",
                        "stride_e": "16"}),
    KernelEntry("trailing_update", "gptq_block", "trailing_update_kernel", "UPDATE_CONFIGS",
                "aot_signature_update", _picks_update,
                # engine/hessian.py: C = W[:, c0+B:] (row-major), A = err^T.t() (column-major), B = U slice
                assume={"M": "16", "N": "16", "K": "16", "stride_cm": "16", "stride_cn": "1", "stride_am": "1",
                        "stride_ak": "16", "stride_bk": "16", "stride_bn": "1"}),
    KernelEntry("awq_search", "awq_search", "awq_candidates_kernel", "CONFIGS", "aot_signature", _picks_awq,
                excluded="excluded", launcher_checks_exclusion=True,
                assume={"N": "16", "K": "16", "T": "16", "stride_w": "16", "stride_x": "16", "stride_s": "16"}),
    # the same kernel writing the module searches' candidate outputs (norm -> q/k/v, norm -> gate/up):
    # contiguous x [T, K], y [A, T, N]
    KernelEntry("awq_linear", "awq_search", "awq_candidates_kernel", "LINEAR_CONFIGS", "aot_signature_linear",
                _picks_awq_linear, excluded="excluded", launcher_checks_exclusion=True,
                assume={"N": "16", "K": "16", "stride_w": "16", "stride_x": "16", "stride_s": "16", "stride_ya": "16",
                        "stride_yt": "16"}),
    # the clip search: fp32 weights [N, K] row-major, Gram blocks [G, g, g] contiguous
    KernelEntry("awq_clip", "awq_clip", "awq_clip_kernel", "CONFIGS", "aot_signature", _picks_awq_clip,
                assume={"N": "16", "stride_w": "16"}),
    # engine/boa.py: contiguous tensors; K a multiple of 16 at the bench shapes (Llama q_proj)
    KernelEntry("boa_rows", "boa_rows", "boa_rows_kernel", "CONFIGS", "aot_signature", _picks_boa,
                assume={"K": "16"}),
    # W8A8: activations [M, K] and int8 weights [N, K] row-major; K, N multiples of 16 at the bench shapes
    KernelEntry("int8_gemm", "int8_matmul", "int8_gemm_kernel", "GEMM_CONFIGS", "aot_signature_gemm",
                _picks_int8_gemm, excluded="excluded", launcher_checks_exclusion=True,
                assume={"N": "16", "K": "16", "stride_am": "16", "stride_bn": "16", "stride_cm": "16"}),
    KernelEntry("int8_quant", "int8_matmul", "quantize_per_token_kernel", "QUANT_CONFIGS", "aot_signature_quant",
                _picks_int8_quant, assume={"K": "16", "stride_x": "16", "stride_q": "16"}),
    # AutoRound's fake quantization: contiguous fp32 [N, K] weights, offsets and gradients; groups of 32/64/128
    # and K multiples of 16 at the bench shapes
    KernelEntry("signround_fwd", "signround", "signround_fwd_kernel", "CONFIGS", "aot_signature", _picks_signround,
                assume={"N": "16", "group": "16", "stride": "16"}),
    KernelEntry("signround_bwd", "signround", "signround_bwd_kernel", "CONFIGS", "aot_signature_bwd",
                _picks_signround, assume={"N": "16", "group": "16", "stride": "16"}),
    # the online Hadamard (QuaRot): contiguous rows of P values in, fp32 rows out
    KernelEntry("hadamard", "hadamard", "fwht_kernel", "CONFIGS", "aot_signature", _picks_hadamard,
                assume={"stride_x": "16", "stride_y": "16"}),
    # dequant_matmul routes around sm_75 in pick_config itself (no tensor-core dot): no exclusion hook
    KernelEntry("dequant_gemv", "dequant_matmul", "dequant_gemv_kernel", "GEMV_CONFIGS", "aot_signature_gemv",
                _picks_dequant("gemv"), assume=_DEQUANT_ASSUME),
    KernelEntry("dequant_gemm", "dequant_matmul", "dequant_gemm_kernel", "GEMM_CONFIGS", "aot_signature_gemm",
                _picks_dequant("gemm"), assume=_DEQUANT_ASSUME),
)


def get_entry(name: str) -> KernelEntry:
    for e in ENTRIES:
        if e.name == name:
            return e
    raise TritonqError(f"no kernel {name!r} in the catalog; known: {', '.join(e.name for e in ENTRIES)}")


# tritonq.kernels modules without kernels of their own (grid_fit: device helpers, compiled inside their callers)
_NOT_KERNEL_MODULES = {"aot", "configs", "grid_rule", "grid_fit"}


def discover_kernels() -> set[tuple[str, str]]:
    """(module, attribute) of every jitted function defined in any module of ``tritonq.kernels``, less the device
    helpers a kernel module declares in ``DEVICE_HELPERS`` (compiled inside its kernels, never launched)."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(KERNELS_PACKAGE)
    found: set[tuple[str, str]] = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in _NOT_KERNEL_MODULES:
            continue
        mod = importlib.import_module(f"{KERNELS_PACKAGE}.{info.name}")
        helpers = set(getattr(mod, "DEVICE_HELPERS", ()))
        for attr, obj in vars(mod).items():
            if attr in helpers:
                continue
            raw = getattr(obj, "fn", None)
            jitted = isinstance(obj, JITFunction) or type(obj).__name__ == "InterpretedFunction"
            if jitted and raw is not None and getattr(raw, "__module__", None) == mod.__name__:
                found.add((info.name, attr))
    return found


@dataclass(frozen=True)
class Combo:
    """One compile the static checks make: entry x pick (config + variant) x dtype x target."""

    entry: KernelEntry
    pick: Pick
    target: str

    @property
    def dtype(self) -> str:
        return self.pick.dtype


def full_sweep() -> bool:
    """``TRITONQ_AOT_FULL=1``: compile every config in the module's tuple too, not only the picks."""
    return os.environ.get("TRITONQ_AOT_FULL", "0") == "1"


def combos(entries: tuple[KernelEntry, ...] = ENTRIES, targets: tuple[str, ...] | None = None,
           full: bool | None = None) -> tuple[list[Combo], list[str]]:
    """Every combination to compile, deduplicated by (config, variant, dtype, target), and the printed
    exclusions ("<kernel> [<config>, <dtype>] on <target>: <reason>")."""
    full = full_sweep() if full is None else full
    out: list[Combo] = []
    excluded: list[str] = []
    for entry in entries:
        mod = entry.load()
        for tname in targets or tuple(TARGETS):
            target = TARGETS[tname]
            seen: set[tuple] = set()
            for dtype in entry.dtypes:
                picks = entry.picks(mod, target, dtype)
                if full:
                    picks += [Pick(c, "full sweep", (), dtype) for c in entry.all_configs()]
                for pick in picks:
                    key = (pick.config, pick.variant, dtype)
                    if key in seen:
                        continue
                    seen.add(key)
                    reason = entry.exclusion(tname, dtype, pick.config)
                    if reason:
                        excluded.append(f"{entry.name} [{pick.config.label()}, {dtype}] on {tname}: {reason}")
                        continue
                    out.append(Combo(entry, pick, tname))
    return out, excluded


def job_for(combo: Combo):
    """The :class:`tritonq.kernels.aot.compile.Job` that compiles ``combo``."""
    from .compile import Job, kernel_ref

    entry = combo.entry
    sig, consts = entry.aot_signature(combo.dtype, combo.pick.config, combo.pick.variant)
    ref = kernel_ref(getattr(entry.load(), entry.kernel))
    name = entry.name + "".join(f"+{k}" for k, v in combo.pick.variant if v is True)
    return Job(name, ref, sig, consts, combo.pick.config, combo.dtype, combo.target)


def runtime_target(device: Any) -> str | None:
    """Catalog target name of a torch CUDA/ROCm device (``sm_90``, ``gfx942``...), None if not listed.

    For launchers that consult ``excluded()``; queries the device only when called.
    """
    import torch

    props = torch.cuda.get_device_properties(device)
    arch = getattr(props, "gcnArchName", "") or ""
    if arch:
        name = arch.split(":")[0]
    else:
        name = f"sm_{props.major}{props.minor}"
    return name if name in TARGETS else None


_TARGET_OF_DEVICE: dict[int, str | None] = {}


def device_target(device: Any) -> str | None:
    """:func:`runtime_target` of a CUDA device, asked once per device index (launchers call it on every launch)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TARGET_OF_DEVICE:
        _TARGET_OF_DEVICE[index] = runtime_target(device)
    return _TARGET_OF_DEVICE[index]
