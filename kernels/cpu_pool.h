// The thread pool of tritonq's CPU ops (cpu_gemv.cpp, cpu_attention.cpp): one pool per extension, shared by
// every file that includes this header (inline definitions are merged by the linker), so two ops never keep two
// sets of spinning helpers.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

namespace TRITONQ_OPS_NAMESPACE {  // the build's op namespace: the portable and native builds keep their own pool

// How long a pool helper spins for the next job before it blocks: longer than the gap between two matmuls of
// a decode step (attention, norms: under 0.3 ms per layer measured), so helpers are awake when a call starts.
constexpr int64_t kSpinMicroseconds = 500;

// A thread pool that never waits for a thread that has not started. The caller posts a job (numbered chunks),
// works on it itself, and returns once every chunk is done; helpers that wake late find no chunk left and go
// back to sleep, with nobody waiting for them. An OpenMP fork-join region instead waits at its barrier for every
// thread, so on a busy machine each call costs a scheduler time slice (measured: 8x slower decode with the
// other core busy). Helpers spin briefly for the next job (decode calls come back to back), then block.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: detached helpers may still sleep on it at exit
    return *pool;
  }

  void run(int64_t count, int threads, const std::function<void(int64_t)>& fn) {
    TORCH_CHECK(count < static_cast<int64_t>(kClosed), "too many chunks for the pool: ", count);
    if (threads <= 1 || count <= 1) {
      for (int64_t i = 0; i < count; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mu_);  // one job at a time (several Python threads may call)
    grow(threads - 1);
    // Close the last job before its count and function change. A helper that read the last job's state (all its
    // chunks claimed) and was preempted before its compare-and-swap could otherwise see the new, larger count,
    // claim a chunk under the old job's number, run the new function on it and count it done before the new job
    // is published: the caller then returned with a chunk still running on references to its stack (segfaults
    // in the server under load, 2026-12-07). The closed index is above any count, so that claim now fails.
    state_.store((static_cast<uint64_t>(gen_) << 32) | kClosed, std::memory_order_release);
    fn_.store(&fn, std::memory_order_relaxed);
    count_.store(count, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      helpers_wanted_ = threads - 1;
      state_.store(static_cast<uint64_t>(++gen_) << 32, std::memory_order_release);
    }
    cv_.notify_all();
    work(gen_);
    for (int spins = 0; done_.load(std::memory_order_acquire) < count; ++spins) {
      if (spins < 4096) {
        pause();
      } else {
        std::this_thread::yield();  // a helper was preempted inside a chunk: let it have this core
      }
    }
  }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void grow(int helpers) {
    while (static_cast<int>(started_) < helpers) {
      const int index = started_++;
      std::thread([this, index] { loop(index); }).detach();
    }
  }

  // Claims chunks of job `gen` until none is left or a newer job replaced it.
  void work(uint32_t gen) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if ((s >> 32) != gen || static_cast<int64_t>(s & 0xffffffffu) >= count_.load(std::memory_order_relaxed)) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      (*fn_.load(std::memory_order_relaxed))(static_cast<int64_t>(s & 0xffffffffu));  // fn_ is stable until every claimed chunk is done
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop(int index) {
    uint32_t seen = gen_seen_at_start();
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicroseconds);
      while (static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32) == seen &&
             std::chrono::steady_clock::now() < until)
        pause();
      if (static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return static_cast<uint32_t>(state_.load() >> 32) != seen; });
      }
      seen = static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32);
      if (index < helpers_wanted_.load(std::memory_order_relaxed)) work(seen);
    }
  }

  uint32_t gen_seen_at_start() { return static_cast<uint32_t>(state_.load(std::memory_order_acquire) >> 32); }

  static constexpr uint64_t kClosed = 0xffffffffu;  // a chunk index no job reaches (run() refuses counts >= it)
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};  // job number << 32 | next unclaimed chunk
  std::atomic<int64_t> done_{0};
  std::atomic<int> helpers_wanted_{0};
  std::atomic<int> started_{0};
  uint32_t gen_ = 0;
  std::atomic<int64_t> count_{0};
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
};

// The pool's thread count: 0 follows torch's (at::get_num_threads()).
inline std::atomic<int64_t> pool_threads{0};  // C++17 inline: one object for every file that includes this

inline int64_t set_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0, "threads must be >= 0 (0: torch's thread count)");
  return pool_threads.exchange(threads);
}

// Runs work(begin, end) over [0, count) in chunks, on the pool's number of threads.
template <typename F>
void parallel_dynamic(int64_t count, int64_t chunk, const F& work) {
  const int64_t chunks = (count + chunk - 1) / chunk;
  const std::function<void(int64_t)> one = [&](int64_t c) { work(c * chunk, std::min(count, (c + 1) * chunk)); };
  const int64_t wanted = pool_threads.load() > 0 ? pool_threads.load() : at::get_num_threads();
  Pool::get().run(chunks, static_cast<int>(std::min<int64_t>(wanted, chunks)), one);
}

}  // namespace TRITONQ_OPS_NAMESPACE
