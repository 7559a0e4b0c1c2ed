// Threads across independent items (rows, draws): OpenMP when the build found it, else
// std::thread, else one thread. Each item's result depends on the item only, so the
// number of threads never changes a result.
#pragma once

#include <stdint.h>

#include <thread>
#include <vector>

#if defined(FASTIS_WITH_OPENMP)
#include <omp.h>
#endif

// x86-64 GCC / Clang: the hot loops are compiled for AVX-512, AVX2 + FMA and the baseline,
// and the loader picks the best one for the running CPU (ifunc); flatten inlines the whole
// call tree so that every clone is vectorised for its own target.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && \
    !defined(FASTIS_NO_CLONES) && !defined(__CUDACC__)
#define FASTIS_HOT \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define FASTIS_HOT
#endif

namespace fastis {

// Items of ~work_per_item elements each; below ~32k elements per thread the start-up of a
// thread costs more than it saves.
inline int choose_threads(int32_t requested, int64_t items, int64_t work_per_item) {
  int64_t n = requested;
  if (n <= 0) {
#if defined(FASTIS_WITH_OPENMP)
    n = omp_get_max_threads();
#else
    n = static_cast<int64_t>(std::thread::hardware_concurrency());
#endif
  }
  const int64_t work = items * (work_per_item > 0 ? work_per_item : 1);
  const int64_t useful = work / 32768 > 0 ? work / 32768 : 1;
  if (n > useful) n = useful;
  if (n > items) n = items;
  return n < 1 ? 1 : static_cast<int>(n);
}

// fn(begin, end) on contiguous slices of [0, items), one per thread.
template <class Fn>
void parallel_for(int64_t items, int64_t work_per_item, int32_t num_threads, Fn fn) {
  const int nt = choose_threads(num_threads, items, work_per_item);
  if (nt <= 1) {
    fn(int64_t{0}, items);
    return;
  }
#if defined(FASTIS_WITH_OPENMP)
#pragma omp parallel num_threads(nt)
  {
    const int64_t k = omp_get_num_threads(), id = omp_get_thread_num();
    fn(items * id / k, items * (id + 1) / k);
  }
#else
  std::vector<std::thread> pool;
  try {
    pool.reserve(nt - 1);
    for (int id = 1; id < nt; ++id)
      pool.emplace_back([=] { fn(items * id / nt, items * (id + 1) / nt); });
  } catch (...) {  // no thread to be had: the rest runs here
  }
  const int started = static_cast<int>(pool.size()) + 1;
  fn(int64_t{0}, items / nt);
  for (int id = started; id < nt; ++id) fn(items * id / nt, items * (id + 1) / nt);
  for (auto& t : pool) t.join();
#endif
}

}  // namespace fastis
