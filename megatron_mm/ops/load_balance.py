"""Per-expert token histogram for MoE load balancing.

`expert_histogram` runs the csrc kernel (OpenMP on CPU, CUDA on GPU) when megatron_mm._C
is built and otherwise the pure-torch `expert_histogram_reference`; both share one contract.
"""

import torch

try:
    from megatron_mm import _C
except ImportError:
    _C = None

HAVE_KERNEL = _C is not None


def expert_histogram_reference(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count how often each expert was chosen.

    indices: int32/int64 routing choices of any shape (typically [tokens, top_k]); -1 marks
    a dropped slot and is not counted. Returns int64 counts [num_experts] on the device of
    `indices`. Raises ValueError for entries outside [-1, num_experts).
    """
    if num_experts <= 0:
        raise ValueError(f"expert_histogram: num_experts must be positive, got {num_experts}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_histogram: indices must be int32 or int64, got {indices.dtype}")
    flat = indices.reshape(-1)
    num_invalid = int(((flat < -1) | (flat >= num_experts)).sum())
    if num_invalid:
        raise ValueError(
            f"expert_histogram: {num_invalid} indices outside [-1, num_experts={num_experts}): "
            f"min {int(flat.min())}, max {int(flat.max())}"
        )
    return torch.bincount(flat[flat >= 0], minlength=num_experts)


def expert_histogram(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Same contract as `expert_histogram_reference`, on the compiled kernel when built."""
    if HAVE_KERNEL:
        return _C.expert_histogram(indices, num_experts)
    return expert_histogram_reference(indices, num_experts)
