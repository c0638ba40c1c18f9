// CUDA device policy of the generic recurrence (recurrence.h): per step, the GEMM runs on
// the current stream through at::mm_out (cuBLAS) and the pointwise pass is ONE kernel
// running step.h's rows: a thread per (row, hidden unit), or with layer norms a block per
// row. Half types compute their gates in float32 (acc_t) and keep a float32 workspace.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <climits>

#include "recurrence.h"

namespace fastrnn {
namespace {

constexpr int kThreads = 256;

// A step without layer norms: a thread per (row, hidden unit), each running its row as a
// OneElement (step.h).
template <Cell C, class V, template <class, class> class Step, typename scalar_t,
          typename acc_t>
__global__ void element_kernel(Step<scalar_t, acc_t> a, int64_t rows) {
  const int64_t n = rows * a.H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    run_row<C, V>(a, i / a.H, OneElement{i % a.H});
  }
}

// ------------------------------------------------------------------ layer-norm steps
// A block per row: the layer norms need the row's sums between the element phases. CudaRow
// is step.h's `Row` for one block: threads stride over the row, phases end with a barrier,
// sums are block reductions (fixed order: deterministic). The __CUDA_ARCH__ guards only
// keep the host pass of nvcc quiet; these run on the device alone.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, known to every thread. scratch: 32 shared values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T total = lane < warps ? scratch[lane] : T(0);
    total = warp_sum(total);
    if (lane == 0) scratch[0] = total;
  }
  __syncthreads();
  const T result = scratch[0];
  __syncthreads();  // scratch may be reused by the next sum
  return result;
}

template <typename acc_t>
struct CudaRow {
  acc_t* scratch;  // 64 shared values

  __host__ __device__ bool leader() const {
#if defined(__CUDA_ARCH__)
    return threadIdx.x == 0;
#else
    return true;
#endif
  }

  template <class F>
  __host__ __device__ void for_each(int64_t n, F&& f) const {
#if defined(__CUDA_ARCH__)
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) f(j);
    __syncthreads();
#endif
  }

  template <typename T, class F>
  __host__ __device__ T sum(int64_t n, F&& f) const {
    T v = T(0);
#if defined(__CUDA_ARCH__)
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) v += f(j);
    v = block_sum<T>(v, scratch);
#endif
    return v;
  }

  template <typename T, class F>
  __host__ __device__ Sums<T> sum2(int64_t n, F&& f) const {
    Sums<T> v{T(0), T(0)};
#if defined(__CUDA_ARCH__)
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const Sums<T> x = f(j);
      v.a += x.a;
      v.b += x.b;
    }
    v.a = block_sum<T>(v.a, scratch);
    v.b = block_sum<T>(v.b, scratch + 32);
#endif
    return v;
  }
};

template <Cell C, class V, template <class, class> class Step, typename scalar_t,
          typename acc_t>
__global__ void row_kernel(Step<scalar_t, acc_t> a) {
  __shared__ acc_t scratch[64];
  run_row<C, V>(a, blockIdx.x, CudaRow<acc_t>{scratch});
}

template <class Step>
__global__ void projection_kernel(Step a, int64_t rows) {
  const int64_t n = rows * a.P;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    projection_element(a, i / a.P, i % a.P);
  }
}

// Threads of a row block: a warp multiple covering H, at most 512 (rows of 4H then take
// a few elements per thread).
inline unsigned int row_threads(int64_t H) {
  return static_cast<unsigned int>(std::min<int64_t>(512, std::max<int64_t>(32, (H + 31) / 32 * 32)));
}

inline unsigned int num_blocks(int64_t rows, int64_t H) {
  const int64_t n = rows * H;
  return static_cast<unsigned int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 20));
}

struct CudaDevice : OneRowBlock {
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

  // The pointwise pass of a step, either direction: a block per row with layer norms, else
  // a thread per element.
  template <class Step>
  static void step(Cell cell, const Step& a, int64_t rows) {
    if (rows * a.H == 0) return;
    auto stream = at::cuda::getCurrentCUDAStream();
    with_step(cell, a.opt, [&](auto c, auto v) {
      constexpr Cell C = decltype(c)::value;
      using V = decltype(v);
      if constexpr (V::rows) {
        TORCH_CHECK(rows <= INT_MAX, "fastrnn native CUDA: too many rows in one step");
        row_kernel<C, V><<<static_cast<unsigned int>(rows), row_threads(a.H), 0, stream>>>(a);
      } else {
        element_kernel<C, V><<<num_blocks(rows, a.H), kThreads, 0, stream>>>(a, rows);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // The projected rows of an lstm step with proj_clip or zoneout_h, either direction.
  template <class Step>
  static void projection_step(const Step& a, int64_t rows) {
    if (rows * a.P == 0) return;
    projection_kernel<<<num_blocks(rows, a.P), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        a, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("native_forward", &recurrence_forward<CudaDevice>);
  m.impl("native_backward", &recurrence_backward<CudaDevice>);
}

}  // namespace fastrnn
