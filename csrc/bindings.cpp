// Python bindings of the csrc kernels as the extension module megatron_mm._C.
#include <torch/extension.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "expert_bias.h"
#include "load_balance.h"
#include "moe_dispatch.h"
#include "router.h"

#ifdef MEGATRON_MM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace megatron_mm {
namespace {

#ifdef MEGATRON_MM_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// Counts how often each expert was chosen. `indices`: int32/int64 routing choices of
// any shape (typically [tokens, top_k]); -1 marks a dropped slot and is not counted.
// Returns int64 counts [num_experts] on the device of `indices`.
torch::Tensor expert_histogram(const torch::Tensor& indices, int64_t num_experts) {
  TORCH_CHECK_VALUE(num_experts > 0, "expert_histogram: num_experts must be positive, got ",
                    num_experts);
  TORCH_CHECK_TYPE(indices.scalar_type() == torch::kInt64 || indices.scalar_type() == torch::kInt32,
                   "expert_histogram: indices must be int32 or int64, got ",
                   indices.scalar_type());

  // Slices such as routing[:, :k] are common; the kernels read a flat buffer.
  const torch::Tensor flat = indices.contiguous();
  const int64_t num_indices = flat.numel();
  torch::Tensor counts =
      torch::empty({num_experts + 1}, flat.options().dtype(torch::kInt64));

  if (flat.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
    const c10::cuda::CUDAGuard device_guard(flat.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const cudaError_t err =
        flat.scalar_type() == torch::kInt64
            ? expert_histogram_cuda(flat.data_ptr<int64_t>(), num_indices, num_experts,
                                    counts.data_ptr<int64_t>(), stream)
            : expert_histogram_cuda(flat.data_ptr<int32_t>(), num_indices, num_experts,
                                    counts.data_ptr<int64_t>(), stream);
    TORCH_CHECK(err == cudaSuccess, "expert_histogram: CUDA error: ", cudaGetErrorString(err));
#else
    TORCH_CHECK(false,
                "expert_histogram: megatron_mm._C was built without CUDA; rebuild with nvcc and "
                "a CUDA build of torch (pip install --no-build-isolation -e .) or move indices "
                "to the CPU");
#endif
  } else {
    TORCH_CHECK(flat.device().is_cpu(), "expert_histogram: unsupported device ", flat.device());
    if (flat.scalar_type() == torch::kInt64) {
      expert_histogram_cpu(flat.data_ptr<int64_t>(), num_indices, num_experts,
                           counts.data_ptr<int64_t>());
    } else {
      expert_histogram_cpu(flat.data_ptr<int32_t>(), num_indices, num_experts,
                           counts.data_ptr<int64_t>());
    }
  }

  // The last bin counts out-of-range entries; reading it is the only host sync.
  const int64_t num_invalid = counts[num_experts].item<int64_t>();
  TORCH_CHECK_VALUE(num_invalid == 0, "expert_histogram: ", num_invalid,
                    " indices outside [-1, num_experts=", num_experts, "): min ",
                    flat.min().item<int64_t>(), ", max ", flat.max().item<int64_t>());
  return counts.narrow(0, 0, num_experts);
}


// ---- MoE permute / unpermute (kernel contracts in moe_dispatch.h) ----

FloatType float_type_of(const torch::Tensor& tensor, const char* op) {
  const torch::ScalarType type = tensor.scalar_type();
  TORCH_CHECK_TYPE(type == torch::kFloat32 || type == torch::kFloat64 ||
                       type == torch::kFloat16 || type == torch::kBFloat16,
                   op, ": expected float32/float64/float16/bfloat16 data, got ", type);
  return type == torch::kFloat32   ? FloatType::kFloat32
         : type == torch::kFloat64 ? FloatType::kFloat64
         : type == torch::kFloat16 ? FloatType::kFloat16
                                   : FloatType::kBFloat16;
}

// The kernels sum in float (double for float64 data) and read probabilities in that type.
torch::ScalarType accum_type_of(const torch::Tensor& data) {
  return data.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

#ifdef MEGATRON_MM_WITH_CUDA
void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

torch::Tensor workspace_like(const torch::Tensor& tensor, size_t bytes) {
  return torch::empty({static_cast<int64_t>(bytes)}, tensor.options().dtype(torch::kUInt8));
}
#endif

// Range checks that read a tensor's values cost a host sync on CUDA: there they run only with
// MEGATRON_MM_DEBUG_CHECKS=1 (read once, as megatron_mm.ops.moe_permute does); host tensors are
// always checked.
bool checks_values(const torch::Tensor& tensor) {
  static const bool debug_checks = [] {
    const char* value = std::getenv("MEGATRON_MM_DEBUG_CHECKS");
    return value != nullptr && std::string(value) == "1";
  }();
  return debug_checks || !tensor.is_cuda();
}

void check_device(const torch::Tensor& tensor, const char* op) {
#ifndef MEGATRON_MM_WITH_CUDA
  TORCH_CHECK(!tensor.is_cuda(), op,
              ": megatron_mm._C was built without CUDA; rebuild with nvcc and a CUDA build of "
              "torch (pip install --no-build-isolation -e .) or move the tensors to the CPU");
#endif
  TORCH_CHECK(tensor.is_cuda() || tensor.device().is_cpu(), op, ": unsupported device ",
              tensor.device());
}

// An uninitialised tensor for a kernel to fill. Large CPU ones ask for transparent huge pages
// before anything touches them: the kernels only move rows, so faulting in fresh 4 KiB pages
// otherwise dominates them. Best effort: if madvise fails the pages are ordinary.
torch::Tensor empty_output(at::IntArrayRef sizes, const torch::TensorOptions& options) {
  torch::Tensor out = torch::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (out.device().is_cpu() && out.nbytes() >= 2 * kHugePage) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// out[i] = src[index[i]] over the leading dimension, zero where index[i] == -1; index is
// trusted (built by moe_permute or checked by the caller).
torch::Tensor gather_rows(const torch::Tensor& src, const torch::Tensor& index) {
  std::vector<int64_t> out_shape = src.sizes().vec();
  out_shape[0] = index.numel();
  torch::Tensor out = empty_output(out_shape, src.options());
  // From the trailing sizes, not nbytes / rows: src may have no rows but out still does.
  int64_t row_bytes = src.element_size();
  for (int64_t d = 1; d < src.dim(); ++d) row_bytes *= src.size(d);
  if (out.numel() == 0) return out;
  if (src.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
    const c10::cuda::CUDAGuard device_guard(src.device());
    check_cuda(moe_gather_rows_cuda(src.data_ptr(), row_bytes, index.data_ptr<int64_t>(),
                                    index.numel(), out.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream()),
               "moe_gather_rows");
#endif
  } else {
    moe_gather_rows_cpu(src.data_ptr(), row_bytes, index.data_ptr<int64_t>(), index.numel(),
                        out.data_ptr());
  }
  return out;
}

// Groups token rows by expert (expert ascending, token ascending within an expert).
// tokens [T, H] float; topk_indices [T, K] int32/int64 with -1 = no expert; topk_probs
// [T, K] optional; capacity: keep each expert's first `capacity` tokens in [E * capacity]
// padded rows. Returns (permuted [N, H], permuted_probs [N] or None, row_map [N] int64
// source token (-1 = padding), tokens_per_expert [E] int64 rows kept per expert,
// row_of_slot [T, K] int64 permuted row of each slot (-1 = none)).
std::tuple<torch::Tensor, c10::optional<torch::Tensor>, torch::Tensor, torch::Tensor,
           torch::Tensor>
moe_permute(const torch::Tensor& tokens, const torch::Tensor& topk_indices, int64_t num_experts,
            const c10::optional<torch::Tensor>& topk_probs, c10::optional<int64_t> capacity) {
  constexpr const char* op = "moe_permute";
  TORCH_CHECK_VALUE(num_experts > 0, op, ": num_experts must be positive, got ", num_experts);
  TORCH_CHECK_VALUE(!capacity || *capacity >= 0, op, ": capacity must be >= 0, got ",
                    capacity.value_or(0));
  TORCH_CHECK_VALUE(tokens.dim() == 2, op, ": tokens must be [tokens, hidden], got shape ",
                    tokens.sizes());
  TORCH_CHECK_TYPE(topk_indices.scalar_type() == torch::kInt64 ||
                       topk_indices.scalar_type() == torch::kInt32,
                   op, ": topk_indices must be int32 or int64, got ", topk_indices.scalar_type());
  TORCH_CHECK_VALUE(topk_indices.dim() == 2 && topk_indices.size(0) == tokens.size(0), op,
                    ": topk_indices must be [tokens=", tokens.size(0), ", top_k], got shape ",
                    topk_indices.sizes());
  float_type_of(tokens, op);
  check_device(tokens, op);
  TORCH_CHECK(topk_indices.device() == tokens.device(), op,
              ": topk_indices and tokens are on different devices");
  if (topk_probs) {
    TORCH_CHECK_VALUE(topk_probs->sizes() == topk_indices.sizes(), op,
                      ": topk_probs must have the shape of topk_indices ", topk_indices.sizes(),
                      ", got ", topk_probs->sizes());
    TORCH_CHECK_TYPE(topk_probs->is_floating_point(), op, ": topk_probs must be floating point");
    TORCH_CHECK(topk_probs->device() == tokens.device(), op,
                ": topk_probs and tokens are on different devices");
  }

  const torch::Tensor source = tokens.contiguous();
  const torch::Tensor routing = topk_indices.contiguous();
  const int64_t num_tokens = routing.size(0);
  const int64_t top_k = routing.size(1);
  const bool is_int64 = routing.scalar_type() == torch::kInt64;
  const auto index_options = routing.options().dtype(torch::kInt64);
  torch::Tensor counts = torch::empty({num_experts + 2}, index_options);

#ifdef MEGATRON_MM_WITH_CUDA
  c10::optional<c10::cuda::CUDAGuard> device_guard;
  if (source.is_cuda()) device_guard.emplace(source.device());
#endif
  if (source.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    check_cuda(is_int64 ? moe_route_counts_cuda(routing.data_ptr<int64_t>(), num_tokens, top_k,
                                                num_experts, counts.data_ptr<int64_t>(), stream)
                        : moe_route_counts_cuda(routing.data_ptr<int32_t>(), num_tokens, top_k,
                                                num_experts, counts.data_ptr<int64_t>(), stream),
               op);
#endif
  } else if (is_int64) {
    moe_route_counts_cpu(routing.data_ptr<int64_t>(), num_tokens, top_k, num_experts,
                         counts.data_ptr<int64_t>());
  } else {
    moe_route_counts_cpu(routing.data_ptr<int32_t>(), num_tokens, top_k, num_experts,
                         counts.data_ptr<int64_t>());
  }

  // The row count sizes the outputs, so the host needs the counts (the one sync).
  const torch::Tensor host_counts = counts.cpu();
  const int64_t* count = host_counts.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(count[num_experts] == 0, op, ": ", count[num_experts],
                    " topk_indices outside [-1, num_experts=", num_experts, ")");
  TORCH_CHECK_VALUE(count[num_experts + 1] == 0, op, ": ", count[num_experts + 1],
                    " tokens choose the same expert more than once");
  int64_t num_rows = 0;
  for (int64_t e = 0; e < num_experts; ++e) num_rows += count[e];
  if (capacity) num_rows = num_experts * *capacity;

  torch::Tensor row_map = torch::empty({num_rows}, index_options);
  torch::Tensor slot_of_row = torch::empty({num_rows}, index_options);
  torch::Tensor row_of_slot = torch::empty({num_tokens, top_k}, index_options);
  const int64_t capacity_or_none = capacity.value_or(-1);
  if (source.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const size_t workspace_bytes =
        moe_permute_map_workspace_bytes(num_tokens, top_k, num_experts);
    torch::Tensor workspace = workspace_like(source, workspace_bytes);
    const auto build = [&](auto* topk) {
      return moe_build_permute_map_cuda(topk, num_tokens, top_k, num_experts, capacity_or_none,
                                        counts.data_ptr<int64_t>(), workspace.data_ptr(),
                                        workspace_bytes, row_map.data_ptr<int64_t>(),
                                        slot_of_row.data_ptr<int64_t>(),
                                        row_of_slot.data_ptr<int64_t>(), stream);
    };
    check_cuda(is_int64 ? build(routing.data_ptr<int64_t>()) : build(routing.data_ptr<int32_t>()),
               op);
#endif
  } else {
    const auto build = [&](auto* topk) {
      moe_build_permute_map_cpu(topk, num_tokens, top_k, num_experts, capacity_or_none, count,
                                row_map.data_ptr<int64_t>(), slot_of_row.data_ptr<int64_t>(),
                                row_of_slot.data_ptr<int64_t>());
    };
    is_int64 ? build(routing.data_ptr<int64_t>()) : build(routing.data_ptr<int32_t>());
  }

  torch::Tensor permuted = gather_rows(source, row_map);
  c10::optional<torch::Tensor> permuted_probs;
  if (topk_probs) permuted_probs = gather_rows(topk_probs->contiguous().view({-1}), slot_of_row);
  torch::Tensor tokens_per_expert = host_counts.narrow(0, 0, num_experts).clone();
  if (capacity) tokens_per_expert = tokens_per_expert.clamp_max(*capacity);
  return {permuted, permuted_probs, row_map, tokens_per_expert.to(tokens.device()), row_of_slot};
}

// out [num_tokens, H] with out[row_map[i]] += probs[i] * permuted[i] (rows with row_map -1
// skipped), summed in float32 (float64 for float64 data) in ascending row order.
torch::Tensor moe_unpermute(const torch::Tensor& permuted, const torch::Tensor& row_map,
                            int64_t num_tokens, const c10::optional<torch::Tensor>& probs) {
  constexpr const char* op = "moe_unpermute";
  TORCH_CHECK_VALUE(num_tokens >= 0, op, ": num_tokens must be >= 0, got ", num_tokens);
  TORCH_CHECK_VALUE(permuted.dim() == 2, op, ": permuted must be [rows, hidden], got shape ",
                    permuted.sizes());
  TORCH_CHECK_TYPE(row_map.scalar_type() == torch::kInt64, op, ": row_map must be int64, got ",
                   row_map.scalar_type());
  TORCH_CHECK_VALUE(row_map.dim() == 1 && row_map.size(0) == permuted.size(0), op,
                    ": row_map must be [rows=", permuted.size(0), "], got shape ",
                    row_map.sizes());
  const FloatType dtype = float_type_of(permuted, op);
  check_device(permuted, op);
  TORCH_CHECK(row_map.device() == permuted.device(), op,
              ": row_map and permuted are on different devices");
  if (probs) {
    TORCH_CHECK_VALUE(probs->sizes() == row_map.sizes(), op, ": probs must be [rows=",
                      row_map.size(0), "], got shape ", probs->sizes());
    TORCH_CHECK_TYPE(probs->is_floating_point(), op, ": probs must be floating point");
    TORCH_CHECK(probs->device() == permuted.device(), op,
                ": probs and permuted are on different devices");
  }

  const torch::Tensor rows = permuted.contiguous();
  const torch::Tensor map = row_map.contiguous();
  c10::optional<torch::Tensor> weights;
  if (probs) weights = probs->to(accum_type_of(rows)).contiguous();
  const void* weights_ptr = weights ? weights->data_ptr() : nullptr;
  const int64_t hidden = rows.size(1);
  torch::Tensor out = empty_output({num_tokens, hidden}, rows.options());

  if (rows.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
    const c10::cuda::CUDAGuard device_guard(rows.device());
    if (map.numel() > 0 && checks_values(map)) {
      const auto [low, high] = torch::aminmax(map);
      TORCH_CHECK_VALUE(low.item<int64_t>() >= -1 && high.item<int64_t>() < num_tokens, op,
                        ": row_map entries outside [-1, num_tokens=", num_tokens, ")");
    }
    const size_t workspace_bytes = moe_unpermute_workspace_bytes(map.numel(), num_tokens);
    torch::Tensor workspace = workspace_like(rows, workspace_bytes);
    check_cuda(moe_unpermute_cuda(dtype, rows.data_ptr(), hidden, map.data_ptr<int64_t>(),
                                  map.numel(), weights_ptr, num_tokens, workspace.data_ptr(),
                                  workspace_bytes, out.data_ptr(),
                                  c10::cuda::getCurrentCUDAStream()),
               op);
#endif
  } else {
    const int64_t num_invalid =
        moe_unpermute_cpu(dtype, rows.data_ptr(), hidden, map.data_ptr<int64_t>(), map.numel(),
                          weights_ptr, num_tokens, out.data_ptr());
    TORCH_CHECK_VALUE(num_invalid == 0, op, ": ", num_invalid,
                      " row_map entries outside [-1, num_tokens=", num_tokens, ")");
  }
  return out;
}

// Backward of moe_unpermute for a row_map it accepted: grad_permuted [N, H] =
// probs[i] * grad_out[row_map[i]] (probs None: weight 1) in the dtype of grad_out, and, when
// `permuted` is given (with probs), grad_probs [N] = dot(permuted[i], grad_out[row_map[i]])
// in the dtype of probs.
std::tuple<torch::Tensor, c10::optional<torch::Tensor>> moe_unpermute_backward(
    const torch::Tensor& grad_out, const torch::Tensor& row_map,
    const c10::optional<torch::Tensor>& probs, const c10::optional<torch::Tensor>& permuted) {
  constexpr const char* op = "moe_unpermute_backward";
  TORCH_CHECK_VALUE(grad_out.dim() == 2, op, ": grad_out must be [tokens, hidden], got shape ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(!permuted || probs, op, ": permuted is only read with probs");
  const FloatType dtype = float_type_of(grad_out, op);
  check_device(grad_out, op);
  const torch::Tensor grad = grad_out.contiguous();
  const torch::Tensor map = row_map.contiguous();
  if (!probs) return {gather_rows(grad, map), c10::nullopt};

  const int64_t hidden = grad.size(1);
  const torch::Tensor weights = probs->to(accum_type_of(grad)).contiguous();
  torch::Tensor grad_permuted = empty_output({map.numel(), hidden}, grad.options());
  torch::Tensor rows;
  c10::optional<torch::Tensor> grad_probs;
  if (permuted) {
    TORCH_CHECK_VALUE(permuted->sizes() == grad_permuted.sizes(), op, ": permuted must be ",
                      grad_permuted.sizes(), ", got ", permuted->sizes());
    rows = permuted->to(grad.scalar_type()).contiguous();
    grad_probs = torch::empty_like(weights);
  }
  const void* rows_ptr = permuted ? rows.data_ptr() : nullptr;
  void* grad_probs_ptr = grad_probs ? grad_probs->data_ptr() : nullptr;
  if (grad.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
    const c10::cuda::CUDAGuard device_guard(grad.device());
    check_cuda(moe_unpermute_backward_cuda(dtype, grad.data_ptr(), rows_ptr, hidden,
                                           map.data_ptr<int64_t>(), map.numel(),
                                           weights.data_ptr(), grad_permuted.data_ptr(),
                                           grad_probs_ptr, c10::cuda::getCurrentCUDAStream()),
               op);
#endif
  } else {
    moe_unpermute_backward_cpu(dtype, grad.data_ptr(), rows_ptr, hidden, map.data_ptr<int64_t>(),
                               map.numel(), weights.data_ptr(), grad_permuted.data_ptr(),
                               grad_probs_ptr);
  }
  if (grad_probs) grad_probs = grad_probs->to(probs->scalar_type());
  return {grad_permuted, grad_probs};
}

// out[i] = src[index[i]] along dim 0, zero rows where index[i] == -1 (permute backward of
// the probabilities: grad_topk_probs = moe_gather_rows(grad_permuted_probs, row_of_slot)).
torch::Tensor moe_gather_rows(const torch::Tensor& src, const torch::Tensor& index) {
  constexpr const char* op = "moe_gather_rows";
  TORCH_CHECK_VALUE(src.dim() >= 1, op, ": src must have a leading dimension");
  TORCH_CHECK_TYPE(index.scalar_type() == torch::kInt64, op, ": index must be int64, got ",
                   index.scalar_type());
  check_device(src, op);
  TORCH_CHECK(index.device() == src.device(), op, ": index and src are on different devices");
  const torch::Tensor flat_index = index.contiguous().view({-1});
  if (flat_index.numel() > 0 && checks_values(flat_index)) {
    const auto [low, high] = torch::aminmax(flat_index);
    TORCH_CHECK_VALUE(low.item<int64_t>() >= -1 && high.item<int64_t>() < src.size(0), op,
                      ": index entries outside [-1, ", src.size(0), ")");
  }
  std::vector<int64_t> out_shape = index.sizes().vec();
  for (int64_t d = 1; d < src.dim(); ++d) out_shape.push_back(src.size(d));
  return gather_rows(src.contiguous(), flat_index).view(out_shape);
}

// ---- aux-loss-free expert-bias update (kernel contract in expert_bias.h) ----

// In place, for every layer: biases[l] += rate * sign(mean(counts[l]) - counts[l]).
// biases: contiguous fp32 [E_l]; counts: [E_l] of any integer or float dtype (integers are
// read as int64, float16/bfloat16 as float32), all on one device. One kernel call.
void update_expert_bias(const std::vector<torch::Tensor>& biases,
                        const std::vector<torch::Tensor>& counts, double rate) {
  constexpr const char* op = "update_expert_bias_";
  TORCH_CHECK_VALUE(biases.size() == counts.size(), op, ": got ", biases.size(),
                    " biases but ", counts.size(), " tokens_per_expert tensors");
  if (biases.empty()) return;
  const torch::Device device = biases[0].device();
  check_device(biases[0], op);
  std::vector<torch::Tensor> kept_counts;  // owns converted counts until the kernel is done
  std::vector<ExpertBiasLayer> layers;
  for (size_t l = 0; l < biases.size(); ++l) {
    const torch::Tensor& bias = biases[l];
    TORCH_CHECK_TYPE(bias.scalar_type() == torch::kFloat32, op, ": biases[", l,
                     "] must be float32, got ", bias.scalar_type());
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.numel() > 0 && bias.is_contiguous(), op,
                      ": biases[", l, "] must be a contiguous non-empty [num_experts] tensor");
    TORCH_CHECK_VALUE(counts[l].sizes() == bias.sizes(), op, ": tokens_per_expert[", l,
                      "] must have shape ", bias.sizes(), ", got ", counts[l].sizes());
    TORCH_CHECK(bias.device() == device && counts[l].device() == device, op,
                ": all tensors must be on ", device);
    TORCH_CHECK_TYPE(!counts[l].is_complex(), op, ": tokens_per_expert must be real");
    const torch::ScalarType type = counts[l].scalar_type();
    const CountType count_type = type == torch::kFloat64       ? CountType::kFloat64
                                 : counts[l].is_floating_point() ? CountType::kFloat32
                                                                 : CountType::kInt64;
    const torch::ScalarType read_type = count_type == CountType::kFloat64   ? torch::kFloat64
                                        : count_type == CountType::kFloat32 ? torch::kFloat32
                                                                            : torch::kInt64;
    kept_counts.push_back(counts[l].to(read_type).contiguous());
    layers.push_back({bias.data_ptr<float>(), kept_counts.back().data_ptr(), bias.numel(),
                      count_type});
  }
  if (device.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
    const c10::cuda::CUDAGuard device_guard(device);
    const int64_t table_bytes = static_cast<int64_t>(layers.size() * sizeof(ExpertBiasLayer));
    torch::Tensor host_table = torch::empty({table_bytes}, torch::kUInt8).pin_memory();
    std::memcpy(host_table.data_ptr(), layers.data(), table_bytes);
    const torch::Tensor table = host_table.to(device, /*non_blocking=*/true);
    check_cuda(update_expert_bias_cuda(static_cast<const ExpertBiasLayer*>(table.data_ptr()),
                                       static_cast<int64_t>(layers.size()), rate,
                                       c10::cuda::getCurrentCUDAStream()),
               op);
    // Converted counts are freed through the caching allocator on this stream: safe.
#endif
  } else {
    update_expert_bias_cpu(layers.data(), static_cast<int64_t>(layers.size()), rate);
  }
}

// ---- fused MoE router (kernel contract in router.h) ----

RouterConfig router_config(const torch::Tensor& logits, int64_t topk,
                           const std::string& score_function, bool pre_softmax,
                           c10::optional<int64_t> num_groups, c10::optional<int64_t> group_topk,
                           c10::optional<double> scaling_factor) {
  constexpr const char* op = "route";
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be [tokens, experts], got shape ",
                    logits.sizes());
  const torch::ScalarType type = logits.scalar_type();
  TORCH_CHECK_TYPE(type == torch::kFloat32 || type == torch::kBFloat16 || type == torch::kFloat64,
                   op, ": logits must be float32, bfloat16 or float64, got ", type);
  TORCH_CHECK_VALUE(score_function == "softmax" || score_function == "sigmoid", op,
                    ": score_function must be 'softmax' or 'sigmoid', got '", score_function, "'");
  check_device(logits, op);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK_VALUE(topk >= 1 && topk <= num_experts && topk <= kRouterMaxTopK, op,
                    ": topk must be in [1, min(num_experts=", num_experts, ", ", kRouterMaxTopK,
                    ")], got ", topk);
  const int64_t groups_kept = group_topk.value_or(0);
  if (groups_kept > 0) {
    const int64_t groups = num_groups.value_or(0);
    TORCH_CHECK_VALUE(groups > 0 && num_experts % groups == 0, op, ": num_groups must divide ",
                      "num_experts=", num_experts, ", got ", groups);
    TORCH_CHECK_VALUE(groups_kept <= groups && groups_kept <= topk &&
                          topk <= groups_kept * (num_experts / groups),
                      op, ": need group_topk <= num_groups, group_topk <= topk and topk <= ",
                      "group_topk * experts per group; got group_topk=", groups_kept,
                      ", num_groups=", groups, ", topk=", topk);
  }
  // megatron-core scales only when scaling_factor is truthy.
  const double scale = scaling_factor && *scaling_factor != 0.0 ? *scaling_factor : 1.0;
  return {logits.size(0), num_experts, topk,
          score_function == "softmax" ? RouterScore::kSoftmax : RouterScore::kSigmoid,
          pre_softmax, num_groups.value_or(0), groups_kept, scale};
}

torch::ScalarType router_accum_type(const torch::Tensor& logits) {
  return logits.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

// Runs `fn(typed logits pointer, Accum{})` for float32, bfloat16 and float64 logits.
template <typename Fn>
auto with_logits(const torch::Tensor& logits, Fn fn) {
  switch (logits.scalar_type()) {
    case torch::kFloat64: return fn(logits.data_ptr<double>(), double{});
    case torch::kBFloat16:
      return fn(reinterpret_cast<const BFloat16Bits*>(logits.data_ptr<at::BFloat16>()), float{});
    default: return fn(logits.data_ptr<float>(), float{});
  }
}

// Top-k routing of logits [T, E]: (probs [T, K] float32 (float64 for float64 logits),
// indices [T, K] int64 by descending selection score, tokens_per_expert [E] int64).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> router_forward(
    const torch::Tensor& logits, int64_t topk, const std::string& score_function,
    const c10::optional<torch::Tensor>& expert_bias, c10::optional<int64_t> num_groups,
    c10::optional<int64_t> group_topk, c10::optional<double> scaling_factor, bool pre_softmax) {
  constexpr const char* op = "route";
  const RouterConfig config = router_config(logits, topk, score_function, pre_softmax,
                                            num_groups, group_topk, scaling_factor);
  const torch::ScalarType accum = router_accum_type(logits);
  torch::Tensor bias;
  if (expert_bias) {
    TORCH_CHECK_VALUE(config.score == RouterScore::kSigmoid, op,
                      ": expert_bias needs score_function='sigmoid' (as in megatron-core)");
    TORCH_CHECK_VALUE(expert_bias->dim() == 1 && expert_bias->size(0) == config.num_experts, op,
                      ": expert_bias must be [num_experts=", config.num_experts, "], got shape ",
                      expert_bias->sizes());
    TORCH_CHECK(expert_bias->device() == logits.device(), op,
                ": expert_bias and logits are on different devices");
    bias = expert_bias->to(accum).contiguous();
  }
  const torch::Tensor scores = logits.contiguous();
  torch::Tensor probs = torch::empty({config.num_tokens, topk}, scores.options().dtype(accum));
  torch::Tensor indices = torch::empty({config.num_tokens, topk}, scores.options().dtype(torch::kInt64));
  torch::Tensor counts = torch::empty({config.num_experts}, indices.options());
  with_logits(scores, [&](const auto* z, auto accum_zero) {
    using Accum = decltype(accum_zero);
    const Accum* bias_ptr = bias.defined() ? bias.data_ptr<Accum>() : nullptr;
    if (scores.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
      const c10::cuda::CUDAGuard device_guard(scores.device());
      check_cuda(router_forward_cuda(z, bias_ptr, config, probs.data_ptr<Accum>(),
                                     indices.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                     c10::cuda::getCurrentCUDAStream()),
                 op);
#endif
    } else {
      router_forward_cpu(z, bias_ptr, config, probs.data_ptr<Accum>(), indices.data_ptr<int64_t>(),
                         counts.data_ptr<int64_t>());
    }
  });
  return {probs, indices, counts};
}

// d probs / d logits: grad_logits [T, E] in the dtype of logits from grad_probs [T, K] for
// the `indices` router_forward returned for these logits and options.
torch::Tensor router_backward(const torch::Tensor& grad_probs, const torch::Tensor& logits,
                              const torch::Tensor& indices, const std::string& score_function,
                              c10::optional<double> scaling_factor, bool pre_softmax) {
  constexpr const char* op = "route_backward";
  const RouterConfig config = router_config(logits, indices.size(1), score_function, pre_softmax,
                                            c10::nullopt, c10::nullopt, scaling_factor);
  TORCH_CHECK_VALUE(indices.sizes() == grad_probs.sizes() && indices.size(0) == config.num_tokens,
                    op, ": grad_probs and indices must be [tokens=", config.num_tokens,
                    ", topk], got ", grad_probs.sizes(), " and ", indices.sizes());
  const torch::ScalarType accum = router_accum_type(logits);
  const torch::Tensor scores = logits.contiguous();
  const torch::Tensor grad = grad_probs.to(accum).contiguous();
  const torch::Tensor chosen = indices.contiguous();
  torch::Tensor grad_logits = torch::empty(scores.sizes(), scores.options().dtype(accum));
  with_logits(scores, [&](const auto* z, auto accum_zero) {
    using Accum = decltype(accum_zero);
    if (scores.is_cuda()) {
#ifdef MEGATRON_MM_WITH_CUDA
      const c10::cuda::CUDAGuard device_guard(scores.device());
      check_cuda(router_backward_cuda(z, chosen.data_ptr<int64_t>(), grad.data_ptr<Accum>(), config,
                                      grad_logits.data_ptr<Accum>(),
                                      c10::cuda::getCurrentCUDAStream()),
                 op);
#endif
    } else {
      router_backward_cpu(z, chosen.data_ptr<int64_t>(), grad.data_ptr<Accum>(), config,
                          grad_logits.data_ptr<Accum>());
    }
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace
}  // namespace megatron_mm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_mm C++/CUDA kernels";
  m.attr("with_cuda") = megatron_mm::kWithCuda;
  m.def("expert_histogram", &megatron_mm::expert_histogram, py::arg("indices"),
        py::arg("num_experts"),
        "Per-expert count of int32/int64 routing choices (-1 = dropped); raises ValueError "
        "for entries outside [-1, num_experts).");
  // The MoE kernels only touch raw buffers and torch allocation, so they run without the GIL.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("moe_permute", &megatron_mm::moe_permute, py::arg("tokens"), py::arg("topk_indices"),
        py::arg("num_experts"), py::arg("topk_probs") = py::none(),
        py::arg("capacity") = py::none(), no_gil,
        "Group token rows by expert: (permuted, permuted_probs, row_map, tokens_per_expert, "
        "row_of_slot).");
  m.def("moe_unpermute", &megatron_mm::moe_unpermute, py::arg("permuted"), py::arg("row_map"),
        py::arg("num_tokens"), py::arg("probs") = py::none(), no_gil,
        "Sum permuted rows (weighted by probs) back into [num_tokens, hidden].");
  m.def("moe_unpermute_backward", &megatron_mm::moe_unpermute_backward, py::arg("grad_out"),
        py::arg("row_map"), py::arg("probs") = py::none(), py::arg("permuted") = py::none(),
        no_gil, "Gradients of moe_unpermute: (grad_permuted, grad_probs or None).");
  m.def("moe_gather_rows", &megatron_mm::moe_gather_rows, py::arg("src"), py::arg("index"),
        no_gil, "src[index] along dim 0 with zero rows where index == -1.");
  m.def("update_expert_bias_", &megatron_mm::update_expert_bias, py::arg("biases"),
        py::arg("tokens_per_expert"), py::arg("rate"), no_gil,
        "In place for every layer: bias += rate * sign(mean(tokens) - tokens).");
  m.def("router_forward", &megatron_mm::router_forward, py::arg("logits"), py::arg("topk"),
        py::arg("score_function"), py::arg("expert_bias") = py::none(),
        py::arg("num_groups") = py::none(), py::arg("group_topk") = py::none(),
        py::arg("scaling_factor") = py::none(), py::arg("pre_softmax") = false, no_gil,
        "Fused top-k routing: (probs [T, K], indices [T, K] int64, tokens_per_expert [E]).");
  m.def("router_backward", &megatron_mm::router_backward, py::arg("grad_probs"),
        py::arg("logits"), py::arg("indices"), py::arg("score_function"),
        py::arg("scaling_factor") = py::none(), py::arg("pre_softmax") = false, no_gil,
        "Gradient of router_forward's probs with respect to the logits.");
}
