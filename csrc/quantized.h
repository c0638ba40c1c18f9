// Products with reduced-precision weights for CPU inference (fastrnn/quantized.py): the
// weight is int8 with one float32 scale per row (symmetric, w ~= scale[n] * q[n, :]) or
// bfloat16 (or float32 itself: the native backend's streaming layer op, the same kernel
// without the widening); activations and sums stay float32, except for int8 weights on a
// CPU with AVX-512 VNNI, where the activations are quantized too and the sums are integer
// (vnni, below). A streaming step is bound by reading the weight, so a quarter (int8) or half
// (bfloat16) of the float32 bytes is that much less time.
//
// Each output element sums in an order fixed by K alone (16 lanes over k, the tail, then a
// pairwise reduction; vnni's integer sums are exact), whatever the number of rows or the
// thread split: a frame gives the same bits alone or inside a longer chunk.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "gemv.h"

namespace fastrnn {
namespace quantized {

using Floats = gemv::Vec64<float>;   // 16 float lanes
constexpr int kLanes = Floats::kLanes;

// 16 weights widened to float: int8 exactly (sign extension, then conversion), bfloat16
// exactly (its bits are the float's upper half). Intrinsics where the build has them: GCC
// turns __builtin_convertvector from bytes into scalar code.
inline Floats::type widen(const int8_t* p) {
  Floats::type f;
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))));
  std::memcpy(&f, &v, sizeof(f));
#elif defined(__AVX2__)
  __m256 v[2];
  for (int half = 0; half < 2; ++half) {
    v[half] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(p + 8 * half))));
  }
  std::memcpy(&f, v, sizeof(f));
#else
  float v[kLanes];
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(p[l]);
  std::memcpy(&f, v, sizeof(f));
#endif
  return f;
}

inline Floats::type widen(const at::BFloat16* p) {
  Floats::type f;
#if defined(__AVX512F__)
  const __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16);
  std::memcpy(&f, &v, sizeof(f));
#elif defined(__AVX2__)
  __m256i v[2];
  for (int half = 0; half < 2; ++half) {
    v[half] = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(p + 8 * half))), 16);
  }
  std::memcpy(&f, v, sizeof(f));
#else
  uint32_t v[kLanes];
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<uint32_t>(p[l].x) << 16;
  std::memcpy(&f, v, sizeof(f));
#endif
  return f;
}

// float32 weights (the streaming layer op at full precision) need no widening.
inline Floats::type widen(const float* p) { return Floats::load(p); }

inline float widen_one(int8_t w) { return static_cast<float>(w); }
inline float widen_one(at::BFloat16 w) { return static_cast<float>(w); }
inline float widen_one(float w) { return w; }

// result[b * kRows + r] = sum_k a[b * lda + k] * w[r * ldw + k] for kBatch rows of a and
// kRows weight rows: the weights are widened once and used by every row of a. With `ahead`,
// the same columns of the kRows rows from there are prefetched as these are read.
template <int kRows, int kBatch, typename W>
inline void dot_block(const float* a, int64_t lda, const W* w, int64_t ldw, int64_t K,
                      float* result, const W* ahead = nullptr) {
  Floats::type acc[kBatch][kRows];
  for (int b = 0; b < kBatch; ++b) {
    for (int r = 0; r < kRows; ++r) acc[b][r] = Floats::type{};
  }
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Floats::type wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = widen(w + r * ldw + k);
    if (ahead != nullptr) {
      for (int r = 0; r < kRows; ++r) __builtin_prefetch(ahead + r * ldw + k, 0, 3);
    }
    for (int b = 0; b < kBatch; ++b) {
      const Floats::type av = Floats::load(a + b * lda + k);
      for (int r = 0; r < kRows; ++r) acc[b][r] += av * wv[r];
    }
  }
  for (int b = 0; b < kBatch; ++b) {
    for (int r = 0; r < kRows; ++r) {
      float lane[kLanes];
      std::memcpy(lane, &acc[b][r], sizeof(lane));
      for (int64_t j = k, l = 0; j < K; ++j, ++l) {
        lane[l] += a[b * lda + j] * widen_one(w[r * ldw + j]);
      }
      for (int width = kLanes / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
      }
      result[b * kRows + r] = lane[0];
    }
  }
}

// Rows of a that share one pass over the weights: the rows of a stay in L1 while the
// weights stream through once per block. float32 rows are read without widening, so more of
// them share a pass (16 rows of 512 floats: 32 KB): a 16-frame chunk's input projection
// reads w_ih once.
template <typename W>
constexpr int64_t kBlockRows = std::is_same_v<W, float> ? 16 : 8;

// Rows of a sharing each widened weight vector: widening costs as much as the multiply, so a
// longer chunk (the input projection) or a larger batch reuses it. With AVX-512 the 4 x 4
// accumulators fit the 32 vector registers; with fewer registers, 2 rows.
#if defined(__AVX512F__)
constexpr int kGroup = 4;
#else
constexpr int kGroup = 2;
#endif

// dot_block for `rows` (1..kGroup) rows of a, the count a compile-time constant.
template <int kRows, typename W, int kBatch = kGroup>
inline void dot_rows(int64_t rows, const float* a, int64_t lda, const W* w, int64_t ldw,
                     int64_t K, float* result, const W* ahead = nullptr) {
  if constexpr (kBatch > 1) {
    if (rows < kBatch) {
      return dot_rows<kRows, W, kBatch - 1>(rows, a, lda, w, ldw, K, result, ahead);
    }
  }
  dot_block<kRows, kBatch>(a, lda, w, ldw, K, result, ahead);
}

// Calls tile(b, size, n, count) for every tile of `size` (up to `group`) rows of a from b
// and `count` (up to 4) weight rows from n: the weight rows split over the threads, the rows
// of a in blocks of block_rows per pass over the weights.
template <typename Tile>
void for_each_tile(int64_t rows, int64_t N, int64_t K, int64_t block_rows, int64_t group,
                   const Tile& tile) {
  at::parallel_for(0, (N + 3) / 4, gemv::grain(4 * K), [&](int64_t q0, int64_t q1) {
    for (int64_t b0 = 0; b0 < rows; b0 += block_rows) {
      const int64_t b1 = std::min(rows, b0 + block_rows);
      for (int64_t n = q0 * 4; n < std::min(N, q1 * 4); n += 4) {
        for (int64_t b = b0; b < b1; b += group) {
          tile(b, std::min(group, b1 - b), n, std::min<int64_t>(4, N - n));
        }
      }
    }
  });
}

// out[b, n] = scale[n] * sum_k a[b, k] * w[n, k] + bias[n], for `rows` rows of a ([rows, K])
// and w [N, K] row-major; scale and bias may be null (1 and 0). Four weight rows at a time,
// up to kGroup rows of a at a time.
template <typename W>
void linear(float* out, const float* a, int64_t rows, const W* w, const float* scale,
            const float* bias, int64_t N, int64_t K) {
  for_each_tile(rows, N, K, kBlockRows<W>, kGroup, [&](int64_t b, int64_t group, int64_t n,
                                                    int64_t count) {
    float result[4 * kGroup];
    const float* ab = a + b * K;
    const W* wn = w + n * K;
    if (count == 4) {
      // float32 weights: the product only streams them, at the cache's pace; fetching the
      // next four rows (8 KB at K = 512) while these are summed hides the latency the
      // hardware prefetcher leaves (about 8% of a step at hidden 512, weights in L3). Once
      // per pass: the block's other rows of a find them cached.
      const W* ahead = std::is_same_v<W, float> && b % kBlockRows<W> == 0 ? wn + 4 * K
                                                                         : nullptr;
      dot_rows<4>(group, ab, K, wn, K, K, result, ahead);
    } else {
      for (int64_t r = 0; r < count; ++r) {
        float one[kGroup];
        dot_rows<1>(group, ab, K, wn + r * K, K, K, one);
        for (int64_t i = 0; i < group; ++i) result[i * count + r] = one[i];
      }
    }
    for (int64_t i = 0; i < group; ++i) {
      float* o = out + (b + i) * N + n;
      for (int64_t r = 0; r < count; ++r) {
        const float sum = result[i * count + r];
        o[r] = (scale != nullptr ? sum * scale[n + r] : sum) +
               (bias != nullptr ? bias[n + r] : 0.f);
      }
    }
  });
}

// ---- int8 weights with integer dot products (AVX-512 VNNI) ---------------------------------
//
// Where the CPU has AVX-512 VNNI, an int8 product runs on vpdpbusd (64 byte products summed
// into 16 int32 lanes per instruction) instead of widening every weight to float32. The
// activations become integers too: each row of a (one frame of one stream) gets its own
// scale, a[k] ~= sa * qa[k] with sa = max_k |a[k]| / max_q, as one signed byte plane
// (8 bits: |qa| <= 127, as torch's dynamic quantization but a scale per row) or two
// (16 bits: qa = 256 * hi + lo, |qa| <= 32511). The integer sum over k is exact, so the
// result, (sa * scale[n]) * sum_k qa[k] * q[n, k], depends on no summation order at all.
//
// vpdpbusd multiplies unsigned by signed bytes: the weights are the unsigned operand, offset
// by 128 (their top bit flipped), and 128 * sum_k plane[k] is taken off each plane's sum.
// Per 64 multiply-adds and row of a: one vpdpbusd per plane, the planes' loads shared by 4
// weight rows, the weights' load and flip shared by the kGroup rows of a.
namespace vnni {

constexpr int64_t kAlign = 64;   // the planes' rows are padded to whole vectors
// Each plane's exact sum, |sum_k q[k] * plane[k]| <= 127 * 128 * K, fits an int32.
constexpr int64_t kMaxK = 131072;

// Whether the kernels below run on this CPU, and are not turned off by
// FASTRNN_QUANTIZED_VNNI=0 (to run the float32 kernel, as on CPUs without VNNI).
inline bool enabled() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool supported = __builtin_cpu_supports("avx512f") &&
                                __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vnni");
  const char* env = std::getenv("FASTRNN_QUANTIZED_VNNI");
  return supported && !(env != nullptr && std::string(env) == "0");
#else
  return false;
#endif
}

// Rows of a as integers: `planes` byte planes [rows, ld] (zero past K), and per row its
// scale and each plane's sum (for the weights' offset).
struct Activations {
  int planes = 1;
  int64_t ld = 0;
  std::vector<int8_t> plane[2];
  std::vector<float> scale;
  std::vector<int32_t> sum[2];
};

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTRNN_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// Quantizes a [rows, K] into q; false if a value is not finite (the float32 kernel then
// keeps NaN and infinity as they are). qa = round-to-nearest-even(a / sa), sa = max|a| / max_q
// in float32 (fastrnn.quantized.quantize_activations does the same).
FASTRNN_VNNI inline bool quantize(const float* a, int64_t rows, int64_t K, int planes,
                                  Activations& q) {
  const int32_t max_q = planes == 2 ? 32511 : 127;   // 32511: |hi| <= 127, lo in [-128, 127]
  q.planes = planes;
  q.ld = (K + kAlign - 1) / kAlign * kAlign;
  q.scale.resize(rows);
  for (int p = 0; p < planes; ++p) {
    q.plane[p].assign(rows * q.ld, 0);
    q.sum[p].assign(rows, 0);
  }
  const __m512 limit = _mm512_set1_ps(static_cast<float>(max_q));
  for (int64_t b = 0; b < rows; ++b) {
    const float* row = a + b * K;
    __m512 top = _mm512_setzero_ps(), finite = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? 0xffff : (1u << (K - k)) - 1;
      const __m512 x = _mm512_maskz_loadu_ps(mask, row + k);
      top = _mm512_max_ps(top, _mm512_abs_ps(x));
      finite = _mm512_add_ps(finite, _mm512_mul_ps(x, _mm512_setzero_ps()));  // NaN if any
    }                                                                          // is NaN or inf
    if (_mm512_reduce_add_ps(finite) != 0.f) return false;
    const float scale = _mm512_reduce_max_ps(top) / max_q;
    q.scale[b] = scale;
    if (scale == 0.f) continue;
    const __m512 divisor = _mm512_set1_ps(scale);
    int8_t* hi = q.plane[0].data() + b * q.ld;
    int8_t* lo = planes == 2 ? q.plane[1].data() + b * q.ld : nullptr;
    __m512i sum_hi = _mm512_setzero_si512(), sum_lo = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? 0xffff : (1u << (K - k)) - 1;
      const __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, row + k), divisor);
      // Rounds to nearest even (the default rounding mode), as std::nearbyint.
      const __m512i v = _mm512_cvtps_epi32(
          _mm512_min_ps(_mm512_max_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), limit)), limit));
      if (planes == 1) {
        _mm512_mask_cvtepi32_storeu_epi8(hi + k, mask, v);
        sum_hi = _mm512_add_epi32(sum_hi, v);
      } else {
        // floor: lo = v - 256 * h lands in [-128, 127]
        const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(128)), 8);
        const __m512i l = _mm512_sub_epi32(v, _mm512_slli_epi32(h, 8));
        _mm512_mask_cvtepi32_storeu_epi8(hi + k, mask, h);
        _mm512_mask_cvtepi32_storeu_epi8(lo + k, mask, l);
        sum_hi = _mm512_add_epi32(sum_hi, h);
        sum_lo = _mm512_add_epi32(sum_lo, l);
      }
    }
    q.sum[0][b] = _mm512_reduce_add_epi32(sum_hi);
    if (planes == 2) q.sum[1][b] = _mm512_reduce_add_epi32(sum_lo);
  }
  return true;
}

// The sums of four vectors' 16 int32 lanes (wrapping), as 4 lanes.
FASTRNN_VNNI inline __m128i sum4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1),
                                      _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3),
                                      _mm512_unpackhi_epi32(v2, v3));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1),
                                     _mm512_unpackhi_epi64(t0, t1));
  const __m256i x = _mm256_add_epi32(_mm512_castsi512_si256(u),
                                     _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

// sums[p][b][r] = the offset sum (wrapping int32) of plane p of row b of a with weight row
// r, for kBatch rows of the planes (stride ld) and kRows weight rows w (stride ldw, K
// columns).
template <int kPlanes, int kRows, int kBatch>
FASTRNN_VNNI inline void dot_block(const int8_t* const* plane, int64_t ld, const int8_t* w,
                                   int64_t ldw, int64_t K, int32_t sums[][kBatch][kRows]) {
  __m512i acc[kPlanes][kBatch][kRows];
  for (int p = 0; p < kPlanes; ++p) {
    for (int b = 0; b < kBatch; ++b) {
      for (int r = 0; r < kRows; ++r) acc[p][b][r] = _mm512_setzero_si512();
    }
  }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += kAlign) {
    // Past K the weights load as 0 (flipped: 128) and meet zero planes.
    const __mmask64 mask = K - k >= kAlign ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;
    __m512i wv[kRows];
    for (int r = 0; r < kRows; ++r) {
      wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + r * ldw + k), flip);
    }
    for (int b = 0; b < kBatch; ++b) {
      for (int p = 0; p < kPlanes; ++p) {
        const __m512i v = _mm512_loadu_si512(plane[p] + b * ld + k);
        for (int r = 0; r < kRows; ++r) acc[p][b][r] = _mm512_dpbusd_epi32(acc[p][b][r], wv[r], v);
      }
    }
  }
  for (int p = 0; p < kPlanes; ++p) {
    for (int b = 0; b < kBatch; ++b) {
      if constexpr (kRows % 4 == 0) {
        for (int r = 0; r < kRows; r += 4) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(sums[p][b] + r),
                           sum4(acc[p][b][r], acc[p][b][r + 1], acc[p][b][r + 2],
                                acc[p][b][r + 3]));
        }
      } else {
        for (int r = 0; r < kRows; ++r) sums[p][b][r] = _mm512_reduce_add_epi32(acc[p][b][r]);
      }
    }
  }
}

// Rows of a per pass: with kGroup (4 / planes) rows of a, 16 accumulators.
template <int kPlanes>
constexpr int kGroup = 4 / kPlanes;

// out[b, n] = scale[n] * sum_k a[b, k] * w[n, k] + bias[n] (quantized::linear) for kBatch
// rows of a from b (as q, quantize's) and kRows weight rows from n.
template <int kPlanes, int kRows, int kBatch>
FASTRNN_VNNI void rows_out(const Activations& q, int64_t b, const int8_t* w, int64_t n,
                           const float* scale, const float* bias, int64_t N, int64_t K,
                           float* out) {
  int32_t sums[kPlanes][kBatch][kRows];
  const int8_t* plane[kPlanes];
  for (int p = 0; p < kPlanes; ++p) plane[p] = q.plane[p].data() + b * q.ld;
  dot_block<kPlanes, kRows, kBatch>(plane, q.ld, w + n * K, K, K, sums);
  for (int i = 0; i < kBatch; ++i) {
    if constexpr (kRows % 4 == 0) {   // the loop below, 4 rows at once
      for (int r = 0; r < kRows; r += 4) {
        __m256d dot = _mm256_setzero_pd();
        for (int p = 0; p < kPlanes; ++p) {
          const __m128i exact = _mm_sub_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(sums[p][i] + r)),
              _mm_set1_epi32(
                  static_cast<int32_t>(128u * static_cast<uint32_t>(q.sum[p][b + i]))));
          dot = _mm256_add_pd(_mm256_mul_pd(dot, _mm256_set1_pd(256.)),
                              _mm256_cvtepi32_pd(exact));
        }
        const __m256d factor = _mm256_mul_pd(_mm256_set1_pd(q.scale[b + i]),
                                             _mm256_cvtps_pd(_mm_loadu_ps(scale + n + r)));
        __m128 result = _mm256_cvtpd_ps(_mm256_mul_pd(dot, factor));
        if (bias != nullptr) result = _mm_add_ps(result, _mm_loadu_ps(bias + n + r));
        _mm_storeu_ps(out + (b + i) * N + n + r, result);
      }
      continue;
    }
    for (int r = 0; r < kRows; ++r) {
      // Each plane's sum without the weights' offset: exact, it fits an int32.
      int64_t dot = 0;
      for (int p = 0; p < kPlanes; ++p) {
        dot = dot * 256 + static_cast<int32_t>(static_cast<uint32_t>(sums[p][i][r]) -
                                               128u * static_cast<uint32_t>(q.sum[p][b + i]));
      }
      // The product of two floats is exact in double: one rounding, then one to float.
      const double factor = static_cast<double>(q.scale[b + i]) * scale[n + r];
      out[(b + i) * N + n + r] = static_cast<float>(static_cast<double>(dot) * factor) +
                                 (bias != nullptr ? bias[n + r] : 0.f);
    }
  }
}

// rows_out for `count` (1..kGroup) rows of a, the count a compile-time constant.
template <int kPlanes, int kRows, int kBatch = kGroup<kPlanes>>
void group_out(int64_t count, const Activations& q, int64_t b, const int8_t* w, int64_t n,
               const float* scale, const float* bias, int64_t N, int64_t K, float* out) {
  if constexpr (kBatch > 1) {
    if (count < kBatch) {
      return group_out<kPlanes, kRows, kBatch - 1>(count, q, b, w, n, scale, bias, N, K, out);
    }
  }
  rows_out<kPlanes, kRows, kBatch>(q, b, w, n, scale, bias, N, K, out);
}

// Rows of a per pass over the weights: each 4 weight rows (4 K bytes) stay in L1 while the
// planes of up to 64 rows stream past them, so a chunk's input projection reads the weights
// from memory about once.
constexpr int64_t kBlockRows = 64;

template <int kPlanes>
void linear_planes(float* out, const Activations& q, int64_t rows, const int8_t* w,
                   const float* scale, const float* bias, int64_t N, int64_t K) {
  constexpr int group = kGroup<kPlanes>;
  if (rows == 1) {   // a step at batch 1: 8 weight rows at a time, 8 independent sums
    at::parallel_for(0, (N + 7) / 8, gemv::grain(8 * K), [&](int64_t o0, int64_t o1) {
      for (int64_t n = o0 * 8; n < std::min(N, o1 * 8); n += 8) {
        if (n + 8 <= N) {
          rows_out<kPlanes, 8, 1>(q, 0, w, n, scale, bias, N, K, out);
        } else {
          for (int64_t r = n; r < N; ++r) {
            rows_out<kPlanes, 1, 1>(q, 0, w, r, scale, bias, N, K, out);
          }
        }
      }
    });
    return;
  }
  for_each_tile(rows, N, K, kBlockRows, group, [&](int64_t b, int64_t size, int64_t n,
                                                  int64_t count) {
    if (count == 4) {
      group_out<kPlanes, 4>(size, q, b, w, n, scale, bias, N, K, out);
    } else {
      for (int64_t r = n; r < n + count; ++r) {
        group_out<kPlanes, 1>(size, q, b, w, r, scale, bias, N, K, out);
      }
    }
  });
}

// quantized::linear for int8 weights with VNNI; false (nothing written) where it does not
// apply: a value of a not finite, or K too large for the int32 sums. planes: 1 or 2 (8- or
// 16-bit activations).
inline bool linear(float* out, const float* a, int64_t rows, const int8_t* w,
                   const float* scale, const float* bias, int64_t N, int64_t K, int planes) {
  if (K > kMaxK) return false;
  static thread_local Activations q;   // reused: a step's call allocates nothing
  if (!quantize(a, rows, K, planes, q)) return false;
  if (q.planes == 2) {
    linear_planes<2>(out, q, rows, w, scale, bias, N, K);
  } else {
    linear_planes<1>(out, q, rows, w, scale, bias, N, K);
  }
  return true;
}

#undef FASTRNN_VNNI
#else
inline bool linear(float*, const float*, int64_t, const int8_t*, const float*, const float*,
                   int64_t, int64_t, int) {
  return false;
}
#endif

}  // namespace vnni

}  // namespace quantized
}  // namespace fastrnn
