// Fused MoE router: scores, group-limited top-k, probabilities and per-expert token counts
// in one pass per token, plus the backward of the probabilities to the logits.
//
// Semantics are megatron-core's moe_utils.topk_routing_with_score_function (fused=False):
//   * scores: softmax (pre_softmax: softmax over all experts before top-k; otherwise top-k on
//     the logits and softmax over the chosen logits) or sigmoid (chosen scores divided by
//     their sum + 1e-20 when topk > 1);
//   * expert_bias (sigmoid only) is added to the scores for the selection, never to probs;
//   * group-limited routing (group_topk > 0): experts form num_groups equal groups, a group
//     scores the sum of its top (topk / group_topk) selection scores, the best group_topk
//     groups are kept, and top-k runs over their experts;
//   * probs are multiplied by `scale` (1 when megatron-core's scaling_factor is unset).
// Chosen experts come out by descending selection score; ties go to the lower expert (and
// the lower group) index. Logits are read in Accum = double for float64 logits and float
// otherwise (bfloat16 logits are scored in float32). NaN logits give unspecified routing.
// Plain C++ (and CUDA runtime types for the GPU path): no torch headers, so the .cu file
// compiles standalone with nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MEGATRON_MM_HOST_DEVICE __host__ __device__
#else
#define MEGATRON_MM_HOST_DEVICE
#endif

namespace megatron_mm {

// Per-token buffers are fixed-size arrays (registers on the GPU), so top-k is bounded.
constexpr int64_t kRouterMaxTopK = 64;

enum class RouterScore : int { kSoftmax = 0, kSigmoid = 1 };

// bfloat16 logits as raw bits: the upper half of a float32.
struct BFloat16Bits {
  uint16_t bits;
};

struct RouterConfig {
  int64_t num_tokens;
  int64_t num_experts;
  int64_t topk;           // 1 <= topk <= min(num_experts, kRouterMaxTopK)
  RouterScore score;
  bool pre_softmax;       // softmax only
  int64_t num_groups;     // divides num_experts; read only when group_topk > 0
  int64_t group_topk;     // 0: no group limit; else group_topk <= topk <= group_topk * group size
  double scale;
};

// logits [T, E]; bias [E] or nullptr; probs [T, K]; indices [T, K]; counts [E] overwritten
// with how many tokens chose each expert.
void router_forward_cpu(const float* logits, const float* bias, const RouterConfig& config,
                        float* probs, int64_t* indices, int64_t* counts);
void router_forward_cpu(const BFloat16Bits* logits, const float* bias, const RouterConfig& config,
                        float* probs, int64_t* indices, int64_t* counts);
void router_forward_cpu(const double* logits, const double* bias, const RouterConfig& config,
                        double* probs, int64_t* indices, int64_t* counts);

// grad_logits [T, E] (Accum) from grad_probs [T, K] for the routing `indices` [T, K] that
// router_forward produced from the same logits and config; unchosen experts get zero except
// with pre_softmax, where every logit feeds the softmax.
void router_backward_cpu(const float* logits, const int64_t* indices, const float* grad_probs,
                         const RouterConfig& config, float* grad_logits);
void router_backward_cpu(const BFloat16Bits* logits, const int64_t* indices,
                         const float* grad_probs, const RouterConfig& config, float* grad_logits);
void router_backward_cpu(const double* logits, const int64_t* indices, const double* grad_probs,
                         const RouterConfig& config, double* grad_logits);

// ---- per-token routing shared by the CPU and CUDA kernels ----
namespace router_token {

MEGATRON_MM_HOST_DEVICE inline float to_accum(float x) { return x; }
MEGATRON_MM_HOST_DEVICE inline double to_accum(double x) { return x; }
MEGATRON_MM_HOST_DEVICE inline float to_accum(BFloat16Bits x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// Unqualified host exp(float) would be ::exp(double); keep float math in float.
MEGATRON_MM_HOST_DEVICE inline float exp_of(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
MEGATRON_MM_HOST_DEVICE inline double exp_of(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

template <typename Accum>
MEGATRON_MM_HOST_DEVICE Accum sigmoid(Accum x) {
  return Accum(1) / (Accum(1) + exp_of(-x));
}

// Keeps the `capacity` best (value, id) pairs seen so far, best first. Ids arrive in
// ascending order, so a strict `>` leaves equal values in ascending id order.
template <typename Accum>
struct TopK {
  Accum value[kRouterMaxTopK];
  int64_t id[kRouterMaxTopK];
  int64_t size = 0;
  int64_t capacity;

  MEGATRON_MM_HOST_DEVICE explicit TopK(int64_t k) : capacity(k) {}

  MEGATRON_MM_HOST_DEVICE void push(Accum v, int64_t i) {
    if (size == capacity && !(v > value[size - 1])) return;
    int64_t pos = size < capacity ? size++ : size - 1;
    for (; pos > 0 && v > value[pos - 1]; --pos) {
      value[pos] = value[pos - 1];
      id[pos] = id[pos - 1];
    }
    value[pos] = v;
    id[pos] = i;
  }
};

// Softmax statistics over all experts: y_e = exp_of(z_e - max) / sum.
template <typename Accum>
struct SoftmaxStats {
  Accum max;
  Accum sum;
};

template <typename Logit, typename Accum>
MEGATRON_MM_HOST_DEVICE SoftmaxStats<Accum> softmax_stats(const Logit* z, int64_t n) {
  Accum max = to_accum(z[0]);
  for (int64_t e = 1; e < n; ++e) max = to_accum(z[e]) > max ? to_accum(z[e]) : max;
  Accum sum = 0;
  for (int64_t e = 0; e < n; ++e) sum += exp_of(to_accum(z[e]) - max);
  return {max, sum};
}

// Score that decides the selection of expert e.
template <typename Logit, typename Accum>
MEGATRON_MM_HOST_DEVICE Accum selection_score(const Logit* z, const Accum* bias,
                                              const RouterConfig& c,
                                              const SoftmaxStats<Accum>& stats, int64_t e) {
  const Accum logit = to_accum(z[e]);
  if (c.score == RouterScore::kSigmoid) {
    return bias ? sigmoid(logit) + bias[e] : sigmoid(logit);
  }
  return c.pre_softmax ? exp_of(logit - stats.max) / stats.sum : logit;
}

// Routes one token: probs[K] and indices[K], best selection score first.
template <typename Logit, typename Accum>
MEGATRON_MM_HOST_DEVICE void route(const Logit* z, const Accum* bias, const RouterConfig& c,
                                   Accum* probs, int64_t* indices) {
  const int64_t num_experts = c.num_experts;
  SoftmaxStats<Accum> stats{0, 1};
  if (c.score == RouterScore::kSoftmax && c.pre_softmax) stats = softmax_stats<Logit, Accum>(z, num_experts);

  TopK<Accum> experts(c.topk);
  if (c.group_topk > 0) {
    const int64_t group_size = num_experts / c.num_groups;
    TopK<Accum> groups(c.group_topk);
    for (int64_t g = 0; g < c.num_groups; ++g) {
      TopK<Accum> best_in_group(c.topk / c.group_topk);
      for (int64_t e = g * group_size; e < (g + 1) * group_size; ++e) {
        best_in_group.push(selection_score(z, bias, c, stats, e), e);
      }
      Accum group_score = 0;
      for (int64_t i = 0; i < best_in_group.size; ++i) group_score += best_in_group.value[i];
      groups.push(group_score, g);
    }
    // Scan the kept groups in ascending order so experts still arrive in ascending id order.
    bool kept[kRouterMaxTopK];
    int64_t kept_group[kRouterMaxTopK];
    for (int64_t i = 0; i < groups.size; ++i) kept[i] = false;
    for (int64_t n = 0; n < groups.size; ++n) {
      int64_t lowest = -1;
      for (int64_t i = 0; i < groups.size; ++i) {
        if (!kept[i] && (lowest < 0 || groups.id[i] < groups.id[lowest])) lowest = i;
      }
      kept[lowest] = true;
      kept_group[n] = groups.id[lowest];
    }
    for (int64_t n = 0; n < groups.size; ++n) {
      for (int64_t e = kept_group[n] * group_size; e < (kept_group[n] + 1) * group_size; ++e) {
        experts.push(selection_score(z, bias, c, stats, e), e);
      }
    }
  } else {
    for (int64_t e = 0; e < num_experts; ++e) experts.push(selection_score(z, bias, c, stats, e), e);
  }

  const int64_t k = c.topk;
  for (int64_t j = 0; j < k; ++j) indices[j] = experts.id[j];
  if (c.score == RouterScore::kSigmoid) {
    Accum sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      probs[j] = sigmoid(to_accum(z[indices[j]]));
      sum += probs[j];
    }
    if (k > 1) {
      for (int64_t j = 0; j < k; ++j) probs[j] = probs[j] / (sum + Accum(1e-20));
    }
  } else if (c.pre_softmax) {
    for (int64_t j = 0; j < k; ++j) probs[j] = exp_of(to_accum(z[indices[j]]) - stats.max) / stats.sum;
  } else {
    // The first chosen logit is the largest: the selection score is the logit itself.
    const Accum max = to_accum(z[indices[0]]);
    Accum sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      probs[j] = exp_of(to_accum(z[indices[j]]) - max);
      sum += probs[j];
    }
    for (int64_t j = 0; j < k; ++j) probs[j] = probs[j] / sum;
  }
  const Accum scale = static_cast<Accum>(c.scale);
  for (int64_t j = 0; j < k; ++j) probs[j] = probs[j] * scale;
}

// d probs / d logits of one token: grad[E] from g[K] for the chosen `indices`.
template <typename Logit, typename Accum>
MEGATRON_MM_HOST_DEVICE void route_backward(const Logit* z, const int64_t* indices,
                                            const Accum* g, const RouterConfig& c, Accum* grad) {
  const int64_t k = c.topk;
  const Accum scale = static_cast<Accum>(c.scale);
  for (int64_t e = 0; e < c.num_experts; ++e) grad[e] = 0;
  if (c.score == RouterScore::kSigmoid) {
    Accum sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += sigmoid(to_accum(z[indices[j]]));
    // probs = scale * s / (sum + eps): d/ds_j = scale / (sum + eps) * (g_j - sum_i g_i q_i).
    const Accum denom = k > 1 ? sum + Accum(1e-20) : Accum(1);
    Accum dot = 0;
    if (k > 1) {
      for (int64_t j = 0; j < k; ++j) dot += g[j] * sigmoid(to_accum(z[indices[j]])) / denom;
    }
    for (int64_t j = 0; j < k; ++j) {
      const Accum s = sigmoid(to_accum(z[indices[j]]));
      grad[indices[j]] = scale / denom * (g[j] - dot) * s * (Accum(1) - s);
    }
  } else if (c.pre_softmax) {
    // probs_j = scale * y[indices_j] with y the softmax over all experts.
    const SoftmaxStats<Accum> stats = softmax_stats<Logit, Accum>(z, c.num_experts);
    Accum dot = 0;
    for (int64_t j = 0; j < k; ++j) dot += g[j] * exp_of(to_accum(z[indices[j]]) - stats.max) / stats.sum;
    for (int64_t e = 0; e < c.num_experts; ++e) {
      grad[e] = -scale * exp_of(to_accum(z[e]) - stats.max) / stats.sum * dot;
    }
    for (int64_t j = 0; j < k; ++j) {
      grad[indices[j]] += scale * exp_of(to_accum(z[indices[j]]) - stats.max) / stats.sum * g[j];
    }
  } else {
    // probs = scale * softmax over the chosen logits.
    const Accum max = to_accum(z[indices[0]]);
    Accum sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += exp_of(to_accum(z[indices[j]]) - max);
    Accum dot = 0;
    for (int64_t j = 0; j < k; ++j) dot += g[j] * exp_of(to_accum(z[indices[j]]) - max) / sum;
    for (int64_t j = 0; j < k; ++j) {
      grad[indices[j]] = scale * exp_of(to_accum(z[indices[j]]) - max) / sum * (g[j] - dot);
    }
  }
}

}  // namespace router_token
}  // namespace megatron_mm

#if defined(MEGATRON_MM_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace megatron_mm {

// Same contracts as the CPU versions; all pointers are device pointers, `config` stays on the
// host, and the work (counts zeroed too) is queued on `stream`. Returns the first CUDA error.
cudaError_t router_forward_cuda(const float* logits, const float* bias, const RouterConfig& config,
                                float* probs, int64_t* indices, int64_t* counts,
                                cudaStream_t stream);
cudaError_t router_forward_cuda(const BFloat16Bits* logits, const float* bias,
                                const RouterConfig& config, float* probs, int64_t* indices,
                                int64_t* counts, cudaStream_t stream);
cudaError_t router_forward_cuda(const double* logits, const double* bias,
                                const RouterConfig& config, double* probs, int64_t* indices,
                                int64_t* counts, cudaStream_t stream);

cudaError_t router_backward_cuda(const float* logits, const int64_t* indices,
                                 const float* grad_probs, const RouterConfig& config,
                                 float* grad_logits, cudaStream_t stream);
cudaError_t router_backward_cuda(const BFloat16Bits* logits, const int64_t* indices,
                                 const float* grad_probs, const RouterConfig& config,
                                 float* grad_logits, cudaStream_t stream);
cudaError_t router_backward_cuda(const double* logits, const int64_t* indices,
                                 const double* grad_probs, const RouterConfig& config,
                                 double* grad_logits, cudaStream_t stream);

}  // namespace megatron_mm
#endif
