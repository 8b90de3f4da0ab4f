// CUDA implementation of MoE permute / unpermute (contracts in moe_dispatch.h).
//
// Row order comes from CUB's stable radix sort: slots t*K+k are sorted by expert, and since
// slot ids ascend with the token, equal experts keep token order. Unpermute sorts rows by
// token the same way, so each token sums its rows in ascending row order without atomics.
#include "moe_dispatch.h"

#include <algorithm>
#include <type_traits>

#include <cub/cub.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace megatron_mm {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr size_t kWorkspaceAlign = 256;
// Grid-stride kernels stop adding blocks here; rows beyond are looped over.
constexpr int64_t kMaxBlocks = 1 << 16;

int blocks_for(int64_t items) {
  return static_cast<int>(
      std::clamp<int64_t>((items + kThreadsPerBlock - 1) / kThreadsPerBlock, 1, kMaxBlocks));
}

size_t aligned(size_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

// Number of key bits the radix sort must look at for keys in [0, max_key].
int bits_for(int64_t max_key) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) <= max_key) ++bits;
  return bits;
}

// Carves consecutive aligned buffers out of one workspace allocation.
struct WorkspaceCursor {
  char* base;
  size_t offset = 0;
  template <typename T>
  T* take(size_t count) {
    T* out = reinterpret_cast<T*>(base + offset);
    offset += aligned(count * sizeof(T));
    return out;
  }
};

__device__ __forceinline__ float to_accum(float x) { return x; }
__device__ __forceinline__ double to_accum(double x) { return x; }
__device__ __forceinline__ float to_accum(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_accum(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Scalar, typename Accum>
__device__ __forceinline__ Scalar from_accum(Accum x) {
  if constexpr (std::is_same_v<Scalar, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<Scalar, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return static_cast<Scalar>(x);
  }
}

// ---- routing counts ----

template <typename Index>
__global__ void route_counts_kernel(const Index* __restrict__ topk, int64_t num_tokens,
                                    int64_t top_k, int64_t num_experts,
                                    unsigned long long* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       token < num_tokens; token += stride) {
    const Index* choices = topk + token * top_k;
    bool duplicate = false;
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t expert = static_cast<int64_t>(choices[k]);
      if (expert == -1) continue;
      if (expert < -1 || expert >= num_experts) {
        atomicAdd(&counts[num_experts], 1ull);
        continue;
      }
      atomicAdd(&counts[expert], 1ull);
      for (int64_t j = 0; j < k; ++j) duplicate |= static_cast<int64_t>(choices[j]) == expert;
    }
    if (duplicate) atomicAdd(&counts[num_experts + 1], 1ull);
  }
}

// ---- permute map ----

// Sort keys: the expert, with unused slots (-1) as num_experts so they sort last.
template <typename Index>
__global__ void slot_keys_kernel(const Index* __restrict__ topk, int64_t num_slots,
                                 int64_t num_experts, int32_t* __restrict__ keys,
                                 int64_t* __restrict__ slots) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       slot < num_slots; slot += stride) {
    const int64_t expert = static_cast<int64_t>(topk[slot]);
    keys[slot] = static_cast<int32_t>(expert < 0 ? num_experts : expert);
    slots[slot] = slot;
  }
}

// One thread: E is at most a few thousand, and this runs once per permute.
__global__ void expert_first_sorted_kernel(const int64_t* __restrict__ counts,
                                           int64_t num_experts, int64_t* __restrict__ first) {
  int64_t running = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    first[e] = running;
    running += counts[e];
  }
}

__global__ void fill_maps_kernel(const int32_t* __restrict__ sorted_keys,
                                 const int64_t* __restrict__ sorted_slots, int64_t num_slots,
                                 int64_t top_k, int64_t num_experts, int64_t capacity,
                                 const int64_t* __restrict__ first_sorted,
                                 int64_t* __restrict__ row_map, int64_t* __restrict__ slot_of_row,
                                 int64_t* __restrict__ row_of_slot) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_slots;
       i += stride) {
    const int64_t expert = sorted_keys[i];
    if (expert == num_experts) continue;  // unused slot; row_of_slot is pre-filled with -1
    const int64_t slot = sorted_slots[i];
    int64_t row = i;
    if (capacity >= 0) {
      const int64_t rank = i - first_sorted[expert];
      if (rank >= capacity) continue;  // dropped
      row = expert * capacity + rank;
    }
    row_map[row] = slot / top_k;
    slot_of_row[row] = slot;
    row_of_slot[slot] = row;
  }
}

size_t permute_map_workspace(int64_t num_slots, int64_t num_experts, size_t* sort_bytes) {
  size_t cub_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr),
                                  static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), num_slots, 0,
                                  bits_for(num_experts));
  if (sort_bytes) *sort_bytes = cub_bytes;
  return 2 * aligned(num_slots * sizeof(int32_t)) + 2 * aligned(num_slots * sizeof(int64_t)) +
         aligned(num_experts * sizeof(int64_t)) + aligned(cub_bytes);
}

template <typename Index>
cudaError_t build_permute_map(const Index* topk, int64_t num_tokens, int64_t top_k,
                              int64_t num_experts, int64_t capacity, const int64_t* counts,
                              void* workspace, size_t workspace_bytes, int64_t* row_map,
                              int64_t* slot_of_row, int64_t* row_of_slot, cudaStream_t stream) {
  const int64_t num_slots = num_tokens * top_k;
  size_t sort_bytes = 0;
  if (workspace_bytes < permute_map_workspace(num_slots, num_experts, &sort_bytes)) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err;
  // All-ones bytes are -1 in int64: unused slots and padding rows.
  if ((err = cudaMemsetAsync(row_of_slot, 0xff, num_slots * sizeof(int64_t), stream)) !=
      cudaSuccess) {
    return err;
  }
  if (capacity >= 0) {
    const size_t map_bytes = num_experts * capacity * sizeof(int64_t);
    if ((err = cudaMemsetAsync(row_map, 0xff, map_bytes, stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(slot_of_row, 0xff, map_bytes, stream)) != cudaSuccess) return err;
  }
  if (num_slots == 0) return cudaGetLastError();

  WorkspaceCursor cursor{static_cast<char*>(workspace)};
  int32_t* keys = cursor.take<int32_t>(num_slots);
  int32_t* sorted_keys = cursor.take<int32_t>(num_slots);
  int64_t* slots = cursor.take<int64_t>(num_slots);
  int64_t* sorted_slots = cursor.take<int64_t>(num_slots);
  int64_t* first_sorted = cursor.take<int64_t>(num_experts);
  void* sort_scratch = cursor.take<char>(sort_bytes);

  slot_keys_kernel<<<blocks_for(num_slots), kThreadsPerBlock, 0, stream>>>(
      topk, num_slots, num_experts, keys, slots);
  if ((err = cub::DeviceRadixSort::SortPairs(sort_scratch, sort_bytes, keys, sorted_keys, slots,
                                             sorted_slots, num_slots, 0, bits_for(num_experts),
                                             stream)) != cudaSuccess) {
    return err;
  }
  expert_first_sorted_kernel<<<1, 1, 0, stream>>>(counts, num_experts, first_sorted);
  fill_maps_kernel<<<blocks_for(num_slots), kThreadsPerBlock, 0, stream>>>(
      sorted_keys, sorted_slots, num_slots, top_k, num_experts, capacity, first_sorted, row_map,
      slot_of_row, row_of_slot);
  return cudaGetLastError();
}

// ---- row gather ----

// One block per output row; Word is the widest type the row size and pointers allow.
template <typename Word>
__global__ void gather_rows_kernel(const Word* __restrict__ src, int64_t row_words,
                                   const int64_t* __restrict__ index, int64_t num_out,
                                   Word* __restrict__ out) {
  for (int64_t row = blockIdx.x; row < num_out; row += gridDim.x) {
    const int64_t from = index[row];
    Word* out_row = out + row * row_words;
    if (from < 0) {
      for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) out_row[w] = Word{};
    } else {
      const Word* src_row = src + from * row_words;
      for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) out_row[w] = src_row[w];
    }
  }
}

template <typename Word>
cudaError_t launch_gather(const void* src, int64_t row_bytes, const int64_t* index,
                          int64_t num_out, void* out, cudaStream_t stream) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int threads = static_cast<int>(std::clamp<int64_t>(row_words, 32, kThreadsPerBlock));
  const int blocks = static_cast<int>(std::min<int64_t>(num_out, kMaxBlocks));
  gather_rows_kernel<<<blocks, threads, 0, stream>>>(static_cast<const Word*>(src), row_words,
                                                     index, num_out, static_cast<Word*>(out));
  return cudaGetLastError();
}

bool word_fits(const void* src, const void* out, int64_t row_bytes, size_t word) {
  return row_bytes % word == 0 && reinterpret_cast<uintptr_t>(src) % word == 0 &&
         reinterpret_cast<uintptr_t>(out) % word == 0;
}

// ---- unpermute ----

__global__ void row_keys_kernel(const int64_t* __restrict__ row_map, int64_t num_rows,
                                int64_t num_tokens, int64_t* __restrict__ keys,
                                int64_t* __restrict__ rows) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       row < num_rows; row += stride) {
    keys[row] = row_map[row] < 0 ? num_tokens : row_map[row];
    rows[row] = row;
  }
}

// first[t] = first sorted position whose token is >= t, for t in [0, num_tokens].
__global__ void token_starts_kernel(const int64_t* __restrict__ sorted_tokens, int64_t num_rows,
                                    int64_t num_tokens, int64_t* __restrict__ first) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       token <= num_tokens; token += stride) {
    int64_t low = 0;
    int64_t high = num_rows;
    while (low < high) {
      const int64_t mid = (low + high) / 2;
      if (sorted_tokens[mid] < token) {
        low = mid + 1;
      } else {
        high = mid;
      }
    }
    first[token] = low;
  }
}

// One block per token; threads stride over hidden, so loads of each row coalesce.
template <typename Scalar, typename Accum>
__global__ void unpermute_kernel(const Scalar* __restrict__ permuted, int64_t hidden,
                                 const int64_t* __restrict__ first,
                                 const int64_t* __restrict__ token_rows,
                                 const Accum* __restrict__ probs, int64_t num_tokens,
                                 Scalar* __restrict__ out) {
  for (int64_t token = blockIdx.x; token < num_tokens; token += gridDim.x) {
    const int64_t begin = first[token];
    const int64_t end = first[token + 1];
    for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
      Accum sum = 0;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = token_rows[r];
        const Accum weight = probs ? probs[row] : Accum(1);
        sum += weight * to_accum(permuted[row * hidden + j]);
      }
      out[token * hidden + j] = from_accum<Scalar>(sum);
    }
  }
}

template <typename Accum>
__device__ Accum block_sum(Accum value) {
  using BlockReduce = cub::BlockReduce<Accum, kThreadsPerBlock>;
  __shared__ typename BlockReduce::TempStorage scratch;
  const Accum total = BlockReduce(scratch).Sum(value);
  __syncthreads();  // scratch is reused by the next row
  return total;
}

// One block per row: scale the token's gradient and reduce the dot product for probs.
template <typename Scalar, typename Accum>
__global__ void unpermute_backward_kernel(const Scalar* __restrict__ grad_out,
                                          const Scalar* __restrict__ permuted, int64_t hidden,
                                          const int64_t* __restrict__ row_map, int64_t num_rows,
                                          const Accum* __restrict__ probs,
                                          Scalar* __restrict__ grad_permuted,
                                          Accum* __restrict__ grad_probs) {
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t token = row_map[row];
    Scalar* grad_row = grad_permuted + row * hidden;
    Accum dot = 0;
    if (token < 0) {
      for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) grad_row[j] = from_accum<Scalar>(Accum(0));
    } else {
      const Scalar* grad_out_row = grad_out + token * hidden;
      const Accum weight = probs ? probs[row] : Accum(1);
      for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
        const Accum grad = to_accum(grad_out_row[j]);
        grad_row[j] = from_accum<Scalar>(weight * grad);
        if (grad_probs) dot += to_accum(permuted[row * hidden + j]) * grad;
      }
    }
    if (grad_probs) {
      const Accum total = block_sum(dot);
      if (threadIdx.x == 0) grad_probs[row] = total;
    }
  }
}

template <typename Fn>
cudaError_t dispatch_float(FloatType dtype, Fn&& fn) {
  switch (dtype) {
    case FloatType::kFloat32: return fn(float{}, float{});
    case FloatType::kFloat64: return fn(double{}, double{});
    case FloatType::kFloat16: return fn(__half{}, float{});
    case FloatType::kBFloat16: return fn(__nv_bfloat16{}, float{});
  }
  return cudaErrorInvalidValue;
}

size_t unpermute_workspace(int64_t num_rows, int64_t num_tokens, size_t* sort_bytes) {
  size_t cub_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr),
                                  static_cast<const int64_t*>(nullptr),
                                  static_cast<int64_t*>(nullptr), num_rows, 0,
                                  bits_for(num_tokens));
  if (sort_bytes) *sort_bytes = cub_bytes;
  return 4 * aligned(num_rows * sizeof(int64_t)) + aligned((num_tokens + 1) * sizeof(int64_t)) +
         aligned(cub_bytes);
}

template <typename Index>
cudaError_t launch_route_counts(const Index* topk, int64_t num_tokens, int64_t top_k,
                                int64_t num_experts, int64_t* counts, cudaStream_t stream) {
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "atomicAdd needs 64-bit bins");
  cudaError_t err = cudaMemsetAsync(counts, 0, (num_experts + 2) * sizeof(int64_t), stream);
  if (err != cudaSuccess || num_tokens == 0) return err;
  route_counts_kernel<<<blocks_for(num_tokens), kThreadsPerBlock, 0, stream>>>(
      topk, num_tokens, top_k, num_experts, reinterpret_cast<unsigned long long*>(counts));
  return cudaGetLastError();
}

}  // namespace

cudaError_t moe_route_counts_cuda(const int32_t* topk, int64_t num_tokens, int64_t top_k,
                                  int64_t num_experts, int64_t* counts, cudaStream_t stream) {
  return launch_route_counts(topk, num_tokens, top_k, num_experts, counts, stream);
}

cudaError_t moe_route_counts_cuda(const int64_t* topk, int64_t num_tokens, int64_t top_k,
                                  int64_t num_experts, int64_t* counts, cudaStream_t stream) {
  return launch_route_counts(topk, num_tokens, top_k, num_experts, counts, stream);
}

size_t moe_permute_map_workspace_bytes(int64_t num_tokens, int64_t top_k, int64_t num_experts) {
  return permute_map_workspace(num_tokens * top_k, num_experts, nullptr);
}

size_t moe_unpermute_workspace_bytes(int64_t num_rows, int64_t num_tokens) {
  return unpermute_workspace(num_rows, num_tokens, nullptr);
}

cudaError_t moe_build_permute_map_cuda(const int32_t* topk, int64_t num_tokens, int64_t top_k,
                                       int64_t num_experts, int64_t capacity,
                                       const int64_t* counts, void* workspace,
                                       size_t workspace_bytes, int64_t* row_map,
                                       int64_t* slot_of_row, int64_t* row_of_slot,
                                       cudaStream_t stream) {
  return build_permute_map(topk, num_tokens, top_k, num_experts, capacity, counts, workspace,
                           workspace_bytes, row_map, slot_of_row, row_of_slot, stream);
}

cudaError_t moe_build_permute_map_cuda(const int64_t* topk, int64_t num_tokens, int64_t top_k,
                                       int64_t num_experts, int64_t capacity,
                                       const int64_t* counts, void* workspace,
                                       size_t workspace_bytes, int64_t* row_map,
                                       int64_t* slot_of_row, int64_t* row_of_slot,
                                       cudaStream_t stream) {
  return build_permute_map(topk, num_tokens, top_k, num_experts, capacity, counts, workspace,
                           workspace_bytes, row_map, slot_of_row, row_of_slot, stream);
}

cudaError_t moe_gather_rows_cuda(const void* src, int64_t row_bytes, const int64_t* index,
                                 int64_t num_out, void* out, cudaStream_t stream) {
  if (num_out == 0 || row_bytes == 0) return cudaSuccess;
  if (word_fits(src, out, row_bytes, sizeof(uint4))) {
    return launch_gather<uint4>(src, row_bytes, index, num_out, out, stream);
  }
  if (word_fits(src, out, row_bytes, sizeof(uint32_t))) {
    return launch_gather<uint32_t>(src, row_bytes, index, num_out, out, stream);
  }
  if (word_fits(src, out, row_bytes, sizeof(uint16_t))) {
    return launch_gather<uint16_t>(src, row_bytes, index, num_out, out, stream);
  }
  return launch_gather<unsigned char>(src, row_bytes, index, num_out, out, stream);
}

cudaError_t moe_unpermute_cuda(FloatType dtype, const void* permuted, int64_t hidden,
                               const int64_t* row_map, int64_t num_rows, const void* probs,
                               int64_t num_tokens, void* workspace, size_t workspace_bytes,
                               void* out, cudaStream_t stream) {
  size_t sort_bytes = 0;
  if (workspace_bytes < unpermute_workspace(num_rows, num_tokens, &sort_bytes)) {
    return cudaErrorInvalidValue;
  }
  if (num_tokens == 0 || hidden == 0) return cudaSuccess;
  WorkspaceCursor cursor{static_cast<char*>(workspace)};
  int64_t* keys = cursor.take<int64_t>(num_rows);
  int64_t* sorted_tokens = cursor.take<int64_t>(num_rows);
  int64_t* rows = cursor.take<int64_t>(num_rows);
  int64_t* token_rows = cursor.take<int64_t>(num_rows);
  int64_t* first = cursor.take<int64_t>(num_tokens + 1);
  void* sort_scratch = cursor.take<char>(sort_bytes);

  cudaError_t err;
  if (num_rows > 0) {
    row_keys_kernel<<<blocks_for(num_rows), kThreadsPerBlock, 0, stream>>>(row_map, num_rows,
                                                                           num_tokens, keys, rows);
    if ((err = cub::DeviceRadixSort::SortPairs(sort_scratch, sort_bytes, keys, sorted_tokens,
                                               rows, token_rows, num_rows, 0,
                                               bits_for(num_tokens), stream)) != cudaSuccess) {
      return err;
    }
  }
  token_starts_kernel<<<blocks_for(num_tokens + 1), kThreadsPerBlock, 0, stream>>>(
      sorted_tokens, num_rows, num_tokens, first);
  const int threads = static_cast<int>(std::clamp<int64_t>(hidden, 32, kThreadsPerBlock));
  const int blocks = static_cast<int>(std::min<int64_t>(num_tokens, kMaxBlocks));
  return dispatch_float(dtype, [&](auto scalar_tag, auto accum_tag) {
    using Scalar = decltype(scalar_tag);
    using Accum = decltype(accum_tag);
    unpermute_kernel<<<blocks, threads, 0, stream>>>(
        static_cast<const Scalar*>(permuted), hidden, first, token_rows,
        static_cast<const Accum*>(probs), num_tokens, static_cast<Scalar*>(out));
    return cudaGetLastError();
  });
}

cudaError_t moe_unpermute_backward_cuda(FloatType dtype, const void* grad_out,
                                        const void* permuted, int64_t hidden,
                                        const int64_t* row_map, int64_t num_rows,
                                        const void* probs, void* grad_permuted, void* grad_probs,
                                        cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  // block_sum assumes full blocks of kThreadsPerBlock threads.
  const int blocks = static_cast<int>(std::min<int64_t>(num_rows, kMaxBlocks));
  return dispatch_float(dtype, [&](auto scalar_tag, auto accum_tag) {
    using Scalar = decltype(scalar_tag);
    using Accum = decltype(accum_tag);
    unpermute_backward_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(
        static_cast<const Scalar*>(grad_out), static_cast<const Scalar*>(permuted), hidden,
        row_map, num_rows, static_cast<const Accum*>(probs), static_cast<Scalar*>(grad_permuted),
        static_cast<Accum*>(grad_probs));
    return cudaGetLastError();
  });
}

}  // namespace megatron_mm
