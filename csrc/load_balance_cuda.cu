// CUDA implementation of the per-expert histogram (contract in load_balance.h).
#include "load_balance.h"

#include <algorithm>

namespace megatron_mm {
namespace {

constexpr int kThreadsPerBlock = 256;
// Enough resident blocks to hide memory latency; more would only add flushes of the
// block histograms into global memory.
constexpr int kBlocksPerSm = 4;
// Block histograms live in shared memory while 32-bit bins fit the default 48 KiB
// per-block limit; wider routings count straight into global memory.
constexpr int64_t kMaxSharedBins = 48 * 1024 / sizeof(unsigned int);

__device__ __forceinline__ int64_t bin_of(int64_t expert, int64_t num_experts) {
  return (expert >= 0 && expert < num_experts) ? expert : (expert == -1 ? -1 : num_experts);
}

// A block sees at most num_indices / gridDim.x entries, far below 2^32 for any real
// routing, so 32-bit shared bins cannot overflow.
template <typename Index>
__global__ void histogram_shared(const Index* __restrict__ indices, int64_t num_indices,
                                 int64_t num_experts, unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int block_bins[];
  const int64_t num_bins = num_experts + 1;
  for (int64_t bin = threadIdx.x; bin < num_bins; bin += blockDim.x) block_bins[bin] = 0;
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_indices;
       i += stride) {
    const int64_t bin = bin_of(static_cast<int64_t>(indices[i]), num_experts);
    if (bin >= 0) atomicAdd(&block_bins[bin], 1u);
  }
  __syncthreads();

  for (int64_t bin = threadIdx.x; bin < num_bins; bin += blockDim.x) {
    const unsigned int count = block_bins[bin];
    if (count != 0) atomicAdd(&counts[bin], static_cast<unsigned long long>(count));
  }
}

template <typename Index>
__global__ void histogram_global(const Index* __restrict__ indices, int64_t num_indices,
                                 int64_t num_experts, unsigned long long* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_indices;
       i += stride) {
    const int64_t bin = bin_of(static_cast<int64_t>(indices[i]), num_experts);
    if (bin >= 0) atomicAdd(&counts[bin], 1ull);
  }
}

template <typename Index>
cudaError_t launch_histogram(const Index* indices, int64_t num_indices, int64_t num_experts,
                             int64_t* counts, cudaStream_t stream) {
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "atomicAdd needs 64-bit bins");
  const int64_t num_bins = num_experts + 1;
  cudaError_t err = cudaMemsetAsync(counts, 0, num_bins * sizeof(int64_t), stream);
  if (err != cudaSuccess || num_indices == 0) return err;

  int device = 0;
  int num_sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device)) !=
      cudaSuccess) {
    return err;
  }
  const int64_t blocks_to_cover = (num_indices + kThreadsPerBlock - 1) / kThreadsPerBlock;
  const int num_blocks =
      static_cast<int>(std::min<int64_t>(blocks_to_cover, int64_t{num_sms} * kBlocksPerSm));

  auto* global_bins = reinterpret_cast<unsigned long long*>(counts);
  if (num_bins <= kMaxSharedBins) {
    const size_t shared_bytes = num_bins * sizeof(unsigned int);
    histogram_shared<<<num_blocks, kThreadsPerBlock, shared_bytes, stream>>>(
        indices, num_indices, num_experts, global_bins);
  } else {
    histogram_global<<<num_blocks, kThreadsPerBlock, 0, stream>>>(indices, num_indices,
                                                                  num_experts, global_bins);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t expert_histogram_cuda(const int64_t* indices, int64_t num_indices,
                                  int64_t num_experts, int64_t* counts, cudaStream_t stream) {
  return launch_histogram(indices, num_indices, num_experts, counts, stream);
}

cudaError_t expert_histogram_cuda(const int32_t* indices, int64_t num_indices,
                                  int64_t num_experts, int64_t* counts, cudaStream_t stream) {
  return launch_histogram(indices, num_indices, num_experts, counts, stream);
}

}  // namespace megatron_mm
