// MoE token permute / unpermute: group token rows by expert and scatter them back.
//
// Routing is top-k expert ids `topk[T, K]` (int32 or int64, flattened row-major into
// T*K "slots"); -1 marks an unused slot. Rows of the permuted layout are ordered by expert
// ascending and, within an expert, by token ascending (a stable counting sort), which is the
// order of megatron-core's moe_utils.permute. With a capacity C >= 0 ("drop and pad"), each
// expert keeps its first C tokens and owns the fixed block of rows [e*C, (e+1)*C); unused rows
// of the block are padding, marked -1 in the maps.
//
// Maps (int64):
//   row_map[num_rows]      source token of each permuted row, -1 for padding
//   slot_of_row[num_rows]  source slot (t*K + k) of each row, -1 for padding
//   row_of_slot[T*K]       permuted row of each slot, -1 for unused or dropped slots
//
// Float data is passed as void* with a FloatType; arithmetic accumulates in `Accum` =
// double for kFloat64 and float otherwise, and probabilities are always given as Accum.
// Plain C++ (and CUDA runtime types for the GPU path): no torch headers, so the .cu file
// compiles standalone with nvcc.
#pragma once

#include <cstddef>
#include <cstdint>

namespace megatron_mm {

enum class FloatType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// counts[num_experts + 2]: counts[e] = slots choosing expert e, counts[E] = slots outside
// [-1, E), counts[E + 1] = tokens naming one expert twice. Overwritten.
void moe_route_counts_cpu(const int32_t* topk, int64_t num_tokens, int64_t top_k,
                          int64_t num_experts, int64_t* counts);
void moe_route_counts_cpu(const int64_t* topk, int64_t num_tokens, int64_t top_k,
                          int64_t num_experts, int64_t* counts);

// Fills the three maps from valid routing and its counts (from moe_route_counts_*).
// capacity < 0: no dropping, num_rows = sum(counts[:E]); else num_rows = E * capacity.
void moe_build_permute_map_cpu(const int32_t* topk, int64_t num_tokens, int64_t top_k,
                               int64_t num_experts, int64_t capacity, const int64_t* counts,
                               int64_t* row_map, int64_t* slot_of_row, int64_t* row_of_slot);
void moe_build_permute_map_cpu(const int64_t* topk, int64_t num_tokens, int64_t top_k,
                               int64_t num_experts, int64_t capacity, const int64_t* counts,
                               int64_t* row_map, int64_t* slot_of_row, int64_t* row_of_slot);

// out[i] = src[index[i]] for i < num_out, zero bytes where index[i] == -1. Rows are opaque
// `row_bytes` wide, so this one gather permutes tokens, probabilities and their gradients.
void moe_gather_rows_cpu(const void* src, int64_t row_bytes, const int64_t* index,
                         int64_t num_out, void* out);

// out[t] = sum over rows i with row_map[i] == t of probs[i] * permuted[i] (probs == nullptr:
// weight 1), summed in Accum in ascending row order, so the result is deterministic; rows
// with row_map -1 are skipped and tokens without rows are zero. out is [num_tokens, hidden].
// Returns the number of row_map entries outside [-1, num_tokens); out is untouched unless 0.
int64_t moe_unpermute_cpu(FloatType dtype, const void* permuted, int64_t hidden,
                          const int64_t* row_map, int64_t num_rows, const void* probs,
                          int64_t num_tokens, void* out);

// Backward of moe_unpermute with probs: grad_permuted[i] = probs[i] * grad_out[row_map[i]],
// grad_probs[i] = dot(permuted[i], grad_out[row_map[i]]) in Accum (skipped, and permuted not
// read, when grad_probs is nullptr); both zero on padding rows. row_map must be valid.
void moe_unpermute_backward_cpu(FloatType dtype, const void* grad_out, const void* permuted,
                                int64_t hidden, const int64_t* row_map, int64_t num_rows,
                                const void* probs, void* grad_permuted, void* grad_probs);

}  // namespace megatron_mm

#if defined(MEGATRON_MM_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace megatron_mm {

// Same contracts as the CPU versions; all pointers are device pointers and the work is
// queued on `stream`. Each returns the first CUDA error.
cudaError_t moe_route_counts_cuda(const int32_t* topk, int64_t num_tokens, int64_t top_k,
                                  int64_t num_experts, int64_t* counts, cudaStream_t stream);
cudaError_t moe_route_counts_cuda(const int64_t* topk, int64_t num_tokens, int64_t top_k,
                                  int64_t num_experts, int64_t* counts, cudaStream_t stream);

// The GPU map builder and unpermute sort with CUB; they need device scratch of these sizes.
size_t moe_permute_map_workspace_bytes(int64_t num_tokens, int64_t top_k, int64_t num_experts);
size_t moe_unpermute_workspace_bytes(int64_t num_rows, int64_t num_tokens);

// `counts` is the device output of moe_route_counts_cuda for the same routing.
cudaError_t moe_build_permute_map_cuda(const int32_t* topk, int64_t num_tokens, int64_t top_k,
                                       int64_t num_experts, int64_t capacity,
                                       const int64_t* counts, void* workspace,
                                       size_t workspace_bytes, int64_t* row_map,
                                       int64_t* slot_of_row, int64_t* row_of_slot,
                                       cudaStream_t stream);
cudaError_t moe_build_permute_map_cuda(const int64_t* topk, int64_t num_tokens, int64_t top_k,
                                       int64_t num_experts, int64_t capacity,
                                       const int64_t* counts, void* workspace,
                                       size_t workspace_bytes, int64_t* row_map,
                                       int64_t* slot_of_row, int64_t* row_of_slot,
                                       cudaStream_t stream);

cudaError_t moe_gather_rows_cuda(const void* src, int64_t row_bytes, const int64_t* index,
                                 int64_t num_out, void* out, cudaStream_t stream);

// row_map must already be valid (entries in [-1, num_tokens)).
cudaError_t moe_unpermute_cuda(FloatType dtype, const void* permuted, int64_t hidden,
                               const int64_t* row_map, int64_t num_rows, const void* probs,
                               int64_t num_tokens, void* workspace, size_t workspace_bytes,
                               void* out, cudaStream_t stream);

cudaError_t moe_unpermute_backward_cuda(FloatType dtype, const void* grad_out,
                                        const void* permuted, int64_t hidden,
                                        const int64_t* row_map, int64_t num_rows,
                                        const void* probs, void* grad_permuted, void* grad_probs,
                                        cudaStream_t stream);

}  // namespace megatron_mm
#endif
