// Aux-loss-free expert-bias update (DeepSeek-V3 style load balancing), fused over layers.
//
// For every MoE layer l with E_l experts: bias_l[e] += rate * sign(mean(counts_l) - counts_l[e]),
// the arithmetic of megatron-core's moe_utils.get_updated_expert_bias after its all-reduce:
//   * int64 / float32 counts: mean = float(sum) / float(E) and the update run in float32;
//   * float64 counts: mean, sign and update run in float64 and round once into the fp32 bias
//     (torch promotes the fp32 bias to float64 there).
// Sums accumulate exactly (int64, or float64 for float counts) before that rounding, so they
// equal torch's whenever its float32 sum is exact (integer counts below 2^24 in total).
// Plain C++ (and CUDA runtime types for the GPU path): no torch headers, so the .cu file
// compiles standalone with nvcc.
#pragma once

#include <cstdint>

namespace megatron_mm {

enum class CountType : int { kInt64 = 0, kFloat32 = 1, kFloat64 = 2 };

// One layer: `bias` fp32 [num_experts] updated in place from `counts` [num_experts].
struct ExpertBiasLayer {
  float* bias;
  const void* counts;
  int64_t num_experts;
  CountType count_type;
};

void update_expert_bias_cpu(const ExpertBiasLayer* layers, int64_t num_layers, double rate);

}  // namespace megatron_mm

#if defined(MEGATRON_MM_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace megatron_mm {

// Same contract; `layers` is a device array whose pointers are device pointers. One launch
// (a block per layer) queued on `stream`. Returns the first CUDA error.
cudaError_t update_expert_bias_cuda(const ExpertBiasLayer* layers, int64_t num_layers,
                                    double rate, cudaStream_t stream);

}  // namespace megatron_mm
#endif
