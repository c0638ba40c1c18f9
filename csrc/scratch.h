// Memory of the native CPU ops' large buffers, kept between calls.
//
// A training call of the fastrnns shape (T100 B64 H512) allocates ~150 MB of buffers
// (output, workspace, gradients). Fresh from the C allocator, every page of them is faulted
// in and zeroed by the kernel again on every call: 5-30% of the call, more or less
// depending on what else the process allocated before (glibc moves its mmap threshold and
// trims its heap as large blocks come and go). The pool below keeps blocks once faulted in:
// a buffer takes a free block of about its size, and the block comes back to the pool when
// the tensor's storage is freed (the deleter below), whether the tensor stayed inside the op
// or escaped to autograd or the caller. A block is never in two live tensors, so calls on
// different threads at once, and a backward while other forwards are live, each get their
// own. The pool caches at most as many free bytes as were ever in use at once (a repeat of
// the largest workload seen needs no new memory); release_scratch() frees them now.
// FASTRNN_NATIVE_POOL=0 turns the pool off (every buffer fresh, as at::empty gives it).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastrnn {

// Asks for transparent huge pages on [p, p + bytes) where the kernel allows them on request:
// 512x fewer faults when the memory is first touched. A hint: failure changes nothing.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  static const bool enabled = [] {  // FASTRNN_NATIVE_HUGE_PAGES=0 turns it off (comparisons)
    const char* env = std::getenv("FASTRNN_NATIVE_HUGE_PAGES");
    return env == nullptr || env[0] != '0';
  }();
  if (!enabled || bytes < 2 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

class BufferPool {
 public:
  // Smaller buffers come from at::empty: the C allocator's heap serves them without faults.
  static constexpr size_t kMinBytes = size_t(64) << 10;
  static constexpr size_t kHuge = size_t(2) << 20;

  struct Stats {
    int64_t cached, in_use, peak;  // bytes: free blocks held, blocks in live tensors, most in use
  };

  // Never destroyed: tensors freed during exit still hand their blocks back.
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();
    return *pool;
  }

  static bool enabled() {
    static const bool on = [] {
      const char* env = std::getenv("FASTRNN_NATIVE_POOL");
      return env == nullptr || env[0] != '0';
    }();
    return on;
  }

  // An uninitialised contiguous CPU tensor of `sizes` whose memory is a pool block.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t numel = c10::multiply_integers(sizes);
    const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (!enabled() || !options.device().is_cpu() || nbytes < kMinBytes) {
      return at::empty(sizes, options);
    }
    Block block = take(nbytes);
    auto* lease = new Block(block);
    at::DataPtr data(block.ptr, lease, &BufferPool::give_back, at::Device(at::kCPU));
    // Resizable through the default allocator (which then frees this block as usual).
    at::Storage storage(at::Storage::use_byte_size_t(), static_cast<int64_t>(nbytes),
                        std::move(data), c10::GetCPUAllocator(), /*resizable=*/true);
    return at::empty({0}, options).set_(storage, 0, sizes);
  }

  // Frees the cached free blocks (those in live tensors come back, and stay, when freed).
  void release() {
    std::deque<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (const Block& b : blocks) std::free(b.ptr);
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(in_use_),
            static_cast<int64_t>(peak_)};
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  // The smallest free block of at least `nbytes` and at most twice that, else a new one.
  Block take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes >= nbytes && it->bytes <= 2 * nbytes &&
            (best == free_.end() || it->bytes < best->bytes)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        const Block b = *best;
        free_.erase(best);
        cached_ -= b.bytes;
        add_in_use(b.bytes);
        return b;
      }
    }
    // Large blocks in whole huge pages, aligned to them, so all of a block can be one.
    const size_t align = nbytes >= kHuge ? kHuge : 64;
    const size_t bytes = (nbytes + align - 1) / align * align;
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes) != 0 || p == nullptr) {
      TORCH_CHECK(false, "fastrnn native: out of memory allocating ", bytes, " bytes");
    }
    advise_huge_pages(p, bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    add_in_use(bytes);
    return {p, bytes};
  }

  void add_in_use(size_t bytes) {
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
  }

  // The storage deleter: the block goes back to the pool; the oldest free blocks beyond the
  // cap are freed.
  static void give_back(void* ctx) {
    auto* lease = static_cast<Block*>(ctx);
    const Block block = *lease;
    delete lease;
    std::deque<Block> evicted;
    BufferPool& pool = get();
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      pool.in_use_ -= block.bytes;
      pool.free_.push_back(block);
      pool.cached_ += block.bytes;
      while (pool.cached_ > pool.peak_ && !pool.free_.empty()) {
        evicted.push_back(pool.free_.front());
        pool.cached_ -= pool.free_.front().bytes;
        pool.free_.pop_front();
      }
    }
    for (const Block& b : evicted) std::free(b.ptr);
  }

  std::mutex mutex_;
  std::deque<Block> free_;  // oldest returned first
  size_t cached_ = 0, in_use_ = 0, peak_ = 0;
};

}  // namespace fastrnn
