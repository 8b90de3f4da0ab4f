"""Fused MoE router: scores, group-limited top-k, probabilities and token counts in one pass.

Semantics are megatron-core's `moe_utils.topk_routing_with_score_function` (fused=False) in
the compact form [T, K] instead of its dense [T, E] probs and routing map:

* softmax: with `pre_softmax`, softmax over all experts then top-k (no renormalisation);
  otherwise top-k on the logits and softmax over the chosen logits;
* sigmoid: top-k on sigmoid(logits) + expert_bias (the bias steers the selection only), then
  the chosen unbiased scores divided by their sum + 1e-20 when topk > 1;
* group-limited routing (`group_topk`): experts form `num_groups` equal groups, a group scores
  the sum of its top (topk // group_topk) selection scores, and top-k runs over the experts of
  the best `group_topk` groups;
* probs are multiplied by `scaling_factor` when it is set (and non-zero).

Scores are computed in float32 (float64 for float64 logits): bfloat16 logits are upcast, where
megatron-core would round the scores back to bfloat16. Chosen experts come out by descending
selection score. The kernel breaks exact ties toward the lower expert (and group) index;
torch.topk, and so the reference and megatron-core, may pick another of the tied experts.
expert_bias needs score_function="sigmoid", as megatron-core ignores it for softmax.

`route` runs the csrc kernel (OpenMP on CPU, CUDA on GPU) as an autograd function,
differentiable in the logits, when megatron_mm._C is built, and otherwise the pure-torch
`route_reference`; both share one contract.
"""

from typing import Optional, Tuple

import torch

try:
    from megatron_mm import _C
except ImportError:
    _C = None

HAVE_KERNEL = _C is not None

# The kernel keeps a token's top-k in fixed-size buffers (kRouterMaxTopK in csrc/router.h).
MAX_TOPK = 64

RouteResult = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_route_args(logits, topk, score_function, expert_bias, num_groups, group_topk) -> None:
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        raise TypeError(f"route: logits must be float32, bfloat16 or float64, got {logits.dtype}")
    if score_function not in ("softmax", "sigmoid"):
        raise ValueError(f"route: score_function must be 'softmax' or 'sigmoid', got '{score_function}'")
    num_experts = logits.shape[1]
    if not 1 <= topk <= min(num_experts, MAX_TOPK):
        raise ValueError(
            f"route: topk must be in [1, min(num_experts={num_experts}, {MAX_TOPK})], got {topk}"
        )
    if group_topk:
        if not num_groups or num_experts % num_groups:
            raise ValueError(f"route: num_groups must divide num_experts={num_experts}, got {num_groups}")
        if not (group_topk <= num_groups and group_topk <= topk
                and topk <= group_topk * (num_experts // num_groups)):
            raise ValueError(
                "route: need group_topk <= num_groups, group_topk <= topk and topk <= group_topk "
                f"* experts per group; got group_topk={group_topk}, num_groups={num_groups}, "
                f"topk={topk}"
            )
    if expert_bias is not None:
        if score_function != "sigmoid":
            raise ValueError("route: expert_bias needs score_function='sigmoid' (as in megatron-core)")
        if expert_bias.shape != (num_experts,):
            raise ValueError(
                f"route: expert_bias must be [num_experts={num_experts}], got shape "
                f"{tuple(expert_bias.shape)}"
            )


def route_reference(
    logits: torch.Tensor,
    topk: int,
    score_function: str = "softmax",
    expert_bias: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: Optional[float] = None,
    pre_softmax: bool = False,
) -> RouteResult:
    """Top-k routing of logits [T, E] (float32, bfloat16 or float64).

    Returns (probs [T, K] float32 (float64 for float64 logits), indices [T, K] int64 by
    descending selection score, tokens_per_expert [E] int64). Raises ValueError / TypeError
    for invalid options (see `_check_route_args`).
    """
    _check_route_args(logits, topk, score_function, expert_bias, num_groups, group_topk)
    accum = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(accum)
    num_tokens, num_experts = logits.shape

    def select(scores: torch.Tensor) -> torch.Tensor:
        if group_topk:
            group_size = num_experts // num_groups
            group_scores = scores.view(num_tokens, num_groups, group_size)
            group_scores = group_scores.topk(topk // group_topk, dim=-1).values.sum(dim=-1)
            kept = group_scores.topk(group_topk, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, kept, True)
            expert_mask = group_mask.repeat_interleave(group_size, dim=1)
            scores = scores.masked_fill(~expert_mask, float("-inf"))
        return scores.topk(topk, dim=-1).indices

    if score_function == "softmax" and pre_softmax:
        scores = torch.softmax(logits, dim=-1)
        indices = select(scores)
        probs = scores.gather(1, indices)
    elif score_function == "softmax":
        indices = select(logits)
        probs = torch.softmax(logits.gather(1, indices), dim=-1)
    else:
        scores = torch.sigmoid(logits)
        selection = scores if expert_bias is None else scores + expert_bias.to(accum)
        indices = select(selection)
        probs = scores.gather(1, indices)
        if topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor:
        probs = probs * scaling_factor
    tokens_per_expert = torch.bincount(indices.reshape(-1), minlength=num_experts)
    return probs, indices, tokens_per_expert


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, expert_bias, topk, score_function, num_groups, group_topk,
                scaling_factor, pre_softmax):
        probs, indices, tokens_per_expert = _C.router_forward(
            logits, topk, score_function, expert_bias, num_groups, group_topk, scaling_factor,
            pre_softmax,
        )
        ctx.save_for_backward(logits, indices)
        ctx.backward_options = (score_function, scaling_factor, pre_softmax)
        ctx.mark_non_differentiable(indices, tokens_per_expert)
        return probs, indices, tokens_per_expert

    @staticmethod
    def backward(ctx, grad_probs, _grad_indices, _grad_counts):
        logits, indices = ctx.saved_tensors
        grad_logits = _C.router_backward(grad_probs, logits, indices, *ctx.backward_options)
        # The bias only steers the selection, so it gets no gradient.
        return grad_logits, None, None, None, None, None, None, None


def route(
    logits: torch.Tensor,
    topk: int,
    score_function: str = "softmax",
    expert_bias: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: Optional[float] = None,
    pre_softmax: bool = False,
) -> RouteResult:
    """Same contract as `route_reference`, on the compiled kernel when built."""
    if not HAVE_KERNEL:
        return route_reference(logits, topk, score_function, expert_bias, num_groups,
                               group_topk, scaling_factor, pre_softmax)
    _check_route_args(logits, topk, score_function, expert_bias, num_groups, group_topk)
    return _Route.apply(logits, expert_bias, topk, score_function, num_groups, group_topk,
                        scaling_factor, pre_softmax)
