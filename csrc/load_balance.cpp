// OpenMP CPU implementation of the per-expert histogram (contract in load_balance.h).
#include "load_balance.h"

#include <algorithm>
#include <vector>

#include <omp.h>

namespace megatron_mm {
namespace {

// Below this many entries thread start-up costs more than the counting itself.
constexpr int64_t kMinIndicesPerThread = 1 << 15;

template <typename Index>
void histogram(const Index* indices, int64_t num_indices, int64_t num_experts, int64_t* counts) {
  const int64_t num_bins = num_experts + 1;
  const int64_t invalid_bin = num_experts;
  std::fill(counts, counts + num_bins, 0);

  const int num_threads = static_cast<int>(std::clamp<int64_t>(
      num_indices / kMinIndicesPerThread, 1, omp_get_max_threads()));

#pragma omp parallel num_threads(num_threads)
  {
    // Each thread counts into its own bins; merging once at the end keeps atomics
    // and false sharing out of the hot loop.
    std::vector<int64_t> local(num_bins, 0);
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < num_indices; ++i) {
      const int64_t expert = static_cast<int64_t>(indices[i]);
      if (expert >= 0 && expert < num_experts) {
        ++local[expert];
      } else if (expert != -1) {
        ++local[invalid_bin];
      }
    }
#pragma omp critical
    for (int64_t bin = 0; bin < num_bins; ++bin) counts[bin] += local[bin];
  }
}

}  // namespace

void expert_histogram_cpu(const int64_t* indices, int64_t num_indices, int64_t num_experts,
                          int64_t* counts) {
  histogram(indices, num_indices, num_experts, counts);
}

void expert_histogram_cpu(const int32_t* indices, int64_t num_indices, int64_t num_experts,
                          int64_t* counts) {
  histogram(indices, num_indices, num_experts, counts);
}

}  // namespace megatron_mm
