#include "openmp_team.h"

#include <dlfcn.h>

#include <atomic>

namespace sp {

namespace {

using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
using IntFn = int (*)();

struct Runtime {
  ParallelFn parallel = nullptr;
  IntFn in_parallel = nullptr;
};

// Written rarely (attach / detach), read on every call; a Runtime is never freed so a reader that
// loaded the old pointer stays valid.
std::atomic<const Runtime*> g_runtime{nullptr};

struct Job {
  void (*fn)(void*, int);
  void* ctx;
  int n_tasks;
  std::atomic<int> next{0};
};

void team_body(void* data) {
  Job& job = *static_cast<Job*>(data);
  for (;;) {
    const int t = job.next.fetch_add(1, std::memory_order_relaxed);
    if (t >= job.n_tasks) return;
    job.fn(job.ctx, t);
  }
}

}  // namespace

std::string attach_openmp(const std::string& path) {
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD | RTLD_LOCAL);
  if (!lib) return "not loaded in this process: " + path;
  auto* parallel = reinterpret_cast<ParallelFn>(dlsym(lib, "GOMP_parallel"));
  auto* in_parallel = reinterpret_cast<IntFn>(dlsym(lib, "omp_in_parallel"));
  if (!parallel || !in_parallel) {
    dlclose(lib);
    return "no GOMP_parallel / omp_in_parallel in " + path;
  }
  // the handle is kept (never dlclose'd): the runtime outlives every call that may use it
  g_runtime.store(new Runtime{parallel, in_parallel}, std::memory_order_release);
  return {};
}

void detach_openmp() { g_runtime.store(nullptr, std::memory_order_release); }

const char* parallel_backend() { return g_runtime.load(std::memory_order_acquire) ? "openmp" : "own"; }

bool openmp_run(int n_tasks, int n_threads, void (*fn)(void*, int), void* ctx) {
  const Runtime* rt = g_runtime.load(std::memory_order_acquire);
  if (!rt || rt->in_parallel()) return false;
  Job job{fn, ctx, n_tasks};
  rt->parallel(&team_body, &job, unsigned(n_threads), 0);
  return true;
}

}  // namespace sp
