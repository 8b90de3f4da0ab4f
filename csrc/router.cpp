// OpenMP CPU implementation of the fused MoE router (contract in router.h).
#include "router.h"

#include <algorithm>
#include <vector>

#include <omp.h>

namespace megatron_mm {
namespace {

// Below this many logits per thread, thread start-up costs more than the routing.
constexpr int64_t kMinLogitsPerThread = 1 << 14;

int threads_for(const RouterConfig& c) {
  return static_cast<int>(std::clamp<int64_t>(c.num_tokens * c.num_experts / kMinLogitsPerThread,
                                              1, omp_get_max_threads()));
}

template <typename Logit, typename Accum>
void forward(const Logit* logits, const Accum* bias, const RouterConfig& c, Accum* probs,
             int64_t* indices, int64_t* counts) {
  std::fill(counts, counts + c.num_experts, 0);
#pragma omp parallel num_threads(threads_for(c))
  {
    // Per-thread counts merged once keep atomics and false sharing out of the token loop.
    std::vector<int64_t> local(c.num_experts, 0);
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < c.num_tokens; ++t) {
      int64_t* chosen = indices + t * c.topk;
      router_token::route(logits + t * c.num_experts, bias, c, probs + t * c.topk, chosen);
      for (int64_t j = 0; j < c.topk; ++j) ++local[chosen[j]];
    }
#pragma omp critical
    for (int64_t e = 0; e < c.num_experts; ++e) counts[e] += local[e];
  }
}

template <typename Logit, typename Accum>
void backward(const Logit* logits, const int64_t* indices, const Accum* grad_probs,
              const RouterConfig& c, Accum* grad_logits) {
#pragma omp parallel for schedule(static) num_threads(threads_for(c))
  for (int64_t t = 0; t < c.num_tokens; ++t) {
    router_token::route_backward(logits + t * c.num_experts, indices + t * c.topk,
                                 grad_probs + t * c.topk, c, grad_logits + t * c.num_experts);
  }
}

}  // namespace

void router_forward_cpu(const float* logits, const float* bias, const RouterConfig& config,
                        float* probs, int64_t* indices, int64_t* counts) {
  forward(logits, bias, config, probs, indices, counts);
}

void router_forward_cpu(const BFloat16Bits* logits, const float* bias, const RouterConfig& config,
                        float* probs, int64_t* indices, int64_t* counts) {
  forward(logits, bias, config, probs, indices, counts);
}

void router_forward_cpu(const double* logits, const double* bias, const RouterConfig& config,
                        double* probs, int64_t* indices, int64_t* counts) {
  forward(logits, bias, config, probs, indices, counts);
}

void router_backward_cpu(const float* logits, const int64_t* indices, const float* grad_probs,
                         const RouterConfig& config, float* grad_logits) {
  backward(logits, indices, grad_probs, config, grad_logits);
}

void router_backward_cpu(const BFloat16Bits* logits, const int64_t* indices,
                         const float* grad_probs, const RouterConfig& config, float* grad_logits) {
  backward(logits, indices, grad_probs, config, grad_logits);
}

void router_backward_cpu(const double* logits, const int64_t* indices, const double* grad_probs,
                         const RouterConfig& config, double* grad_logits) {
  backward(logits, indices, grad_probs, config, grad_logits);
}

}  // namespace megatron_mm
