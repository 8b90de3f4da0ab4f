"""megatron-core's all-to-all token dispatcher with its local permutation on our fused kernels.

The expert-parallel all-to-all, the expert computation and the probabilities stay megatron-core's:
only the two local steps around the all-to-all (tokens -> expert-grouped rows before it, rows ->
tokens after it) run on megatron_mm.ops.moe_permute, which yields the same row order as
megatron-core's `permute`. Drop-and-pad and quantization padding keep megatron-core's own path.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe import token_dispatcher as megatron_dispatch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_mm.moe.module_override import module_function
from megatron_mm.ops import moe_permute


def routing_map_to_topk(routing_map: torch.Tensor, probs: torch.Tensor, topk: int):
    """[T, E] boolean map and probabilities -> [T, k] expert indices (-1 where a token has fewer)
    and their probabilities."""
    chosen, indices = torch.topk(routing_map.to(torch.int8), k=min(topk, routing_map.shape[1]), dim=1)
    indices = torch.where(chosen.bool(), indices, torch.full_like(indices, -1))
    topk_probs = probs.gather(1, indices.clamp(min=0)) * chosen.to(probs.dtype)
    return indices, topk_probs


class FusedPermuteAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """Same state and schedule as megatron-core's dispatcher; see the module docstring."""

    def _fused(self) -> bool:
        return not (self.drop_and_pad or self.config.moe_router_padding_for_quantization)

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        if not self._fused():
            return super().dispatch_preprocess(hidden_states, routing_map, probs)
        with module_function(megatron_dispatch, "permute", self._permute):
            return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def combine_postprocess(self, permutated_local_input_tokens):
        if not self._fused():
            return super().combine_postprocess(permutated_local_input_tokens)
        with module_function(megatron_dispatch, "unpermute", self._unpermute):
            return super().combine_postprocess(permutated_local_input_tokens)

    def _permute(self, tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
        indices, topk_probs = routing_map_to_topk(routing_map, probs, self.config.moe_router_topk)
        permuted, permuted_probs, row_map, _ = moe_permute.permute(
            tokens, indices, routing_map.shape[1], topk_probs=topk_probs
        )
        return permuted, permuted_probs, row_map

    def _unpermute(self, permuted, row_map, restore_shape, probs=None, routing_map=None, fused=False,
                   drop_and_pad=False):
        return moe_permute.unpermute(permuted, row_map, restore_shape[0])


class FusedPermuteMoELayer(MoELayer):
    """megatron-core's MoE layer whose all-to-all dispatcher permutes with our kernels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
            # The subclass adds no state: re-typing the built dispatcher keeps megatron-core's
            # construction (process groups, capacity, shared-expert overlap) as it is.
            self.token_dispatcher.__class__ = FusedPermuteAlltoAllDispatcher
