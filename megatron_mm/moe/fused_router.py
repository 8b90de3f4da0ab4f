"""megatron-core's top-k router with the scoring and selection on our fused kernel.

Logits, z-loss, token dropping, aux losses and expert-bias bookkeeping stay megatron-core's; only
`topk_routing_with_score_function` (scores, selection bias, group-limited top-k, normalisation,
scaling) runs as one csrc pass per token (megatron_mm.ops.router). Router replay keeps
megatron-core's path.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe import router as megatron_router
from megatron.core.transformer.moe.router import TopKRouter

from megatron_mm.moe.module_override import module_function
from megatron_mm.ops.router import route


def fused_topk_routing(logits, topk, use_pre_softmax=False, num_groups=None, group_topk=None, scaling_factor=None,
                       score_function="softmax", expert_bias=None, fused=False, router_replay=None):
    """megatron-core's signature and result ([T, E] probabilities and boolean routing map)."""
    # megatron-core applies the expert bias with sigmoid scores only.
    bias = expert_bias if score_function == "sigmoid" else None
    probs, indices, _ = route(logits, topk, score_function, bias, num_groups, group_topk, scaling_factor,
                              use_pre_softmax)
    dense_probs = torch.zeros(logits.shape, dtype=probs.dtype, device=logits.device).scatter(1, indices, probs)
    routing_map = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(1, indices, True)
    return dense_probs, routing_map


class FusedTopKRouter(TopKRouter):
    def routing(self, logits, *args, **kwargs):
        if self.router_replay is not None:
            return super().routing(logits, *args, **kwargs)
        with module_function(megatron_router, "topk_routing_with_score_function", fused_topk_routing):
            return super().routing(logits, *args, **kwargs)
