// Python bindings of the csrc kernels as the extension module megatron_mm._C.
#include <torch/extension.h>

#include "load_balance.h"

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

}  // namespace
}  // namespace megatron_mm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_mm C++/CUDA kernels";
  m.attr("with_cuda") = megatron_mm::kWithCuda;
  m.def("expert_histogram", &megatron_mm::expert_histogram, py::arg("indices"),
        py::arg("num_experts"),
        "Per-expert count of int32/int64 routing choices (-1 = dropped); raises ValueError "
        "for entries outside [-1, num_experts).");
}
