// CUDA device policy of the generic recurrence (recurrence.h): per step, the GEMM runs on
// the current stream through at::mm_out (cuBLAS) and the pointwise pass is ONE kernel, a
// thread per (row, hidden unit), running the element code of step.h. Half types compute
// their gates in float32 (acc_t) and keep a float32 workspace.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "recurrence.h"

namespace fastrnn {
namespace {

constexpr int kThreads = 256;

template <Cell C, typename scalar_t, typename acc_t>
__global__ void forward_kernel(ForwardStep<scalar_t, acc_t> a, int64_t rows) {
  const int64_t n = rows * a.H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    forward_element<scalar_t, acc_t>(C, a, i / a.H, i % a.H);
  }
}

template <Cell C, typename scalar_t, typename acc_t>
__global__ void backward_kernel(BackwardStep<scalar_t, acc_t> a, int64_t rows) {
  const int64_t n = rows * a.H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    backward_element<scalar_t, acc_t>(C, a, i / a.H, i % a.H);
  }
}

inline unsigned int num_blocks(int64_t rows, int64_t H) {
  const int64_t n = rows * H;
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20));
}

struct CudaDevice {
  using Gemm = MmGemm;  // cuBLAS on the current stream

  static void check_dtype(at::ScalarType dtype) {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                    dtype == at::kBFloat16,
                "fastrnn native CUDA kernels support float32, float64, float16 and bfloat16, "
                "got ", dtype);
  }

  template <class F>
  static void dispatch(at::ScalarType dtype, F&& f) {
    switch (dtype) {
      case at::kDouble: f(double()); break;
      case at::kHalf: f(at::Half()); break;
      case at::kBFloat16: f(at::BFloat16()); break;
      default: f(float()); break;
    }
  }

  template <typename scalar_t, typename acc_t>
  static void forward_step(Cell cell, const ForwardStep<scalar_t, acc_t>& a, int64_t rows) {
    if (rows * a.H == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    with_cell(cell, [&](auto c) {
      forward_kernel<decltype(c)::value, scalar_t, acc_t>
          <<<num_blocks(rows, a.H), kThreads, 0, stream>>>(a, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  template <typename scalar_t, typename acc_t>
  static void backward_step(Cell cell, const BackwardStep<scalar_t, acc_t>& a, int64_t rows) {
    if (rows * a.H == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    with_cell(cell, [&](auto c) {
      backward_kernel<decltype(c)::value, scalar_t, acc_t>
          <<<num_blocks(rows, a.H), kThreads, 0, stream>>>(a, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("native_forward", &recurrence_forward<CudaDevice>);
  m.impl("native_backward", &recurrence_backward<CudaDevice>);
}

}  // namespace fastrnn
