// The activations and option primitives of the gate math, for ONE element, in the
// accumulation type T (float for float/half/bfloat16, double for double).
//
// Shared verbatim by the CPU loop (recurrence_cpu.cpp) and the CUDA kernels
// (recurrence_cuda.cu), so the CPU tests exercise the math the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTRNN_HD __host__ __device__ __forceinline__
#else
#define FASTRNN_HD inline __attribute__((always_inline))
#endif

namespace fastrnn {

// ------------------------------------------------------------------ activations
// On the GPU: the CUDA math library. On the CPU, float: branch-free versions that the
// compiler can vectorise over j (std::exp/std::tanh calls cannot be), accurate to a few ulp.
// double always uses std:: (float64 parity is 1e-10).

#if !defined(__CUDA_ARCH__)
// exp(x) = 2^n * exp(r), |r| <= ln2/2, Cephes polynomial for exp(r) (about 1 ulp).
inline __attribute__((always_inline)) float cpu_expf(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float round_magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh: the odd Taylor series below |x| = 0.3, else (1 - e) / (1 + e) with e = exp(-2|x|)
// <= 1 (no overflow), the sign put back; both are computed: no branch. fastrnn's Triton tanh
// (_gates.py) is the same. Against float64 tanh, every float32 is within 2.1 ulp; a switch
// lower down costs accuracy, as 1 - e cancels (5.5 ulp at 0.05).
inline __attribute__((always_inline)) float cpu_tanhf(float x) {
  float ax = x < 0.f ? -x : x;
  float x2 = x * x;
  float series = -1382.f / 155925.f;
  series = series * x2 + 62.f / 2835.f;
  series = series * x2 + -17.f / 315.f;
  series = series * x2 + 2.f / 15.f;
  series = series * x2 + -1.f / 3.f;
  series = x + x * x2 * series;
  float e = cpu_expf(-2.f * ax);
  float big = (1.f - e) / (1.f + e);
  big = x < 0.f ? -big : big;
  return ax < 0.3f ? series : big;
}

FASTRNN_HD float exp_(float x) { return cpu_expf(x); }
FASTRNN_HD float tanh_(float x) { return cpu_tanhf(x); }
#else
FASTRNN_HD float exp_(float x) { return expf(x); }
FASTRNN_HD float tanh_(float x) { return tanhf(x); }
#endif
FASTRNN_HD double exp_(double x) { return exp(x); }
FASTRNN_HD double tanh_(double x) { return tanh(x); }

template <typename T>
FASTRNN_HD T sigmoid_(T x) { return T(1) / (T(1) + exp_(-x)); }

template <typename T>
FASTRNN_HD T relu_(T x) { return x > T(0) ? x : T(0); }

// ------------------------------------------------------------------ options
// An absent clip is limit = +inf and an absent zoneout z = 0: one branch-free code path
// serves every combination of options, none included.
template <typename T>
FASTRNN_HD T clamp_(T x, T limit) { return x < -limit ? -limit : (x > limit ? limit : x); }

// 1 where |x| <= limit (the clamp passes the gradient), else 0.
template <typename T>
FASTRNN_HD T inside_(T x, T limit) { return (x < T(0) ? -x : x) <= limit ? T(1) : T(0); }

// Zoneout, exactly this form so that z = 1 keeps the previous state bit for bit.
template <typename T>
FASTRNN_HD T blend_(T z, T x_new, T x_prev) { return (T(1) - z) * x_new + z * x_prev; }

FASTRNN_HD float rsqrt_(float x) {
#if defined(__CUDA_ARCH__)
  return 1.f / sqrtf(x);
#else
  return 1.f / std::sqrt(x);
#endif
}
FASTRNN_HD double rsqrt_(double x) { return 1.0 / sqrt(x); }

}  // namespace fastrnn
