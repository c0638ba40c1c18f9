// Matrix-vector products for the per-step GEMM of the CPU recurrence at a small batch
// (recurrence_cpu.cpp: CpuGemm). With one to a few rows the step is bound by reading the
// weight: these read it from its stored layout, once per step, and need no per-call
// preparation (packing a 4 MB w_hh for MKL's packed GEMM cost more than a whole step).
//
// Both forms sum in an order fixed by the sizes alone (not by the thread split), so a step
// gives the same bits whether it runs alone or inside a longer sequence.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace fastrnn {
namespace gemv {

// The most rows the products serve: the streaming batches (a few rows share each weight
// read). Above it CpuGemm keeps MKL's packed GEMM, whose per-call packing a larger batch
// amortises.
constexpr int64_t kMaxRows = 8;

// Weight elements per task: a thread's share must outweigh the fork/join.
inline int64_t grain(int64_t per_unit) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_unit));
}

// 64 bytes of T in one vector (GCC/Clang vector extension): one AVX-512 register, two AVX2 ones.
template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
};

// Dot products of kRows weight rows (each K contiguous elements, ld apart) with x: one vector
// of partial sums per row, kept in registers, then the tail and a pairwise reduction.
template <int kRows, typename T>
inline void dot_rows(const T* x, const T* w, int64_t ld, int64_t K, T* result) {
  using V = Vec64<T>;
  constexpr int kLanes = V::kLanes;
  typename V::type acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = typename V::type{};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    const typename V::type xv = V::load(x + k);
    for (int r = 0; r < kRows; ++r) acc[r] += xv * V::load(w + r * ld + k);
  }
  for (int r = 0; r < kRows; ++r) {
    T lane[kLanes];
    std::memcpy(lane, &acc[r], sizeof(lane));
    for (int64_t j = k, l = 0; j < K; ++j, ++l) lane[l] += x[j] * w[r * ld + j];
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
    }
    result[r] = lane[0];
  }
}

// out[b, n] (+)= sum_k a[b, k] * w[n * ld + k]: w holds the product's columns as rows (w_hh
// itself in the forward, out = h @ w_hh.T). Four weight rows at a time share the loads of a;
// the rows of a reuse the four weight rows from L1.
template <typename T>
void by_rows(T* out, const T* a, int64_t rows, const T* w, int64_t ld, int64_t N, int64_t K,
             bool accumulate) {
  at::parallel_for(0, (N + 3) / 4, grain(4 * K), [&](int64_t q0, int64_t q1) {
    for (int64_t n = q0 * 4; n < std::min(N, q1 * 4); n += 4) {
      const int64_t count = std::min<int64_t>(4, N - n);
      for (int64_t b = 0; b < rows; ++b) {
        T result[4];
        if (count == 4) {
          dot_rows<4>(a + b * K, w + n * ld, ld, K, result);
        } else {
          for (int64_t r = 0; r < count; ++r) {
            dot_rows<1>(a + b * K, w + (n + r) * ld, ld, K, result + r);
          }
        }
        T* o = out + b * N + n;
        for (int64_t r = 0; r < count; ++r) o[r] = accumulate ? o[r] + result[r] : result[r];
      }
    }
  });
}

// out[b, :] (+)= sum_k a[b, k] * w[k * ld + :]: w row-major [K, N] (w_hh in the backward,
// dL/dh = d(gates) @ w_hh). Each task owns a slice of columns and sweeps k in order.
template <typename T>
void by_columns(T* out, const T* a, int64_t rows, const T* w, int64_t ld, int64_t N, int64_t K,
                bool accumulate) {
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    for (int64_t b = 0; b < rows; ++b) {
      T* o = out + b * N;
      if (!accumulate) std::fill(o + n0, o + n1, T(0));
    }
    for (int64_t k = 0; k < K; ++k) {
      const T* wk = w + k * ld;
      for (int64_t b = 0; b < rows; ++b) {
        const T s = a[b * K + k];
        T* o = out + b * N;
#pragma GCC ivdep
        for (int64_t n = n0; n < n1; ++n) o[n] += s * wk[n];
      }
    }
  });
}

}  // namespace gemv
}  // namespace fastrnn
