// One layer and direction of an RNN for CPU inference, weights int8 (with per-row scales),
// bfloat16 or float32 (quantized.h: one kernel, the weight type's loads plugged in):
// fastrnn/quantized.py's modules call quantized_layer with reduced-precision weights, the
// native backend's float32 streaming calls (fastrnn/backends/native.py) with the module's
// own float32 weights; in both the input projection (every frame of the chunk at once) and
// the recurrent product of each step read the weights as stored, and a one-frame call is
// one op call. The native backend's bfloat16 inference calls run quantized_recurrence on
// their own input projection. The gate math is cells.h's, in float32. No gradient:
// inference only.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <tuple>

#include "cells.h"
#include "quantized.h"

namespace fastrnn {
namespace {

using at::Tensor;

int num_gates(Cell cell) { return cell == Cell::LSTM ? 4 : cell == Cell::GRU ? 3 : 1; }

Cell cell_named(const std::string& name) {
  if (name == "lstm") return Cell::LSTM;
  if (name == "gru") return Cell::GRU;
  if (name == "rnn_tanh") return Cell::RNN_TANH;
  if (name == "rnn_relu") return Cell::RNN_RELU;
  TORCH_CHECK(false, "fastrnn quantized: unknown cell ", name,
              " (lstm, gru, rnn_tanh or rnn_relu)");
}

// A weight [N, K] (int8 with a float32 scale per row, or bfloat16 or float32 without
// scales) and an optional float32 bias [N].
void check_weight(const char* name, const Tensor& w, const c10::optional<Tensor>& scale,
                  const c10::optional<Tensor>& bias, int64_t N, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.size(0) == N && w.size(1) == K &&
                  w.is_contiguous(),
              "fastrnn quantized: ", name, " must be a contiguous CPU tensor [", N, ", ", K,
              "], got ", w.sizes(), " on ", w.device());
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kFloat &&
                    scale->device().is_cpu() && scale->dim() == 1 && scale->size(0) == N &&
                    scale->is_contiguous(),
                "fastrnn quantized: an int8 ", name, " needs float32 scales [", N, "]");
  } else {
    TORCH_CHECK((w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat) &&
                    !scale.has_value(),
                "fastrnn quantized: ", name, " must be int8 (with scales), bfloat16 or float32 "
                "(without), got ", w.scalar_type(), scale.has_value() ? " with scales" : "");
  }
  TORCH_CHECK(!bias.has_value() ||
                  (bias->scalar_type() == at::kFloat && bias->device().is_cpu() &&
                   bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous()),
              "fastrnn quantized: the bias of ", name, " must be a float32 CPU tensor [", N,
              "]");
}

// out [rows, N] = a [rows, K] @ w.T (scaled) + bias, on raw rows (no view made: each
// tensor op costs a one-frame call microseconds with cold caches). With int8 weights on a
// CPU with VNNI the rows of a are quantized to activation_bits (8 or 16) first (quantized.h's
// vnni).
void linear(float* out, const float* a, int64_t rows, const Tensor& w,
            const c10::optional<Tensor>& scale, const c10::optional<Tensor>& bias,
            int64_t activation_bits) {
  const float* s = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t N = w.size(0), K = w.size(1);
  if (w.scalar_type() == at::kChar) {
    if (quantized::vnni::enabled() &&
        quantized::vnni::linear(out, a, rows, w.data_ptr<int8_t>(), s, b, N, K,
                                activation_bits == 16 ? 2 : 1)) {
      return;
    }
    quantized::linear(out, a, rows, w.data_ptr<int8_t>(), s, b, N, K);
  } else if (w.scalar_type() == at::kBFloat16) {
    quantized::linear(out, a, rows, w.data_ptr<at::BFloat16>(), s, b, N, K);
  } else {
    quantized::linear(out, a, rows, w.data_ptr<float>(), s, b, N, K);
  }
}

// A float32 CPU tensor, made without the dispatcher's round trip (at::empty's: microseconds of
// a one-frame call with cold caches, four times a call).
Tensor empty_float(c10::IntArrayRef sizes) {
  return Tensor(at::detail::empty_cpu(sizes, at::kFloat, /*pin_memory=*/false, c10::nullopt));
}

// A new tensor of ``sizes`` holding t's values (t contiguous or not): the state the loop
// updates in place. A copy by memcpy where t is contiguous (clone() would set up a
// TensorIterator: microseconds of a one-frame call).
Tensor fresh_copy(const Tensor& t) {
  Tensor copy = empty_float(t.sizes());
  if (t.is_contiguous()) {
    if (t.numel() > 0) std::memcpy(copy.data_ptr<float>(), t.data_ptr<float>(), t.nbytes());
  } else {
    copy.copy_(t);
  }
  return copy;
}

// The pointwise pass of one step for row b: gates from the two projections, the new state.
template <Cell kCell>
void step_row(const float* xp, const float* hp, float* h, float* c, float* out, int64_t H) {
#pragma GCC ivdep
  for (int64_t j = 0; j < H; ++j) {
    if constexpr (kCell == Cell::LSTM) {
      const LSTMGates<float> g = lstm_forward(xp[j] + hp[j], xp[H + j] + hp[H + j],
                                              xp[2 * H + j] + hp[2 * H + j], c[j]);
      c[j] = g.c;
      h[j] = sigmoid_(xp[3 * H + j] + hp[3 * H + j]) * tanh_(g.c);
    } else if constexpr (kCell == Cell::GRU) {
      h[j] = gru_forward(xp[j], xp[H + j], xp[2 * H + j], hp[j], hp[H + j], hp[2 * H + j],
                         h[j]).h;
    } else {
      h[j] = rnn_forward(kCell, xp[j] + hp[j]);
    }
    out[j] = h[j];
  }
}

void check_activation_bits(int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 16, "fastrnn quantized: activation_bits must be 8 or 16, "
              "got ", bits);
}

// h0 (and c0) [batch, hidden], or [1, batch, hidden]: a one-layer module's state as given,
// which spares its call a select before and an unsqueeze after (each a tensor op costing
// microseconds with cold caches); h_n and c_n come back in the same shape.
void check_state(const Tensor& h0, const c10::optional<Tensor>& c0, Cell cell) {
  TORCH_CHECK(h0.device().is_cpu() && h0.scalar_type() == at::kFloat &&
                  (h0.dim() == 2 || (h0.dim() == 3 && h0.size(0) == 1)),
              "fastrnn quantized: h0 must be a float32 CPU tensor [batch, hidden] (or [1, "
              "batch, hidden]), got ",
              h0.scalar_type(), " ", h0.sizes());
  TORCH_CHECK(c0.has_value() == (cell == Cell::LSTM),
              "fastrnn quantized: c0 must be given for lstm and only for lstm");
  if (c0.has_value()) {
    TORCH_CHECK(c0->device().is_cpu() && c0->scalar_type() == at::kFloat &&
                    c0->sizes() == h0.sizes(),
                "fastrnn quantized: c0 must be a float32 CPU tensor like h0 ", h0.sizes(),
                ", got ", c0->scalar_type(), " ", c0->sizes());
  }
}

// The time loop on the input projection xproj [T * B, G] (time-major rows, float32): per
// step the recurrent product of the state with w_hh, then the gate math per row. Returns
// (output [T * B, H], h_n and c_n shaped like h0 (c_n [0] without c0)).
// ``output``: [T * B, H] (or any shape of as many values), filled here; ``scratch``: at
// least B * G floats for each step's recurrent product.
std::tuple<Tensor, Tensor, Tensor> recurrence(Cell cell, const float* xp, Tensor output,
                                              float* scratch, const Tensor& h0,
                                              const c10::optional<Tensor>& c0,
                                              const Tensor& w_hh,
                                              const c10::optional<Tensor>& s_hh,
                                              const c10::optional<Tensor>& b_hh, bool reverse,
                                              int64_t activation_bits) {
  const int64_t B = h0.size(-2), H = h0.size(-1), G = num_gates(cell) * H;
  const int64_t T = B > 0 && H > 0 ? output.numel() / (B * H) : 0;
  Tensor h = fresh_copy(h0);
  Tensor c = c0.has_value() ? fresh_copy(*c0) : empty_float({0});
  if (T == 0) return {output, h, c};
  float* hp = scratch;
  float* hs = h.data_ptr<float>();   // the state as the product's [B, H] rows
  float* cs = c0.has_value() ? c.data_ptr<float>() : nullptr;
  float* out = output.data_ptr<float>();
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    if (G > 0) linear(hp, hs, B, w_hh, s_hh, b_hh, activation_bits);
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = xp + (t * B + b) * G;
      const float* hr = hp + b * G;
      float* o = out + (t * B + b) * H;
      switch (cell) {
        case Cell::LSTM: step_row<Cell::LSTM>(xr, hr, hs + b * H, cs + b * H, o, H); break;
        case Cell::GRU: step_row<Cell::GRU>(xr, hr, hs + b * H, nullptr, o, H); break;
        case Cell::RNN_TANH: step_row<Cell::RNN_TANH>(xr, hr, hs + b * H, nullptr, o, H); break;
        case Cell::RNN_RELU: step_row<Cell::RNN_RELU>(xr, hr, hs + b * H, nullptr, o, H); break;
      }
    }
  }
  return {output, h, c};
}

// x [T, B, I] float32 -> (output [T, B, H], h_n and c_n shaped like h0 (c_n [0] without
// c0)). reverse runs the frames last to first (the backward direction of a bidirectional
// layer).
std::tuple<Tensor, Tensor, Tensor> quantized_layer(
    const std::string& cell_name, const Tensor& x, const Tensor& h0,
    const c10::optional<Tensor>& c0, const Tensor& w_ih, const c10::optional<Tensor>& s_ih,
    const Tensor& w_hh, const c10::optional<Tensor>& s_hh, const c10::optional<Tensor>& b_ih,
    const c10::optional<Tensor>& b_hh, bool reverse, int64_t activation_bits) {
  const Cell cell = cell_named(cell_name);
  check_activation_bits(activation_bits);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3,
              "fastrnn quantized: the input must be a float32 CPU tensor [T, batch, input], "
              "got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  check_state(h0, c0, cell);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(-1);
  const int64_t G = num_gates(cell) * H;
  TORCH_CHECK(h0.size(-2) == B, "fastrnn quantized: h0 must have ", B, " rows, got ",
              h0.sizes());
  check_weight("w_ih", w_ih, s_ih, b_ih, G, I);
  check_weight("w_hh", w_hh, s_hh, b_hh, G, H);
  // One scratch buffer: the chunk's input projection [T * B, G], then a step's recurrent
  // product [B, G].
  Tensor scratch = empty_float({(T + 1) * B * G});
  float* xproj = scratch.data_ptr<float>();
  if (T * B > 0 && G > 0) {
    const Tensor rows = x.contiguous();
    linear(xproj, rows.data_ptr<float>(), T * B, w_ih, s_ih, b_ih, activation_bits);
  }
  return recurrence(cell, xproj, empty_float({T, B, H}), xproj + T * B * G, h0, c0,
                    w_hh, s_hh, b_hh, reverse, activation_bits);
}

// The recurrence alone, on a given input projection xproj [T * batch, gates] (float32):
// the native backend's bfloat16 inference calls (fastrnn/backends/native.py).
std::tuple<Tensor, Tensor, Tensor> quantized_recurrence(
    const std::string& cell_name, const Tensor& xproj, const Tensor& h0,
    const c10::optional<Tensor>& c0, const Tensor& w_hh, const c10::optional<Tensor>& s_hh,
    const c10::optional<Tensor>& b_hh, bool reverse, int64_t activation_bits) {
  const Cell cell = cell_named(cell_name);
  check_activation_bits(activation_bits);
  check_state(h0, c0, cell);
  const int64_t B = h0.size(-2), H = h0.size(-1), G = num_gates(cell) * H;
  TORCH_CHECK(xproj.device().is_cpu() && xproj.scalar_type() == at::kFloat &&
                  xproj.dim() == 2 && xproj.size(1) == G && xproj.is_contiguous() &&
                  (B > 0 ? xproj.size(0) % B == 0 : xproj.size(0) == 0),
              "fastrnn quantized: xproj must be a contiguous float32 CPU tensor [steps * ", B,
              ", ", G, "], got ", xproj.scalar_type(), " ", xproj.sizes());
  check_weight("w_hh", w_hh, s_hh, b_hh, G, H);
  Tensor scratch = empty_float({B * G});
  return recurrence(cell, xproj.data_ptr<float>(), empty_float({xproj.size(0), H}),
                    scratch.data_ptr<float>(), h0, c0, w_hh, s_hh, b_hh, reverse,
                    activation_bits);
}

// Whether int8 products run on integer dot products (quantized.h's vnni), with the
// activations quantized to activation_bits: the tests' truth reproduces that.
bool quantized_int8_vnni() { return quantized::vnni::enabled(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrnn, m) {
  m.def("quantized_int8_vnni() -> bool", &quantized_int8_vnni);   // no tensor: catch-all
  m.def(
      "quantized_layer(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor? s_ih, "
      "Tensor w_hh, Tensor? s_hh, Tensor? b_ih, Tensor? b_hh, bool reverse, "
      "int activation_bits=8) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "quantized_recurrence(str cell, Tensor xproj, Tensor h0, Tensor? c0, Tensor w_hh, "
      "Tensor? s_hh, Tensor? b_hh, bool reverse, int activation_bits=8) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("quantized_layer", &quantized_layer);
  m.impl("quantized_recurrence", &quantized_recurrence);
}

}  // namespace fastrnn

// The layer ops as plain Python functions of the extension module (fastrnn/build.py
// python_module): a streaming call that needs nothing of the dispatcher (no gradient, trace,
// mode, transform or profiler; fastrnn/backends/native.py run_layer decides) calls them
// directly, sparing the boxed op call's ~20 us of a one-frame call with cold caches. The
// GIL is released while the kernel runs, as the op call does. Every argument is positional
// (activation_bits too: no defaults here).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using Release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("quantized_layer", &fastrnn::quantized_layer, Release());
  m.def("quantized_recurrence", &fastrnn::quantized_recurrence, Release());
}
