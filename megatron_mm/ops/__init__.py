"""Python front of the csrc kernels; each op has a pure-torch reference of the same signature."""

from megatron_mm.ops.expert_bias import update_expert_bias_, update_expert_bias_reference_
from megatron_mm.ops.load_balance import expert_histogram, expert_histogram_reference
from megatron_mm.ops.moe_permute import (
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)
from megatron_mm.ops.router import route, route_reference

__all__ = [
    "update_expert_bias_",
    "update_expert_bias_reference_",
    "expert_histogram",
    "expert_histogram_reference",
    "permute",
    "permute_reference",
    "unpermute",
    "unpermute_reference",
    "route",
    "route_reference",
]
