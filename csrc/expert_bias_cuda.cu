// CUDA implementation of the fused expert-bias update (contract in expert_bias.h).
//
// One block per layer: the block sums the layer's counts, then updates its experts. Counts
// are tiny (E experts per layer), so one launch for all layers is what matters.
#include "expert_bias.h"

namespace megatron_mm {
namespace {

constexpr int kThreadsPerBlock = 256;

template <typename Real>
__device__ __forceinline__ Real sign_of(Real x) {
  return static_cast<Real>((x > 0) - (x < 0));
}

// Block-wide sum; every thread gets the total. Integer sums stay exact in any order, and the
// float64 sum of float32 counts is exact for integer-valued counts, as on the CPU.
template <typename Sum>
__device__ Sum block_sum(Sum value) {
  __shared__ Sum partial[kThreadsPerBlock / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  Sum total = 0;
  for (int w = 0; w < kThreadsPerBlock / 32; ++w) total += partial[w];
  return total;
}

template <typename Count, typename Sum, typename Real>
__device__ void update_layer(float* bias, const Count* counts, int64_t num_experts, double rate) {
  Sum local = 0;
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) local += static_cast<Sum>(counts[e]);
  const Real mean = static_cast<Real>(block_sum(local)) / static_cast<Real>(num_experts);
  const Real step = static_cast<Real>(rate);
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const Real offset = mean - static_cast<Real>(counts[e]);
    bias[e] = static_cast<float>(static_cast<Real>(bias[e]) + sign_of(offset) * step);
  }
}

__global__ void update_expert_bias_kernel(const ExpertBiasLayer* __restrict__ layers,
                                          double rate) {
  const ExpertBiasLayer layer = layers[blockIdx.x];
  switch (layer.count_type) {
    case CountType::kInt64:
      update_layer<int64_t, long long, float>(
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

}  // namespace

cudaError_t update_expert_bias_cuda(const ExpertBiasLayer* layers, int64_t num_layers,
                                    double rate, cudaStream_t stream) {
  if (num_layers == 0) return cudaSuccess;
  update_expert_bias_kernel<<<static_cast<unsigned int>(num_layers), kThreadsPerBlock, 0,
                              stream>>>(layers, rate);
  return cudaGetLastError();
}

}  // namespace megatron_mm
