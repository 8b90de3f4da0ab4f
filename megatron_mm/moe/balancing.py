"""Auxiliary-loss-free expert balancing and expert-load statistics, once per optimizer step.

megatron-core's routers count the tokens each expert received (`local_tokens_per_expert`) when the
expert bias is on. Each step this sums the counts over the tensor x data x context-parallel group
(as megatron-core does), records per-layer load, and updates every layer's fp32 bias in one fused
call (megatron_mm.ops.expert_bias: bias += rate * sign(mean load - load)). With
`expert_bias_update="megatron"` megatron-core's own finalize_model_grads does the update instead.
"""

from __future__ import annotations

import torch

from megatron_mm.checkpoint.dist_ckpt import unwrap
from megatron_mm.ops.expert_bias import update_expert_bias_


class ExpertBalancing:
    def __init__(self, model: list, transformer_config, fused_update: bool):
        self.routers = [
            (name, module)
            for chunk in model
            for name, module in unwrap(chunk).named_modules()
            if getattr(module, "local_tokens_per_expert", None) is not None
        ]
        self.rate = transformer_config.moe_router_bias_update_rate
        self.fused_update = fused_update and bool(self.routers)
        if self.fused_update:
            # The routers read this flag only when built (to count tokens); finalize_model_grads
            # reads it every step to update and reset: from here on that is done below.
            transformer_config.moe_router_enable_expert_bias = False
        self.last: dict | None = None  # tokens per expert and biases after the latest step
        self.imbalance_history: list[float] = []  # mean over layers of max/mean load, per step

    def finalize_model_grads(self, model, num_tokens=None, *args, **kwargs):
        """Stands in for megatron-core's finalize_model_grads in the schedule's config."""
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        if not self.routers:
            return finalize_model_grads(model, num_tokens, *args, **kwargs)
        counts = torch.stack([router.local_tokens_per_expert for _, router in self.routers])
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(counts, group=group)
        result = finalize_model_grads(model, num_tokens, *args, **kwargs)
        biases = [router.expert_bias for _, router in self.routers]
        if self.fused_update:
            update_expert_bias_(biases, list(counts), self.rate)
            for _, router in self.routers:
                router.local_tokens_per_expert.zero_()
        self.last = {"tokens_per_expert": counts.float().cpu(), "expert_bias": torch.stack(biases).detach().cpu()}
        self.imbalance_history.append(self._max_over_mean(self.last["tokens_per_expert"]).mean().item())
        return result

    @staticmethod
    def _max_over_mean(counts: torch.Tensor) -> torch.Tensor:
        return counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1)

    @property
    def layer_names(self) -> list[str]:
        return [name.removesuffix(".mlp.router").removesuffix(".router") for name, _ in self.routers]

    def latest(self) -> dict | None:
        """Per-layer max/mean load of the last step, their mean, tokens per expert and biases."""
        if self.last is None:
            return None
        counts = self.last["tokens_per_expert"]
        max_over_mean = self._max_over_mean(counts)
        return {
            "max_over_mean": dict(zip(self.layer_names, max_over_mean.tolist())),
            "mean_max_over_mean": max_over_mean.mean().item(),
            "tokens_per_expert": dict(zip(self.layer_names, counts)),
            "expert_bias": dict(zip(self.layer_names, self.last["expert_bias"])),
        }
