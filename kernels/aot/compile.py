"""Ahead-of-time compilation of tritonq's Triton kernels for GPUs this machine does not have.

``triton.compile(ASTSource(...), target=GPUTarget(...))`` runs the whole Triton pipeline on the CPU
(``../shared/docs/kernels_perf.md`` §7): PTX and a cubin for NVIDIA, GCN assembly and an hsaco for AMD.
This module compiles one (kernel, launch config, dtype, target) combination, reads the result back
with the tools the Triton wheel ships (``cuobjdump --dump-resource-usage`` for REG/STACK/LOCAL/SHARED,
``nvdisasm`` for SASS) or from the AMD assembly's metadata (``.vgpr_count``, ``.vgpr_spill_count``,
``.private_segment_fixed_size``), and returns a :class:`StaticReport`. :func:`problems` turns a report
into failure messages naming kernel, config, dtype, target and the likely fix.

Results are cached on disk by a key over the hash of the source file that defines the kernel (so a
helper in the same file counts), the kernel's name, signature, constexprs, launch knobs, target and
Triton version, under ``$TRITONQ_AOT_CACHE`` or ``~/.cache/tritonq/aot``; within a process the same
key is compiled once. Under ``TRITON_INTERPRET=1`` the compiles run in worker processes with the
interpreter off (the interpreter replaces ``tl.sum`` & co. by objects the compiler cannot use).
Nothing here needs a GPU, and nothing here is ever run on one: every figure is
"compiled, not run".

Specialization: at launch the JIT marks every pointer 16-byte aligned (torch allocations are) and every
integer that is a multiple of 16 as such, which is what lets it emit 128-bit loads. AOT compiles see no
values, so pointers always get the alignment hint and integers get it when the signature says so
(``"i32:16"``, the convention of ``triton/tools/compile.py``; ``"i32:1"`` specializes the value to 1).

The file runs past 400 lines because it is one driver: compile, read back for both vendors, cache, worker
processes and the problems check all handle the same :class:`StaticReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configs import LaunchConfig
from .targets import get_target, occupancy

PARSER_VERSION = 2  # bump when the parsing below changes, so cached reports are recomputed

MATRIX_DTYPES = ("fp16", "bf16")  # inputs a tl.dot should feed to tensor cores / matrix cores


@dataclass
class StaticReport:
    """What the compiler says about one kernel x config x dtype x target. Compiled, not run.

    ``regs`` is registers per thread (NVIDIA REG, AMD VGPRs incl. AGPRs); ``local``/``stack`` (NVIDIA)
    and ``spills``/``scratch`` (AMD) must be 0. ``shared`` is the dynamic shared memory (LDS) a launch
    needs. ``loads`` counts global load instructions in the machine code by width in bits;
    ``arg_loads`` attributes the LLVM IR's global loads to the pointer argument they read, by width.
    ``mma`` counts tensor-core / matrix-core instructions, ``has_dot`` says the kernel contains a
    ``tl.dot``.
    """

    kernel: str
    config: str
    dtype: str
    target: str
    num_warps: int
    num_stages: int
    error: str | None = None
    regs: int = 0
    sgprs: int = 0
    stack: int = 0
    local: int = 0
    spills: int = 0
    scratch: int = 0
    shared: int = 0
    global_scratch: int = 0
    loads: dict[int, int] = field(default_factory=dict)
    arg_loads: dict[str, dict[int, int]] = field(default_factory=dict)
    mma: int = 0
    has_dot: bool = False
    compile_s: float = 0.0
    key: str = ""

    @property
    def compiled(self) -> bool:
        return self.error is None

    @property
    def share_128(self) -> float | None:
        """Fraction of the global load instructions that are 128 bits wide (None: no loads)."""
        total = sum(self.loads.values())
        return None if total == 0 else sum(n for w, n in self.loads.items() if w >= 128) / total

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loads"] = {str(k): v for k, v in self.loads.items()}
        d["arg_loads"] = {a: {str(k): v for k, v in w.items()} for a, w in self.arg_loads.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StaticReport:
        d = dict(d)
        d["loads"] = {int(k): v for k, v in d.get("loads", {}).items()}
        d["arg_loads"] = {a: {int(k): v for k, v in w.items()} for a, w in d.get("arg_loads", {}).items()}
        return cls(**d)


def cache_dir() -> Path:
    """``$TRITONQ_AOT_CACHE`` if set, else ``~/.cache/tritonq/aot`` (read at call time, never at import)."""
    env = os.environ.get("TRITONQ_AOT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tritonq" / "aot"


def nvidia_tool(name: str) -> str:
    """Path of ``cuobjdump`` / ``nvdisasm`` in the Triton wheel (``triton/backends/nvidia/bin``)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _raw_fn(kernel: Any) -> Any:
    """The Python function under a ``JITFunction`` or ``InterpretedFunction`` (or the function itself)."""
    return getattr(kernel, "fn", kernel)


def _split_signature(signature: dict[str, str], constexprs: dict[str, Any], arg_names: list[str]):
    """Triton signature without hint suffixes, constexprs incl. ``:1`` args, and divisibility attrs."""
    sig: dict[str, str] = {}
    consts = dict(constexprs)
    attrs: dict[tuple[int, ...], list] = {}
    for name, ty in signature.items():
        base, _, hint = ty.partition(":")
        if hint == "1":
            consts[name] = 1
            sig[name] = "constexpr"
            continue
        sig[name] = base
        if base != "constexpr" and (base.startswith("*") or hint == "16"):
            attrs[(arg_names.index(name),)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


@dataclass(frozen=True)
class Job:
    """One combination to compile. ``ref`` locates the jitted kernel as ``"package.module:attr"`` or
    ``"/path/to/file.py:attr"`` so that a clean worker process can import it."""

    name: str
    ref: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    config: LaunchConfig
    dtype: str
    target: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ref": self.ref, "signature": self.signature, "constexprs": self.constexprs,
                "meta": list(self.config.meta), "num_warps": self.config.num_warps,
                "num_stages": self.config.num_stages, "dtype": self.dtype, "target": self.target}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Job:
        config = LaunchConfig(tuple((k, v) for k, v in d["meta"]), d["num_warps"], d["num_stages"])
        return cls(d["name"], d["ref"], d["signature"], d["constexprs"], config, d["dtype"], d["target"])


def kernel_ref(kernel: Any) -> str:
    """``"module:attr"`` for a jitted kernel defined at module level (the form :class:`Job` takes)."""
    fn = _raw_fn(kernel)
    return f"{fn.__module__}:{fn.__name__}"


def resolve(ref: str) -> Any:
    """Import the kernel object a :class:`Job` ref names (a module path or a ``.py`` file)."""
    import importlib
    import importlib.util
    import sys

    where, _, attr = ref.rpartition(":")
    if where.endswith(".py"):
        mod_name = "_tritonq_aot_" + hashlib.sha1(where.encode()).hexdigest()[:12]
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, where)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, attr)


def job_key(job: Job, kernel: Any | None = None) -> str:
    """Cache key: the source file that defines the kernel (so helpers in it count), the kernel's name,
    signature, constexprs, launch knobs, target and the Triton version."""
    import triton

    fn = _raw_fn(kernel if kernel is not None else resolve(job.ref))
    src = Path(inspect.getsourcefile(fn)).read_bytes()
    tgt = get_target(job.target)
    blob = json.dumps([hashlib.sha256(src).hexdigest(), fn.__name__, job.signature,
                       {k: repr(v) for k, v in job.constexprs.items()}, job.config.num_warps,
                       job.config.num_stages, tgt.backend, str(tgt.arch), tgt.warp_size, triton.__version__,
                       PARSER_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_MEMO: dict[str, StaticReport] = {}


def _label(report: StaticReport, job: Job) -> StaticReport:
    # the key covers the code; the labels are whatever the caller names it now
    return dataclasses.replace(report, kernel=job.name, config=job.config.label(), dtype=job.dtype,
                               target=job.target)


def compile_jobs(jobs: list[Job], *, use_cache: bool = True, workers: int | None = None) -> list[StaticReport]:
    """Compile every job once (memory, then disk cache, then the compiler) and return reports in order.

    When this process runs Triton's interpreter (``TRITON_INTERPRET=1``, the CPU test session), its
    ``tl.sum``/``tl.max``... are interpreter objects that the compiler cannot use, so the misses are
    compiled by ``python -m tritonq.kernels.aot.compile`` worker processes with the interpreter off
    (``workers``, default ``$TRITONQ_AOT_JOBS`` or min(2, CPUs)). Otherwise they compile in this process.
    A compile failure comes back as a report with ``error`` set; failures are not written to disk.
    """
    keys = [job_key(j) for j in jobs]
    out: dict[str, StaticReport] = {}
    todo: dict[str, Job] = {}
    for job, key in zip(jobs, keys):
        if use_cache and key in _MEMO:
            out[key] = _MEMO[key]
            continue
        path = cache_dir() / key[:2] / f"{key}.json"
        if use_cache and path.exists():
            out[key] = _MEMO[key] = StaticReport.from_json(json.loads(path.read_text()))
            continue
        todo.setdefault(key, job)
    if todo:
        from triton import knobs

        if knobs.runtime.interpret:
            fresh = _compile_in_workers(list(todo.values()), workers, list(todo) if use_cache else None)
        else:
            fresh = [compile_one(job) for job in todo.values()]
        for key, report in zip(todo, fresh):
            report.key = key
            out[key] = report
            if use_cache:
                _MEMO[key] = report
                _store(key, report)
    return [_label(out[k], j) for j, k in zip(jobs, keys)]


def _store(key: str, report: StaticReport) -> None:
    """Write a successful report to the disk cache (failures are recomputed: they are cheap and rare)."""
    if not report.compiled:
        return
    path = cache_dir() / key[:2] / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report.to_json(), indent=1))
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file


def _compile_in_workers(jobs: list[Job], workers: int | None, keys: list[str] | None) -> list[StaticReport]:
    """Compile in ``python -m tritonq.kernels.aot.compile`` processes; each stores its reports in the disk cache
    as it goes (``keys``), so an interrupted run keeps what it compiled."""
    import sys

    default = min(2, os.cpu_count() or 1)
    n = max(1, min(len(jobs), workers or int(os.environ.get("TRITONQ_AOT_JOBS", default))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    chunks = [jobs[i::n] for i in range(n)]
    key_chunks = [keys[i::n] if keys else [None] * len(chunks[i]) for i in range(n)]
    with tempfile.TemporaryDirectory(prefix="tritonq-aot-") as tmp:
        procs = []
        for i, chunk in enumerate(chunks):
            src, dst = os.path.join(tmp, f"in{i}.json"), os.path.join(tmp, f"out{i}.json")
            with open(src, "w") as f:
                json.dump([{**j.to_json(), "key": k} for j, k in zip(chunk, key_chunks[i])], f)
            err = open(os.path.join(tmp, f"err{i}.txt"), "w")  # noqa: SIM115 (closed below)
            procs.append((subprocess.Popen([sys.executable, "-m", "tritonq.kernels.aot.compile", src, dst],
                                           stdout=err, stderr=err, env=env), dst, err))
        results: list[list[StaticReport]] = []
        for proc, dst, err in procs:
            code = proc.wait()
            err.close()
            if code != 0:
                raise RuntimeError(f"AOT worker failed (exit {code}):\n{_first_lines(Path(err.name).read_text(), 30)}")
            with open(dst) as f:
                results.append([StaticReport.from_json(d) for d in json.load(f)])
    ordered: list[StaticReport] = [None] * len(jobs)  # type: ignore[list-item]
    for i, chunk_reports in enumerate(results):
        for j, report in enumerate(chunk_reports):
            ordered[i + j * n] = report
    return ordered


def compile_one(job: Job) -> StaticReport:
    """Compile one job in this process (the interpreter must be off) and parse what the tools say."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    tgt = get_target(job.target)
    config = job.config
    report = StaticReport(job.name, config.label(), job.dtype, tgt.name, config.num_warps, config.num_stages)
    fn = JITFunction(_raw_fn(resolve(job.ref)))
    signature, constexprs = dict(job.signature), dict(job.constexprs)
    missing = []
    for param in inspect.signature(fn.fn).parameters.values():
        if param.name in signature:
            continue
        if param.default is inspect.Parameter.empty:
            missing.append(param.name)
        else:  # the JIT uses the default of an argument the launch leaves out; so do we
            signature[param.name] = "constexpr"
            constexprs[param.name] = param.default
    if missing:
        report.error = (f"the AOT signature omits argument(s) {', '.join(missing)} of {fn.fn.__name__}; "
                        "add them to the module's aot_signature")
        return report
    sig, consts, attrs = _split_signature(signature, constexprs, fn.arg_names)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                  target=tgt.gpu_target, options=options)
    except Exception as exc:  # any compiler failure is a finding, reported with its message
        report.error = _first_lines(f"{type(exc).__name__}: {exc}", 12)
        report.compile_s = time.perf_counter() - t0
        return report
    report.compile_s = time.perf_counter() - t0
    report.shared = int(compiled.metadata.shared)
    report.global_scratch = int(getattr(compiled.metadata, "global_scratch_size", 0) or 0)
    report.has_dot = "tt.dot" in compiled.asm.get("ttir", "")
    runtime_args = [a for a in fn.arg_names if sig.get(a) != "constexpr"]
    report.arg_loads = llir_arg_loads(compiled.asm["llir"], runtime_args, tgt.backend)
    if tgt.backend == "cuda":
        _parse_cubin(compiled.asm["cubin"], report)
    else:
        _parse_amdgcn(compiled.asm["amdgcn"], report)
    return report


def _first_lines(text: str, n: int) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[-n:]) if len(lines) > n else "\n".join(lines)


# ---------------------------------------------------------------------------------------------- NVIDIA

_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS_LOAD_RE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(LDG|LDGSTS|UTMALDG|UBLKCP)(\.[\w.]+)?\s")
_SASS_MMA_RE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?"
                          r"(HMMA|HGMMA|UTCHMMA|UTCQMMA|UTCMMA|IMMA|QGMMA|IGMMA|UTCIMMA)\b")  # + int8: IGMMA, UTCIMMA


def _parse_cubin(cubin: bytes, report: StaticReport) -> None:
    with tempfile.TemporaryDirectory(prefix="tritonq-aot-") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([nvidia_tool("nvdisasm"), path], capture_output=True, text=True, check=True).stdout
    m = _RES_RE.search(res)
    if m is None:
        raise RuntimeError(f"cuobjdump output not understood:\n{res}")
    report.regs, report.stack, _, report.local = (int(g) for g in m.groups())
    report.loads = sass_load_widths(sass)
    report.mma = sum(1 for line in sass.splitlines() if _SASS_MMA_RE.match(line))


def sass_load_widths(sass: str) -> dict[int, int]:
    """Global loads in SASS by width: ``LDG.E.128`` -> 128, ``LDG.E.64`` -> 64, ``LDG.E.U16`` -> 16,
    plain ``LDG.E`` -> 32; ``LDGSTS`` (cp.async) counts by its width too; TMA / bulk copies count as 128."""
    out: dict[int, int] = {}
    for line in sass.splitlines():
        m = _SASS_LOAD_RE.match(line)
        if not m:
            continue
        op, mods = m.group(1), (m.group(2) or "")
        if op in ("UTMALDG", "UBLKCP"):
            width = 128
        elif ".128" in mods:
            width = 128
        elif ".64" in mods:
            width = 64
        elif ".U16" in mods or ".S16" in mods:
            width = 16
        elif ".U8" in mods or ".S8" in mods:
            width = 8
        else:
            width = 32
        out[width] = out.get(width, 0) + 1
    return out


# ------------------------------------------------------------------------------------------------- AMD

_AMD_META = {
    "regs": re.compile(r"^\s*\.vgpr_count:\s+(\d+)", re.M),
    "sgprs": re.compile(r"^\s*\.sgpr_count:\s+(\d+)", re.M),
    "vspill": re.compile(r"^\s*\.vgpr_spill_count:\s+(\d+)", re.M),
    "sspill": re.compile(r"^\s*\.sgpr_spill_count:\s+(\d+)", re.M),
    "scratch": re.compile(r"^\s*\.private_segment_fixed_size:\s+(\d+)", re.M),
    "agprs": re.compile(r"^\s*\.agpr_count:\s+(\d+)", re.M),
}
_GCN_LOAD_RE = re.compile(r"^\s*(global_load|buffer_load)_(\w+)", re.M)
_GCN_WIDTH = {"dwordx4": 128, "dwordx3": 96, "dwordx2": 64, "dword": 32, "ushort": 16, "sshort": 16,
              "short_d16": 16, "short_d16_hi": 16, "ubyte": 8, "sbyte": 8, "ubyte_d16": 8}


def _parse_amdgcn(asm: str, report: StaticReport) -> None:
    vals = {}
    for k, rx in _AMD_META.items():
        m = rx.search(asm)
        vals[k] = int(m.group(1)) if m else 0
    # .vgpr_count includes AGPRs on the unified-register-file targets (gfx90a, gfx942): LLVM AMDGPUUsage
    report.regs = vals["regs"]
    report.sgprs = vals["sgprs"]
    report.spills = vals["vspill"] + vals["sspill"]
    report.scratch = vals["scratch"]
    report.loads = gcn_load_widths(asm)
    report.mma = len(re.findall(r"^\s*v_mfma_", asm, re.M))


def gcn_load_widths(asm: str) -> dict[int, int]:
    """Global / buffer loads in GCN assembly by width (``global_load_dwordx4`` -> 128, ...)."""
    out: dict[int, int] = {}
    for m in _GCN_LOAD_RE.finditer(asm):
        width = _GCN_WIDTH.get(m.group(2), 32)
        out[width] = out.get(width, 0) + 1
    return out


# -------------------------------------------------------------------------------------------- LLVM IR

_LLIR_DEF_RE = re.compile(r"^\s*(%[\w.]+)\s*=\s*(.*)$")
_PTR_OPERAND_RE = re.compile(r"ptr addrspace\((?:1|8)\)(?:\s+(?:inreg|noundef|nonnull|align \d+))*\s+(%[\w.]+)")
_PHI_RE = re.compile(r"\[\s*(%[\w.]+)\s*,")
_ASM_LD_RE = re.compile(r"ld\.global(\S*?)\.(?:b|u|s|f)(\d+)\s")  # e.g. ld.global.L1::evict_first.v4.b32
_CP_ASYNC_RE = re.compile(r"cp\.async\.\w+\.shared\.global[^\"]*?,\s*(0x[0-9a-f]+|\d+)")
_IR_TYPE_BITS = {"i8": 8, "i16": 16, "i32": 32, "i64": 64, "half": 16, "bfloat": 16, "float": 32, "double": 64}


def _ir_type_bits(ty: str) -> int:
    ty = ty.strip()
    m = re.match(r"<(\d+)\s+x\s+(\w+)>", ty)
    if m:
        return int(m.group(1)) * _IR_TYPE_BITS.get(m.group(2), 32)
    return _IR_TYPE_BITS.get(ty, 32)


def llir_arg_loads(llir: str, arg_names: list[str], backend: str) -> dict[str, dict[int, int]]:
    """Attribute each global load in Triton's LLVM IR to the kernel pointer argument it reads.

    The pointer operand of each load (NVIDIA: the ``ld.global``/``cp.async`` inline asm Triton emits;
    AMD: ``load``/buffer-load intrinsics) is followed back through GEPs, phis, selects and buffer
    resource constructors to a function argument ``%i``, which is named from ``arg_names`` (the
    non-constexpr arguments, in order). Loads whose root is not an argument go under ``"?"``.
    """
    defs: dict[str, str] = {}
    lines = llir.splitlines()
    for line in lines:
        m = _LLIR_DEF_RE.match(line)
        if m:
            defs[m.group(1)] = m.group(2)
    n_args = len(arg_names)

    def roots(name: str, seen: set[str]) -> set[int]:
        if name in seen:
            return set()
        seen.add(name)
        if re.fullmatch(r"%\d+", name) and int(name[1:]) < n_args and name not in defs:
            return {int(name[1:])}
        body = defs.get(name)
        if body is None:
            return set()
        ops = _PTR_OPERAND_RE.findall(body)
        if body.startswith("phi"):
            ops += _PHI_RE.findall(body)
        elif body.startswith("select"):
            ops += re.findall(r"(%[\w.]+)", body)[1:]
        out: set[int] = set()
        for op in ops:
            out |= roots(op, seen)
        return out

    result: dict[str, dict[int, int]] = {}

    def add(ptr: str, width: int) -> None:
        rs = roots(ptr, set())
        label = arg_names[min(rs)] if len(rs) == 1 else "?"
        slot = result.setdefault(label, {})
        slot[width] = slot.get(width, 0) + 1

    for line in lines:
        if backend == "cuda":
            if "asm" not in line:
                continue
            m = _ASM_LD_RE.search(line)
            if m:
                v = re.search(r"\.v(\d)", m.group(1))
                vec = int(v.group(1)) if v else 1
                ptrs = _PTR_OPERAND_RE.findall(line.split("asm", 1)[1])
                if ptrs:
                    add(ptrs[0], vec * int(m.group(2)))
                continue
            m = _CP_ASYNC_RE.search(line)
            if m:
                ptrs = _PTR_OPERAND_RE.findall(line.split("asm", 1)[1])
                if len(ptrs) >= 2:  # operands: shared destination (addrspace 3, skipped), global source
                    add(ptrs[-1], 8 * int(m.group(1), 0))
                elif ptrs:
                    add(ptrs[0], 8 * int(m.group(1), 0))
        else:
            m = re.search(r"=\s*load\s+(?:volatile\s+)?([^,]+),\s*ptr addrspace\(1\)\s+(%[\w.]+)", line)
            if m:
                add(m.group(2), _ir_type_bits(m.group(1)))
                continue
            m = re.search(r"=\s*(?:tail\s+)?call\s+([^@]+?)\s+@llvm\.amdgcn\.raw\.ptr\.buffer\.load[\w.]*\(", line)
            if m:
                ptrs = _PTR_OPERAND_RE.findall(line)
                if ptrs:
                    add(ptrs[0], _ir_type_bits(m.group(1)))
    return result


# ------------------------------------------------------------------------------------------- checking

def problems(report: StaticReport, *, require_matrix_units: bool = True) -> list[str]:
    """Failure messages for one report: compile error, spills, scratch, shared-memory overflow, and a
    ``tl.dot`` on fp16/bf16 inputs that the target lowers without tensor/matrix cores (a slow fallback).

    Each message names kernel, config, dtype and target and ends with the likely fix.
    """
    tgt = get_target(report.target)
    where = f"{report.kernel} [{report.config}, {report.dtype}] on {report.target} ({tgt.part})"
    out: list[str] = []
    if not report.compiled:
        out.append(f"{where}: does not compile: {report.error.splitlines()[-1] if report.error else ''}. "
                   "Likely fix: read the Triton error; if the target lacks the feature, make the kernel "
                   f"module's excluded() return a reason for {report.target}/{report.dtype}.")
        return out
    if report.local or report.stack:
        out.append(f"{where}: spills to local memory (LOCAL={report.local} B, STACK={report.stack} B, "
                   f"REG={report.regs}). Likely fix: shrink the per-thread tile (smaller BLOCK_*), raise "
                   "num_warps or lower num_stages for this config, or exclude it on this target.")
    if report.spills or report.scratch:
        out.append(f"{where}: spills (vgpr+sgpr spill count {report.spills}, scratch "
                   f"{report.scratch} B/lane, VGPR={report.regs}). Likely fix: shrink the per-thread "
                   "tile (smaller BLOCK_*), raise num_warps or lower num_stages, or exclude it on this target.")
    if report.shared > tgt.smem_per_block:
        out.append(f"{where}: needs {report.shared} B of shared memory, the target allows "
                   f"{tgt.smem_per_block} B per block. Likely fix: lower num_stages (each stage holds one "
                   "set of operand tiles) or BLOCK_K/BLOCK_N for this config, or exclude it on this target.")
    if require_matrix_units and report.has_dot and report.dtype in MATRIX_DTYPES and report.mma == 0:
        out.append(f"{where}: tl.dot on {report.dtype} compiles to FMA instructions, no tensor/matrix-core "
                   "op (a slow fallback). Likely fix: make excluded() name this target/dtype so the "
                   "dispatcher takes another path (the PyTorch reference / cuBLAS), or accept it there.")
    return out


def occupancy_of(report: StaticReport):
    """Theoretical occupancy of a compiled report on its target (see :func:`targets.occupancy`)."""
    return occupancy(get_target(report.target), report.num_warps, report.regs, report.shared)


def _worker_main(argv: list[str]) -> int:
    """``python -m tritonq.kernels.aot.compile JOBS.json OUT.json``: compile the jobs, write their reports."""
    with open(argv[0]) as f:
        items = json.load(f)
    reports = []
    for d in items:
        report = compile_one(Job.from_json(d))
        if d.get("key"):
            report.key = d["key"]
            _store(d["key"], report)
        reports.append(report.to_json())
    with open(argv[1], "w") as f:
        json.dump(reports, f)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_worker_main(sys.argv[1:]))
