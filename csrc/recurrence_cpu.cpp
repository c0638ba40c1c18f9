// CPU device policy of the generic recurrence (recurrence.h): the pointwise pass of a step
// runs in parallel over the live rows; within a row the loop over hidden units is
// vectorised by the compiler (cells.h keeps the float activations branch-free).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "recurrence.h"

namespace fastrnn {
namespace {

// Rows per task: enough elements that a thread's share outweighs the fork/join.
inline int64_t grain_rows(int64_t H, int64_t G) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, G * H));
}

struct CpuDevice {
  static void check_dtype(at::ScalarType dtype) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
                "fastrnn native CPU kernels support float32 and float64, got ", dtype);
  }

  template <class F>
  static void dispatch(at::ScalarType dtype, F&& f) {
    if (dtype == at::kDouble) {
      f(double());
    } else {
      f(float());
    }
  }

  // The branches on per-call and per-row constants (projection, whether a row continues
  // the previous step) are taken outside the j loop, on a local copy of the arguments, so
  // the compiler sees them constant inside and vectorises the loop.
  template <typename scalar_t, typename acc_t>
  static void forward_step(Cell cell, const ForwardStep<scalar_t, acc_t>& args, int64_t rows) {
    with_cell(cell, [&](auto c) {
      at::parallel_for(0, rows, grain_rows(args.H, num_gates(c)), [&](int64_t b0, int64_t b1) {
        auto run_rows = [&](auto proj) {  // proj: std::bool_constant
          ForwardStep<scalar_t, acc_t> a = args;
          a.proj = proj;
          for (int64_t b = b0; b < b1; ++b) {
#pragma GCC ivdep
            for (int64_t j = 0; j < a.H; ++j) forward_element<scalar_t, acc_t>(c, a, b, j);
          }
        };
        if (args.proj) {
          run_rows(std::true_type());
        } else {
          run_rows(std::false_type());
        }
      });
    });
  }

  template <typename scalar_t, typename acc_t>
  static void backward_step(Cell cell, const BackwardStep<scalar_t, acc_t>& args, int64_t rows) {
    with_cell(cell, [&](auto c) {
      at::parallel_for(0, rows, grain_rows(args.H, num_gates(c)), [&](int64_t b0, int64_t b1) {
        const BackwardStep<scalar_t, acc_t> a = args;
        auto row = [&](int64_t b) {
#pragma GCC ivdep
          for (int64_t j = 0; j < a.H; ++j) backward_element<scalar_t, acc_t>(c, a, b, j);
        };
        for (int64_t b = b0; b < b1; ++b) {
          const bool continues = b < a.prev_rows;
          if (a.dhh != nullptr) {
            if (continues) row(b); else row(b);
          } else {
            if (continues) row(b); else row(b);
          }
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("native_forward", &recurrence_forward<CpuDevice>);
  m.impl("native_backward", &recurrence_backward<CpuDevice>);
}

}  // namespace fastrnn
