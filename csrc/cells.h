// Gate math of every cell kind, forward and backward, for ONE element (row b, unit j).
//
// Shared verbatim by the CPU loop (recurrence_cpu.cpp) and the CUDA kernels
// (recurrence_cuda.cu), so the CPU tests exercise the math the GPU runs. Everything here is
// written for the accumulation type T (float for float/half/bfloat16, double for double).
// The formulas match fastrnn/backends/reference.py (the spec) line by line.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "generated/fastrnn_spec.h"  // the Cell enum; generated from fastrnn/spec.py

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
#endif

FASTRNN_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return cpu_expf(x);
#endif
}
FASTRNN_HD double exp_(double x) { return exp(x); }

FASTRNN_HD float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return cpu_tanhf(x);
#endif
}
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

// ------------------------------------------------------------------ LSTM
// Gates (i, f, g, o); c = f * c_prev + i * g; h = o * tanh(y), y = c after the options
// (cell clip, cell layer norm), which is why the step computes h. The o gate comes after c:
// an option may make its pre-activation depend on the new cell state (step.h).
template <typename T>
struct LSTMGates { T i, f, g, c; };

template <typename T>
FASTRNN_HD LSTMGates<T> lstm_forward(T pre_i, T pre_f, T pre_g, T c_prev) {
  LSTMGates<T> s;
  s.i = sigmoid_(pre_i);
  s.f = sigmoid_(pre_f);
  s.g = tanh_(pre_g);
  s.c = s.f * c_prev + s.i * s.g;
  return s;
}

// Backward of h = o * tanh(y) for dh = dL/dh (before projection): the o gate's
// pre-activation gradient, clamped to +-clip (grad_clip), and dL/dy.
template <typename T>
struct LSTMOutputGrads { T do_, dy; };

template <typename T>
FASTRNN_HD LSTMOutputGrads<T> lstm_backward_output(T dh, T o, T y, T clip) {
  const T tanh_y = tanh_(y);
  return {clamp_(dh * tanh_y * o * (T(1) - o), clip), dh * o * (T(1) - tanh_y * tanh_y)};
}

// Backward of c = f * c_prev + i * g for dc = dL/dc: the gates' pre-activation gradients,
// clamped to +-clip, and dc * f (dL/dc_prev, less zoneout's direct part).
template <typename T>
struct LSTMGrads { T di, df, dg, dc_prev; };

template <typename T>
FASTRNN_HD LSTMGrads<T> lstm_backward(T dc, T i, T f, T g, T c_prev, T clip) {
  LSTMGrads<T> d;
  d.di = clamp_(dc * g * i * (T(1) - i), clip);
  d.df = clamp_(dc * c_prev * f * (T(1) - f), clip);
  d.dg = clamp_(dc * i * (T(1) - g * g), clip);
  d.dc_prev = dc * f;
  return d;
}

// ------------------------------------------------------------------ GRU
// r = s(x_r + hh_r), z = s(x_z + hh_z), n = tanh(x_n + r * hh_n), h = (1 - z) n + z h_prev,
// with hh = h_prev @ w_hh.T + b_hh; hh_n is kept in the workspace.
template <typename T>
struct GRUGates { T r, z, n, hn, h; };

template <typename T>
FASTRNN_HD GRUGates<T> gru_forward(T x_r, T x_z, T x_n, T hh_r, T hh_z, T hh_n, T h_prev) {
  GRUGates<T> s;
  s.r = sigmoid_(x_r + hh_r);
  s.z = sigmoid_(x_z + hh_z);
  s.hn = hh_n;
  s.n = tanh_(x_n + s.r * hh_n);
  s.h = (T(1) - s.z) * s.n + s.z * h_prev;
  return s;
}

// d_x*: gradient of the input projection, clamped to +-clip (grad_clip); d_hh_n: of hh_n
// (d_hh_r/z equal d_x_r/z); dh_prev_direct: the part of dL/dh_prev not through w_hh.
template <typename T>
struct GRUGrads { T dx_r, dx_z, dx_n, dhh_n, dh_prev_direct; };

template <typename T>
FASTRNN_HD GRUGrads<T> gru_backward(T dh, T r, T z, T n, T hn, T h_prev, T clip) {
  GRUGrads<T> d;
  d.dx_n = clamp_(dh * (T(1) - z) * (T(1) - n * n), clip);
  d.dx_r = clamp_(d.dx_n * hn * r * (T(1) - r), clip);
  d.dx_z = clamp_(dh * (h_prev - n) * z * (T(1) - z), clip);
  d.dhh_n = d.dx_n * r;
  d.dh_prev_direct = dh * z;
  return d;
}

// ------------------------------------------------------------------ Elman RNN
template <typename T>
FASTRNN_HD T rnn_forward(Cell cell, T pre) { return cell == Cell::RNN_TANH ? tanh_(pre) : relu_(pre); }

// The derivative is read off the output h.
template <typename T>
FASTRNN_HD T rnn_backward(Cell cell, T dh, T h) {
  return cell == Cell::RNN_TANH ? dh * (T(1) - h * h) : (h > T(0) ? dh : T(0));
}

}  // namespace fastrnn
