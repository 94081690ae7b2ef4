// Borrowing the host's OpenMP team (the one torch's intra-op work runs on) for our parallel calls.
//
// Why: torch's OpenMP workers spin for a while after each of torch's own ops. A second pool of ours
// then competes with them for the same cores, and on a 2-core machine a whole model ran ~1.4x slower
// than its layers did alone. Running our tasks through the host runtime's GOMP_parallel (the entry
// point `#pragma omp parallel` compiles to; libgomp and Intel's libiomp5 both export it) puts them
// on the very threads that are already spinning, as at::parallel_for does.
//
// The runtime is only ever looked up among libraries already loaded (RTLD_NOLOAD), so we never
// start a second OpenMP runtime in the process.
#pragma once
#include <string>

namespace sp {

// Use the OpenMP runtime loaded from `path` (must already be in the process). Returns an empty
// string on success, else why not (nothing changes then).
std::string attach_openmp(const std::string& path);
// Back to sparsepress's own thread pool.
void detach_openmp();
// "openmp" or "own": which threads run parallel calls now.
const char* parallel_backend();

// Runs fn(ctx, task) for task in [0, n_tasks) on an OpenMP team of n_threads when attached and
// not already inside a parallel region; returns false (nothing run) otherwise.
bool openmp_run(int n_tasks, int n_threads, void (*fn)(void* ctx, int task), void* ctx);

}  // namespace sp
