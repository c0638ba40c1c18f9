// Products with reduced-precision weights for CPU inference (fastrnn/quantized.py): the
// weight is int8 with one float32 scale per row (symmetric, w ~= scale[n] * q[n, :]) or
// bfloat16; activations and sums stay float32. A streaming step is bound by reading the
// weight, so a quarter (int8) or half (bfloat16) of the float32 bytes is that much less time.
//
// Each output element sums in an order fixed by K alone (16 lanes over k, the tail, then a
// pairwise reduction), whatever the number of rows or the thread split: a frame gives the
// same bits alone or inside a longer chunk.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
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

inline float widen_one(int8_t w) { return static_cast<float>(w); }
inline float widen_one(at::BFloat16 w) { return static_cast<float>(w); }

// result[b * kRows + r] = sum_k a[b * lda + k] * w[r * ldw + k] for kBatch rows of a and
// kRows weight rows: the weights are widened once and used by every row of a.
template <int kRows, int kBatch, typename W>
inline void dot_block(const float* a, int64_t lda, const W* w, int64_t ldw, int64_t K,
                      float* result) {
  Floats::type acc[kBatch][kRows];
  for (int b = 0; b < kBatch; ++b) {
    for (int r = 0; r < kRows; ++r) acc[b][r] = Floats::type{};
  }
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Floats::type wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = widen(w + r * ldw + k);
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
// weights stream through once per block.
constexpr int64_t kBlockRows = 8;

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
                     int64_t K, float* result) {
  if constexpr (kBatch > 1) {
    if (rows < kBatch) return dot_rows<kRows, W, kBatch - 1>(rows, a, lda, w, ldw, K, result);
  }
  dot_block<kRows, kBatch>(a, lda, w, ldw, K, result);
}

// out[b, n] = scale[n] * sum_k a[b, k] * w[n, k] + bias[n], for `rows` rows of a ([rows, K])
// and w [N, K] row-major; scale and bias may be null (1 and 0). Four weight rows at a time,
// up to kGroup rows of a at a time.
template <typename W>
void linear(float* out, const float* a, int64_t rows, const W* w, const float* scale,
            const float* bias, int64_t N, int64_t K) {
  at::parallel_for(0, (N + 3) / 4, gemv::grain(4 * K), [&](int64_t q0, int64_t q1) {
    for (int64_t b0 = 0; b0 < rows; b0 += kBlockRows) {
      const int64_t b1 = std::min(rows, b0 + kBlockRows);
      for (int64_t n = q0 * 4; n < std::min(N, q1 * 4); n += 4) {
        const int64_t count = std::min<int64_t>(4, N - n);
        for (int64_t b = b0; b < b1; b += kGroup) {
          const int64_t group = std::min<int64_t>(kGroup, b1 - b);
          float result[4 * kGroup];
          const float* ab = a + b * K;
          const W* wn = w + n * K;
          if (count == 4) {
            dot_rows<4>(group, ab, K, wn, K, K, result);
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
        }
      }
    }
  });
}

}  // namespace quantized
}  // namespace fastrnn
