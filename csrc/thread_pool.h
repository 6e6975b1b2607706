// A fixed pool of decode threads, each owning one Scratch (and so one TurboJPEG handle, created and destroyed in
// that thread). run(n, fn) hands out item indices [0, n) through an atomic counter and blocks until all are done.
// Concurrent run() calls are serialised. fn should turn its own failures into per-item results (the callers wrap
// it with `guarded`); should it throw anyway, run() still waits for every item and then rethrows the first
// exception, so a failure never passes as success.
#pragma once

#include <algorithm>
#include <atomic>
#include <exception>
#include <string>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "decode_core.h"

namespace sfmkern {

class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    if (threads < 1) threads = 1;
    workers_.reserve(threads);
    for (int t = 0; t < threads; ++t) workers_.emplace_back([this] { worker(); });
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& th : workers_) th.join();
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()); }

  void run(size_t n, const std::function<void(size_t, Scratch&)>& fn) {
    if (n == 0) return;
    std::lock_guard<std::mutex> serial(run_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &fn;
      job_size_ = n;
      next_.store(0);
      active_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    std::exception_ptr error;
    {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [this] { return active_ == 0; });
      job_ = nullptr;
      std::swap(error, error_);
    }
    if (error) std::rethrow_exception(error);
  }

  // Bytes held by the threads' scratch buffers (between runs; the threads do not touch them then).
  size_t scratch_bytes() {
    std::lock_guard<std::mutex> serial(run_mu_);
    std::lock_guard<std::mutex> lock(mu_);
    size_t total = 0;
    for (const Scratch* s : scratches_) total += s->bytes();
    return total;
  }

 private:
  void worker() {
    Scratch scratch;  // per-thread buffers and TurboJPEG handle, freed when the thread exits
    {
      std::lock_guard<std::mutex> lock(mu_);
      scratches_.push_back(&scratch);
    }
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(size_t, Scratch&)>* job = nullptr;
      size_t n = 0;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) {
          scratches_.erase(std::find(scratches_.begin(), scratches_.end(), &scratch));
          return;
        }
        seen = generation_;
        job = job_;
        n = job_size_;
      }
      for (size_t i = next_.fetch_add(1); i < n; i = next_.fetch_add(1)) {
        try {
          (*job)(i, scratch);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu_);
          if (!error_) error_ = std::current_exception();
        }
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--active_ == 0) done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable wake_, done_;
  const std::function<void(size_t, Scratch&)>* job_ = nullptr;
  size_t job_size_ = 0;
  std::atomic<size_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;           // first exception thrown by fn in the current run
  std::vector<const Scratch*> scratches_;  // each live worker's scratch (read by scratch_bytes between runs)
};

// Wraps a per-item job so that any exception becomes that item's reason: "out of memory" or "internal error: ..."
// (never an empty reason, which means success).
template <typename Fn>
std::function<void(size_t, Scratch&)> guarded(std::vector<std::string>& reasons, Fn fn) {
  return [&reasons, fn](size_t i, Scratch& scratch) {
    try {
      fn(i, scratch);
    } catch (const std::bad_alloc&) {
      reasons[i] = "out of memory";
    } catch (const std::exception& e) {
      reasons[i] = std::string("internal error: ") + e.what();
    } catch (...) {
      reasons[i] = "internal error: unknown exception";
    }
  };
}

}  // namespace sfmkern
