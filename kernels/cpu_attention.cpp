// The non-matmul work of one decode step on the CPU, for rows of one token each: RMSNorm, SiLU-gated products,
// and attention over each row's own KV cache with the new key and value appended in place. The Python side
// (cpu_attention.py) documents the layouts and holds the float64 references.
//
// Why: at one token per row these are tiny tensors, and a step of transformers' Llama runs about fifty torch ops
// per layer for them (norms, rotary, cache concatenation, SDPA and its transposes), each costing microseconds of
// dispatch; on a 2048-wide 22-layer model that was 6.8 ms of a 52 ms step. One call per piece does the same
// arithmetic in a few microseconds.
//
// Batch invariance: each row (and each head) is computed by the same operations whatever the number of rows, so
// a request decoded in a batch gets the same values as alone. Plain loops with fixed 16-lane partial sums keep
// the summation order independent of the build (the portable and the native builds agree bit for bit).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_pool.h"

#if defined(__AVX512F__) && !defined(TRITONQ_PORTABLE)
#include <immintrin.h>
#define TRITONQ_AVX512 1
#else
#define TRITONQ_AVX512 0
#endif

namespace {

using TRITONQ_OPS_NAMESPACE::parallel_dynamic;

constexpr int64_t kLanes = 16;

// sum_i a[i] * b[i] in 16 partial sums (lane i mod 16), added in a fixed tree; one vector per 16 inputs on
// AVX-512, the same roundings in the portable loop (multiply, then add: no fused multiply-add).
float dot(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {0.f};
  int64_t i = 0;
#if TRITONQ_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + kLanes <= n; i += kLanes)
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
  if (i == n) {  // the tree below in registers: lanes l + (l+8), then + (l+4), + (l+2), + (l+1)
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
  _mm512_storeu_ps(part, acc);
#else
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
#endif
  for (int64_t l = 0; i < n; ++i, ++l) part[l] += a[i] * b[i];
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

// acc[i] += p * v[i] (multiply, then add), 16 lanes at a time on AVX-512.
void add_scaled(float* acc, const float* v, float p, int64_t n) {
  int64_t i = 0;
#if TRITONQ_AVX512
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + kLanes <= n; i += kLanes)
    _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), _mm512_mul_ps(pv, _mm512_loadu_ps(v + i))));
#endif
  for (; i < n; ++i) acc[i] += p * v[i];
}

// out = sum_j p[j] v[j] / sum_j p[j] over `count` value rows of `d`: each output element adds p[j] * v[j][i] in order
// of j (multiply, then add). With d = 64 or 128 on AVX-512 the running sums stay in registers (a store and a
// reload per value row otherwise); the operations, and so the roundings, are the same either way.
#if TRITONQ_AVX512
template <int V>
void weighted_values_regs(const float* p, const float* v, int64_t count, float* out) {
  __m512 acc[V];
  for (int r = 0; r < V; ++r) acc[r] = _mm512_setzero_ps();
  float sum = 0.f;
  for (int64_t j = 0; j < count; ++j) {
    sum += p[j];
    const __m512 pv = _mm512_set1_ps(p[j]);
    for (int r = 0; r < V; ++r)
      acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(pv, _mm512_loadu_ps(v + j * V * kLanes + r * kLanes)));
  }
  const __m512 total = _mm512_set1_ps(sum);
  for (int r = 0; r < V; ++r) _mm512_storeu_ps(out + r * kLanes, _mm512_div_ps(acc[r], total));
}
#endif

void weighted_values(const float* p, const float* v, int64_t count, int64_t d, float* acc, float* out) {
#if TRITONQ_AVX512
  if (d == 64) return weighted_values_regs<4>(p, v, count, out);
  if (d == 128) return weighted_values_regs<8>(p, v, count, out);
#endif
  float sum = 0.f;
  std::fill(acc, acc + d, 0.f);
  for (int64_t j = 0; j < count; ++j) {
    sum += p[j];
    add_scaled(acc, v + j * d, p[j], d);
  }
  for (int64_t i = 0; i < d; ++i) out[i] = acc[i] / sum;
}

// e^x in float32 to about 2 ulp, branch-free so that loops over it vectorize (the C library's expf is a call per
// element and took most of an attention op's time). Cody-Waite reduction x = n ln2 + r with ln2 in two parts,
// then the degree-6 minimax polynomial of Moshier's Cephes expf for e^r on |r| <= ln2 / 2, scaled by 2^n through
// the exponent bits; x is clamped so that 2^n stays a normal float.
inline float exp_approx(float x) {
  x = std::min(88.3762626647949f, std::max(-87.3365478515625f, x));
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

#if TRITONQ_AVX512
// exp_approx on 16 lanes, operation for operation (so both builds agree bit for bit).
inline __m512 exp_approx16(__m512 x) {
  const auto mul = [](__m512 a, float b) { return _mm512_mul_ps(a, _mm512_set1_ps(b)); };
  const auto add = [](__m512 a, float b) { return _mm512_add_ps(a, _mm512_set1_ps(b)); };
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), _mm512_max_ps(_mm512_set1_ps(-87.3365478515625f), x));
  const __m512 n = _mm512_roundscale_ps(add(mul(x, 1.44269504088896341f), 0.5f), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, mul(n, 0.693359375f)), mul(n, -2.12194440e-4f));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = add(_mm512_mul_ps(p, r), 1.3981999507e-3f);
  p = add(_mm512_mul_ps(p, r), 8.3334519073e-3f);
  p = add(_mm512_mul_ps(p, r), 4.1665795894e-2f);
  p = add(_mm512_mul_ps(p, r), 1.6666665459e-1f);
  p = add(_mm512_mul_ps(p, r), 5.0000001201e-1f);
  const __m512 y = add(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), 1.f);
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}
#endif

// x[i] = exp_approx(x[i] - shift) for i < n.
void exp_shifted(float* x, int64_t n, float shift) {
  int64_t i = 0;
#if TRITONQ_AVX512
  for (; i + kLanes <= n; i += kLanes)
    _mm512_storeu_ps(x + i, exp_approx16(_mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_set1_ps(shift))));
#endif
  for (; i < n; ++i) x[i] = exp_approx(x[i] - shift);
}

// Rows per work item of the row-wise ops: one row each for a decode batch, bigger items for a prompt's hundreds
// (each row is computed alone, so the split never changes a value).
int64_t rows_per_task(int64_t rows) { return std::max<int64_t>(1, rows / 16); }

void check_float(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim && t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous ", dim, "-d float32 CPU tensor, got ", t.sizes(), " ", t.scalar_type());
}

// y = w * (x / sqrt(mean(x^2) + eps)) per row (Zhang & Sennrich 2019; transformers' LlamaRMSNorm order).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_float(x, "x", 2);
  check_float(w, "w", 1);
  const int64_t m_rows = x.size(0), d = x.size(1);
  TORCH_CHECK(w.size(0) == d, "w has ", w.size(0), " features, x has ", d);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_dynamic(m_rows, rows_per_task(m_rows), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* xr = xp + m * d;
      const float r = 1.f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + static_cast<float>(eps));
      for (int64_t i = 0; i < d; ++i) yp[m * d + i] = wp[i] * (xr[i] * r);
    }
  });
  return y;
}

// gate_up [M, 2I] (gate first) -> silu(gate) * up [M, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_float(gate_up, "gate_up", 2);
  const int64_t m_rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  at::Tensor y = at::empty({m_rows, inter}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_dynamic(m_rows, rows_per_task(m_rows), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* g = gp + m * 2 * inter;
      const float* u = g + inter;
      float* out = yp + m * inter;
      int64_t i = 0;
#if TRITONQ_AVX512
      for (; i + kLanes <= inter; i += kLanes) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 e = exp_approx16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(u + i)));
      }
#endif
      for (; i < inter; ++i) out[i] = g[i] / (1.f + exp_approx(-g[i])) * u[i];
    }
  });
  return y;
}

// x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2]) (transformers' apply_rotary_pos_emb).
void rotate(const float* x, const float* cos, const float* sin, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
  for (int64_t i = half; i < d; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// Rows of new tokens: row b feeds counts[b] tokens (one each when counts is empty), at positions lengths[b],
// lengths[b] + 1, ...; qkv [N, (Hq + 2 Hkv) * D] holds every row's tokens in row order, before the rotary
// embedding (q heads, then k, then v), and cos/sin [N, D] their embeddings. k_cache[b], v_cache[b]
// [1, Hkv, capacity, D] hold lengths[b] tokens. The op writes the new rotated keys and the values at their
// positions, then each new token attends causally over the last `window` keys up to itself (all when window <= 0).
// Returns [N, Hq * D].
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            at::TensorList k_cache, at::TensorList v_cache, at::IntArrayRef lengths,
                            at::IntArrayRef counts, int64_t heads, int64_t kv_heads, int64_t window, double scale) {
  check_float(qkv, "qkv", 2);
  check_float(cos, "cos", 2);
  check_float(sin, "sin", 2);
  const int64_t tokens = qkv.size(0), d = cos.size(1), rows = static_cast<int64_t>(lengths.size());
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(d % 2 == 0 && qkv.size(1) == (heads + 2 * kv_heads) * d, "qkv must be [N, (heads + 2 kv_heads) * ",
              d, "], got ", qkv.sizes());
  TORCH_CHECK(cos.size(0) == tokens && sin.sizes() == cos.sizes(), "cos and sin must be [N, head_dim]");
  TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == rows && static_cast<int64_t>(v_cache.size()) == rows &&
                  (counts.empty() || static_cast<int64_t>(counts.size()) == rows),
              "one cache, one length and one count per row");
  std::vector<int64_t> first(rows + 1, 0);  // row b's tokens are qkv rows [first[b], first[b + 1])
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t fed = counts.empty() ? 1 : counts[b];
    TORCH_CHECK(fed >= 1, "every row feeds at least one token");
    first[b + 1] = first[b] + fed;
    for (const auto* cache : {&k_cache[b], &v_cache[b]}) {
      check_float(*cache, "a cache", 4);
      TORCH_CHECK(cache->size(0) == 1 && cache->size(1) == kv_heads && cache->size(3) == d && lengths[b] >= 0 &&
                      lengths[b] + fed <= cache->size(2),
                  "a cache must be [1, kv_heads, capacity >= length + new tokens, head_dim]");
    }
  }
  TORCH_CHECK(first[rows] == tokens, "qkv has ", tokens, " rows but the rows feed ", first[rows], " tokens");
  at::Tensor out = at::empty({tokens, heads * d}, qkv.options());
  const int64_t group = heads / kv_heads, width = (heads + 2 * kv_heads) * d;
  const float* base = qkv.data_ptr<float>();
  const float* cos_p = cos.data_ptr<float>();
  const float* sin_p = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // one task per (row, kv head): it appends that head's keys and values, then serves its group of query heads
  parallel_dynamic(rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(d), scores, acc(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, hk = task % kv_heads, len = lengths[b];
      const int64_t capacity = k_cache[b].size(2);
      float* keys = k_cache[b].data_ptr<float>() + hk * capacity * d;
      float* values = v_cache[b].data_ptr<float>() + hk * capacity * d;
      for (int64_t t = first[b]; t < first[b + 1]; ++t) {
        const float* row = base + t * width;
        const int64_t at = len + t - first[b];
        rotate(row + (heads + hk) * d, cos_p + t * d, sin_p + t * d, d, keys + at * d);
        std::copy(row + (heads + kv_heads + hk) * d, row + (heads + kv_heads + hk + 1) * d, values + at * d);
      }
      for (int64_t t = first[b]; t < first[b + 1]; ++t) {
        const float* row = base + t * width;
        const int64_t total = len + t - first[b] + 1, start = window > 0 ? std::max<int64_t>(0, total - window) : 0;
        const int64_t count = total - start;
        scores.resize(count);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          rotate(row + h * d, cos_p + t * d, sin_p + t * d, d, q.data());
          float top = -INFINITY;
          for (int64_t j = 0; j < count; ++j) {
            scores[j] = dot(q.data(), keys + (start + j) * d, d) * static_cast<float>(scale);
            top = std::max(top, scores[j]);
          }
          exp_shifted(scores.data(), count, top);
          float* o = op + t * heads * d + h * d;
          weighted_values(scores.data(), values + start * d, count, d, acc.data(), o);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TRITONQ_OPS_NAMESPACE, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", silu_mul);
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, int[] lengths, "
        "int[] counts, int heads, int kv_heads, int window, float scale) -> Tensor", decode_attention);
}
