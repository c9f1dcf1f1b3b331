#include "threadpool.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define SD_PAUSE() _mm_pause()
#else
#define SD_PAUSE() std::this_thread::yield()
#endif

namespace specdec {
namespace {

thread_local bool tl_in_pool_task = false;

class Pool {
 public:
  explicit Pool(int total) : total_(std::max(1, total)) {
    for (int w = 1; w < total_; ++w) threads_.emplace_back([this, w] { loop(w); });
  }
  // Stops and joins the workers; the object stays valid (callers may still hold it) and runs inline.
  void shutdown() {
    std::lock_guard<std::mutex> call(call_mu_);
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }
  bool stopped() const { return stop_.load(); }
  int total() const { return total_; }
  std::mutex& call_mutex() { return call_mu_; }

  // Caller must hold call_mutex(). The caller claims tasks too and never waits for a worker that has
  // not started: a worker that is late (descheduled, asleep) simply finds no task left.
  void run(int64_t n, const TaskFn& fn, int workers) {
    Job job;
    job.fn = &fn;
    job.n = n;
    job.max_worker = workers;
    {
      std::lock_guard<std::mutex> lk(m_);
      job.gen = gen_.load(std::memory_order_relaxed) + 1;
      job_.store(&job, std::memory_order_seq_cst);
      gen_.store(job.gen, std::memory_order_seq_cst);
    }
    cv_.notify_all();
    work(job, 0);
    job_.store(nullptr, std::memory_order_seq_cst);
    while (entered_.load(std::memory_order_seq_cst) != 0) SD_PAUSE();
  }

 private:
  struct Job {
    const TaskFn* fn = nullptr;
    int64_t n = 0;
    int max_worker = 1;
    uint64_t gen = 0;
    std::atomic<int64_t> next{0};
  };

  static void work(Job& job, int w) {
    if (w >= job.max_worker) return;
    tl_in_pool_task = true;
    for (;;) {
      const int64_t t = job.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= job.n) break;
      (*job.fn)(t, w);
    }
    tl_in_pool_task = false;
  }

  void loop(int w) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        // Spin for a while, then sleep: a forward dispatches a linear layer's job every few hundred microseconds with
        // torch's ops in between, and a sleeping worker wakes too late to take its share of the next one (the caller
        // then streams most of the weights alone). The spin is what `python bench/verify_cost.py` finds fastest.
        auto t0 = std::chrono::steady_clock::now();
        int spins = 0;
        while ((g = gen_.load(std::memory_order_acquire)) == seen && !stop_.load(std::memory_order_relaxed)) {
          SD_PAUSE();
          if (++spins % 128 == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(1000)) {
            std::unique_lock<std::mutex> lk(m_);
            cv_.wait(lk, [&] { return stop_.load() || gen_.load(std::memory_order_acquire) != seen; });
            g = gen_.load(std::memory_order_acquire);
            break;
          }
        }
      }
      if (stop_.load()) return;
      seen = g;
      entered_.fetch_add(1, std::memory_order_seq_cst);
      Job* j = job_.load(std::memory_order_seq_cst);
      if (j && j->gen == g) work(*j, w);
      entered_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  const int total_;
  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<Job*> job_{nullptr};
  std::atomic<int> entered_{0};
  std::atomic<bool> stop_{false};
  std::mutex call_mu_;
};

std::mutex g_mu;
Pool* g_pool = nullptr;  // leaked on purpose: no join at interpreter exit
int g_requested = 0;

int default_threads() {
  if (const char* env = std::getenv("SPECDEC_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : int(std::min(hc, 64u));
}

void after_fork_child() {
  // The child has no worker threads: forget the pool (leak it) and build a new one on demand.
  g_pool = nullptr;
  new (&g_mu) std::mutex();
}

Pool* pool() {
  static bool registered = [] {
    pthread_atfork(nullptr, nullptr, after_fork_child);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lk(g_mu);
  if (!g_pool) g_pool = new Pool(g_requested > 0 ? g_requested : default_threads());
  return g_pool;
}

}  // namespace

int num_threads() { return pool()->total(); }

void set_num_threads(int n) {
  Pool* old = nullptr;
  {
    pool();
    std::lock_guard<std::mutex> lk(g_mu);
    g_requested = n > 0 ? n : 0;
    old = g_pool;
    g_pool = nullptr;
  }
  if (old) old->shutdown();  // leaked: another thread may still hold the pointer
  pool();
}

int available_workers() {
  if (tl_in_pool_task) return 1;
  return pool()->total();
}

void parallel_run(int64_t n, const TaskFn& fn, int max_workers) {
  if (n <= 0) return;
  Pool* p = tl_in_pool_task ? nullptr : pool();
  int workers = p ? p->total() : 1;
  if (max_workers > 0) workers = std::min(workers, max_workers);
  workers = int(std::min<int64_t>(workers, n));
  if (p && workers > 1) {
    std::unique_lock<std::mutex> lk(p->call_mutex(), std::try_to_lock);
    if (lk.owns_lock() && !p->stopped()) {
      p->run(n, fn, workers);
      return;
    }
  }
  const bool was = tl_in_pool_task;
  tl_in_pool_task = true;
  for (int64_t t = 0; t < n; ++t) fn(t, 0);
  tl_in_pool_task = was;
}

}  // namespace specdec
