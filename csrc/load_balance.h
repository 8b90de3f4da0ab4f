// Per-expert token histogram for MoE load balancing.
//
// Input: routing choices (top-k expert ids per token, flattened), where -1 marks a
// dropped slot. Output: counts[num_experts + 1]; counts[e] is how many entries chose
// expert e, and the extra last bin counts entries outside [-1, num_experts) so the
// caller can reject bad input after a single pass over the data.
// Plain C++ (and CUDA runtime types for the GPU path): no torch headers, so the .cu
// file compiles standalone with nvcc.
#pragma once

#include <cstdint>

namespace megatron_mm {

// counts must hold num_experts + 1 elements; they are overwritten.
void expert_histogram_cpu(const int64_t* indices, int64_t num_indices, int64_t num_experts,
                          int64_t* counts);
void expert_histogram_cpu(const int32_t* indices, int64_t num_indices, int64_t num_experts,
                          int64_t* counts);

}  // namespace megatron_mm

#if defined(MEGATRON_MM_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace megatron_mm {

// Same contract as the CPU version; all pointers are device pointers and the work is
// queued on `stream` (counts are zeroed there too). Returns the first CUDA error.
cudaError_t expert_histogram_cuda(const int64_t* indices, int64_t num_indices,
                                  int64_t num_experts, int64_t* counts, cudaStream_t stream);
cudaError_t expert_histogram_cuda(const int32_t* indices, int64_t num_indices,
                                  int64_t num_experts, int64_t* counts, cudaStream_t stream);

}  // namespace megatron_mm
#endif
