// The generic time loop, forward and backward, for every cell kind and device.
//
// Per step: ONE GEMM of the live hidden states with w_hh (at::mm_out into preallocated
// buffers; on CUDA it runs on the current stream) and ONE fused pointwise pass (step.h),
// supplied by the device policy `Dev` (recurrence_cpu.cpp: at::parallel_for over rows;
// recurrence_cuda.cu: one kernel). Backward runs the steps in reverse and accumulates the
// weight gradients as single GEMMs over all steps at the end.
//
// The options (lstm/gru; fastrnn/spec.py) are small pieces of the same loop: the recurrent
// mask multiplies h before the GEMM (and dL/dh_rec after it), the pointwise pass applies
// clips and zoneout as data and the layer norms in extra row phases (step.h), a projection
// pass follows the w_hr GEMM when proj_clip / zoneout_h need it, and the layer-norm
// parameter gradients are column sums at the end.
//
// Rows depend on no other row (the per-step GEMMs too), so the device may split the states
// into blocks that each run through every step on their own (Dev::row_blocks: on the CPU one
// per thread, with no synchronisation between steps).
//
// Dev provides:
//   template <class F> static void row_blocks(int64_t rows, bool uniform, F f);  // f(b0, b1)
//       per block of states covering [0, rows) (OneRowBlock below: one block)
//   static void step(Cell, const ForwardStep& or const BackwardStep&, int64_t rows);
//       (step.h's run_row for every live row)
//   static void projection_step(const ForwardStep& or const BackwardStep&, int64_t rows);
//       (step.h's projection_element for every live row and column)
//   static void check_dtype(at::ScalarType);       // clear error for dtypes it lacks
//   template <class F> static void dispatch(at::ScalarType, F f);  // f(scalar_t{}) per dtype
//   using Gemm = ...;  // out[rows, N] (+)= a[rows, K] @ w[K, N] with w fixed for the call
//                      // (MmGemm below, or one that prepares w once, e.g. packs it)
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/DeviceGuard.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "generated/fastrnn_spec.h"  // generated from fastrnn/spec.py by fastrnn/build.py
#include "scratch.h"
#include "cells.h"  // and step.h, generated/fastrnn_spec.h

namespace fastrnn {

using at::Tensor;

// The generated header's macros test whether an option argument is given with these.
namespace spec {
inline bool is_on(const Tensor& t) { return t.defined(); }
inline bool is_on(const c10::optional<double>& v) { return v.has_value(); }
}  // namespace spec

inline Cell parse_cell(c10::string_view name) {
  for (int id = 0; id < spec::kNumCells; ++id) {
    if (name == spec::kCellNames[id]) return static_cast<Cell>(id);
  }
  TORCH_CHECK(false, "fastrnn native: unknown cell '", std::string(name),
              "'; expected one of ", spec::kCellList);
}

// Calls body(std::integral_constant<Cell, c>) so the cell is a compile-time constant inside.
template <class Body>
void with_cell(Cell cell, Body&& body) {
  switch (cell) {
#define FASTRNN_CELL_CASE(CELL) \
    case Cell::CELL: body(std::integral_constant<Cell, Cell::CELL>()); break;
    FASTRNN_CELLS(FASTRNN_CELL_CASE)
#undef FASTRNN_CELL_CASE
  }
}

// Calls f(std::integral_constant<unsigned, bits>) with the run-time `bits` (below 1 << N, the
// bits from K on) as a compile-time constant.
template <unsigned BITS, int K, int N, class F>
void with_bits(unsigned bits, F&& f) {
  if constexpr (K == N) {
    f(std::integral_constant<unsigned, BITS>());
  } else if ((bits >> K) & 1u) {
    with_bits<BITS | (1u << K), K + 1, N>(bits, f);
  } else {
    with_bits<BITS, K + 1, N>(bits, f);
  }
}

// Calls body(cell, OptionsOn<bits, any>()) with the cell and the specialised options it has on
// as compile-time constants (a cell's bits are only those of its options: the Elman cells
// have none).
template <typename scalar_t, typename acc_t, class Body>
void with_step(Cell cell, const StepOptions<scalar_t, acc_t>& o, Body&& body) {
  unsigned bits = 0;
#define FASTRNN_OPTION_BIT(option, bit, arg) bits |= (o.arg != nullptr ? 1u : 0u) << bit;
  FASTRNN_SPECIALISED(FASTRNN_OPTION_BIT)
#undef FASTRNN_OPTION_BIT
  with_cell(cell, [&](auto c) {
    constexpr int k = static_cast<int>(decltype(c)::value);
    if (!o.any) return body(c, NoOptions());
    with_bits<0, 0, FASTRNN_NUM_SPECIALISED>(bits, [&](auto on) {
      body(c, OptionsOn<decltype(on)::value & spec::kSpecialisedOfCell[k],
                        spec::kCellTakesOptions[k]>());
    });
  });
}

inline int64_t num_gates(Cell cell) { return spec::kNumGates[static_cast<int>(cell)]; }

// A cell's entry of one of the spec's per-cell tables (spec::kHasCellState, ...).
inline bool of_cell(const bool* table, Cell cell) { return table[static_cast<int>(cell)]; }

// The options of a call (fastrnn/spec.py): the trailing arguments of the ops.
struct Options {
  FASTRNN_OPTION_FIELDS

  bool any() const { return FASTRNN_ANY_OPTION(*this); }
};

inline Options make_options(FASTRNN_OPTION_PARAMS) {
  auto get = [](const c10::optional<Tensor>& t) {
    return t.has_value() && t->defined() ? t->contiguous() : Tensor();
  };
  Options o;
  FASTRNN_OPTION_ASSIGN(o, get)
  return o;
}

// The workspace layout of a call (step.h Columns).
inline Columns workspace_columns(Cell cell, int64_t H, int64_t P, bool proj,
                                 const Options& o = Options()) {
  const int id = static_cast<int>(cell);
  const int64_t G = num_gates(cell);
  Columns c;
#define FASTRNN_COLUMN_NAME(group) {#group, &c.group},
  const std::pair<const char*, int64_t*> named[] = {FASTRNN_COLUMN_GROUPS(FASTRNN_COLUMN_NAME)};
#undef FASTRNN_COLUMN_NAME
  for (const spec::ColumnGroup& g : spec::kColumnGroups) {
    if (g.cell != id && g.option < 0) continue;  // another cell's own columns
    for (const auto& name : named) {
      if (std::string(g.name) == name.first) *name.second = c.width;
    }
    const bool on = g.cell == id || FASTRNN_OPTION_ON(o, g.option);
    if (on && (proj || !g.projected)) c.width += g.h * H + g.gh * G * H + g.p * P + g.one;
  }
  return c;
}

// Steps in packed time-major order (docs/op-contract.md): sizes[t] live rows starting at
// offsets[t]; `order` lists the steps in processing order (T-1 .. 0 when reverse).
struct Layout {
  std::vector<int64_t> sizes, offsets, order;
  bool uniform = true;  // every step has all the rows (not a packed batch of varying lengths)
};

inline Layout make_layout(int64_t N, int64_t B, const c10::optional<Tensor>& batch_sizes,
                          bool reverse) {
  Layout l;
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.device().is_cpu() && bs.scalar_type() == at::kLong,
                "fastrnn native: batch_sizes must be a 1-D CPU int64 tensor, got ",
                bs.sizes(), " ", bs.scalar_type(), " on ", bs.device());
    auto acc = bs.accessor<int64_t, 1>();
    int64_t total = 0;
    for (int64_t t = 0; t < bs.size(0); ++t) {
      int64_t s = acc[t];
      TORCH_CHECK(s > 0 && s <= (t == 0 ? B : l.sizes.back()),
                  "fastrnn native: batch_sizes must be positive and non-increasing with "
                  "batch_sizes[0] == batch (", B, "); got ", s, " at step ", t);
      l.sizes.push_back(s);
      total += s;
    }
    TORCH_CHECK(l.sizes.empty() || l.sizes[0] == B, "fastrnn native: batch_sizes[0] (",
                l.sizes.empty() ? 0 : l.sizes[0], ") must equal the batch size of h0 (", B, ")");
    TORCH_CHECK(total == N, "fastrnn native: sum(batch_sizes) = ", total,
                " but xproj has ", N, " rows");
  } else {
    TORCH_CHECK(B > 0 ? N % B == 0 : N == 0, "fastrnn native: xproj has ", N,
                " rows, not a multiple of the batch size ", B);
    l.sizes.assign(B > 0 ? N / B : 0, B);
  }
  const int64_t T = static_cast<int64_t>(l.sizes.size());
  for (int64_t size : l.sizes) l.uniform = l.uniform && size == B;
  l.offsets.resize(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) l.offsets[t + 1] = l.offsets[t] + l.sizes[t];
  for (int64_t k = 0; k < T; ++k) l.order.push_back(reverse ? T - 1 - k : k);
  return l;
}

// Outputs and scratch buffers, from the pool of scratch.h on the CPU (their memory stays
// faulted in between calls). FASTRNN_NATIVE_POISON=1 fills them with NaN first, so a test
// catches every element a kernel forgets to write (or reads before writing).
inline Tensor new_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = BufferPool::get().empty(sizes, options);
  const char* poison = std::getenv("FASTRNN_NATIVE_POISON");
  if (poison != nullptr && poison[0] != '\0' && poison[0] != '0') {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

// A new buffer holding a copy of `t` (converted to the buffer's dtype), or zeros without it.
inline Tensor new_copy(at::IntArrayRef sizes, const at::TensorOptions& options, const Tensor& t) {
  Tensor out = new_buffer(sizes, options);
  return t.defined() ? out.copy_(t) : out.zero_();
}

inline Tensor defined_or_empty(const c10::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

// Dev::row_blocks(rows, uniform, f): calls f(b0, b1) for blocks of states that together cover
// [0, rows), each running through every step (rows depend on no other row). This default runs
// them as one block; `uniform`: every step has all the rows.
struct OneRowBlock {
  template <class F>
  static void row_blocks(int64_t rows, bool /*uniform*/, F&& f) {
    f(int64_t(0), rows);
  }
};

// The per-step GEMM with a weight that stays the same for the whole call: a plain at::mm_out.
// A device policy may substitute a Gemm that prepares `w` once per call instead.
class MmGemm {
 public:
  MmGemm(const Tensor& w, int64_t /*max_rows*/) : w_(w) {}
  // out = a @ w, or out += a @ w when accumulate.
  void operator()(Tensor& out, const Tensor& a, bool accumulate = false) const {
    if (accumulate) {
      out.addmm_(a, w_);
    } else {
      at::mm_out(out, a, w_);
    }
  }

 private:
  Tensor w_;
};

struct Shapes {
  Cell cell;
  int64_t G, H, P, B, N, W;
  bool proj;
  bool has_c;  // the cell carries a cell state c (c0, c_n)
  Columns cols;
};

// The options' shapes and values (fastrnn/spec.py); the modules have checked them already,
// this is for direct callers of the ops.
inline void check_options(const Shapes& s, const Options& o, const Tensor& like) {
  if (!o.any()) return;
  const int64_t G = s.G, H = s.H, B = s.B, P = s.P, N = s.N;  // the shape rules' sizes
  const int id = static_cast<int>(s.cell);
  auto check_cell = [&](bool given, int option, const char* name) {
    TORCH_CHECK(!given || (spec::kOptionCells[option] >> id) & 1u, "fastrnn native: ", name,
                " is not an option of ", spec::kCellNames[id], " (", spec::kOptionsOfCells, ")");
  };
  auto check = [&](const Tensor& t, const char* name, std::vector<int64_t> shape) {
    if (!t.defined()) return;
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "fastrnn native: ", name, " must be ",
                at::IntArrayRef(shape), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(),
                "fastrnn native: ", name, " must have the dtype and device of xproj (",
                like.scalar_type(), ", ", like.device(), "), got ", t.scalar_type(), " on ",
                t.device());
  };
#define FASTRNN_CHECK_TENSOR(arg, option, ...)      \
  check_cell(o.arg.defined(), option, #arg);        \
  check(o.arg, #arg, {__VA_ARGS__});
  FASTRNN_TENSOR_ARGS(FASTRNN_CHECK_TENSOR)
#undef FASTRNN_CHECK_TENSOR
#define FASTRNN_CHECK_FLOAT(arg, option)                                                   \
  check_cell(o.arg.has_value(), option, #arg);                                             \
  TORCH_CHECK(!o.arg.has_value() || *o.arg > 0, "fastrnn native: " #arg                   \
              " must be a positive number or None, got ", o.arg.value_or(0));
  FASTRNN_FLOAT_ARGS(FASTRNN_CHECK_FLOAT)
#undef FASTRNN_CHECK_FLOAT
#define FASTRNN_CHECK_TOGETHER(names, together) \
  TORCH_CHECK(together, "fastrnn native: " names " come together (both or neither)");
  FASTRNN_ARGS_TOGETHER(FASTRNN_CHECK_TOGETHER, o)
#undef FASTRNN_CHECK_TOGETHER
#define FASTRNN_CHECK_PROJECTION(arg) \
  TORCH_CHECK(!spec::is_on(o.arg) || s.proj, "fastrnn native: " #arg " needs a projection (w_hr)");
  FASTRNN_NEEDS_PROJECTION(FASTRNN_CHECK_PROJECTION)
#undef FASTRNN_CHECK_PROJECTION
}

// Shapes of the op (docs/op-contract.md); `rows`/`cols` are those of xproj (in backward: N
// and the implied G*H). All tensors share the dtype and device of `like`.
inline Shapes check_shapes(c10::string_view cell_name, int64_t rows, int64_t cols,
                           const Tensor& like, const Tensor& h0,
                           const c10::optional<Tensor>& c0_in, const Tensor& w_hh,
                           const c10::optional<Tensor>& b_hh_in,
                           const c10::optional<Tensor>& w_hr_in, const Options& options) {
  const Tensor c0 = defined_or_empty(c0_in), b_hh = defined_or_empty(b_hh_in);
  const Tensor w_hr = defined_or_empty(w_hr_in);
  Shapes s;
  s.cell = parse_cell(cell_name);
  s.G = num_gates(s.cell);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % s.G == 0, "fastrnn native: w_hh must be [",
              s.G, "*hidden, state], got ", w_hh.sizes());
  s.H = w_hh.size(0) / s.G;
  s.P = w_hh.size(1);
  s.proj = w_hr.defined();
  TORCH_CHECK(of_cell(spec::kHasProjection, s.cell) || !s.proj, "fastrnn native: only ",
              spec::kProjectingCells, " takes w_hr");
  TORCH_CHECK(s.proj ? (w_hr.dim() == 2 && w_hr.size(0) == s.P && w_hr.size(1) == s.H)
                     : s.P == s.H,
              "fastrnn native: w_hh ", w_hh.sizes(), " and w_hr ",
              s.proj ? w_hr.sizes() : at::IntArrayRef{}, " do not fit hidden size ", s.H);
  TORCH_CHECK(cols == s.G * s.H, "fastrnn native: xproj must be [N, ", s.G * s.H, "], got [",
              rows, ", ", cols, "]");
  s.N = rows;
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == s.P, "fastrnn native: h0 must be [batch, ", s.P,
              "], got ", h0.sizes());
  s.B = h0.size(0);
  s.has_c = of_cell(spec::kHasCellState, s.cell);
  if (s.has_c) {
    TORCH_CHECK(c0.defined() && c0.dim() == 2 && c0.size(0) == s.B && c0.size(1) == s.H,
                "fastrnn native: ", cell_name, " needs c0 [", s.B, ", ", s.H, "]");
  }
  TORCH_CHECK(!b_hh.defined() || (b_hh.dim() == 1 && b_hh.size(0) == s.G * s.H),
              "fastrnn native: b_hh must be [", s.G * s.H, "]");
  for (const Tensor* t : {&h0, &c0, &w_hh, &b_hh, &w_hr}) {
    TORCH_CHECK(!t->defined() || (t->scalar_type() == like.scalar_type() &&
                                  t->device() == like.device()),
                "fastrnn native: all tensors must have the dtype and device of xproj (",
                like.scalar_type(), ", ", like.device(), "), got ", t->scalar_type(),
                " on ", t->device());
  }
  check_options(s, options, like);
  s.cols = workspace_columns(s.cell, s.H, s.P, s.proj, options);
  s.W = s.cols.width;
  return s;
}

// The data of `t` from row `row` on, or null where `t` is absent.
template <typename T>
T* row_ptr(const Tensor& t, int64_t row = 0) {
  return t.defined() ? t.data_ptr<T>() + row * t.stride(0) : nullptr;
}

// The fields every step shares: the sizes, the workspace layout and the kernels' view of the
// options. `zeros` (at least max(H, P) zeros) stands in for an absent zoneout, +inf for an
// absent clip: the step code has no per-option branches.
template <template <typename, typename> class Step, typename scalar_t, typename acc_t>
void set_shared(Step<scalar_t, acc_t>& step, const Shapes& s, const Options& o,
                const Tensor& zeros) {
  step.H = s.H;
  step.P = s.P;
  step.W = s.W;
  step.cols = s.cols;
  StepOptions<scalar_t, acc_t>& so = step.opt;
  so.any = o.any();
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t H = s.H, P = s.P;  // the per-row options' widths
#define FASTRNN_TENSOR_POINTER(arg, ...) so.arg = row_ptr<scalar_t>(o.arg);
  FASTRNN_TENSOR_ARGS(FASTRNN_TENSOR_POINTER)
#undef FASTRNN_TENSOR_POINTER
#define FASTRNN_ROW_POINTER(arg, width) \
  so.arg = row_ptr<scalar_t>(o.arg.defined() ? o.arg : zeros); \
  so.arg##_stride = o.arg.defined() ? (width) : 0;
  FASTRNN_ROW_ARGS(FASTRNN_ROW_POINTER)
#undef FASTRNN_ROW_POINTER
#define FASTRNN_FLOAT_VALUE(arg, option) \
  so.arg = o.arg.has_value() ? static_cast<acc_t>(*o.arg) : inf;
  FASTRNN_FLOAT_ARGS(FASTRNN_FLOAT_VALUE)
#undef FASTRNN_FLOAT_VALUE
}

template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor> recurrence_forward(
    c10::string_view cell_name, const Tensor& xproj_in, const Tensor& h0_in,
    const c10::optional<Tensor>& c0_in, const Tensor& w_hh_in,
    const c10::optional<Tensor>& b_hh_in, const c10::optional<Tensor>& w_hr_in,
    const c10::optional<Tensor>& batch_sizes, bool reverse, FASTRNN_OPTION_PARAMS,
    bool need_workspace) {
  c10::OptionalDeviceGuard guard(at::device_of(xproj_in));
  TORCH_CHECK(xproj_in.dim() == 2, "fastrnn native: xproj must be 2-D [N, G*hidden], got ",
              xproj_in.sizes());
  const Options opt = make_options(FASTRNN_OPTION_ARGS);
  const Shapes s = check_shapes(cell_name, xproj_in.size(0), xproj_in.size(1), xproj_in, h0_in,
                                c0_in, w_hh_in, b_hh_in, w_hr_in, opt);
  Dev::check_dtype(xproj_in.scalar_type());
  const Layout layout = make_layout(s.N, s.B, batch_sizes, reverse);
  const auto dtype = xproj_in.scalar_type();
  const auto acc_dtype = at::toOpMathType(dtype);
  const auto opts = xproj_in.options();
  const auto acc_opts = opts.dtype(acc_dtype);

  const Tensor xproj = xproj_in.contiguous();
  const Tensor w_hh_t = w_hh_in.t();
  const Tensor bias = b_hh_in.has_value() ? b_hh_in->contiguous() : at::zeros({s.G * s.H}, opts);
  const Tensor w_hr_t = s.proj ? w_hr_in->t() : Tensor();

  Tensor output = new_buffer({s.N, s.P}, opts);
  // Without backward to feed (need_workspace false) the workspace is one step of scratch,
  // reused by every step, and an empty [0, W] is returned.
  Tensor workspace = new_buffer({need_workspace ? s.N : std::min(s.N, s.B), s.W}, acc_opts);
  Tensor h_state = new_copy({s.B, s.P}, opts, h0_in);  // running h; ends as h_n
  Tensor c_state = s.has_c ? new_copy({s.B, s.H}, acc_opts, *c0_in) : Tensor();
  Tensor hgates = new_buffer({s.B, s.G * s.H}, opts);
  Tensor hh = s.proj ? new_buffer({s.B, s.H}, opts) : Tensor();
  const bool mask = opt.recurrent_mask.defined();
  Tensor h_rec = mask ? new_buffer({s.B, s.P}, opts) : Tensor();  // h * recurrent_mask
  const Tensor zeros = at::zeros({std::max(s.H, s.P)}, opts);
  // The projected rows need a pass of their own only for the options that act on them
  // (spec Option.on_projection: proj_clip, zoneout_h).
  const bool projection_pass = s.proj && FASTRNN_ON_PROJECTION(opt);

  Dev::dispatch(dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    using acc_t = at::opmath_type<scalar_t>;
    ForwardStep<scalar_t, acc_t> all;
    set_shared(all, s, opt, zeros);
    all.proj = s.proj;
    all.xproj = xproj.data_ptr<scalar_t>();
    all.bias = bias.data_ptr<scalar_t>();
    all.output = output.data_ptr<scalar_t>();
    all.ws = workspace.data_ptr<acc_t>();
    // States b0 .. b1-1 through every step; their pointers start at row b0.
    Dev::row_blocks(s.B, layout.uniform, [&](int64_t b0, int64_t b1) {
      const typename Dev::Gemm recurrent_gemm(w_hh_t, b1 - b0);
      ForwardStep<scalar_t, acc_t> a = all;
      a.hgates = row_ptr<scalar_t>(hgates, b0);
      a.h_state = row_ptr<scalar_t>(h_state, b0);
      a.c_state = row_ptr<acc_t>(c_state, b0);
      a.hh = row_ptr<scalar_t>(hh, b0);
      for (int64_t t : layout.order) {
        const int64_t rows = std::min(layout.sizes[t], b1) - b0, row = layout.offsets[t] + b0;
        if (rows <= 0) continue;
        Tensor hgates_live = hgates.narrow(0, b0, rows);
        Tensor h_live = h_state.narrow(0, b0, rows);
        if (mask) {
          Tensor h_rec_live = h_rec.narrow(0, b0, rows);
          at::mul_out(h_rec_live, h_live, opt.recurrent_mask.narrow(0, b0, rows));
          recurrent_gemm(hgates_live, h_rec_live);
        } else {
          recurrent_gemm(hgates_live, h_live);
        }
        a.row = row;
        a.ws_first = need_workspace ? row : b0;
        Dev::step(s.cell, a, rows);
        if (s.proj) {
          Tensor out_rows = output.narrow(0, row, rows);
          at::mm_out(out_rows, hh.narrow(0, b0, rows), w_hr_t);
          if (projection_pass) {
            Dev::projection_step(a, rows);
          } else {
            h_live.copy_(out_rows);
          }
        }
      }
    });
  });
  Tensor c_n = c_state.defined() ? c_state.to(dtype) : at::empty({0}, opts);
  if (!need_workspace) workspace = at::empty({0, s.W}, acc_opts);
  return {output, h_state, c_n, workspace};
}

using BackwardResult = FASTRNN_BACKWARD_TUPLE;

template <class Dev>
BackwardResult recurrence_backward(
    c10::string_view cell_name, const Tensor& grad_output_in,
    const c10::optional<Tensor>& grad_h_n, const c10::optional<Tensor>& grad_c_n,
    const Tensor& h0_in, const c10::optional<Tensor>& c0_in, const Tensor& w_hh,
    const c10::optional<Tensor>& b_hh, const c10::optional<Tensor>& w_hr_in,
    const c10::optional<Tensor>& batch_sizes, bool reverse, const Tensor& output_in,
    const Tensor& workspace_in, FASTRNN_OPTION_PARAMS) {
  c10::OptionalDeviceGuard guard(at::device_of(output_in));
  TORCH_CHECK(output_in.dim() == 2, "fastrnn native: output must be 2-D [N, state], got ",
              output_in.sizes());
  const Options opt = make_options(FASTRNN_OPTION_ARGS);
  // xproj is not an input of backward: its shape [N, G*H] is implied.
  const Shapes s = check_shapes(cell_name, output_in.size(0), w_hh.size(0), output_in, h0_in,
                                c0_in, w_hh, b_hh, w_hr_in, opt);
  const auto dtype = output_in.scalar_type();
  Dev::check_dtype(dtype);
  const auto acc_dtype = at::toOpMathType(dtype);
  const auto opts = output_in.options();
  const auto acc_opts = opts.dtype(acc_dtype);
  TORCH_CHECK(output_in.size(1) == s.P && grad_output_in.sizes() == output_in.sizes(),
              "fastrnn native: output and grad_output must be [N, ", s.P, "], got ",
              output_in.sizes(), " and ", grad_output_in.sizes());
  TORCH_CHECK(workspace_in.dim() == 2 && workspace_in.size(0) == s.N &&
                  workspace_in.size(1) == s.W && workspace_in.scalar_type() == acc_dtype,
              "fastrnn native: workspace must be [", s.N, ", ", s.W, "] ", acc_dtype,
              ", got ", workspace_in.sizes(), " ", workspace_in.scalar_type());
  const Layout layout = make_layout(s.N, s.B, batch_sizes, reverse);

  const Tensor grad_output = grad_output_in.to(dtype).contiguous();
  const Tensor output = output_in.contiguous();
  const Tensor workspace = workspace_in.contiguous();
  const Tensor h0 = h0_in.contiguous();
  const Tensor c0 = s.has_c ? c0_in->to(acc_dtype).contiguous() : Tensor();
  const Tensor w_hr = s.proj ? *w_hr_in : Tensor();

  // Carried gradients: dL/dh (after projection) and dL/dc of the state entering later steps.
  Tensor dh_state = new_copy({s.B, s.P}, opts, defined_or_empty(grad_h_n));
  Tensor dc_state = c0.defined()
                        ? new_copy({s.B, s.H}, acc_opts, defined_or_empty(grad_c_n))
                        : Tensor();
  Tensor grad_xproj = new_buffer({s.N, s.G * s.H}, opts);
  // Gradient of hh (= of xproj for lstm/rnn) and of the GEMM result a = h_rec @ w_hh.T
  // (differs from hh's only through the layer norm).
  Tensor grad_hgates =
      of_cell(spec::kRecurrentGrad, s.cell) ? new_buffer({s.N, s.G * s.H}, opts) : grad_xproj;
  Tensor grad_a = opt.ln_weight.defined() ? new_buffer({s.N, s.G * s.H}, opts) : grad_hgates;
  Tensor grad_y = opt.ln_c_weight.defined() ? new_buffer({s.N, s.H}, acc_opts) : Tensor();
  Tensor grad_out_all = s.proj ? new_buffer({s.N, s.P}, opts) : Tensor();  // dL/dp per row
  Tensor dhh = s.proj ? new_buffer({s.B, s.H}, opts) : Tensor();
  const bool mask = opt.recurrent_mask.defined();
  Tensor dh_rec = mask ? new_buffer({s.B, s.P}, opts) : Tensor();  // dL/dh_rec
  // Per-state sums over the steps of the learnable option arguments' gradients (the kernels
  // add to them), for those that are on.
  Tensor grad_sums[FASTRNN_NUM_LEARNABLE];
  {
    const int64_t G = s.G, H = s.H;
#define FASTRNN_SUMS_BUFFER(arg, k, ...) \
    if (opt.arg.defined()) grad_sums[k] = new_copy({s.B, __VA_ARGS__}, acc_opts, Tensor());
    FASTRNN_LEARNABLE_ARGS(FASTRNN_SUMS_BUFFER)
#undef FASTRNN_SUMS_BUFFER
  }
  const Tensor zeros = at::zeros({std::max(s.H, s.P)}, opts);
  // The step kernels leave a direct part of dL/dh_prev in dh_state for the GEMM to add to
  // (gru's z * dh; zoneout's z_h * dh).
  const bool direct_part = of_cell(spec::kDirectH, s.cell) || opt.any();

  Dev::dispatch(dtype, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    using acc_t = at::opmath_type<scalar_t>;
    BackwardStep<scalar_t, acc_t> all;
    set_shared(all, s, opt, zeros);
    all.grad_output = grad_output.data_ptr<scalar_t>();
    all.ws = workspace.data_ptr<acc_t>();
    all.output = output.data_ptr<scalar_t>();
    all.grad_xproj = grad_xproj.data_ptr<scalar_t>();
    all.grad_hgates = grad_hgates.data_ptr<scalar_t>();
    all.grad_a = grad_a.data_ptr<scalar_t>();
    all.grad_y = row_ptr<acc_t>(grad_y);
    all.grad_p = row_ptr<scalar_t>(grad_out_all);
    // States b0 .. b1-1 through every step, as in forward.
    Dev::row_blocks(s.B, layout.uniform, [&](int64_t b0, int64_t b1) {
      const typename Dev::Gemm recurrent_gemm(w_hh, b1 - b0);  // dL/dh_prev = d(a) @ w_hh
      BackwardStep<scalar_t, acc_t> a = all;
      a.dh_state = row_ptr<scalar_t>(dh_state, b0);
      a.dhh = row_ptr<scalar_t>(dhh, b0);
      a.dc_state = row_ptr<acc_t>(dc_state, b0);
      a.c0 = row_ptr<acc_t>(c0, b0);
      a.h0 = row_ptr<scalar_t>(h0, b0);
#define FASTRNN_SUMS_POINTER(arg, k, ...) \
      a.grad_##arg = row_ptr<acc_t>(grad_sums[k], b0);
      FASTRNN_LEARNABLE_ARGS(FASTRNN_SUMS_POINTER)
#undef FASTRNN_SUMS_POINTER
      const int64_t T = static_cast<int64_t>(layout.order.size());
      for (int64_t k = T - 1; k >= 0; --k) {
        const int64_t t = layout.order[k];
        const int64_t rows = std::min(layout.sizes[t], b1) - b0, row = layout.offsets[t] + b0;
        if (rows <= 0) continue;
        a.row = row;
        a.prev_row = k > 0 ? layout.offsets[layout.order[k - 1]] + b0 : 0;
        a.prev_rows = k > 0 ? std::max<int64_t>(
                                  0, std::min(layout.sizes[layout.order[k - 1]], b1) - b0)
                            : 0;
        Tensor dh_live = dh_state.narrow(0, b0, rows);
        if (s.proj) {
          Tensor d_out = grad_out_all.narrow(0, row, rows);
          if (opt.any()) {
            Dev::projection_step(a, rows);
          } else {
            at::add_out(d_out, grad_output.narrow(0, row, rows), dh_live);
          }
          Tensor dhh_live = dhh.narrow(0, b0, rows);
          at::mm_out(dhh_live, d_out, w_hr);
        }
        Dev::step(s.cell, a, rows);
        // dL/dh_prev = (d(a) @ w_hh) * recurrent_mask + the direct part left in dh_state.
        Tensor grad_a_rows = grad_a.narrow(0, row, rows);
        if (mask) {
          Tensor dh_rec_live = dh_rec.narrow(0, b0, rows);
          recurrent_gemm(dh_rec_live, grad_a_rows);
          dh_live.addcmul_(dh_rec_live, opt.recurrent_mask.narrow(0, b0, rows));
        } else {
          recurrent_gemm(dh_live, grad_a_rows, direct_part);
        }
      }
    });
  });

  // h_rec (h_prev, masked) of every row, for the one weight-gradient GEMM over all steps.
  Tensor h_prev_all = new_buffer({s.N, s.P}, opts);
  for (size_t k = 0; k < layout.order.size(); ++k) {
    const int64_t t = layout.order[k];
    const int64_t rows = layout.sizes[t], row = layout.offsets[t];
    const int64_t kept = k > 0 ? std::min(rows, layout.sizes[layout.order[k - 1]]) : 0;
    if (kept > 0) {
      h_prev_all.narrow(0, row, kept).copy_(output.narrow(0, layout.offsets[layout.order[k - 1]], kept));
    }
    if (kept < rows) h_prev_all.narrow(0, row + kept, rows - kept).copy_(h0.narrow(0, kept, rows - kept));
    if (mask) h_prev_all.narrow(0, row, rows).mul_(opt.recurrent_mask.narrow(0, 0, rows));
  }
  Tensor grad_w_hh = new_buffer({s.G * s.H, s.P}, opts);
  at::mm_out(grad_w_hh, grad_a.t(), h_prev_all);
  Tensor grad_b_hh = grad_hgates.sum(0);
  const Tensor h_pre = s.proj ? workspace.narrow(1, s.cols.h_pre, s.H).to(dtype) : Tensor();
  Tensor grad_w_hr = s.proj ? new_buffer({s.P, s.H}, opts) : at::empty({0}, opts);
  if (s.proj) at::mm_out(grad_w_hr, grad_out_all.t(), h_pre);
  Tensor grad_c0 = c0.defined() ? dc_state.to(dtype) : at::empty({0}, opts);
  // The learnable option arguments' gradients: column sums (over the batch), in acc_t, of the
  // per-state sums; absent ones empty, and distinct tensors (outputs may not alias).
  Tensor learned[FASTRNN_NUM_LEARNABLE];
  for (int k = 0; k < FASTRNN_NUM_LEARNABLE; ++k) {
    learned[k] = grad_sums[k].defined() ? grad_sums[k].sum(0).to(dtype) : at::empty({0}, opts);
  }
  return {grad_xproj, dh_state, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr, FASTRNN_LEARNED(learned)};
}

}  // namespace fastrnn
