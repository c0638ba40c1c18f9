// Each cell kind's math: the gate functions of ONE element (row b, unit j), forward and
// backward, and its row math, CellMath<Cell::...>, which step.h's generic row calls through
// the compile-time Cell; the options every cell shares are step.h's (recurrent_input,
// store_h, h_grad, clips, zoneout). Shared verbatim by the CPU loop (recurrence_cpu.cpp) and
// the CUDA kernels (recurrence_cuda.cu), written for the accumulation type T (float for
// float/half/bfloat16, double for double). The formulas match fastrnn/backends/reference.py.
#pragma once

#include "step.h"  // the generic step; activations.h, generated/fastrnn_spec.h (the Cell enum)

namespace fastrnn {

// ------------------------------------------------------------------ LSTM
// Gates (i, f, g, o); c = f * c_prev + i * g; h = o * tanh(y), y = c after the options
// (cell clip, cell layer norm), which is why the step computes h. The o gate comes after c:
// the peephole makes its pre-activation depend on the new cell state (below).
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


// The options that act inside the lstm's cell (cell_clip, zoneout_c, layer_norm_cell,
// peephole) are lstm math: they are here and nowhere else in C++.

// A peephole connection (Gers and Schmidhuber 2000): a gate's pre-activation x plus p[k] * c,
// p[k] its diagonal weight, c the cell state it sees (i, f: the previous one; o: the new one,
// after the cell clip); x without peepholes. Its backward has the same form: dL/dc gains
// p[k] * d_pre.
template <class V, typename T, typename S>
FASTRNN_HD T peephole(T x, const S* p, int64_t k, T c) {
  return V::peephole ? x + static_cast<T>(p[k]) * c : x;
}

// Phase 1 of an lstm row, element j: gates, cell clip, zoneout of c, and h unless the cell
// layer norm must see the whole row first. (The element bodies are function objects, not
// lambdas: GCC always inlines these into the CPU row loop, which must happen for the loop to
// be vectorised; it declined to inline the equivalent lambdas.)
template <class V, typename scalar_t, typename acc_t>
struct LSTMForwardElement {
  ForwardStep<scalar_t, acc_t> a;  // a copy: nothing the loop stores can alias its fields
  int64_t b;
  RowStats<stat_t<acc_t>> st;

  FASTRNN_HD void operator()(int64_t j) const {
    const int64_t H = a.H, GH = 4 * H, r = a.row + b;
    const StepOptions<scalar_t, acc_t>& o = a.opt;
    acc_t* ws = a.ws_row(b);
    const scalar_t* x = a.xproj + r * GH + j;
    acc_t* c = a.c_state + b * H + j;
    const acc_t c_prev = *c;
    const LSTMGates<acc_t> s = lstm_forward<acc_t>(
        peephole<V>(static_cast<acc_t>(x[0]) + recurrent_input<V>(a, b, GH, j, st),
                    o.peephole, j, c_prev),
        peephole<V>(static_cast<acc_t>(x[H]) + recurrent_input<V>(a, b, GH, H + j, st),
                    o.peephole, H + j, c_prev),
        static_cast<acc_t>(x[2 * H]) + recurrent_input<V>(a, b, GH, 2 * H + j, st), c_prev);
    const acc_t c_new = clip<V>(s.c, o.cell_clip);
    const acc_t o_gate = sigmoid_(
        peephole<V>(static_cast<acc_t>(x[3 * H]) + recurrent_input<V>(a, b, GH, 3 * H + j, st),
                    o.peephole, 2 * H + j, c_new));
    const acc_t zc = zoneout_z<V, acc_t>(o.zoneout_c, o.zoneout_c_stride, r, j);
    const acc_t c_t = zoneout<V>(zc, c_new, c_prev);
    ws[j] = s.i;
    ws[H + j] = s.f;
    ws[2 * H + j] = s.g;
    ws[3 * H + j] = o_gate;
    ws[a.cols.c + j] = c_t;
    *c = c_t;
    if constexpr (V::layer_norm_cell) {
      ws[a.cols.c_hat + j] = c_new;  // normalised in place by the next phase
    } else {
      store_h<Cell::LSTM, V>(a, b, j, o_gate * tanh_(c_new));
    }
  }
};

// An lstm row's backward, element j, in two parts: `operator()` takes dL/dh back through
// h = o * tanh(y) (and zoneout of h), `finish` takes dL/dc_new through the cell clip to the
// gates i, f, g and dL/dc_prev (and zoneout of c). With the cell layer norm, dL/dy goes to
// grad_y and the row's layer-norm backward calls `finish` once it has the row's sums. With
// peepholes, `finish` adds d_o's path to c: there it reads d_o back from grad_xproj's o
// column (exact where scalar_t is acc_t: every CPU dtype).
template <class V, typename scalar_t, typename acc_t>
struct LSTMBackwardElement {
  BackwardStep<scalar_t, acc_t> a;  // a copy, as in LSTMForwardElement
  int64_t b;
  const acc_t* c_prev_row;  // [H] c before this step

  FASTRNN_HD void operator()(int64_t j) const {
    const int64_t H = a.H, r = a.row + b;
    const StepOptions<scalar_t, acc_t>& o = a.opt;
    const acc_t* ws = a.ws + r * a.W;
    const HGrad<acc_t> hg = h_grad<Cell::LSTM, V>(a, b, j);
    if (V::any && a.dhh == nullptr) a.dh_state[b * H + j] = static_cast<scalar_t>(hg.direct);
    acc_t y;
    if constexpr (V::layer_norm_cell) {
      y = ws[a.cols.c_hat + j] * static_cast<acc_t>(o.ln_c_weight[j]) +
          static_cast<acc_t>(o.ln_c_bias[j]);
    } else {
      y = clip<V>(ws[H + j] * c_prev_row[j] + ws[j] * ws[2 * H + j], o.cell_clip);
    }
    const LSTMOutputGrads<acc_t> d =
        lstm_backward_output(hg.dh, ws[3 * H + j], y, clip_limit<V>(o.grad_clip));
    a.grad_xproj[r * 4 * H + 3 * H + j] = static_cast<scalar_t>(d.do_);
    if constexpr (V::layer_norm_cell) {
      a.grad_y[r * H + j] = d.dy;
    } else {
      finish(j, d.dy, d.do_);
    }
  }

  // dc_y: dL/dc_new through y (and h); adds the carried part and masks by the clip. d_o:
  // the o gate's gradient (read with peepholes only).
  FASTRNN_HD void finish(int64_t j, acc_t dc_y, acc_t d_o) const {
    const int64_t H = a.H, r = a.row + b;
    const StepOptions<scalar_t, acc_t>& o = a.opt;
    const acc_t* ws = a.ws + r * a.W;
    const acc_t i = ws[j], f = ws[H + j], g = ws[2 * H + j], c_prev = c_prev_row[j];
    acc_t* dc_state = a.dc_state + b * H + j;
    const acc_t dc_t = *dc_state;
    const acc_t zc = zoneout_z<V, acc_t>(o.zoneout_c, o.zoneout_c_stride, r, j);
    const acc_t c_raw = f * c_prev + i * g;
    const acc_t dc = peephole<V>((acc_t(1) - zc) * dc_t + dc_y, o.peephole, 2 * H + j, d_o) *
                     clip_mask<V>(c_raw, o.cell_clip);
    const LSTMGrads<acc_t> d = lstm_backward(dc, i, f, g, c_prev, clip_limit<V>(o.grad_clip));
    scalar_t* gx = a.grad_xproj + r * 4 * H;
    gx[j] = static_cast<scalar_t>(d.di);
    gx[H + j] = static_cast<scalar_t>(d.df);
    gx[2 * H + j] = static_cast<scalar_t>(d.dg);
    const acc_t dc_prev =
        peephole<V>(peephole<V>(d.dc_prev, o.peephole, j, d.di), o.peephole, H + j, d.df);
    *dc_state = V::any ? dc_prev + zc * dc_t : dc_prev;
    if constexpr (V::peephole) {
      acc_t* gp = a.grad_peephole + b * 3 * H;
      gp[j] += d.di * c_prev;
      gp[H + j] += d.df * c_prev;
      gp[2 * H + j] += d_o * clip<V>(c_raw, o.cell_clip);
    }
  }
};

template <>
struct CellMath<Cell::LSTM> {
  template <class V, class Row, typename scalar_t, typename acc_t>
  static FASTRNN_HD void forward_row(const ForwardStep<scalar_t, acc_t>& a, int64_t b,
                                     const Row& row, RowStats<stat_t<acc_t>> st) {
    const int64_t H = a.H;
    const StepOptions<scalar_t, acc_t>& o = a.opt;
    acc_t* ws = a.ws_row(b);
    row.for_each(H, LSTMForwardElement<V, scalar_t, acc_t>{a, b, st});
    if constexpr (V::layer_norm_cell) {
      using S = stat_t<acc_t>;
      const RowStats<S> sc = row_mean_rstd<S>(row, H, [&](int64_t j) {
        return static_cast<S>(ws[a.cols.c_hat + j]);
      });
      if (row.leader()) ws[a.cols.c_hat + H] = static_cast<acc_t>(sc.rstd);
      row.for_each(H, [&](int64_t j) {
        const acc_t hat = static_cast<acc_t>((ws[a.cols.c_hat + j] - sc.mean) * sc.rstd);
        ws[a.cols.c_hat + j] = hat;
        const acc_t y = hat * static_cast<acc_t>(o.ln_c_weight[j]) +
                        static_cast<acc_t>(o.ln_c_bias[j]);
        store_h<Cell::LSTM, V>(a, b, j, ws[3 * H + j] * tanh_(y));
      });
    }
  }

  template <class V, class Row, typename scalar_t, typename acc_t>
  static FASTRNN_HD void backward_row(const BackwardStep<scalar_t, acc_t>& a, int64_t b,
                                      const Row& row) {
    const int64_t H = a.H, r = a.row + b;
    const acc_t* c_prev_row = b < a.prev_rows ? a.ws + (a.prev_row + b) * a.W + a.cols.c
                                              : a.c0 + b * H;
    const LSTMBackwardElement<V, scalar_t, acc_t> element{a, b, c_prev_row};
    row.for_each(H, element);
    if constexpr (V::layer_norm_cell) {
      const StepOptions<scalar_t, acc_t>& o = a.opt;
      const acc_t* hat = a.ws + r * a.W + a.cols.c_hat;
      const acc_t* dy = a.grad_y + r * H;
      auto g = [&](int64_t j) {
        return mul_rounded(dy[j], static_cast<acc_t>(o.ln_c_weight[j]));
      };
      acc_t* d_weight = a.grad_ln_c_weight + b * H;  // the state's sums of ln_c_weight, ln_c_bias
      acc_t* d_bias = a.grad_ln_c_bias + b * H;
      const scalar_t* d_o = a.grad_xproj + r * 4 * H + 3 * H;
      layer_norm_backward_row(row, H, hat, hat[H], g, [&](int64_t j, acc_t dc_y) {
        element.finish(j, dc_y, V::peephole ? static_cast<acc_t>(d_o[j]) : acc_t(0));
        d_weight[j] += dy[j] * hat[j];
        d_bias[j] += dy[j];
      });
    }
  }
};

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

template <class V, typename scalar_t, typename acc_t>
struct GRUForwardElement {
  ForwardStep<scalar_t, acc_t> a;
  int64_t b;
  RowStats<stat_t<acc_t>> st;

  FASTRNN_HD void operator()(int64_t j) const {
    const int64_t H = a.H, GH = 3 * H, r = a.row + b;
    acc_t* ws = a.ws_row(b);
    const scalar_t* x = a.xproj + r * GH + j;
    const GRUGates<acc_t> s = gru_forward<acc_t>(
        static_cast<acc_t>(x[0]), static_cast<acc_t>(x[H]), static_cast<acc_t>(x[2 * H]),
        recurrent_input<V>(a, b, GH, j, st), recurrent_input<V>(a, b, GH, H + j, st),
        recurrent_input<V>(a, b, GH, 2 * H + j, st), static_cast<acc_t>(a.h_state[b * H + j]));
    ws[j] = s.r;
    ws[H + j] = s.z;
    ws[2 * H + j] = s.n;
    ws[3 * H + j] = s.hn;
    store_h<Cell::GRU, V>(a, b, j, s.h);
  }
};

template <class V, typename scalar_t, typename acc_t>
struct GRUBackwardElement {
  BackwardStep<scalar_t, acc_t> a;
  int64_t b;
  const scalar_t* h_prev_row;  // [H] h before this step

  FASTRNN_HD void operator()(int64_t j) const {
    const int64_t H = a.H, GH = 3 * H, r = a.row + b;
    const acc_t* ws = a.ws + r * a.W;
    scalar_t* gx = a.grad_xproj + r * GH;
    scalar_t* gh = a.grad_hgates + r * GH;
    const HGrad<acc_t> hg = h_grad<Cell::GRU, V>(a, b, j);
    const GRUGrads<acc_t> d = gru_backward<acc_t>(
        hg.dh, ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j],
        static_cast<acc_t>(h_prev_row[j]), clip_limit<V>(a.opt.grad_clip));
    gx[j] = gh[j] = static_cast<scalar_t>(d.dx_r);
    gx[H + j] = gh[H + j] = static_cast<scalar_t>(d.dx_z);
    gx[2 * H + j] = static_cast<scalar_t>(d.dx_n);
    gh[2 * H + j] = static_cast<scalar_t>(d.dhh_n);
    a.dh_state[b * H + j] =
        static_cast<scalar_t>(V::any ? d.dh_prev_direct + hg.direct : d.dh_prev_direct);
  }
};

template <>
struct CellMath<Cell::GRU> {
  template <class V, class Row, typename scalar_t, typename acc_t>
  static FASTRNN_HD void forward_row(const ForwardStep<scalar_t, acc_t>& a, int64_t b,
                                     const Row& row, RowStats<stat_t<acc_t>> st) {
    row.for_each(a.H, GRUForwardElement<V, scalar_t, acc_t>{a, b, st});
  }

  template <class V, class Row, typename scalar_t, typename acc_t>
  static FASTRNN_HD void backward_row(const BackwardStep<scalar_t, acc_t>& a, int64_t b,
                                      const Row& row) {
    const scalar_t* h_prev_row =
        b < a.prev_rows ? a.output + (a.prev_row + b) * a.H : a.h0 + b * a.H;
    row.for_each(a.H, GRUBackwardElement<V, scalar_t, acc_t>{a, b, h_prev_row});
  }
};

// ------------------------------------------------------------------ Elman RNN
template <typename T>
FASTRNN_HD T rnn_forward(Cell cell, T pre) { return cell == Cell::RNN_TANH ? tanh_(pre) : relu_(pre); }

// The derivative is read off the output h.
template <typename T>
FASTRNN_HD T rnn_backward(Cell cell, T dh, T h) {
  return cell == Cell::RNN_TANH ? dh * (T(1) - h * h) : (h > T(0) ? dh : T(0));
}


template <Cell C, class V, typename scalar_t, typename acc_t>
struct ElmanForwardElement {
  ForwardStep<scalar_t, acc_t> a;
  int64_t b;
  RowStats<stat_t<acc_t>> st;

  FASTRNN_HD void operator()(int64_t j) const {
    const acc_t x = static_cast<acc_t>(a.xproj[(a.row + b) * a.H + j]);
    store_h<C, V>(a, b, j, rnn_forward<acc_t>(C, x + recurrent_input<V>(a, b, a.H, j, st)));
  }
};

template <Cell C, class V, typename scalar_t, typename acc_t>
struct ElmanBackwardElement {
  BackwardStep<scalar_t, acc_t> a;
  int64_t b;

  FASTRNN_HD void operator()(int64_t j) const {
    const int64_t r = a.row + b;
    const acc_t h = static_cast<acc_t>(a.output[r * a.H + j]);
    a.grad_xproj[r * a.H + j] =
        static_cast<scalar_t>(rnn_backward<acc_t>(C, h_grad<C, V>(a, b, j).dh, h));
  }
};

template <Cell C>
struct ElmanMath {
  template <class V, class Row, typename scalar_t, typename acc_t>
  static FASTRNN_HD void forward_row(const ForwardStep<scalar_t, acc_t>& a, int64_t b,
                                     const Row& row, RowStats<stat_t<acc_t>> st) {
    row.for_each(a.H, ElmanForwardElement<C, V, scalar_t, acc_t>{a, b, st});
  }

  template <class V, class Row, typename scalar_t, typename acc_t>
  static FASTRNN_HD void backward_row(const BackwardStep<scalar_t, acc_t>& a, int64_t b,
                                      const Row& row) {
    row.for_each(a.H, ElmanBackwardElement<C, V, scalar_t, acc_t>{a, b});
  }
};

template <> struct CellMath<Cell::RNN_TANH> : ElmanMath<Cell::RNN_TANH> {};
template <> struct CellMath<Cell::RNN_RELU> : ElmanMath<Cell::RNN_RELU> {};

}  // namespace fastrnn
