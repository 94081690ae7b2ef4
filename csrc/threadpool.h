// A fixed pool of worker threads shared by every kernel call, unless the host's OpenMP team is
// attached (openmp_team.h): then parallel calls run on that team instead.
// One caller at a time owns the pool; a concurrent caller (another Python thread)
// does not wait for it but runs its own tasks inline, so calls never block each
// other and never share work state.
#pragma once
#include <atomic>
#include <algorithm>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "openmp_team.h"

namespace sp {

// A spin-wait hint to the core (pause on x86-64, yield on aarch64).
inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

class ThreadPool {
 public:
  // Process-wide pool; deliberately leaked so interpreter shutdown never joins threads.
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool();
    return *pool;
  }

  // Runs fn(task) for task in [0, n_tasks) on up to n_threads threads (the caller included).
  void run(int n_tasks, int n_threads, const std::function<void(int)>& fn) {
    if (n_tasks <= 0) return;
    if (n_threads <= 1 || n_tasks == 1) {
      for (int t = 0; t < n_tasks; ++t) fn(t);
      return;
    }
    auto call = [](void* f, int t) { (*static_cast<const std::function<void(int)>*>(f))(t); };
    if (openmp_run(n_tasks, std::min(n_threads, n_tasks), call, const_cast<std::function<void(int)>*>(&fn)))
      return;
    std::unique_lock<std::mutex> owner(owner_mu_, std::try_to_lock);
    if (!owner.owns_lock()) {
      for (int t = 0; t < n_tasks; ++t) fn(t);
      return;
    }
    const int helpers = std::min(n_threads, n_tasks) - 1;
    grow(helpers);
    {
      std::lock_guard<std::mutex> lk(wake_mu_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_.store(0, std::memory_order_relaxed);
      done_.store(0, std::memory_order_relaxed);
      active_ = helpers;
      running_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_cv_.notify_all();
    work();
    for (int spins = 0; done_.load(std::memory_order_acquire) < n_tasks; ++spins) {
      // on an oversubscribed machine the helper may be descheduled: give the core away
      if (spins > 4096) std::this_thread::yield(); else cpu_relax();
    }
    {
      std::lock_guard<std::mutex> lk(wake_mu_);
      running_ = false;
    }
    // helpers that joined late may still hold fn_; the caller's frame owns it
    while (busy_.load(std::memory_order_acquire) != 0) cpu_relax();
  }

  int size() const { return int(workers_.size()) + 1; }

 private:
  ThreadPool() = default;

  void grow(int helpers) {
    while (int(workers_.size()) < helpers) {
      const int id = int(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();
    }
  }

  void work() {
    for (;;) {
      const int t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= n_tasks_) return;
      (*fn_)(t);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void loop(int id) {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      // Spin briefly: back-to-back layer calls arrive microseconds apart, and a
      // condition-variable wake-up costs more than a small GEMV.
      uint64_t g = seen;
      for (int i = 0; i < kSpinPauses && g == seen; ++i) {
        cpu_relax();
        g = generation_.load(std::memory_order_acquire);
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(wake_mu_);
        wake_cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        g = generation_.load(std::memory_order_acquire);
      }
      seen = g;
      {
        std::lock_guard<std::mutex> lk(wake_mu_);
        if (!running_ || id >= active_ || generation_.load(std::memory_order_relaxed) != seen) continue;
        busy_.fetch_add(1, std::memory_order_acq_rel);
      }
      work();
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // Spin budget of an idle helper before it sleeps, about 30 us. Longer spins win on back-to-back
  // kernel calls but steal the second core from torch's own threads (layer norm, attention) that
  // run between our layers: measured on MiniLM, 20000 pauses made those ops 3-10x slower.
  static constexpr int kSpinPauses = 1000;

  std::mutex owner_mu_;
  std::mutex wake_mu_;
  std::condition_variable wake_cv_;
  std::vector<std::thread> workers_;
  // job fields: written under wake_mu_ by the owner, read by helpers that joined under it
  const std::function<void(int)>* fn_ = nullptr;
  int n_tasks_ = 0;
  int active_ = 0;
  bool running_ = false;
  std::atomic<int> next_{0}, done_{0}, busy_{0};
  std::atomic<uint64_t> generation_{0};
};

}  // namespace sp
