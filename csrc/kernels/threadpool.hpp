// A small persistent thread pool (std::thread, not OpenMP, so it never fights torch's OpenMP pool).
//
// run(n, fn) calls fn(task, worker) for every task in [0, n); the calling thread works too (worker 0).
// Workers spin briefly after a job (kernels dispatch several short jobs back to back) and then sleep.
// Results never depend on which worker ran a task: the kernels give every task its own output slot.
#pragma once
#include <cstdint>
#include <functional>

namespace specdec {

using TaskFn = std::function<void(int64_t task, int worker)>;

// Total threads including the caller; at least 1.
int num_threads();
// n <= 0 restores the default (SPECDEC_NUM_THREADS or the hardware concurrency).
void set_num_threads(int n);
// Runs fn over [0, n). Falls back to running inline when the pool is busy (a concurrent caller) or
// when called from inside a pool task. max_workers caps the threads used (<= 0: all).
void parallel_run(int64_t n, const TaskFn& fn, int max_workers = 0);
// The number of workers parallel_run may use right now from this thread (1 when it would run inline).
int available_workers();

}  // namespace specdec
