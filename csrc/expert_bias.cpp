// OpenMP CPU implementation of the fused expert-bias update (contract in expert_bias.h).
#include "expert_bias.h"

#include <omp.h>

namespace megatron_mm {
namespace {

// Below this many experts in all layers thread start-up costs more than the update.
constexpr int64_t kMinExpertsPerThread = 1 << 14;

template <typename Real>
Real sign_of(Real x) {
  return static_cast<Real>((x > 0) - (x < 0));
}

// Real: the type torch computes the mean, offset and update in (see expert_bias.h).
template <typename Count, typename Sum, typename Real>
void update_layer(float* bias, const Count* counts, int64_t num_experts, double rate) {
  Sum sum = 0;
  for (int64_t e = 0; e < num_experts; ++e) sum += static_cast<Sum>(counts[e]);
  const Real mean = static_cast<Real>(sum) / static_cast<Real>(num_experts);
  const Real step = static_cast<Real>(rate);
  for (int64_t e = 0; e < num_experts; ++e) {
    const Real offset = mean - static_cast<Real>(counts[e]);
    bias[e] = static_cast<float>(static_cast<Real>(bias[e]) + sign_of(offset) * step);
  }
}

}  // namespace

void update_expert_bias_cpu(const ExpertBiasLayer* layers, int64_t num_layers, double rate) {
  int64_t total_experts = 0;
  for (int64_t l = 0; l < num_layers; ++l) total_experts += layers[l].num_experts;
  const bool parallel = total_experts >= kMinExpertsPerThread;

#pragma omp parallel for schedule(dynamic) if (parallel)
  for (int64_t l = 0; l < num_layers; ++l) {
    const ExpertBiasLayer& layer = layers[l];
    switch (layer.count_type) {
      case CountType::kInt64:
        update_layer<int64_t, int64_t, float>(
            layer.bias, static_cast<const int64_t*>(layer.counts), layer.num_experts, rate);
        break;
      case CountType::kFloat32:
        update_layer<float, double, float>(
            layer.bias, static_cast<const float*>(layer.counts), layer.num_experts, rate);
        break;
      case CountType::kFloat64:
        update_layer<double, double, double>(
            layer.bias, static_cast<const double*>(layer.counts), layer.num_experts, rate);
        break;
    }
  }
}

}  // namespace megatron_mm
