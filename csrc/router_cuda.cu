// CUDA implementation of the fused MoE router (contract in router.h).
//
// One thread routes one token with the same per-token code as the CPU (router_token in
// router.h), so both devices pick the same experts. Counts go through a shared-memory block
// histogram while the bins fit, as in load_balance_cuda.cu.
#include "router.h"

#include <algorithm>

namespace megatron_mm {
namespace {

constexpr int kThreadsPerBlock = 128;
constexpr int64_t kMaxBlocks = 1 << 16;
constexpr int64_t kMaxSharedBins = 48 * 1024 / sizeof(unsigned int);

int blocks_for(int64_t items) {
  return static_cast<int>(
      std::clamp<int64_t>((items + kThreadsPerBlock - 1) / kThreadsPerBlock, 1, kMaxBlocks));
}

template <typename Logit, typename Accum>
__global__ void forward_kernel(const Logit* __restrict__ logits, const Accum* __restrict__ bias,
                               RouterConfig c, bool shared_bins, Accum* __restrict__ probs,
                               int64_t* __restrict__ indices,
                               unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int block_bins[];
  if (shared_bins) {
    for (int64_t e = threadIdx.x; e < c.num_experts; e += blockDim.x) block_bins[e] = 0;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < c.num_tokens;
       t += stride) {
    int64_t* chosen = indices + t * c.topk;
    router_token::route(logits + t * c.num_experts, bias, c, probs + t * c.topk, chosen);
    for (int64_t j = 0; j < c.topk; ++j) {
      if (shared_bins) {
        atomicAdd(&block_bins[chosen[j]], 1u);
      } else {
        atomicAdd(&counts[chosen[j]], 1ull);
      }
    }
  }
  if (shared_bins) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < c.num_experts; e += blockDim.x) {
      if (block_bins[e] != 0) atomicAdd(&counts[e], static_cast<unsigned long long>(block_bins[e]));
    }
  }
}

template <typename Logit, typename Accum>
__global__ void backward_kernel(const Logit* __restrict__ logits,
                                const int64_t* __restrict__ indices,
                                const Accum* __restrict__ grad_probs, RouterConfig c,
                                Accum* __restrict__ grad_logits) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < c.num_tokens;
       t += stride) {
    router_token::route_backward(logits + t * c.num_experts, indices + t * c.topk,
                                 grad_probs + t * c.topk, c, grad_logits + t * c.num_experts);
  }
}

template <typename Logit, typename Accum>
cudaError_t launch_forward(const Logit* logits, const Accum* bias, const RouterConfig& c,
                           Accum* probs, int64_t* indices, int64_t* counts, cudaStream_t stream) {
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "atomicAdd needs 64-bit bins");
  cudaError_t err = cudaMemsetAsync(counts, 0, c.num_experts * sizeof(int64_t), stream);
  if (err != cudaSuccess || c.num_tokens == 0) return err;
  const bool shared_bins = c.num_experts <= kMaxSharedBins;
  const size_t shared_bytes = shared_bins ? c.num_experts * sizeof(unsigned int) : 0;
  forward_kernel<<<blocks_for(c.num_tokens), kThreadsPerBlock, shared_bytes, stream>>>(
      logits, bias, c, shared_bins, probs, indices,
      reinterpret_cast<unsigned long long*>(counts));
  return cudaGetLastError();
}

template <typename Logit, typename Accum>
cudaError_t launch_backward(const Logit* logits, const int64_t* indices, const Accum* grad_probs,
                            const RouterConfig& c, Accum* grad_logits, cudaStream_t stream) {
  if (c.num_tokens == 0) return cudaSuccess;
  backward_kernel<<<blocks_for(c.num_tokens), kThreadsPerBlock, 0, stream>>>(
      logits, indices, grad_probs, c, grad_logits);
  return cudaGetLastError();
}

}  // namespace

cudaError_t router_forward_cuda(const float* logits, const float* bias, const RouterConfig& config,
                                float* probs, int64_t* indices, int64_t* counts,
                                cudaStream_t stream) {
  return launch_forward(logits, bias, config, probs, indices, counts, stream);
}

cudaError_t router_forward_cuda(const BFloat16Bits* logits, const float* bias,
                                const RouterConfig& config, float* probs, int64_t* indices,
                                int64_t* counts, cudaStream_t stream) {
  return launch_forward(logits, bias, config, probs, indices, counts, stream);
}

cudaError_t router_forward_cuda(const double* logits, const double* bias,
                                const RouterConfig& config, double* probs, int64_t* indices,
                                int64_t* counts, cudaStream_t stream) {
  return launch_forward(logits, bias, config, probs, indices, counts, stream);
}

cudaError_t router_backward_cuda(const float* logits, const int64_t* indices,
                                 const float* grad_probs, const RouterConfig& config,
                                 float* grad_logits, cudaStream_t stream) {
  return launch_backward(logits, indices, grad_probs, config, grad_logits, stream);
}

cudaError_t router_backward_cuda(const BFloat16Bits* logits, const int64_t* indices,
                                 const float* grad_probs, const RouterConfig& config,
                                 float* grad_logits, cudaStream_t stream) {
  return launch_backward(logits, indices, grad_probs, config, grad_logits, stream);
}

cudaError_t router_backward_cuda(const double* logits, const int64_t* indices,
                                 const double* grad_probs, const RouterConfig& config,
                                 double* grad_logits, cudaStream_t stream) {
  return launch_backward(logits, indices, grad_probs, config, grad_logits, stream);
}

}  // namespace megatron_mm
