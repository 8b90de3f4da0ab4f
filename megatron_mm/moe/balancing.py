"""Expert-load statistics and auxiliary-loss-free balancing, once per optimizer step.

Statistics per MoE layer (every router, with or without expert bias): tokens per expert after
capacity dropping, max/mean load, tokens dropped (routed x top-k minus kept) and the expert bias.
They come from each router's output in training forwards, summed over the tensor x data x
context-parallel group, as megatron-core sums the counts behind its bias update. They stay on the
device: the host reads them only when a log line or a summary looks at them.

The bias update itself (bias += rate * sign(mean load - load)) uses megatron-core's own counts
(`local_tokens_per_expert`) and runs for every layer in one fused call (megatron_mm.ops.expert_bias);
with `expert_bias_update="megatron"` megatron-core's finalize_model_grads does it instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megatron_mm.ops.expert_bias import update_expert_bias_
from megatron_mm.runtime.device import compute_device
from megatron_mm.runtime.model_chunks import unwrap


class ExpertBalancing:
    def __init__(self, model: list, transformer_config, fused_update: bool):
        from megatron.core.transformer.moe.router import TopKRouter

        self.routers = [
            (name, module)
            for chunk in model
            for name, module in unwrap(chunk).named_modules()
            if isinstance(module, TopKRouter)
        ]
        self.layer_names = [name.removesuffix(".mlp.router").removesuffix(".router") for name, _ in self.routers]
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
        device = compute_device()
        self._kept = torch.zeros(len(self.routers), num_experts, device=device)
        self._routed = torch.zeros(len(self.routers), device=device)
        for index, (_, router) in enumerate(self.routers):
            router.register_forward_hook(self._count_load(index))
        self._latest: ExpertLoad | None = None  # device tensors of the latest step
        # Per-step mean max/mean load, kept on the device only when asked for (it grows every step).
        self.keep_history = False
        self._history: list[torch.Tensor] = []

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
        """Keeps the step's statistics as device tensors: nothing here waits for the device."""
        biases = {name: router.expert_bias.detach().clone() for name, (_, router) in zip(self.layer_names, self.routers)
                  if router.expert_bias is not None}
        dropped = (routed * self.topk - kept.sum(dim=1)).clamp(min=0) if self.counts_drops else None
        self._latest = ExpertLoad(self.layer_names, kept, dropped, biases)
        if self.keep_history:
            self._history.append(max_over_mean(kept).mean())

    @property
    def imbalance_history(self) -> list[float]:
        """Mean over layers of the max/mean load, per step since keep_history was set."""
        return torch.stack(self._history).tolist() if self._history else []

    def latest(self) -> ExpertLoad | None:
        """Statistics of the last step; they are read from the device only when looked at."""
        return self._latest


def max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    return counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1)


class ExpertLoad(Mapping):
    """Per-layer max/mean load ("max_over_mean"), their mean ("mean_max_over_mean"), tokens per
    expert, drops (None with pad-to-capacity) and biases of one step, keyed by layer name. Held as
    device tensors; the first lookup copies them to the host in one transfer."""

    def __init__(self, names: list[str], kept: torch.Tensor, dropped: torch.Tensor | None, biases: dict):
        self._names, self._kept, self._dropped, self._biases = names, kept, dropped, biases
        self._host: dict | None = None

    def _read(self) -> dict:
        if self._host is None:
            ratios = max_over_mean(self._kept)
            device_parts = [self._kept.reshape(-1), ratios, *([] if self._dropped is None else [self._dropped]),
                            *self._biases.values()]
            sizes = [part.numel() for part in device_parts]
            host = torch.cat([part.float() for part in device_parts]).cpu().split(sizes)
            kept, ratios, rest = host[0].view_as(self._kept), host[1], list(host[2:])
            dropped = None if self._dropped is None else rest.pop(0)
            biases = {name: bias.to(original.dtype) for (name, original), bias in zip(self._biases.items(), rest)}
            self._host = {
                "max_over_mean": dict(zip(self._names, ratios.tolist())),
                "mean_max_over_mean": ratios.mean().item(),
                "tokens_per_expert": dict(zip(self._names, kept)),
                "dropped": None if dropped is None else dict(zip(self._names, dropped.tolist())),
                "expert_bias": biases,
            }
        return self._host

    def __getitem__(self, key):
        return self._read()[key]

    def __iter__(self):
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())
