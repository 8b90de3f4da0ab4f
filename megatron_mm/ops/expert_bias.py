"""Aux-loss-free expert-bias update (DeepSeek-V3 style load balancing), fused over layers.

For every MoE layer: bias += rate * sign(mean(tokens_per_expert) - tokens_per_expert), the
arithmetic of megatron-core's `moe_utils.get_updated_expert_bias` after its all-reduce: the
counts given here are already reduced. `update_expert_bias_` runs one csrc kernel call for all
layers (OpenMP on CPU, one CUDA launch on GPU) when megatron_mm._C is built and otherwise the
pure-torch `update_expert_bias_reference_`; both share one contract.
"""

from typing import Sequence

import torch

try:
    from megatron_mm import _C
except ImportError:
    _C = None

HAVE_KERNEL = _C is not None


def _check_layers(biases: Sequence[torch.Tensor], tokens_per_expert: Sequence[torch.Tensor]) -> None:
    if len(biases) != len(tokens_per_expert):
        raise ValueError(
            f"update_expert_bias_: got {len(biases)} biases but {len(tokens_per_expert)} "
            "tokens_per_expert tensors"
        )
    for layer, (bias, counts) in enumerate(zip(biases, tokens_per_expert)):
        if bias.dtype != torch.float32:
            raise TypeError(f"update_expert_bias_: biases[{layer}] must be float32, got {bias.dtype}")
        if bias.dim() != 1 or bias.numel() == 0 or not bias.is_contiguous():
            raise ValueError(
                f"update_expert_bias_: biases[{layer}] must be a contiguous non-empty "
                "[num_experts] tensor"
            )
        if counts.shape != bias.shape:
            raise ValueError(
                f"update_expert_bias_: tokens_per_expert[{layer}] must have shape "
                f"{tuple(bias.shape)}, got {tuple(counts.shape)}"
            )


def _read_counts(counts: torch.Tensor) -> torch.Tensor:
    """Counts as the kernel reads them: int64, float32 (16-bit floats widened) or float64."""
    if counts.dtype == torch.float64:
        return counts
    return counts.float() if counts.is_floating_point() else counts.long()


@torch.no_grad()
def update_expert_bias_reference_(
    biases: Sequence[torch.Tensor], tokens_per_expert: Sequence[torch.Tensor], rate: float
) -> None:
    """In place, for every layer l: biases[l] += rate * sign(mean(tokens_l) - tokens_l).

    biases: contiguous float32 [E_l] (E_l may differ between layers); tokens_per_expert: [E_l]
    of any integer or float dtype (float16/bfloat16 are widened to float32). Integer and
    float32 counts are averaged and applied in float32, float64 counts in float64 rounded
    once into the bias, as megatron-core does. A load equal to the mean leaves the bias as is.
    """
    _check_layers(biases, tokens_per_expert)
    for bias, counts in zip(biases, tokens_per_expert):
        counts = _read_counts(counts)
        # Summed exactly, so the mean matches torch's float32 sum wherever that one is exact.
        total = counts.sum(dtype=torch.int64 if counts.dtype == torch.int64 else torch.float64)
        real = torch.float64 if counts.dtype == torch.float64 else torch.float32
        mean = total.to(real) / counts.shape[-1]
        offset = mean - counts.to(real)
        bias.copy_(bias.to(real) + torch.sign(offset) * rate)


def update_expert_bias_(
    biases: Sequence[torch.Tensor], tokens_per_expert: Sequence[torch.Tensor], rate: float
) -> None:
    """Same contract as `update_expert_bias_reference_`, in one kernel call when built."""
    if not HAVE_KERNEL:
        update_expert_bias_reference_(biases, tokens_per_expert, rate)
        return
    _check_layers(biases, tokens_per_expert)
    _C.update_expert_bias_(list(biases), list(tokens_per_expert), float(rate))
