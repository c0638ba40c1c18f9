// One time step of the recurrence for ONE live row b, every cell kind: run_row (forward or
// backward, by the step's type) runs the cell's row math (cells.h, CellMath) with the parts
// all cells share here (the recurrent input and its layer norm, the h store, dL/dh, clips,
// zoneout, the projection's pass). Layouts are those of docs/op-contract.md:
//   packed rows: step t owns rows [row, row + rows) of xproj/output/workspace/grad_xproj;
//   row b of a step is sequence b, so the live rows of a step are the first `rows` states.
#pragma once

#include "activations.h"
#include "generated/fastrnn_spec.h"  // generated from fastrnn/spec.py

namespace fastrnn {

// The options of a call as the kernels see them (fields from fastrnn/spec.py). An absent
// per-row option (zoneout) reads a row of zeros (row stride 0) and an absent clip is +inf,
// so every combination runs the same branch-free code; only the specialised options
// (spec.Option.specialised) change its shape, and a call without options skips the rest
// (OptionsOn).
template <typename scalar_t, typename acc_t>
struct StepOptions {
  bool any = false;  // any option at all
#define FASTRNN_TENSOR_FIELD(arg, option, ...) const scalar_t* arg = nullptr;
  FASTRNN_TENSOR_ARGS(FASTRNN_TENSOR_FIELD)  // e.g. ln_weight [G*H], zoneout_h [N, P]
#undef FASTRNN_TENSOR_FIELD
#define FASTRNN_ROW_STRIDE(arg, width) int64_t arg##_stride = 0;  // row r at arg + r * stride
  FASTRNN_ROW_ARGS(FASTRNN_ROW_STRIDE)
#undef FASTRNN_ROW_STRIDE
#define FASTRNN_FLOAT_FIELD(arg, option) acc_t arg = acc_t(0);
  FASTRNN_FLOAT_ARGS(FASTRNN_FLOAT_FIELD)
#undef FASTRNN_FLOAT_FIELD
};

// Where each workspace column group starts in a row (fastrnn/spec.py workspace_layout: the
// cell's own, then those of each option that is on; an absent group: where it would start)
// and the row's width.
struct Columns {
  int64_t width = 0;
#define FASTRNN_COLUMN_FIELD(group) int64_t group = 0;
  FASTRNN_COLUMN_GROUPS(FASTRNN_COLUMN_FIELD)
#undef FASTRNN_COLUMN_FIELD
};

// The options a step has on, as compile-time constants: V::<option> for each specialised
// option (FASTRNN_SPECIALISED: bit k of BITS), `rows` when one needs the row's sums between
// the element phases (the layer norms; on CUDA a block per row), and whether there is any
// option at all. The clips and zoneouts are data; a step without options (ANY false) leaves
// out their arithmetic (clip, clip_mask, zoneout below), which the plain CPU loops would pay
// 2-5% for.
template <unsigned BITS, bool ANY>
struct OptionsOn {
#define FASTRNN_OPTION_BIT(option, bit, arg) static constexpr bool option = (BITS >> bit) & 1u;
  FASTRNN_SPECIALISED(FASTRNN_OPTION_BIT)
#undef FASTRNN_OPTION_BIT
  static constexpr bool any = ANY, rows = (BITS & spec::kWholeRows) != 0;
};
using NoOptions = OptionsOn<0, false>;

template <class V, typename T>
FASTRNN_HD T clip(T x, T limit) {
  return V::any ? clamp_(x, limit) : x;
}

// A clip's limit for cells.h's math, which clamps by value: +inf, a constant the compiler
// folds, in a step without options.
template <class V, typename T>
FASTRNN_HD T clip_limit(T limit) {
  return V::any ? limit : T(INFINITY);
}

// The clip's gradient mask (1 where the clip passes it).
template <class V, typename T>
FASTRNN_HD T clip_mask(T x, T limit) {
  return V::any ? inside_(x, limit) : T(1);
}

// Zoneout's z of element (row r, unit j) of a [N, n] option (stride n, or 0 when absent).
template <class V, typename T, typename S>
FASTRNN_HD T zoneout_z(const S* z, int64_t stride, int64_t r, int64_t j) {
  return V::any ? static_cast<T>(z[r * stride + j]) : T(0);
}

template <class V, typename T>
FASTRNN_HD T zoneout(T z, T x_new, T x_prev) {
  return V::any ? blend_(z, x_new, x_prev) : x_new;
}

template <typename T>
struct RowStats { T mean, rstd; };

// The layer norms' row statistics and backward sums are taken in double on the CPU: a row of
// small variance (rstd up to 1/sqrt(eps) = 316) amplifies their rounding, and a row's few
// sums cost little next to the step's GEMM. CUDA keeps the accumulation type.
#ifdef __CUDACC__
template <typename acc_t>
using stat_t = acc_t;
#else
template <typename acc_t>
using stat_t = double;
#endif

template <typename T>
struct Sums { T a, b; };

// a * b rounded to T, never fused into an FMA with what consumes it. The layer-norm backward
// uses each g = d * w twice, in the row's mean and in g - mean: both must see the same
// rounded g, or (row of one element, or of equal values: rstd up to 1/sqrt(eps) = 316) the
// rounding of g itself shows up 316-fold where the exact result is 0. On the CPU a float g
// is rounded by its conversion to the double statistics (stat_t), and a fused double g
// costs 316 x 1e-16, far below float64's bound, so the plain product keeps the loop
// vectorised there.
template <typename T>
FASTRNN_HD T mul_rounded(T a, T b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == sizeof(double)) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// scalar_t: the tensors' dtype; acc_t: gate math and workspace (float for half types).
template <typename scalar_t, typename acc_t>
struct ForwardStep {
  int64_t H = 0, P = 0, W = 0;  // hidden size, state width (proj or H), workspace width
  int64_t row = 0;              // first packed row of this step
  int64_t ws_first = 0;         // its first workspace row: `row`, or 0 when the workspace is
                                // one step of scratch (a forward that keeps none, inference)
  bool proj = false;            // lstm with w_hr: h goes to hh (then the projection GEMM)
  const scalar_t* xproj = nullptr;   // [N, G*H]
  const scalar_t* hgates = nullptr;  // [B, G*H] h_prev @ w_hh.T of the live rows
  const scalar_t* bias = nullptr;    // [G*H] b_hh (zeros when None)
  scalar_t* h_state = nullptr;       // [B, P] running h: read (gru, zoneout), written
  acc_t* c_state = nullptr;          // [B, H] running c (lstm)
  scalar_t* output = nullptr;        // [N, P]
  acc_t* ws = nullptr;               // [N, W]
  scalar_t* hh = nullptr;            // [B, H] h before the projection (proj only)
  Columns cols;                      // the workspace layout
  StepOptions<scalar_t, acc_t> opt;

  FASTRNN_HD acc_t* ws_row(int64_t b) const { return ws + (ws_first + b) * W; }
};

template <typename scalar_t, typename acc_t>
struct BackwardStep {
  int64_t H = 0, P = 0, W = 0;
  int64_t row = 0;
  int64_t prev_row = 0, prev_rows = 0;  // the step before this one in processing order:
                                        // rows b < prev_rows continue it, the others start
                                        // from the initial state (h0, c0)
  const scalar_t* grad_output = nullptr;  // [N, P] (no proj)
  scalar_t* dh_state = nullptr;  // [B, P] in: dL/dh carried from later steps (no proj);
                                 // out: the direct part of dL/dh_prev (gru's dh * z, zoneout)
  const scalar_t* dhh = nullptr; // [B, H] (proj): dL/dh before the projection, complete
  acc_t* dc_state = nullptr;     // [B, H] (lstm) in: dL/dc from later steps, out: dL/dc_prev
  const acc_t* ws = nullptr;     // [N, W]
  const scalar_t* output = nullptr;  // [N, P]
  const scalar_t* h0 = nullptr;      // [B, P]
  const acc_t* c0 = nullptr;         // [B, H] (lstm; in acc_t)
  scalar_t* grad_xproj = nullptr;    // [N, G*H]
  scalar_t* grad_hgates = nullptr;   // [N, G*H] gradient of h_prev @ w_hh.T + b_hh (gru;
                                     // for lstm/rnn it equals grad_xproj)
  Columns cols;                      // the workspace layout
  StepOptions<scalar_t, acc_t> opt;
  scalar_t* grad_a = nullptr;        // [N, G*H] (layer norm) gradient of h_rec @ w_hh.T
  acc_t* grad_y = nullptr;           // [N, H] (cell layer norm) dL/dy, y = LN(c_new)
  scalar_t* grad_p = nullptr;        // [N, P] (proj) dL/dp, p = h_pre @ w_hr.T
  // grad_<argument> [B, size] of each learnable option argument that is on: per-state sums
  // over the steps (each state's row is only ever updated by the one worker running it),
  // whose column sums are its gradient
#define FASTRNN_ROWS_FIELD(arg, k, ...) acc_t* grad_##arg = nullptr;
  FASTRNN_LEARNABLE_ARGS(FASTRNN_ROWS_FIELD)
#undef FASTRNN_ROWS_FIELD
};

// ------------------------------------------------------------------ rows

// A step runs per ROW: the layer norms need the row's statistics before (forward) or after
// (backward) the element math. `Row` is the device's way of running a row:
//   row.for_each(n, f)   f(j) for j in [0, n), all done (and visible) when it returns;
//   row.sum(n, f), row.sum2(n, f)   sums over j of f(j) (a T, or a Sums<T>), known to all;
//   row.leader()         true for the one worker that stores a row's scalars.
// CPU (recurrence_cpu.cpp): one thread per row, plain loops. CUDA: one block per row with
// layer norms, else a thread per element, each running its row as a OneElement.

// A row reduced to one element j: for steps without layer norms (no sums), where every j is
// independent.
struct OneElement {
  int64_t j;
  template <class F>
  FASTRNN_HD void for_each(int64_t, F&& f) const { f(j); }
};

template <typename T, class Row, class F>
FASTRNN_HD RowStats<T> row_mean_rstd(const Row& row, int64_t n, F&& f) {
  RowStats<T> st;
  st.mean = row.template sum<T>(n, f) / T(n);
  const T var = row.template sum<T>(n, [&](int64_t k) {
    const T d = f(k) - st.mean;
    return d * d;
  }) / T(n);
  st.rstd = rsqrt_(var + T(spec::kLayerNormEps));
  return st;
}

// Statistics of the row's recurrent pre-activation a = h_rec @ w_hh.T; rstd to the workspace.
template <class V, class Row, typename scalar_t, typename acc_t>
FASTRNN_HD RowStats<stat_t<acc_t>> recurrent_norm_stats(const ForwardStep<scalar_t, acc_t>& a,
                                                        int64_t b, int64_t GH, const Row& row) {
  using S = stat_t<acc_t>;
  RowStats<S> st{S(0), S(1)};
  if constexpr (V::layer_norm) {
    const scalar_t* hg = a.hgates + b * GH;
    st = row_mean_rstd<S>(row, GH, [&](int64_t k) {
      return static_cast<S>(hg[k]);
    });
    if (row.leader()) a.ws_row(b)[a.cols.a_hat + GH] = static_cast<acc_t>(st.rstd);
  }
  return st;
}

// hh of gate column k: the (normalised, scaled, shifted) recurrent pre-activation + b_hh.
template <class V, typename scalar_t, typename acc_t>
FASTRNN_HD acc_t recurrent_input(const ForwardStep<scalar_t, acc_t>& a, int64_t b, int64_t GH,
                                 int64_t k, RowStats<stat_t<acc_t>> st) {
  acc_t hh = static_cast<acc_t>(a.hgates[b * GH + k]);
  if constexpr (V::layer_norm) {
    const acc_t hat = static_cast<acc_t>((hh - st.mean) * st.rstd);
    a.ws_row(b)[a.cols.a_hat + k] = hat;
    hh = hat * static_cast<acc_t>(a.opt.ln_weight[k]) + static_cast<acc_t>(a.opt.ln_bias[k]);
  }
  return hh + static_cast<acc_t>(a.bias[k]);
}

// h of row b, unit j, before any projection: kept for the projection GEMM, or zoned out
// (zoneout_h) and stored as the output and the running h.
template <Cell C, class V, typename scalar_t, typename acc_t>
FASTRNN_HD void store_h(const ForwardStep<scalar_t, acc_t>& a, int64_t b, int64_t j, acc_t h) {
  const int64_t H = a.H, r = a.row + b;
  // constexpr: CUDA device code may read the spec's tables only as constants
  constexpr bool can_project = spec::kHasProjection[static_cast<int>(C)];
  if (can_project && a.proj) {
    a.ws_row(b)[a.cols.h_pre + j] = h;
    a.hh[b * H + j] = static_cast<scalar_t>(h);
  } else {
    scalar_t* h_state = a.h_state + b * H + j;
    const acc_t z = zoneout_z<V, acc_t>(a.opt.zoneout_h, a.opt.zoneout_h_stride, r, j);
    const scalar_t h_t = static_cast<scalar_t>(zoneout<V>(z, h, static_cast<acc_t>(*h_state)));
    a.output[r * H + j] = h_t;
    *h_state = h_t;
  }
}

// Each cell kind's row math (cells.h): CellMath<C>::forward_row<V>(a, b, row, st) and
// backward_row<V>(a, b, row), st the statistics of the recurrent layer norm.
template <Cell C>
struct CellMath;

// The forward of row b of a step, every cell kind: the recurrent layer norm's statistics,
// then the cell's row math.
template <Cell C, class V, class Row, typename scalar_t, typename acc_t>
FASTRNN_HD void run_row(const ForwardStep<scalar_t, acc_t>& a, int64_t b, const Row& row) {
  constexpr int64_t G = spec::kNumGates[static_cast<int>(C)];
  CellMath<C>::template forward_row<V>(a, b, row, recurrent_norm_stats<V>(a, b, G * a.H, row));
}


// After the projection GEMM wrote p = h_pre @ w_hr.T into the output rows: keep p (for
// proj_clip's backward), clip, zone out, store output and state. One element (b, j < P).
template <typename scalar_t, typename acc_t>
FASTRNN_HD void projection_element(const ForwardStep<scalar_t, acc_t>& a, int64_t b, int64_t j) {
  const int64_t P = a.P, r = a.row + b;
  const StepOptions<scalar_t, acc_t>& o = a.opt;
  const acc_t p = static_cast<acc_t>(a.output[r * P + j]);
  if (o.proj_clip < acc_t(INFINITY)) a.ws_row(b)[a.cols.p + j] = p;
  scalar_t* h_state = a.h_state + b * P + j;
  const acc_t z = static_cast<acc_t>(o.zoneout_h[r * o.zoneout_h_stride + j]);
  const scalar_t h_t =
      static_cast<scalar_t>(blend_(z, clamp_(p, o.proj_clip), static_cast<acc_t>(*h_state)));
  a.output[r * P + j] = h_t;
  *h_state = h_t;
}

// Backward of the above (before the dL/dh_pre = dp @ w_hr GEMM): dL/dh_t splits into the
// zoned-out part (to h_prev directly, left in dh_state) and dp (to grad_p).
template <typename scalar_t, typename acc_t>
FASTRNN_HD void projection_element(const BackwardStep<scalar_t, acc_t>& a, int64_t b, int64_t j) {
  const int64_t P = a.P, r = a.row + b;
  const StepOptions<scalar_t, acc_t>& o = a.opt;
  scalar_t* dh_state = a.dh_state + b * P + j;
  const acc_t dh_t = static_cast<acc_t>(a.grad_output[r * P + j]) + static_cast<acc_t>(*dh_state);
  const acc_t z = static_cast<acc_t>(o.zoneout_h[r * o.zoneout_h_stride + j]);
  acc_t dp = (acc_t(1) - z) * dh_t;
  if (o.proj_clip < acc_t(INFINITY)) {
    dp = dp * inside_(a.ws[r * a.W + a.cols.p + j], o.proj_clip);
  }
  a.grad_p[r * P + j] = static_cast<scalar_t>(dp);
  *dh_state = static_cast<scalar_t>(z * dh_t);
}

// Layer-norm backward of one row of n values: out(k, rstd * (g(k) - mean(g) - hat[k] *
// mean(g * hat))), with g(k) the gradient of the normalised value times its gain, and the
// row means taken in stat_t.
template <class Row, typename acc_t, class G, class Out>
FASTRNN_HD void layer_norm_backward_row(const Row& row, int64_t n, const acc_t* hat, acc_t rstd,
                                        G&& g, Out&& out) {
  using S = stat_t<acc_t>;
  Sums<S> m = row.template sum2<S>(n, [&](int64_t k) {
    const S gk = g(k);
    return Sums<S>{gk, gk * hat[k]};
  });
  m.a = m.a / S(n);
  m.b = m.b / S(n);
  row.for_each(n, [&](int64_t k) {
    out(k, static_cast<acc_t>(rstd * (g(k) - m.a - hat[k] * m.b)));
  });
}

// Layer-norm backward of the recurrent pre-activation: d_hh (the row's gradient of hh, in
// d_hh_row) -> grad_a = LNback(d_hh * ln_weight, a_hat, rstd).
template <class Row, typename scalar_t, typename acc_t>
FASTRNN_HD void recurrent_norm_backward(const BackwardStep<scalar_t, acc_t>& a, int64_t b,
                                        int64_t GH, const scalar_t* d_hh_row, const Row& row) {
  const int64_t r = a.row + b;
  const acc_t* hat = a.ws + r * a.W + a.cols.a_hat;
  const acc_t rstd = hat[GH];
  const scalar_t* w = a.opt.ln_weight;
  auto g = [&](int64_t k) {
    return mul_rounded(static_cast<acc_t>(d_hh_row[k]), static_cast<acc_t>(w[k]));
  };
  scalar_t* out = a.grad_a + r * GH;
  acc_t* d_weight = a.grad_ln_weight + b * GH;  // the state's sums for ln_weight, ln_bias
  acc_t* d_bias = a.grad_ln_bias + b * GH;
  layer_norm_backward_row(row, GH, hat, rstd, g, [&](int64_t k, acc_t d) {
    out[k] = static_cast<scalar_t>(d);
    const acc_t d_hh = static_cast<acc_t>(d_hh_row[k]);
    d_weight[k] += d_hh * hat[k];
    d_bias[k] += d_hh;
  });
}

// dL/dh of row b, unit j, before the projection (the cell's `dh`), and the part that
// zoneout_h sends straight to h_prev (`direct`, the cell adds its own and stores it).
template <typename T>
struct HGrad { T dh, direct; };

template <Cell C, class V, typename scalar_t, typename acc_t>
FASTRNN_HD HGrad<acc_t> h_grad(const BackwardStep<scalar_t, acc_t>& a, int64_t b, int64_t j) {
  const int64_t H = a.H, r = a.row + b;
  constexpr bool can_project = spec::kHasProjection[static_cast<int>(C)];
  if (can_project && a.dhh != nullptr) {
    return {static_cast<acc_t>(a.dhh[b * H + j]), acc_t(0)};
  }
  const acc_t dh_t =
      static_cast<acc_t>(a.grad_output[r * H + j]) + static_cast<acc_t>(a.dh_state[b * H + j]);
  const acc_t z = zoneout_z<V, acc_t>(a.opt.zoneout_h, a.opt.zoneout_h_stride, r, j);
  return {(acc_t(1) - z) * dh_t, z * dh_t};
}

// The backward of row b of a step, every cell kind: the cell's row math, then the recurrent
// layer norm's backward of its recurrent pre-activation gradient.
template <Cell C, class V, class Row, typename scalar_t, typename acc_t>
FASTRNN_HD void run_row(const BackwardStep<scalar_t, acc_t>& a, int64_t b, const Row& row) {
  CellMath<C>::template backward_row<V>(a, b, row);
  if constexpr (V::layer_norm) {
    constexpr int64_t G = spec::kNumGates[static_cast<int>(C)];
    constexpr bool own_grad = spec::kRecurrentGrad[static_cast<int>(C)];
    scalar_t* d_hh = own_grad ? a.grad_hgates : a.grad_xproj;
    recurrent_norm_backward(a, b, G * a.H, d_hh + (a.row + b) * G * a.H, row);
  }
}

}  // namespace fastrnn
