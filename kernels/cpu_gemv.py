"""CPU matmuls for decoding packed weights: int4 (group scale and min) and int8 (per channel), C++ beside a
PyTorch reference.

Decoding reads every weight once per step for one row per request, so on a CPU the matmul's cost is the
weight bytes and the work of unpacking them. ``cpu_gemv.cpp`` does it the way llama.cpp's Q4_1 x Q8_1 dot
product does (Gerganov et al., ggml ``ggml_vec_dot_q4_1_q8_1``; the "min times sum of x" algebra also in
Frantar et al.'s Marlin and in Dettmers' QLoRA kernels): activations are quantized to int8 per row and block of
32 inputs, weights stay 4-bit codes ``q`` with ``w = scale * q + min`` per group, and

    y[n] = sum_g ( scale[g,n] * sum_{b in g} xs[b] * sum_{k in b} q[n,k] xq[k]  +  min[g,n] * sum_{k in g} x^[k] )

with ``x^ = xs * xq`` the dequantized activations. The integer sums are exact, so the op equals
``x^ @ W^T`` (W in fp16 scale/min) up to float32 rounding of a few block sums, which is what
:func:`int4_gemm_ref` computes in float64. On AVX512-VNNI ``vpdpbusd`` multiplies 64 nibbles by int8
activations per instruction; elsewhere a portable C++ loop does the same arithmetic, bit for bit.

Layouts (made once at load by :func:`pack_int4_rows` / :func:`pack_int8_rows`): output rows in blocks of 16,
one 32-bit lane per row, four consecutive inputs per lane.

* int4: ``w`` uint8 ``[N/16, K/8, 64]``: byte ``4r + j`` of chunk ``c`` holds inputs ``8c + j`` (low nibble)
  and ``8c + 4 + j`` (high nibble) of row ``r``; ``scale`` and ``min`` fp16 ``[N/16, G, 16]``.
* int8: ``w`` uint8 ``[N/16, K/4, 64]``: byte ``4r + j`` of chunk ``c`` holds ``code + 128`` of input
  ``4c + j`` of row ``r``; ``scale`` float32 ``[N]``.
* fp16 (a float head at half the bytes, float32 activations and sums; :func:`f16_gemm`): ``w`` fp16
  ``[N/16, K, 16]``, input-major within a block of rows. Each row keeps four float32 partial sums (inputs
  ``k mod 4``), added as ``(s0 + s1) + (s2 + s3)``: :func:`f16_gemm_ref` does the same, so it is exact.

Every output row goes through the same operations whatever the number of rows in the call (batch
invariance: a request decoded in a batch gets the logits it gets alone). Row blocks are handed to threads
dynamically, so a descheduled thread on a busy machine stalls the call for one chunk only.

The C++ is compiled on first use with the machine's compiler (``-march=native``: the build runs where the
op runs) into torch's extension cache; where no compiler works, :func:`extension` returns None with the
reason in :func:`unavailable_reason`, and callers keep their other path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import TritonqError

ROWS = 16  # output rows per block (one 512-bit register of int32 lanes)
X_BLOCK = 32  # activations share one int8 scale per this many inputs

_HERE = os.path.dirname(os.path.abspath(__file__))
#: One extension, two files: the matmuls here, the rest of a decode step in ``cpu_attention.cpp``
#: (:mod:`tritonq.kernels.cpu_attention`); both include ``cpu_pool.h``, so they share one thread pool.
_SOURCES = [os.path.join(_HERE, "cpu_gemv.cpp"), os.path.join(_HERE, "cpu_attention.cpp")]
_failure: dict[bool, str] = {}


def supports(in_features: int, out_features: int, group_size: int) -> str | None:
    """Why the int4 op cannot take a layer of this shape (None when it can)."""
    if out_features % ROWS:
        return f"out_features={out_features} is not a multiple of {ROWS}"
    if in_features % X_BLOCK:
        return f"in_features={in_features} is not a multiple of {X_BLOCK}"
    if group_size % X_BLOCK or in_features % group_size:
        return f"group_size={group_size} is not a multiple of {X_BLOCK} dividing in_features={in_features}"
    return None


@functools.cache
def extension(portable: bool = False) -> object | None:
    """The compiled ops' namespace (``torch.ops.tritonq_cpu``), built on first use; None when the build fails.

    ``portable`` builds the plain C++ path (no SIMD intrinsics) under its own namespace, for tests that check
    the two paths agree bit for bit."""
    from torch.utils import cpp_extension

    namespace = "tritonq_cpu_portable" if portable else "tritonq_cpu"
    # no implicit fused multiply-adds: the portable and the native builds must round every float step alike
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", f"-DTRITONQ_OPS_NAMESPACE={namespace}"]
    flags += ["-DTRITONQ_PORTABLE"] if portable else ["-march=native"]
    if not _built_before(namespace):
        print(f"tritonq: building the CPU decode kernels ({namespace}; once per machine, about a minute)...",
              file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name=namespace, sources=_SOURCES, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no headers, a sandbox: the callers keep their other path
        _failure[portable] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return None
    return getattr(torch.ops, namespace)


def _built_before(namespace: str) -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    try:
        return os.path.exists(os.path.join(_get_build_directory(namespace, verbose=False), f"{namespace}.so"))
    except Exception:
        return False


def unavailable_reason(portable: bool = False) -> str | None:
    """Why :func:`extension` returned None (None when it built)."""
    return _failure.get(portable)


def _codes_by_row(codes: Tensor, lanes: int) -> Tensor:
    """[N, K] codes as [N/16, K/lanes_per_chunk, 16, lanes] blocks (lane-major within a 64-byte chunk)."""
    n, k = codes.shape
    return codes.reshape(n // ROWS, ROWS, k // lanes, lanes).permute(0, 2, 1, 3)


def pack_int4_rows(codes: Tensor, scale: Tensor, minv: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes [N, K] (0..15), scale and min [K/group, N] (``w = scale * q + min``) -> the op's int4 layout."""
    n, k = codes.shape
    reason = supports(k, n, group_size)
    if reason is not None:
        raise TritonqError(f"the CPU int4 op cannot take this layer: {reason}")
    blocks = _codes_by_row(codes.to(torch.uint8), 8)  # [N/16, K/8, 16, 8]
    w = (blocks[..., :4] | (blocks[..., 4:] << 4)).reshape(n // ROWS, k // 8, 64).contiguous()
    g = k // group_size

    def by_block(t: Tensor) -> Tensor:
        return t.reshape(g, n // ROWS, ROWS).permute(1, 0, 2).to(torch.float16).contiguous()

    return w, by_block(scale), by_block(minv)


def pack_int8_rows(codes: Tensor) -> Tensor:
    """Signed codes [N, K] (-128..127) -> the op's int8 layout (``code + 128`` as uint8)."""
    n, k = codes.shape
    if n % ROWS or k % X_BLOCK:
        raise TritonqError(f"the CPU int8 op needs out_features % {ROWS} == 0 and in_features % {X_BLOCK} == 0, "
                           f"got {n} x {k}")
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8)
    return _codes_by_row(shifted, 4).reshape(n // ROWS, k // 4, 64).contiguous()


def pack_f16_rows(weight: Tensor) -> Tensor:
    """A float weight [N, K] -> the fp16 layout ``[N/16, K, 16]``."""
    n, k = weight.shape
    if n % ROWS or k % 4:
        raise TritonqError(f"the CPU fp16 op needs out_features % {ROWS} == 0 and in_features % 4 == 0, got {n} x {k}")
    return weight.to(torch.float16).reshape(n // ROWS, ROWS, k).transpose(1, 2).contiguous()


def f16_gemm_ref(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """The fp16 op's exact float32 arithmetic in PyTorch: four fused partial sums per row, added pairwise."""
    blocks, k, _ = w.shape
    weight = w.transpose(1, 2).reshape(blocks * ROWS, k).double()
    xd = x.reshape(-1, k).float().double()
    partial = []
    for j in range(4):  # float32 fma chains: each step rounds once, as the op's fused multiply-add does
        acc = torch.zeros(xd.shape[0], weight.shape[0], dtype=torch.float32)
        for kk in range(j, k, 4):
            acc = (acc.double() + xd[:, kk:kk + 1] * weight[:, kk]).float()
        partial.append(acc)
    y = (partial[0] + partial[1]) + (partial[2] + partial[3])
    return y if bias is None else y + bias.float()


def quantize_x_ref(x: Tensor) -> Tensor:
    """The activations the op multiplies: per row and block of 32, ``rint(x * 127 / amax)`` times
    ``amax / 127`` (float32 arithmetic as the op does it), returned dequantized in float64."""
    m, k = x.shape
    xb = x.float().reshape(m, k // X_BLOCK, X_BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q.double() * (amax / 127.0).double()).reshape(m, k)


def _dequantized_rows(w: Tensor, scale: Tensor, minv: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """``scale * q + min`` of the int4 layout as a dense [N, K] tensor of ``dtype``."""
    blocks, chunks, _ = w.shape
    lanes = w.reshape(blocks, chunks, ROWS, 4)
    codes = torch.cat([lanes & 0x0F, lanes >> 4], dim=-1).permute(0, 2, 1, 3)  # [N/16, 16, K/8, 8]
    g = scale.shape[1]
    per_group = codes.reshape(blocks * ROWS, g, group_size).to(dtype)
    s = scale.permute(0, 2, 1).reshape(blocks * ROWS, g, 1).to(dtype)
    m = minv.permute(0, 2, 1).reshape(blocks * ROWS, g, 1).to(dtype)
    return torch.addcmul(m, per_group, s).reshape(blocks * ROWS, chunks * 8)


def unpack_int4_rows(w: Tensor, scale: Tensor, minv: Tensor, group_size: int) -> Tensor:
    """The dense float64 [N, K] weight of the int4 layout (fp16 scale and min, as the op reads them; exact)."""
    return _dequantized_rows(w, scale, minv, group_size, torch.float64)


def int4_gemm_ref(x: Tensor, w: Tensor, scale: Tensor, minv: Tensor, group_size: int,
                  bias: Tensor | None = None) -> Tensor:
    """Float64 reference of :func:`int4_gemm`: ``x^ @ W^T + bias``."""
    y = quantize_x_ref(x) @ unpack_int4_rows(w, scale, minv, group_size).t()
    return y if bias is None else y + bias.double()


def int8_gemm_ref(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Float64 reference of :func:`int8_gemm`: ``x^ @ (code * scale)^T + bias``."""
    blocks, chunks, _ = w.shape
    codes = w.reshape(blocks, chunks, ROWS, 4).permute(0, 2, 1, 3).reshape(blocks * ROWS, chunks * 4)
    y = quantize_x_ref(x) @ ((codes.double() - 128.0) * scale.double()[:, None]).t()
    return y if bias is None else y + bias.double()


def set_threads(threads: int) -> int:
    """Threads of the ops' pool (0: follow ``torch.get_num_threads()``, the default); returns the previous
    setting. Decoding can keep torch's own ops on one thread (their OpenMP regions wait for every thread,
    which stalls on a busy machine) while the matmuls, which dominate, use more."""
    return int(compiled_ops(False).set_threads(threads))


def compiled_ops(portable: bool = False) -> object:
    """The built ops' namespace (``torch.ops.tritonq_cpu``, or the portable build's); a clear error when the
    build failed."""
    ops = extension(portable)
    if ops is None:
        raise TritonqError(f"tritonq's CPU kernels did not build ({unavailable_reason(portable)}); "
                           "install a C++ compiler (g++) or load the model without them")
    return ops


def _rows(x: Tensor, k: int) -> Tensor:
    if x.shape[-1] != k:
        raise TritonqError(f"input has {x.shape[-1]} features, the layer expects {k}")
    return x.reshape(-1, k).float().contiguous()


#: Above this many rows per call, :func:`int4_linear` multiplies float32 weights dequantized for the call (a BLAS
#: GEMM) instead of running the op on int8 activations: an evaluation window or a long prompt is compute-bound
#: (the dequantization is paid once for many rows), and its result is then the stored grid's to float32
#: rounding (what ``tritonq eval`` should score). Decode batches (up to this many requests) and short prompts
#: stay on the op, so batched decoding stays batch-invariant.
GEMM_ROWS = 64
_generating = [0]  # depth of open generating() blocks


@contextlib.contextmanager
def generating() -> Iterator[None]:
    """Inside it, int4 and int8 layouts run every call on the ops, prompts of any length included.

    Generation prefers speed: on int8 activations the op does 64 multiply-adds per instruction, so an 80-token
    prompt of SmolLM2 took 489 ms through dequantized float32 GEMMs and runs many times faster on the op (and
    a prompt then sees the same arithmetic as its decoded tokens). Evaluation, outside it, keeps
    :data:`GEMM_ROWS`' rule and scores the stored grid."""
    _generating[0] += 1
    try:
        yield
    finally:
        _generating[0] -= 1


def runs_on_op(rows: int) -> bool:
    """Whether a call of ``rows`` rows on the int4 or int8 layout runs on the op (see :func:`generating`)."""
    return rows <= GEMM_ROWS or _generating[0] > 0


def dequantize_int4_rows(w: Tensor, scale: Tensor, minv: Tensor, group_size: int) -> Tensor:
    """The float32 [N, K] weight of the int4 layout (``scale * q + min``, the fp16 values the op reads)."""
    return _dequantized_rows(w, scale, minv, group_size, torch.float32)


def int4_linear(x: Tensor, w: Tensor, scale: Tensor, minv: Tensor, group_size: int,
                bias: Tensor | None = None) -> Tensor:
    """``x @ W^T + bias`` for the int4 layout, float32 [..., N]: the op (:func:`int4_gemm`) for up to
    :data:`GEMM_ROWS` rows (decode steps, batch-invariant) or any number while :func:`generating`, a float32 GEMM
    on the dequantized weight otherwise."""
    if runs_on_op(x.numel() // max(1, x.shape[-1])):
        return int4_gemm(x, w, scale, minv, group_size, bias)
    dense = dequantize_int4_rows(w, scale, minv, group_size)
    return torch.nn.functional.linear(x.float(), dense, None if bias is None else bias.float())


def int4_gemm(x: Tensor, w: Tensor, scale: Tensor, minv: Tensor, group_size: int, bias: Tensor | None = None,
              portable: bool = False) -> Tensor:
    """``x @ W^T + bias`` for the int4 layout; x [..., K] in any float dtype, result float32 [..., N]."""
    k = w.shape[1] * 8
    y = compiled_ops(portable).int4_gemm(_rows(x, k), w, scale, minv, group_size,
                                 None if bias is None else bias.float().contiguous())
    return y.reshape(*x.shape[:-1], y.shape[-1])


def f16_gemm(x: Tensor, w: Tensor, bias: Tensor | None = None, portable: bool = False) -> Tensor:
    """``x @ W^T + bias`` for the fp16 layout; x [..., K] any float dtype, result float32 [..., N]."""
    k = w.shape[1]
    y = compiled_ops(portable).f16_gemm(_rows(x, k), w, None if bias is None else bias.float().contiguous())
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int8_gemm(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None = None, portable: bool = False) -> Tensor:
    """``x @ (code * scale)^T + bias`` for the int8 layout; x [..., K] any float dtype, result float32 [..., N]."""
    k = w.shape[1] * 4
    y = compiled_ops(portable).int8_gemm(_rows(x, k), w, scale.float().contiguous(),
                                 None if bias is None else bias.float().contiguous())
    return y.reshape(*x.shape[:-1], y.shape[-1])
