// One time step of the recurrence for ONE element (live row b, hidden unit j): loads, the
// gate math of cells.h, stores. The CPU loop calls these for every j of a row; the CUDA
// kernels call them once per thread. Layouts are those of fastrnn/ops.py:
//   packed rows: step t owns rows [row, row + rows) of xproj/output/workspace/grad_xproj;
//   row b of a step is sequence b, so the live rows of a step are the first `rows` states.
#pragma once

#include "cells.h"

namespace fastrnn {

// scalar_t: the tensors' dtype; acc_t: gate math and workspace (float for half types).
template <typename scalar_t, typename acc_t>
struct ForwardStep {
  int64_t H = 0, P = 0, W = 0;  // hidden size, state width (proj or H), workspace width
  int64_t row = 0;              // first packed row of this step
  bool proj = false;            // lstm with w_hr: h goes to hh (then the projection GEMM)
  const scalar_t* xproj = nullptr;   // [N, G*H]
  const scalar_t* hgates = nullptr;  // [B, G*H] h_prev @ w_hh.T of the live rows
  const scalar_t* bias = nullptr;    // [G*H] b_hh (zeros when None)
  scalar_t* h_state = nullptr;       // [B, P] running h: read (gru), written (no proj)
  acc_t* c_state = nullptr;          // [B, H] running c (lstm)
  scalar_t* output = nullptr;        // [N, P]
  acc_t* ws = nullptr;               // [N, W]
  scalar_t* hh = nullptr;            // [B, H] h before the projection (proj only)
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
                                 // out (gru): the direct part dh * z of dL/dh_prev
  const scalar_t* dhh = nullptr; // [B, H] (proj): dL/dh before the projection, complete
  acc_t* dc_state = nullptr;     // [B, H] (lstm) in: dL/dc from later steps, out: dL/dc_prev
  const acc_t* ws = nullptr;     // [N, W]
  const scalar_t* output = nullptr;  // [N, P]
  const scalar_t* h0 = nullptr;      // [B, P]
  const acc_t* c0 = nullptr;         // [B, H] (lstm; in acc_t)
  scalar_t* grad_xproj = nullptr;    // [N, G*H]
  scalar_t* grad_hgates = nullptr;   // [N, G*H] gradient of h_prev @ w_hh.T + b_hh (gru;
                                     // for lstm/rnn it equals grad_xproj)
};

template <typename scalar_t, typename acc_t>
FASTRNN_HD void forward_element(Cell cell, const ForwardStep<scalar_t, acc_t>& a, int64_t b,
                                int64_t j) {
  const int64_t H = a.H, r = a.row + b;
  if (cell == Cell::LSTM) {
    const scalar_t* x = a.xproj + r * 4 * H + j;
    const scalar_t* hg = a.hgates + b * 4 * H + j;
    const scalar_t* bias = a.bias + j;
    auto pre = [&](int k) {
      return static_cast<acc_t>(x[k * H]) + static_cast<acc_t>(hg[k * H]) +
             static_cast<acc_t>(bias[k * H]);
    };
    acc_t* c = a.c_state + b * H + j;
    LSTMGates<acc_t> s = lstm_forward<acc_t>(pre(0), pre(1), pre(2), pre(3), *c);
    acc_t* ws = a.ws + r * a.W + j;
    ws[0] = s.i;
    ws[H] = s.f;
    ws[2 * H] = s.g;
    ws[3 * H] = s.o;
    ws[4 * H] = s.c;
    *c = s.c;
    if (a.proj) {
      ws[5 * H] = s.h;
      a.hh[b * H + j] = static_cast<scalar_t>(s.h);
    } else {
      a.output[r * H + j] = static_cast<scalar_t>(s.h);
      a.h_state[b * H + j] = static_cast<scalar_t>(s.h);
    }
  } else if (cell == Cell::GRU) {
    const scalar_t* x = a.xproj + r * 3 * H + j;
    const scalar_t* hg = a.hgates + b * 3 * H + j;
    const scalar_t* bias = a.bias + j;
    auto hh = [&](int k) { return static_cast<acc_t>(hg[k * H]) + static_cast<acc_t>(bias[k * H]); };
    scalar_t* h = a.h_state + b * H + j;
    GRUGates<acc_t> s = gru_forward<acc_t>(static_cast<acc_t>(x[0]), static_cast<acc_t>(x[H]),
                                           static_cast<acc_t>(x[2 * H]), hh(0), hh(1), hh(2),
                                           static_cast<acc_t>(*h));
    acc_t* ws = a.ws + r * a.W + j;
    ws[0] = s.r;
    ws[H] = s.z;
    ws[2 * H] = s.n;
    ws[3 * H] = s.hn;
    a.output[r * H + j] = static_cast<scalar_t>(s.h);
    *h = static_cast<scalar_t>(s.h);
  } else {
    acc_t pre = static_cast<acc_t>(a.xproj[r * H + j]) +
                static_cast<acc_t>(a.hgates[b * H + j]) + static_cast<acc_t>(a.bias[j]);
    scalar_t h = static_cast<scalar_t>(rnn_forward<acc_t>(cell, pre));
    a.output[r * H + j] = h;
    a.h_state[b * H + j] = h;
  }
}

template <typename scalar_t, typename acc_t>
FASTRNN_HD void backward_element(Cell cell, const BackwardStep<scalar_t, acc_t>& a, int64_t b,
                                 int64_t j) {
  const int64_t H = a.H, r = a.row + b;
  const bool continues = b < a.prev_rows;  // else this sequence starts at this step
  acc_t dh = a.dhh != nullptr
                 ? static_cast<acc_t>(a.dhh[b * H + j])
                 : static_cast<acc_t>(a.grad_output[r * a.P + j]) +
                       static_cast<acc_t>(a.dh_state[b * a.P + j]);
  if (cell == Cell::LSTM) {
    const acc_t* ws = a.ws + r * a.W + j;
    acc_t c_prev = continues ? a.ws[(a.prev_row + b) * a.W + 4 * H + j] : a.c0[b * H + j];
    acc_t* dc = a.dc_state + b * H + j;
    LSTMGrads<acc_t> d = lstm_backward<acc_t>(dh, *dc, ws[0], ws[H], ws[2 * H], ws[3 * H],
                                              ws[4 * H], c_prev);
    scalar_t* g = a.grad_xproj + r * 4 * H + j;
    g[0] = static_cast<scalar_t>(d.di);
    g[H] = static_cast<scalar_t>(d.df);
    g[2 * H] = static_cast<scalar_t>(d.dg);
    g[3 * H] = static_cast<scalar_t>(d.do_);
    *dc = d.dc_prev;
  } else if (cell == Cell::GRU) {
    const acc_t* ws = a.ws + r * a.W + j;
    acc_t h_prev = static_cast<acc_t>(continues ? a.output[(a.prev_row + b) * H + j]
                                                : a.h0[b * H + j]);
    GRUGrads<acc_t> d = gru_backward<acc_t>(dh, ws[0], ws[H], ws[2 * H], ws[3 * H], h_prev);
    scalar_t* gx = a.grad_xproj + r * 3 * H + j;
    scalar_t* gh = a.grad_hgates + r * 3 * H + j;
    gx[0] = gh[0] = static_cast<scalar_t>(d.dx_r);
    gx[H] = gh[H] = static_cast<scalar_t>(d.dx_z);
    gx[2 * H] = static_cast<scalar_t>(d.dx_n);
    gh[2 * H] = static_cast<scalar_t>(d.dhh_n);
    a.dh_state[b * H + j] = static_cast<scalar_t>(d.dh_prev_direct);
  } else {
    acc_t h = static_cast<acc_t>(a.output[r * H + j]);
    a.grad_xproj[r * H + j] = static_cast<scalar_t>(rnn_backward<acc_t>(cell, dh, h));
  }
}

}  // namespace fastrnn
