// CPU matmuls for decoding: packed int4 (group-wise scale and min) and int8 (per-channel) weights against
// activations quantized to int8 in blocks of 32, on AVX512-VNNI where the compiler targets it, in portable C++
// otherwise; and fp16 weights against float32 activations (a float lm_head at half the bytes). The Python side (cpu_gemv.py) documents the layouts and holds the PyTorch reference.
//
// Why this shape: one decode step reads every weight once for a handful of rows, so the op is a GEMV whose
// cost is the weight bytes. Sixteen output rows sit in one vector register (one int32 lane each); each lane's
// four bytes are four consecutive inputs of that row, so `vpdpbusd` (u8 weight x s8 activation, 4 products
// summed per lane) does 64 multiply-adds with no horizontal reduction. Scales apply once per 32-input block
// (activations) and once per group (weights), and a group's min term is min * sum(x), so zero points cost
// nothing per weight (llama.cpp's Q4_1 x Q8_1 dot product does the same algebra).
//
// Batch invariance: every output row is computed by the same sequence of operations whatever the number of
// rows M in the call, so a request decoded inside a batch gets bit-identical logits to the same request alone.
// The SIMD and the portable paths also agree bit for bit (integer sums are exact; each float step is one
// rounding: a conversion, or a fused multiply-add).
//
// Threads: output row blocks are handed out in small chunks by a pool (below) that never waits for a thread
// the OS has not scheduled, so a busy machine slows a call by at most the chunks in flight.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(TRITONQ_PORTABLE)
#include <immintrin.h>
#define TRITONQ_VNNI 1
#else
#define TRITONQ_VNNI 0
#endif

namespace {

using TRITONQ_OPS_NAMESPACE::parallel_dynamic;
using TRITONQ_OPS_NAMESPACE::set_threads;

constexpr int64_t kRows = 16;     // output rows per block: one 512-bit register of int32 lanes
constexpr int64_t kXBlock = 32;   // activations share one scale per 32 inputs
constexpr int kMaxTile = 8;       // activation rows held in registers at once

#if TRITONQ_VNNI
// Asks for the `lines` cache lines at `p` ahead of their use. A decode step streams ~100 MB of weights through
// the caches, and the hardware prefetcher alone left the loops waiting on memory: prefetching about a 16-row
// block ahead (4 KB at K = 576) made SmolLM2's 1-row and 8-row steps 3-11% faster (measured side by side).
inline void prefetch_lines(const void* p, int lines) {
  for (int i = 0; i < lines; ++i) _mm_prefetch(static_cast<const char*>(p) + 64 * i, _MM_HINT_T0);
}

// Hides a zero accumulator's value from the compiler: GCC folds `zero-started vpdpbusd chain + other chain`
// into one chain, undoing the split into two dependency chains (seen in the disassembly; 1-3% measured).
inline void hide(__m512i& v) { asm("" : "+v"(v)); }
#endif

// Activations quantized per row and 32-input block: q = rint(x * 127 / amax), scale = amax / 127.
struct QuantizedX {
  at::Tensor q;       // int8 [M, K]
  at::Tensor scale;   // float [M, K / 32]
  at::Tensor isum;    // int32 [M, K / 32]: sum of q over the block
  at::Tensor gsum;    // float [M, K / group]: sum over the group of scale * isum, in block order
};

// One block of 32 activations to int8 codes; returns the scale amax / 127 and stores the sum of the codes. Both
// paths round x * (127 / amax) to nearest-even and clamp to [-127, 127], so their codes agree bit for bit.
#if TRITONQ_VNNI
float quantize_block(const float* xb, int8_t* q, int32_t* total) {
  const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512 hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  const auto codes = [&](__m512 v) {
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, r)));
  };
  const __m512i c0 = codes(x0), c1 = codes(x1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(c0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(c1));
  *total = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
  return amax / 127.f;
}
#else
float quantize_block(const float* xb, int8_t* q, int32_t* total) {
  float amax = 0.f;
  for (int64_t i = 0; i < kXBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < kXBlock; ++i) {
    float r = std::nearbyint(xb[i] * inv);
    r = std::min(127.f, std::max(-127.f, r));
    q[i] = static_cast<int8_t>(r);
    sum += static_cast<int32_t>(r);
  }
  *total = sum;
  return amax / 127.f;
}
#endif

QuantizedX quantize_x(const at::Tensor& x, int64_t group) {
  const int64_t m_rows = x.size(0), k = x.size(1), nb = k / kXBlock, ng = k / group;
  QuantizedX out{at::empty({m_rows, k}, at::kChar), at::empty({m_rows, nb}, at::kFloat),
                 at::empty({m_rows, nb}, at::kInt), at::zeros({m_rows, ng}, at::kFloat)};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = out.q.data_ptr<int8_t>();
  float* sp = out.scale.data_ptr<float>();
  int32_t* ip = out.isum.data_ptr<int32_t>();
  float* gp = out.gsum.data_ptr<float>();
  const int64_t per_group = group / kXBlock;
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const float s = quantize_block(xp + m * k + b * kXBlock, qp + m * k + b * kXBlock, ip + m * nb + b);
      sp[m * nb + b] = s;
      const int32_t total = ip[m * nb + b];
      float& g = gp[m * ng + b / per_group];
      g = std::fma(s, static_cast<float>(total), g);
    }
  }
  return out;
}

struct Int4Args {
  const uint8_t* w;      // [N/16, K/8, 64]
  const at::Half* scale; // [N/16, G, 16]
  const at::Half* minv;  // [N/16, G, 16]
  const int8_t* xq;
  const float* xs;
  const float* gsum;
  const float* bias;     // [N] or null
  float* y;              // [M, N]
  int64_t k, n, group;
};

#if TRITONQ_VNNI
template <int MT>
void int4_rows(const Int4Args& a, int64_t block, int64_t m0) {
  const int64_t nb = a.k / kXBlock, ng = a.k / a.group, per_group = a.group / kXBlock;
  const uint8_t* wp = a.w + block * (a.k / 8) * 64;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 y[MT];
  for (int m = 0; m < MT; ++m) y[m] = a.bias ? _mm512_loadu_ps(a.bias + block * kRows) : _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512 fg[MT];
    for (int m = 0; m < MT; ++m) fg[m] = _mm512_setzero_ps();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      // low and high nibbles in separate accumulators: two dependency chains of four vpdpbusd per row and
      // block instead of one of eight (its latency, not its throughput, bounded the loop); the integer sums
      // are exact, so the result is the same in any order
      __m512i acc_lo[MT], acc_hi[MT];
      for (int m = 0; m < MT; ++m) {
        acc_lo[m] = acc_hi[m] = _mm512_setzero_si512();
        hide(acc_hi[m]);
      }
      prefetch_lines(wp + 4096, 4);  // this 32-input block's 4 lines, 4 KB ahead
      for (int c = 0; c < 4; ++c, wp += 64) {
        const __m512i v = _mm512_loadu_si512(wp);
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        const int64_t kk = b * kXBlock + c * 8;
        for (int m = 0; m < MT; ++m) {
          const int8_t* xr = a.xq + (m0 + m) * a.k + kk;
          int32_t x0, x1;
          std::memcpy(&x0, xr, 4);
          std::memcpy(&x1, xr + 4, 4);
          acc_lo[m] = _mm512_dpbusd_epi32(acc_lo[m], lo, _mm512_set1_epi32(x0));
          acc_hi[m] = _mm512_dpbusd_epi32(acc_hi[m], hi, _mm512_set1_epi32(x1));
        }
      }
      for (int m = 0; m < MT; ++m)
        fg[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc_lo[m], acc_hi[m])),
                                _mm512_set1_ps(a.xs[(m0 + m) * nb + b]), fg[m]);
    }
    const int64_t at = (block * ng + g) * kRows;
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.scale + at)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.minv + at)));
    for (int m = 0; m < MT; ++m) {
      y[m] = _mm512_fmadd_ps(fg[m], s, y[m]);
      y[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.gsum[(m0 + m) * ng + g]), y[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(a.y + (m0 + m) * a.n + block * kRows, y[m]);
}
#else
template <int MT>
void int4_rows(const Int4Args& a, int64_t block, int64_t m0) {
  const int64_t nb = a.k / kXBlock, ng = a.k / a.group, per_group = a.group / kXBlock;
  for (int m = 0; m < MT; ++m) {
    const int8_t* xr = a.xq + (m0 + m) * a.k;
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = block * kRows + r;
      const uint8_t* wp = a.w + block * (a.k / 8) * 64 + r * 4;
      float y = a.bias ? a.bias[row] : 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float fg = 0.f;
        for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
          int32_t acc = 0;
          for (int c = 0; c < 4; ++c, wp += 64) {
            const int64_t kk = b * kXBlock + c * 8;
            for (int j = 0; j < 4; ++j) acc += (wp[j] & 0x0F) * xr[kk + j] + (wp[j] >> 4) * xr[kk + 4 + j];
          }
          fg = std::fma(static_cast<float>(acc), a.xs[(m0 + m) * nb + b], fg);
        }
        const int64_t at = (block * ng + g) * kRows + r;
        y = std::fma(fg, static_cast<float>(a.scale[at]), y);
        y = std::fma(static_cast<float>(a.minv[at]), a.gsum[(m0 + m) * ng + g], y);
      }
      a.y[(m0 + m) * a.n + row] = y;
    }
  }
}
#endif

template <typename Args, typename Rows>
void tiles(const Args& a, int64_t block, int64_t m_rows, const Rows& rows) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += kMaxTile) rows(a, block, m0, std::min<int64_t>(kMaxTile, m_rows - m0));
}

void int4_dispatch(const Int4Args& a, int64_t block, int64_t m0, int64_t mt) {
  switch (mt) {
    case 1: return int4_rows<1>(a, block, m0);
    case 2: return int4_rows<2>(a, block, m0);
    case 3: return int4_rows<3>(a, block, m0);
    case 4: return int4_rows<4>(a, block, m0);
    case 5: return int4_rows<5>(a, block, m0);
    case 6: return int4_rows<6>(a, block, m0);
    case 7: return int4_rows<7>(a, block, m0);
    default: return int4_rows<8>(a, block, m0);
  }
}

struct Int8Args {
  const uint8_t* w;      // [N/16, K/4, 64]: code + 128
  const float* scale;    // [N]
  const int8_t* xq;
  const float* xs;
  const int32_t* isum;
  const float* bias;
  float* y;
  int64_t k, n;
};

#if TRITONQ_VNNI
template <int MT>
void int8_rows(const Int8Args& a, int64_t block, int64_t m0) {
  const int64_t nb = a.k / kXBlock;
  const uint8_t* wp = a.w + block * (a.k / 4) * 64;
  __m512 fg[MT];
  for (int m = 0; m < MT; ++m) fg[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[MT], odd[MT];  // two dependency chains per row (even and odd chunks), as in int4_rows
    for (int m = 0; m < MT; ++m) {
      acc[m] = _mm512_set1_epi32(-128 * a.isum[(m0 + m) * nb + b]);
      odd[m] = _mm512_setzero_si512();
      hide(odd[m]);
    }
    prefetch_lines(wp + 4096, 8);
    for (int c = 0; c < 8; c += 2, wp += 128) {
      const __m512i v0 = _mm512_loadu_si512(wp), v1 = _mm512_loadu_si512(wp + 64);
      const int64_t kk = b * kXBlock + c * 4;
      for (int m = 0; m < MT; ++m) {
        int32_t x0, x1;
        std::memcpy(&x0, a.xq + (m0 + m) * a.k + kk, 4);
        std::memcpy(&x1, a.xq + (m0 + m) * a.k + kk + 4, 4);
        acc[m] = _mm512_dpbusd_epi32(acc[m], v0, _mm512_set1_epi32(x0));
        odd[m] = _mm512_dpbusd_epi32(odd[m], v1, _mm512_set1_epi32(x1));
      }
    }
    for (int m = 0; m < MT; ++m)
      fg[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[m], odd[m])),
                              _mm512_set1_ps(a.xs[(m0 + m) * nb + b]), fg[m]);
  }
  const __m512 s = _mm512_loadu_ps(a.scale + block * kRows);
  for (int m = 0; m < MT; ++m) {
    const __m512 bias = a.bias ? _mm512_loadu_ps(a.bias + block * kRows) : _mm512_setzero_ps();
    _mm512_storeu_ps(a.y + (m0 + m) * a.n + block * kRows, _mm512_fmadd_ps(fg[m], s, bias));
  }
}
#else
template <int MT>
void int8_rows(const Int8Args& a, int64_t block, int64_t m0) {
  const int64_t nb = a.k / kXBlock;
  for (int m = 0; m < MT; ++m) {
    const int8_t* xr = a.xq + (m0 + m) * a.k;
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = block * kRows + r;
      const uint8_t* wp = a.w + block * (a.k / 4) * 64 + r * 4;
      float fg = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t acc = -128 * a.isum[(m0 + m) * nb + b];
        for (int c = 0; c < 8; ++c, wp += 64)
          for (int j = 0; j < 4; ++j) acc += wp[j] * xr[b * kXBlock + c * 4 + j];
        fg = std::fma(static_cast<float>(acc), a.xs[(m0 + m) * nb + b], fg);
      }
      a.y[(m0 + m) * a.n + row] = std::fma(fg, a.scale[row], a.bias ? a.bias[row] : 0.f);
    }
  }
}
#endif

void int8_dispatch(const Int8Args& a, int64_t block, int64_t m0, int64_t mt) {
  switch (mt) {
    case 1: return int8_rows<1>(a, block, m0);
    case 2: return int8_rows<2>(a, block, m0);
    case 3: return int8_rows<3>(a, block, m0);
    case 4: return int8_rows<4>(a, block, m0);
    case 5: return int8_rows<5>(a, block, m0);
    case 6: return int8_rows<6>(a, block, m0);
    case 7: return int8_rows<7>(a, block, m0);
    default: return int8_rows<8>(a, block, m0);
  }
}

struct F16Args {
  const at::Half* w;  // [N/16, K, 16]
  const float* x;     // [M, K]
  const float* bias;
  float* y;
  int64_t k, n;
};

// Four accumulators per row (inputs k mod 4) hide the FMA latency; they are summed in a fixed order.
#if TRITONQ_VNNI
template <int MT>
void f16_rows(const F16Args& a, int64_t block, int64_t m0) {
  const at::Half* wp = a.w + block * a.k * kRows;
  __m512 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < a.k; kk += 4) {
    prefetch_lines(wp + (kk + 64) * kRows, 2);  // these 4 inputs' 128 bytes, 2 KB ahead
    for (int j = 0; j < 4; ++j) {
      const __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + (kk + j) * kRows)));
      for (int m = 0; m < MT; ++m) acc[m][j] = _mm512_fmadd_ps(_mm512_set1_ps(a.x[(m0 + m) * a.k + kk + j]), w, acc[m][j]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    __m512 y = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
    if (a.bias) y = _mm512_add_ps(y, _mm512_loadu_ps(a.bias + block * kRows));
    _mm512_storeu_ps(a.y + (m0 + m) * a.n + block * kRows, y);
  }
}
#else
template <int MT>
void f16_rows(const F16Args& a, int64_t block, int64_t m0) {
  const at::Half* wp = a.w + block * a.k * kRows;
  for (int m = 0; m < MT; ++m) {
    const float* xr = a.x + (m0 + m) * a.k;
    for (int64_t r = 0; r < kRows; ++r) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t kk = 0; kk < a.k; kk += 4)
        for (int j = 0; j < 4; ++j) acc[j] = std::fma(xr[kk + j], static_cast<float>(wp[(kk + j) * kRows + r]), acc[j]);
      float y = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      if (a.bias) y += a.bias[block * kRows + r];
      a.y[(m0 + m) * a.n + block * kRows + r] = y;
    }
  }
}
#endif

// Four rows at a time: 16 accumulators stay in registers (eight rows would spill them).
void f16_dispatch(const F16Args& a, int64_t block, int64_t m0, int64_t mt) {
  for (int64_t m = m0; m < m0 + mt; m += 4) {
    switch (std::min<int64_t>(4, m0 + mt - m)) {
      case 1: f16_rows<1>(a, block, m); break;
      case 2: f16_rows<2>(a, block, m); break;
      case 3: f16_rows<3>(a, block, m); break;
      default: f16_rows<4>(a, block, m); break;
    }
  }
}

// Row blocks per work item: small enough to balance two threads on a 256-row projection, large enough that
// the atomic counter is touched rarely and that each thread streams runs of consecutive blocks (one-block items
// at 4 or more rows interleaved the threads' reads and cost 7-15% at 4-8 rows, measured).
int64_t chunk_for(int64_t blocks) { return std::max<int64_t>(1, std::min<int64_t>(4, blocks / 16)); }

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 CPU tensor");
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& minv,
                     int64_t group, const c10::optional<at::Tensor>& bias) {
  const int64_t blocks = w.size(0), n = blocks * kRows, k = w.size(1) * 8;
  check_x(x, k);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.scalar_type() == at::kByte && w.is_contiguous(), "bad packed w");
  TORCH_CHECK(group % kXBlock == 0 && k % group == 0, "group must be a multiple of 32 dividing K");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minv.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  minv.is_contiguous() && scale.numel() == n * (k / group) && minv.numel() == scale.numel(),
              "scale/min must be contiguous fp16 [N/16, K/group, 16]");
  const auto q = quantize_x(x, group);
  at::Tensor y = at::empty({x.size(0), n}, at::kFloat);
  const Int4Args a{w.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), minv.data_ptr<at::Half>(),
                   q.q.data_ptr<int8_t>(), q.scale.data_ptr<float>(), q.gsum.data_ptr<float>(),
                   bias && bias->defined() ? bias->contiguous().data_ptr<float>() : nullptr, y.data_ptr<float>(),
                   k, n, group};
  const int64_t m_rows = x.size(0);
  parallel_dynamic(blocks, chunk_for(blocks), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) tiles(a, block, m_rows, int4_dispatch);
  });
  return y;
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias) {
  const int64_t blocks = w.size(0), n = blocks * kRows, k = w.size(1) * 4;
  check_x(x, k);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.scalar_type() == at::kByte && w.is_contiguous(), "bad packed w");
  TORCH_CHECK(k % kXBlock == 0, "K must be a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n && scale.is_contiguous(),
              "scale must be contiguous float32 [N]");
  const auto q = quantize_x(x, k);
  at::Tensor y = at::empty({x.size(0), n}, at::kFloat);
  const Int8Args a{w.data_ptr<uint8_t>(), scale.data_ptr<float>(), q.q.data_ptr<int8_t>(),
                   q.scale.data_ptr<float>(), q.isum.data_ptr<int32_t>(),
                   bias && bias->defined() ? bias->contiguous().data_ptr<float>() : nullptr, y.data_ptr<float>(),
                   k, n};
  const int64_t m_rows = x.size(0);
  parallel_dynamic(blocks, chunk_for(blocks), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) tiles(a, block, m_rows, int8_dispatch);
  });
  return y;
}

at::Tensor f16_gemm(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const int64_t blocks = w.size(0), n = blocks * kRows, k = w.size(1);
  check_x(x, k);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kRows && w.scalar_type() == at::kHalf && w.is_contiguous(),
              "w must be contiguous fp16 [N/16, K, 16]");
  TORCH_CHECK(k % 4 == 0, "K must be a multiple of 4");
  at::Tensor y = at::empty({x.size(0), n}, at::kFloat);
  const F16Args a{w.data_ptr<at::Half>(), x.data_ptr<float>(),
                  bias && bias->defined() ? bias->contiguous().data_ptr<float>() : nullptr, y.data_ptr<float>(), k, n};
  const int64_t m_rows = x.size(0);
  parallel_dynamic(blocks, chunk_for(blocks), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) tiles(a, block, m_rows, f16_dispatch);
  });
  return y;
}

bool uses_vnni() { return TRITONQ_VNNI; }

}  // namespace

TORCH_LIBRARY(TRITONQ_OPS_NAMESPACE, m) {
  m.def("int4_gemm(Tensor x, Tensor w, Tensor scale, Tensor minv, int group, Tensor? bias) -> Tensor", int4_gemm);
  m.def("int8_gemm(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor", int8_gemm);
  m.def("f16_gemm(Tensor x, Tensor w, Tensor? bias) -> Tensor", f16_gemm);
  m.def("simd() -> bool", uses_vnni);
  m.def("set_threads(int threads) -> int", set_threads);
}
