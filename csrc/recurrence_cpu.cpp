// CPU device policy of the generic recurrence (recurrence.h): the pointwise pass of a step
// runs in parallel over the live rows; within a row the loop over hidden units is
// vectorised by the compiler (cells.h keeps the float activations branch-free).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <climits>
#include <cstdlib>

#include "gemv.h"
#include "recurrence.h"

namespace fastrnn {
namespace {

// MKL's packed-GEMM API (cblas_sgemm_pack_get_size / _pack / _compute). torch's MKL re-packs
// the weight operand on every at::mm call: for the small per-step GEMMs of a recurrence that
// costs about half as much as the multiplication itself. Packing w once per call removes it.
// The functions are looked up at run time in the already loaded process (libtorch_cpu
// exports them when torch is built with MKL); without them every GEMM is at::mm_out.
// Enum values and the LP64 (int) interface are those of mkl_cblas.h.
struct MklPackedApi {
  enum : int { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };
  using GetSize = size_t (*)(int identifier, int m, int n, int k);
  using Pack = void (*)(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                        const float* src, int ld, float* dest);
  using Compute = void (*)(int layout, int transa, int transb, int m, int n, int k,
                           const float* a, int lda, const float* b, int ldb, float beta,
                           float* c, int ldc);
  GetSize get_size = nullptr;
  Pack pack = nullptr;
  Compute compute = nullptr;

  static void* find(const char* name) {
    if (void* f = dlsym(RTLD_DEFAULT, name)) return f;
    // torch's libraries are loaded RTLD_LOCAL: ask the one this extension links against.
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib != nullptr ? dlsym(lib, name) : nullptr;
  }

  // Null when the functions are missing or FASTRNN_NATIVE_PACKED_GEMM=0 (for comparisons).
  static const MklPackedApi* get() {
    static const MklPackedApi api = [] {
      MklPackedApi a;
      const char* env = std::getenv("FASTRNN_NATIVE_PACKED_GEMM");
      if (env != nullptr && env[0] == '0') return a;
      a.get_size = reinterpret_cast<GetSize>(find("cblas_sgemm_pack_get_size"));
      a.pack = reinterpret_cast<Pack>(find("cblas_sgemm_pack"));
      a.compute = reinterpret_cast<Compute>(find("cblas_sgemm_compute"));
      return a;
    }();
    return api.get_size && api.pack && api.compute ? &api : nullptr;
  }
};

// out[rows, N] (+)= a[rows, K] @ w[K, N]. Up to gemv::kMaxRows rows (streaming, small
// batches): matrix-vector products on w as stored (gemv.h), nothing prepared per call.
// Above that, float32: w packed by MKL once per call (for steps with all max_rows rows live:
// the packed layout is made for that row count). Everything else (float64 at larger batches,
// the shorter steps of a packed sequence, no MKL) goes to at::mm_out.
class CpuGemm {
 public:
  CpuGemm(const Tensor& w, int64_t max_rows) : fallback_(w, max_rows), m_(max_rows) {
    const int64_t K = w.size(0), N = w.size(1);
    // Row-major w is B itself; a transposed view (w_hh.t()) is B^T.
    const bool rows_contiguous = w.stride(1) == 1 && w.stride(0) >= N;
    const bool cols_contiguous = w.stride(0) == 1 && w.stride(1) >= K;
    if (max_rows <= gemv::kMaxRows && (rows_contiguous || cols_contiguous) &&
        (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble)) {
      gemv_ = true;
      w_ = w;
      by_rows_ = !rows_contiguous;   // w_hh.t(): w's columns are w_hh's contiguous rows
      ld_ = by_rows_ ? w.stride(1) : w.stride(0);
      return;
    }
    api_ = MklPackedApi::get();
    const bool fits = max_rows > 0 && K > 0 && N > 0 && max_rows < INT_MAX / 4 &&
                      K < INT_MAX / 4 && N < INT_MAX / 4;
    if (api_ == nullptr || w.scalar_type() != at::kFloat || !fits) {
      api_ = nullptr;
      return;
    }
    const Tensor src = rows_contiguous || cols_contiguous ? w : w.contiguous();
    const bool trans = !rows_contiguous && cols_contiguous;
    const int ld = static_cast<int>(trans ? src.stride(1) : src.stride(0));
    n_ = static_cast<int>(N);
    k_ = static_cast<int>(K);
    const size_t bytes = api_->get_size(MklPackedApi::kBMatrix, static_cast<int>(m_), n_, k_);
    packed_ = BufferPool::get().empty(
        {static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float))},
        w.options().dtype(at::kFloat));
    api_->pack(MklPackedApi::kRowMajor, MklPackedApi::kBMatrix,
               trans ? MklPackedApi::kTrans : MklPackedApi::kNoTrans, static_cast<int>(m_), n_,
               k_, 1.f, src.data_ptr<float>(), ld, packed_.data_ptr<float>());
  }

  void operator()(Tensor& out, const Tensor& a, bool accumulate = false) const {
    if (gemv_ && out.is_contiguous() && a.is_contiguous() && a.size(0) <= m_) {
      const int64_t K = w_.size(0), N = w_.size(1);
      AT_DISPATCH_FLOATING_TYPES(w_.scalar_type(), "fastrnn_gemv", [&] {
        const auto run = by_rows_ ? gemv::by_rows<scalar_t> : gemv::by_columns<scalar_t>;
        run(out.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), a.size(0),
            w_.data_ptr<scalar_t>(), ld_, N, K, accumulate);
      });
      return;
    }
    if (api_ == nullptr || a.size(0) != m_ || !out.is_contiguous() || !a.is_contiguous()) {
      fallback_(out, a, accumulate);
      return;
    }
    api_->compute(MklPackedApi::kRowMajor, MklPackedApi::kNoTrans, MklPackedApi::kPacked,
                  static_cast<int>(m_), n_, k_, a.data_ptr<float>(), k_,
                  packed_.data_ptr<float>(), n_, accumulate ? 1.f : 0.f,
                  out.data_ptr<float>(), n_);
  }

 private:
  MmGemm fallback_;
  bool gemv_ = false, by_rows_ = false;
  Tensor w_;
  int64_t ld_ = 0;
  const MklPackedApi* api_ = nullptr;
  int64_t m_;
  int n_ = 0, k_ = 0;
  Tensor packed_;
};

// Rows per task: enough elements that a thread's share outweighs the fork/join.
inline int64_t grain_rows(int64_t H, int64_t G) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, G * H));
}

// How a row runs on the CPU (step.h): one thread, plain loops over the row; the sums
// keep 16 partial lanes so the compiler vectorises them (and the result does not depend on
// how rows are split over threads).
struct CpuRow {
  static constexpr bool leader() { return true; }

  // Always inlined: the loop vectorises only where the caller's constants are seen.
  template <class F>
  inline __attribute__((always_inline)) void for_each(int64_t n, F&& f) const {
#pragma GCC ivdep
    for (int64_t j = 0; j < n; ++j) f(j);
  }

  template <typename T, class F>
  T sum(int64_t n, F&& f) const {
    constexpr int kLanes = 16;
    T lane[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lane[l] += f(j + l);
    }
    for (int l = 0; j < n; ++j, ++l) lane[l] += f(j);
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
    }
    return lane[0];
  }

  template <typename T, class F>
  Sums<T> sum2(int64_t n, F&& f) const {
    constexpr int kLanes = 16;
    T lane_a[kLanes] = {}, lane_b[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const Sums<T> v = f(j + l);
        lane_a[l] += v.a;
        lane_b[l] += v.b;
      }
    }
    for (int l = 0; j < n; ++j, ++l) {
      const Sums<T> v = f(j);
      lane_a[l] += v.a;
      lane_b[l] += v.b;
    }
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) {
        lane_a[l] += lane_a[l + width];
        lane_b[l] += lane_b[l + width];
      }
    }
    return Sums<T>{lane_a[0], lane_b[0]};
  }
};

struct CpuDevice {
  using Gemm = CpuGemm;

  // States per block below which a batch stays one block (its steps then run their GEMM and
  // rows in parallel instead).
  static constexpr int64_t kMinBlockRows = 16;

  // A block of states per thread, each through every step: a parallel region per step costs a
  // fork/join twice a step, and on a shared core every one of them waits for a descheduled
  // thread. A packed batch (steps of varying rows) stays one block: its blocks would get
  // unequal work.
  template <class F>
  static void row_blocks(int64_t rows, bool uniform, F&& f) {
    const int64_t blocks =
        uniform && !at::in_parallel_region()
            ? std::min<int64_t>(at::get_num_threads(), rows / kMinBlockRows)
            : 1;
    if (blocks <= 1) {
      f(int64_t(0), rows);
      return;
    }
    const int64_t size = (rows + blocks - 1) / blocks;
    // A block's products (at::mm_out) dispatch from the worker thread: it takes the caller's
    // thread-local state (below autograd, grad mode), or they would see tensors that require
    // grad with autograd on and refuse out= arguments.
    const at::ThreadLocalState caller;
    at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
      const at::ThreadLocalStateGuard same_state(caller);
      for (int64_t k = k0; k < k1; ++k) f(k * size, std::min(rows, (k + 1) * size));
    });
  }

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

  // A row per iteration (step.h), rows in parallel, on a local copy of the arguments. Whether
  // there is a projection is made a constant of each copy: a branch on it inside the j loop
  // would become masked loads and stores through the absent (null) pointer, which the CPU
  // runs ~10x slower (fault suppression).
  template <typename scalar_t, typename acc_t>
  static void step(Cell cell, const ForwardStep<scalar_t, acc_t>& args, int64_t rows) {
    with_step(cell, args.opt, [&](auto c, auto v) {
      at::parallel_for(0, rows, grain_rows(args.H, num_gates(c)), [&](int64_t b0, int64_t b1) {
        auto run_rows = [&](auto proj) {  // proj: std::bool_constant
          ForwardStep<scalar_t, acc_t> a = args;
          a.proj = proj;
          for (int64_t b = b0; b < b1; ++b) {
            run_row<decltype(c)::value, decltype(v)>(a, b, CpuRow());
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
  static void step(Cell cell, const BackwardStep<scalar_t, acc_t>& args, int64_t rows) {
    with_step(cell, args.opt, [&](auto c, auto v) {
      at::parallel_for(0, rows, grain_rows(args.H, num_gates(c)), [&](int64_t b0, int64_t b1) {
        const BackwardStep<scalar_t, acc_t> a = args;
        auto run_rows = [&] {
          for (int64_t b = b0; b < b1; ++b) {
            run_row<decltype(c)::value, decltype(v)>(a, b, CpuRow());
          }
        };
        // The same call in both branches on purpose: inlined there, each copy sees whether
        // dhh (the projection's gradient) is given as a constant.
        if (a.dhh != nullptr) {
          run_rows();
        } else {
          run_rows();
        }
      });
    });
  }

  // The projected rows of an lstm step with proj_clip or zoneout_h (step.h), either direction.
  template <class Step>
  static void projection_step(const Step& args, int64_t rows) {
    at::parallel_for(0, rows, grain_rows(args.P, 1), [&](int64_t b0, int64_t b1) {
      const Step a = args;
      for (int64_t b = b0; b < b1; ++b) {
#pragma GCC ivdep
        for (int64_t j = 0; j < a.P; ++j) projection_element(a, b, j);
      }
    });
  }
};

}  // namespace

// The buffer pool (scratch.h); no tensor arguments: catch-all kernels.
void release_scratch() { BufferPool::get().release(); }

std::vector<int64_t> scratch_stats() {
  const BufferPool::Stats s = BufferPool::get().stats();
  return {s.cached, s.in_use, s.peak};
}

TORCH_LIBRARY_FRAGMENT(fastrnn, m) {
  m.def("native_release_scratch() -> ()", &release_scratch);
  m.def("native_scratch_stats() -> int[]", &scratch_stats);  // cached, in use, peak (bytes)
}

TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("native_forward", &recurrence_forward<CpuDevice>);
  m.impl("native_backward", &recurrence_backward<CpuDevice>);
}

}  // namespace fastrnn
