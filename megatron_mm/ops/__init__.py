"""Python front of the csrc kernels; each op has a pure-torch reference of the same signature."""

from megatron_mm.ops.load_balance import expert_histogram, expert_histogram_reference
from megatron_mm.ops.moe_permute import (
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)

__all__ = [
    "expert_histogram",
    "expert_histogram_reference",
    "permute",
    "permute_reference",
    "unpermute",
    "unpermute_reference",
]
