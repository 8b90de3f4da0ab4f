"""MoE token permute / unpermute: group token rows by expert and sum them back.

Rows of the permuted layout are ordered by expert ascending and, within an expert, by token
ascending: the order of megatron-core's `moe_utils.permute(tokens, routing_map, probs)` with
`routing_map[t, e] = e in topk_indices[t]`. With `capacity` C ("drop and pad") every expert
keeps its first C tokens and owns the rows [e*C, (e+1)*C); unused rows are zero and their
`row_map` entry is -1.

`permute` / `unpermute` run the csrc kernels (OpenMP on CPU, CUDA on GPU) as autograd
functions, differentiable in the tokens and the probabilities, when megatron_mm._C is built,
and otherwise the pure-torch `permute_reference` / `unpermute_reference`; both pairs share
one contract. Unpermute sums in float32 (float64 for float64 data) in ascending row order.
"""

import os
from typing import Optional, Tuple

import torch

try:
    from megatron_mm import _C
except ImportError:
    _C = None

HAVE_KERNEL = _C is not None

# Range checks that read index values: on CUDA tensors each is a host sync per call, so there
# they run only with MEGATRON_MM_DEBUG_CHECKS=1 (read once, at import); CPU tensors are always
# checked (nothing to wait for).
DEBUG_CHECKS = os.environ.get("MEGATRON_MM_DEBUG_CHECKS", "0") == "1"


def _checks_values(tensor: torch.Tensor) -> bool:
    return DEBUG_CHECKS or not tensor.is_cuda

PermuteResult = Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_routing(topk_indices: torch.Tensor, num_experts: int, capacity: Optional[int]) -> None:
    if num_experts <= 0:
        raise ValueError(f"moe_permute: num_experts must be positive, got {num_experts}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"moe_permute: capacity must be >= 0, got {capacity}")
    if topk_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_permute: topk_indices must be int32 or int64, got {topk_indices.dtype}")
    if not _checks_values(topk_indices):
        return
    num_invalid = int(((topk_indices < -1) | (topk_indices >= num_experts)).sum())
    if num_invalid:
        raise ValueError(
            f"moe_permute: {num_invalid} topk_indices outside [-1, num_experts={num_experts})"
        )
    chosen = topk_indices.sort(dim=1).values
    repeats = (chosen[:, 1:] == chosen[:, :-1]) & (chosen[:, 1:] >= 0)
    num_duplicate = int(repeats.any(dim=1).sum())
    if num_duplicate:
        raise ValueError(
            f"moe_permute: {num_duplicate} tokens choose the same expert more than once"
        )


def _check_row_map(row_map: torch.Tensor, num_tokens: int) -> None:
    num_invalid = int(((row_map < -1) | (row_map >= num_tokens)).sum())
    if num_invalid:
        raise ValueError(
            f"moe_unpermute: {num_invalid} row_map entries outside [-1, num_tokens={num_tokens})"
        )


def permute_reference(
    tokens: torch.Tensor,
    topk_indices: torch.Tensor,
    num_experts: int,
    topk_probs: Optional[torch.Tensor] = None,
    capacity: Optional[int] = None,
) -> PermuteResult:
    """Group token rows by expert.

    tokens [T, H] float; topk_indices [T, K] int32/int64, -1 = no expert, no expert twice in
    a row; topk_probs [T, K] optional; capacity: keep each expert's first `capacity` tokens in
    E*capacity padded rows. Returns (permuted [N, H], permuted_probs [N] or None, row_map [N]
    int64 source token of each row (-1 = padding), tokens_per_expert [E] int64 rows kept per
    expert). Raises ValueError for out-of-range or repeated experts (checked on CUDA only with
    DEBUG_CHECKS).
    """
    _check_routing(topk_indices, num_experts, capacity)
    top_k = topk_indices.shape[1]
    flat = topk_indices.reshape(-1).long()
    slots = torch.nonzero(flat >= 0).squeeze(1)  # ascending, so token-major
    experts = flat[slots]
    order = torch.argsort(experts, stable=True)
    sorted_slots, sorted_experts = slots[order], experts[order]
    tokens_per_expert = torch.bincount(experts, minlength=num_experts)
    if capacity is None:
        slot_of_row = sorted_slots
    else:
        first_of_expert = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        rank = torch.arange(len(sorted_slots), device=flat.device) - first_of_expert[sorted_experts]
        kept = rank < capacity
        slot_of_row = torch.full((num_experts * capacity,), -1, dtype=torch.long, device=flat.device)
        slot_of_row[sorted_experts[kept] * capacity + rank[kept]] = sorted_slots[kept]
        tokens_per_expert = tokens_per_expert.clamp_max(capacity)

    is_row = slot_of_row >= 0
    row_map = torch.where(is_row, slot_of_row // top_k, -1)
    permuted = tokens.new_zeros(len(row_map), tokens.shape[1])
    permuted[is_row] = tokens.index_select(0, row_map[is_row])
    permuted_probs = None
    if topk_probs is not None:
        permuted_probs = topk_probs.new_zeros(len(row_map))
        permuted_probs[is_row] = topk_probs.reshape(-1).index_select(0, slot_of_row[is_row])
    return permuted, permuted_probs, row_map, tokens_per_expert


def unpermute_reference(
    permuted: torch.Tensor,
    row_map: torch.Tensor,
    num_tokens: int,
    probs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """out [num_tokens, H] with out[row_map[i]] += probs[i] * permuted[i].

    Rows with row_map -1 are skipped; the sum runs in float32 (float64 for float64 data) in
    ascending row order and is cast to the dtype of `permuted`. Raises ValueError for row_map
    entries outside [-1, num_tokens) (checked on CUDA only with DEBUG_CHECKS).
    """
    if _checks_values(row_map):
        _check_row_map(row_map, num_tokens)
    accum = _accum_dtype(permuted.dtype)
    is_row = row_map >= 0
    rows = permuted[is_row].to(accum)
    if probs is not None:
        rows = rows * probs[is_row].to(accum).unsqueeze(1)
    out = permuted.new_zeros(num_tokens, permuted.shape[1], dtype=accum)
    return out.index_add(0, row_map[is_row], rows).to(permuted.dtype)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, topk_probs, topk_indices, num_experts, capacity):
        permuted, permuted_probs, row_map, tokens_per_expert, row_of_slot = _C.moe_permute(
            tokens, topk_indices, num_experts, topk_probs, capacity
        )
        ctx.save_for_backward(row_map, row_of_slot)
        ctx.num_tokens = tokens.shape[0]
        ctx.mark_non_differentiable(row_map, tokens_per_expert)
        return permuted, permuted_probs, row_map, tokens_per_expert

    @staticmethod
    def backward(ctx, grad_permuted, grad_permuted_probs, _grad_row_map, _grad_counts):
        row_map, row_of_slot = ctx.saved_tensors
        grad_tokens = grad_probs = None
        # A token's gradient is the sum of its rows' gradients: an unpermute without probs.
        if ctx.needs_input_grad[0]:
            grad_tokens = _C.moe_unpermute(grad_permuted, row_map, ctx.num_tokens, None)
        if ctx.needs_input_grad[1] and grad_permuted_probs is not None:
            grad_probs = _C.moe_gather_rows(grad_permuted_probs, row_of_slot)
        return grad_tokens, grad_probs, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, permuted, probs, row_map, num_tokens):
        out = _C.moe_unpermute(permuted, row_map, num_tokens, probs)
        # permuted is only read by the gradient of probs.
        needs_grad_probs = probs is not None and probs.requires_grad
        ctx.save_for_backward(row_map, probs, permuted if needs_grad_probs else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        row_map, probs, permuted = ctx.saved_tensors
        grad_permuted, grad_probs = _C.moe_unpermute_backward(grad_out, row_map, probs, permuted)
        return grad_permuted, grad_probs, None, None


def permute(
    tokens: torch.Tensor,
    topk_indices: torch.Tensor,
    num_experts: int,
    topk_probs: Optional[torch.Tensor] = None,
    capacity: Optional[int] = None,
) -> PermuteResult:
    """Same contract as `permute_reference`, on the compiled kernel when built."""
    if not HAVE_KERNEL:
        return permute_reference(tokens, topk_indices, num_experts, topk_probs, capacity)
    return _Permute.apply(tokens, topk_probs, topk_indices, num_experts, capacity)


def unpermute(
    permuted: torch.Tensor,
    row_map: torch.Tensor,
    num_tokens: int,
    probs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as `unpermute_reference`, on the compiled kernel when built."""
    if not HAVE_KERNEL:
        return unpermute_reference(permuted, row_map, num_tokens, probs)
    return _Unpermute.apply(permuted, probs, row_map, num_tokens)
