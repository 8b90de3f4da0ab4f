"""Expert-load statistics and auxiliary-loss-free balancing, once per optimizer step.

Statistics per MoE layer (every router, with or without expert bias): tokens per expert after
capacity dropping, max/mean load, tokens dropped (routed x top-k minus kept) and the expert bias.
They come from each router's output in training forwards, summed over the tensor x data x
context-parallel group, as megatron-core sums the counts behind its bias update.

The bias update itself (bias += rate * sign(mean load - load)) uses megatron-core's own counts
(`local_tokens_per_expert`) and runs for every layer in one fused call (megatron_mm.ops.expert_bias);
with `expert_bias_update="megatron"` megatron-core's finalize_model_grads does it instead.
"""

from __future__ import annotations

import torch

from megatron_mm.checkpoint.dist_ckpt import unwrap
from megatron_mm.ops.expert_bias import update_expert_bias_


class ExpertBalancing:
    def __init__(self, model: list, transformer_config, fused_update: bool):
        from megatron.core.transformer.moe.router import TopKRouter

        self.routers = [
            (name, module)
            for chunk in model
            for name, module in unwrap(chunk).named_modules()
            if isinstance(module, TopKRouter)
        ]
        self.biased = [router for _, router in self.routers if router.expert_bias is not None]
        self.rate = transformer_config.moe_router_bias_update_rate
        self.topk = transformer_config.moe_router_topk
        self.fused_update = fused_update and bool(self.biased)
        if self.fused_update:
            # The routers read this flag only when built (to count tokens); finalize_model_grads
            # reads it every step to update and reset: from here on that is done below.
            transformer_config.moe_router_enable_expert_bias = False
        # With pad-to-capacity the routing map holds padding slots, so kept - routed is no drop count.
        self.counts_drops = not transformer_config.moe_pad_expert_input_to_capacity
        num_experts = transformer_config.num_moe_experts or 0
        # On the device the collective runs on (NCCL reduces CUDA tensors only).
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        self._kept = torch.zeros(len(self.routers), num_experts, device=device)
        self._routed = torch.zeros(len(self.routers), device=device)
        for index, (_, router) in enumerate(self.routers):
            router.register_forward_hook(self._count_load(index))
        self.last: dict | None = None  # statistics of the latest step
        self.imbalance_history: list[float] = []  # mean over layers of max/mean load, per step

    def _count_load(self, index: int):
        def hook(router, inputs, outputs):
            if router.training and torch.is_grad_enabled():  # training forwards, as megatron-core counts
                hidden, (_, routing_map) = inputs[0], outputs
                self._routed[index] += hidden.numel() // hidden.shape[-1]
                self._kept[index] += routing_map.sum(dim=0).to(self._kept.device, self._kept.dtype)

        return hook

    def finalize_model_grads(self, model, num_tokens=None, *args, **kwargs):
        """Stands in for megatron-core's finalize_model_grads in the schedule's config."""
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        if not self.routers:
            return finalize_model_grads(model, num_tokens, *args, **kwargs)
        parts = [self._kept, self._routed[:, None]]
        if self.fused_update:
            parts.append(torch.stack([router.local_tokens_per_expert.to(self._kept) for router in self.biased]))
        totals = torch.cat([p.reshape(-1) for p in parts])
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        torch.distributed.all_reduce(totals, group=group)  # one reduction for statistics and update
        pieces = totals.split([p.numel() for p in parts])
        kept, routed = pieces[0].view_as(self._kept), pieces[1]
        result = finalize_model_grads(model, num_tokens, *args, **kwargs)
        if self.fused_update:
            counts = pieces[2].view(len(self.biased), -1)
            update_expert_bias_([router.expert_bias for router in self.biased], list(counts), self.rate)
            for router in self.biased:
                router.local_tokens_per_expert.zero_()
        self._record(kept, routed)
        self._kept.zero_()
        self._routed.zero_()
        return result

    def _record(self, kept: torch.Tensor, routed: torch.Tensor) -> None:
        biases = {name: router.expert_bias.detach().cpu() for name, router in self.routers
                  if router.expert_bias is not None}
        dropped = (routed * self.topk - kept.sum(dim=1)).clamp(min=0) if self.counts_drops else None
        self.last = {"tokens_per_expert": kept.cpu(), "dropped": None if dropped is None else dropped.cpu(),
                     "expert_bias": biases}
        self.imbalance_history.append(self._max_over_mean(kept).mean().item())

    @staticmethod
    def _max_over_mean(counts: torch.Tensor) -> torch.Tensor:
        return counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1)

    def latest(self) -> dict | None:
        """Per-layer max/mean load of the last step, their mean, tokens per expert, drops, biases."""
        if self.last is None:
            return None
        names = [name.removesuffix(".mlp.router").removesuffix(".router") for name, _ in self.routers]
        counts = self.last["tokens_per_expert"]
        max_over_mean = self._max_over_mean(counts)
        dropped = self.last["dropped"]
        return {
            "max_over_mean": dict(zip(names, max_over_mean.tolist())),
            "mean_max_over_mean": max_over_mean.mean().item(),
            "tokens_per_expert": dict(zip(names, counts)),
            "dropped": None if dropped is None else dict(zip(names, dropped.tolist())),
            "expert_bias": {name.removesuffix(".mlp.router").removesuffix(".router"): bias
                            for name, bias in self.last["expert_bias"].items()},
        }
