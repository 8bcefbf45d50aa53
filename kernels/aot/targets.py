"""The GPUs tritonq compiles for ahead of time, with the per-target limits the static checks use.

Every figure carries its source. NVIDIA per-SM limits come from the CUDA C++ Programming Guide,
"Compute Capabilities", table "Technical Specifications per Compute Capability" (rows: maximum
resident blocks / warps per SM, 32-bit registers per SM, maximum registers per thread, maximum shared
memory per SM and per thread block); the 1 KB of shared memory reserved per block on compute capability
8.0 and later is stated in the same guide ("Shared Memory" of the 8.x / 9.0 sections) and in the CUDA
Occupancy Calculator. Register allocation granularity (per warp, 256 registers) is the Occupancy
Calculator's. Bandwidth, peak FLOP/s and SM counts are from each flagship part's datasheet (and its
architecture whitepaper for the SM count, where the datasheet gives only CUDA cores: SMs = cores / cores
per SM, 64 on Turing, 64 on GA100, 128 on GA10x/AD10x, 128 on GH100).

AMD limits come from the ROCm documentation "GPU hardware specifications" table
(rocm.docs.amd.com, reference/gpu-arch-specs: CUs, LDS 64 KiB per CU, VGPR file 512 KiB per CU =
512 VGPRs of 4 B x 64 lanes per SIMD, 4 SIMDs per CU, wavefront 64), the AMD "Instinct MI200" (CDNA2)
and "Instinct MI300" (CDNA3) ISA reference guides (LDS of 64 KiB per workgroup, unified VGPR/AGPR file,
up to 8 waves per SIMD) and LLVM's AMDGPUUsage (VGPR allocation granule 8 on gfx90a/gfx942). Bandwidth and
peak FLOP/s are from the AMD Instinct MI250X and MI300X datasheets; gfx90a is one MI250X GCD (half the
package: 110 CUs, 1.64 TB/s, 191.5 TFLOP/s fp16), which is what software sees as one device.

Peak FLOP/s are dense (no structured sparsity) fp16/bf16 matrix figures with fp32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import TritonqError

KB = 1024


@dataclass(frozen=True)
class Target:
    """One compilation target and the limits its flagship part imposes.

    ``arch`` is what ``triton.backends.compiler.GPUTarget`` takes (an int for CUDA, a gfx name for HIP).
    "SM" means streaming multiprocessor on NVIDIA and compute unit (CU) on AMD; "warp" means a
    wavefront of ``warp_size`` lanes on AMD.
    """

    name: str
    backend: str  # "cuda" or "hip"
    arch: int | str
    warp_size: int
    part: str  # flagship part used for the roofline
    sm_count: int
    smem_per_block: int  # bytes a single block may use (opt-in maximum)
    smem_per_sm: int  # bytes per SM (CU) available to resident blocks
    smem_reserved_per_block: int  # bytes the runtime adds to every block
    regs_per_sm: int  # 32-bit registers per SM (AMD: the CU's VGPR file, 512 KiB = 4 SIMDs x 64 lanes x 512)
    max_regs_per_thread: int
    reg_granule: int  # registers per thread are rounded up to this
    max_warps_per_sm: int
    max_blocks_per_sm: int
    hbm_bytes_per_s: float
    peak_flops_fp16: float  # dense matrix fp16/bf16 -> fp32
    # peak of an IEEE-fp32 tl.dot as Triton lowers it: FMA on NVIDIA (no tensor-core op takes IEEE fp32),
    # MFMA f32 on CDNA
    peak_flops_fp32: float
    bf16_matrix: bool  # the matrix units take bf16 operands
    sources: tuple[str, ...] = ()

    @property
    def gpu_target(self):
        """The ``GPUTarget`` Triton compiles for (imported lazily: importing tritonq imports no triton)."""
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)


_CUDA_GUIDE = "CUDA C++ Programming Guide, 'Compute Capabilities', Technical Specifications per Compute Capability"
_OCC_CALC = "CUDA Occupancy Calculator (register allocation unit 256 per warp, 1 KB reserved smem per block on 8.x+)"
_ROCM_SPECS = "ROCm docs, 'GPU hardware specifications' (reference/gpu-arch-specs): CUs, LDS 64 KiB, VGPR 512 KiB/CU"
_LLVM_AMDGPU = "LLVM AMDGPUUsage: gfx90a/gfx942 unified VGPR+AGPR file, allocation granule 8, max 8 waves per EU"

TARGETS: dict[str, Target] = {
    "sm_75": Target(
        "sm_75", "cuda", 75, 32, "Tesla T4", sm_count=40,
        smem_per_block=64 * KB, smem_per_sm=64 * KB, smem_reserved_per_block=0,
        regs_per_sm=65536, max_regs_per_thread=255, reg_granule=8, max_warps_per_sm=32, max_blocks_per_sm=16,
        hbm_bytes_per_s=320e9, peak_flops_fp16=65e12, peak_flops_fp32=8.1e12, bf16_matrix=False,
        sources=(_CUDA_GUIDE, _OCC_CALC,
                 "NVIDIA T4 Tensor Core GPU datasheet: 320 GB/s GDDR6, 65 TFLOPS fp16 mixed, 8.1 TFLOPS fp32",
                 "NVIDIA Turing architecture whitepaper: T4 = 40 SMs (2,560 CUDA cores); no bf16 tensor-core op"),
    ),
    "sm_80": Target(
        "sm_80", "cuda", 80, 32, "A100 SXM 80GB", sm_count=108,
        smem_per_block=163 * KB, smem_per_sm=164 * KB, smem_reserved_per_block=1 * KB,
        regs_per_sm=65536, max_regs_per_thread=255, reg_granule=8, max_warps_per_sm=64, max_blocks_per_sm=32,
        hbm_bytes_per_s=2039e9, peak_flops_fp16=312e12, peak_flops_fp32=19.5e12, bf16_matrix=True,
        sources=(_CUDA_GUIDE, _OCC_CALC,
                 "NVIDIA A100 Tensor Core GPU datasheet: 80GB SXM 2,039 GB/s, fp16/bf16 312 TFLOPS, fp32 19.5",
                 "NVIDIA A100 Tensor Core GPU Architecture whitepaper: 108 SMs"),
    ),
    "sm_86": Target(
        "sm_86", "cuda", 86, 32, "A10", sm_count=72,
        smem_per_block=99 * KB, smem_per_sm=100 * KB, smem_reserved_per_block=1 * KB,
        regs_per_sm=65536, max_regs_per_thread=255, reg_granule=8, max_warps_per_sm=48, max_blocks_per_sm=16,
        hbm_bytes_per_s=600e9, peak_flops_fp16=125e12, peak_flops_fp32=31.2e12, bf16_matrix=True,
        sources=(_CUDA_GUIDE, _OCC_CALC,
                 "NVIDIA A10 Tensor Core GPU datasheet: 600 GB/s, fp16/bf16 125 TFLOPS dense, fp32 31.2, "
                 "9,216 CUDA cores = 72 SMs"),
    ),
    "sm_89": Target(
        "sm_89", "cuda", 89, 32, "L40S", sm_count=142,
        smem_per_block=99 * KB, smem_per_sm=100 * KB, smem_reserved_per_block=1 * KB,
        regs_per_sm=65536, max_regs_per_thread=255, reg_granule=8, max_warps_per_sm=48, max_blocks_per_sm=24,
        hbm_bytes_per_s=864e9, peak_flops_fp16=362e12, peak_flops_fp32=91.6e12, bf16_matrix=True,
        sources=(_CUDA_GUIDE, _OCC_CALC,
                 "NVIDIA L40S datasheet: 864 GB/s GDDR6, fp16/bf16 362 TFLOPS dense (733 sparse), fp32 91.6, "
                 "18,176 CUDA cores = 142 SMs"),
    ),
    "sm_90": Target(
        "sm_90", "cuda", 90, 32, "H100 SXM", sm_count=132,
        smem_per_block=227 * KB, smem_per_sm=228 * KB, smem_reserved_per_block=1 * KB,
        regs_per_sm=65536, max_regs_per_thread=255, reg_granule=8, max_warps_per_sm=64, max_blocks_per_sm=32,
        hbm_bytes_per_s=3.35e12, peak_flops_fp16=989e12, peak_flops_fp32=67e12, bf16_matrix=True,
        sources=(_CUDA_GUIDE, _OCC_CALC,
                 "NVIDIA H100 Tensor Core GPU datasheet: SXM 3.35 TB/s, fp16/bf16 1,979 TFLOPS with sparsity "
                 "(989 dense), fp32 67 TFLOPS; H200: 4.8 TB/s",
                 "NVIDIA H100 Tensor Core GPU Architecture whitepaper: H100 SXM5 = 132 SMs"),
    ),
    "sm_100": Target(
        "sm_100", "cuda", 100, 32, "B200", sm_count=148,
        smem_per_block=227 * KB, smem_per_sm=228 * KB, smem_reserved_per_block=1 * KB,
        regs_per_sm=65536, max_regs_per_thread=255, reg_granule=8, max_warps_per_sm=64, max_blocks_per_sm=32,
        hbm_bytes_per_s=8.0e12, peak_flops_fp16=2.25e15, peak_flops_fp32=75e12, bf16_matrix=True,
        sources=(_CUDA_GUIDE, _OCC_CALC,
                 "NVIDIA HGX B200 datasheet (per GPU): 8 TB/s HBM3e, fp16/bf16 4.5 PFLOPS with sparsity "
                 "(2.25 dense), fp32 75 TFLOPS",
                 "148 SMs: the multiProcessorCount a B200 reports (not stated on the datasheet)"),
    ),
    "gfx90a": Target(
        "gfx90a", "hip", "gfx90a", 64, "MI250X (one GCD)", sm_count=110,
        smem_per_block=64 * KB, smem_per_sm=64 * KB, smem_reserved_per_block=0,
        regs_per_sm=131072, max_regs_per_thread=512, reg_granule=8, max_warps_per_sm=32, max_blocks_per_sm=32,
        hbm_bytes_per_s=1.6384e12, peak_flops_fp16=191.5e12, peak_flops_fp32=47.85e12, bf16_matrix=True,
        sources=(_ROCM_SPECS, _LLVM_AMDGPU, "AMD Instinct MI200 (CDNA2) ISA reference guide: 64 KiB LDS",
                 "AMD Instinct MI250X datasheet: 220 CUs, 3.2768 TB/s, 383 TFLOPS fp16/bf16, 95.7 TFLOPS fp32 "
                 "matrix (47.9 vector); halved for one of its two GCDs"),
    ),
    "gfx942": Target(
        "gfx942", "hip", "gfx942", 64, "MI300X", sm_count=304,
        smem_per_block=64 * KB, smem_per_sm=64 * KB, smem_reserved_per_block=0,
        regs_per_sm=131072, max_regs_per_thread=512, reg_granule=8, max_warps_per_sm=32, max_blocks_per_sm=32,
        hbm_bytes_per_s=5.3e12, peak_flops_fp16=1307.4e12, peak_flops_fp32=163.4e12, bf16_matrix=True,
        sources=(_ROCM_SPECS, _LLVM_AMDGPU, "AMD Instinct MI300 (CDNA3) ISA reference guide: 64 KiB LDS",
                 "AMD Instinct MI300X datasheet: 304 CUs, 5.3 TB/s HBM3, 1,307.4 TFLOPS fp16/bf16 dense, "
                 "163.4 TFLOPS fp32 matrix (81.7 vector)"),
    ),
}

ROOFLINE_TARGETS = ("sm_90", "gfx942")  # H100 and MI300X, the two parts the report bounds


def get_target(name: str) -> Target:
    """Look a target up by name (``sm_90``, ``gfx942``, ...); raises ``TritonqError`` naming the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise TritonqError(f"unknown target {name!r}; known: {', '.join(TARGETS)}") from None


@dataclass(frozen=True)
class Occupancy:
    """Theoretical residency of one kernel launch on one SM (CU); ``limiter`` names the binding limit."""

    blocks_per_sm: int
    warps_per_sm: int
    fraction: float  # warps_per_sm / max_warps_per_sm
    limiter: str  # "warps", "blocks", "registers", "shared memory"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def occupancy(target: Target, num_warps: int, regs_per_thread: int, shared_bytes: int) -> Occupancy:
    """Theoretical occupancy from registers, shared memory and the warp/block limits.

    NVIDIA (CUDA Occupancy Calculator): registers per thread rounded up to 8, per warp to 256; blocks
    limited by ``regs_per_sm / (warp allocation x num_warps)``, by ``smem_per_sm / (shared + 1 KB)``
    (rounded to 128 B), by warps and by the resident-block limit. AMD: VGPRs rounded up to 8 give waves per
    SIMD ``min(8, 512 // vgprs)``; a workgroup's waves spread over the 4 SIMDs of a CU; LDS limits
    workgroups to ``65536 // lds``. SGPR limits are not modelled (they bind only above ~100 SGPRs).
    A block that needs more shared memory than ``smem_per_block`` gives zero blocks.
    """
    limits: dict[str, int] = {
        "warps": target.max_warps_per_sm // num_warps,
        "blocks": target.max_blocks_per_sm,
    }
    regs = _round_up(max(regs_per_thread, 1), target.reg_granule)
    if target.backend == "cuda":
        per_warp = _round_up(regs * target.warp_size, 256)
        limits["registers"] = (target.regs_per_sm // per_warp) // num_warps
    else:
        vgprs_per_lane = target.regs_per_sm // (4 * target.warp_size)  # 512 per lane of each SIMD
        waves_per_simd = min(target.max_warps_per_sm // 4, vgprs_per_lane // regs)
        limits["registers"] = (4 * waves_per_simd) // num_warps
    if shared_bytes > target.smem_per_block:
        limits["shared memory"] = 0
    elif shared_bytes > 0 or target.smem_reserved_per_block:
        need = _round_up(shared_bytes + target.smem_reserved_per_block, 128)
        limits["shared memory"] = target.smem_per_sm // need
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    warps = blocks * num_warps
    return Occupancy(blocks, warps, warps / target.max_warps_per_sm, limiter)
