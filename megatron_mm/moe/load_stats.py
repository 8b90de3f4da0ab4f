"""Expert load per MoE layer: tokens per expert, max/mean imbalance and the expert-bias trajectory.

megatron-core's routers count the tokens each expert received (`local_tokens_per_expert`, kept when
auxiliary-loss-free balancing is on) and finalize_model_grads turns those counts into the bias update,
then zeroes them. The monitor reads the counts just before that, summed over the same
tensor x data x context-parallel group megatron-core uses, so it sees exactly what the update sees.
"""

from __future__ import annotations

import torch

from megatron_mm.checkpoint.dist_ckpt import unwrap


class ExpertLoadMonitor:
    def __init__(self, model: list):
        self.routers = [
            (name, module)
            for chunk in model
            for name, module in unwrap(chunk).named_modules()
            if getattr(module, "local_tokens_per_expert", None) is not None
        ]
        self.last: dict | None = None  # tokens per expert and biases after the latest step
        self.imbalance_history: list[float] = []  # mean over layers of max/mean load, per step

    def finalize_model_grads(self, model, num_tokens=None, *args, **kwargs):
        """Stands in for megatron-core's finalize_model_grads in the schedule's config."""
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads

        if self.routers:
            counts = torch.stack([router.local_tokens_per_expert for _, router in self.routers]).float()
            group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
            torch.distributed.all_reduce(counts, group=group)
            result = finalize_model_grads(model, num_tokens, *args, **kwargs)
            biases = torch.stack([router.expert_bias.detach().float() for _, router in self.routers])
            self.last = {"tokens_per_expert": counts.cpu(), "expert_bias": biases.cpu()}
            self.imbalance_history.append(self._max_over_mean(counts).mean().item())
            return result
        return finalize_model_grads(model, num_tokens, *args, **kwargs)

    @property
    def layer_names(self) -> list[str]:
        return [name.removesuffix(".mlp.router").removesuffix(".router") for name, _ in self.routers]

    @staticmethod
    def _max_over_mean(counts: torch.Tensor) -> torch.Tensor:
        return counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1)

    def latest(self) -> dict | None:
        """Per-layer max/mean load of the last step, their mean, tokens per expert and biases."""
        if self.last is None:
            return None
        step = self.last
        counts = step["tokens_per_expert"]
        max_over_mean = self._max_over_mean(counts)
        return {
            "max_over_mean": dict(zip(self.layer_names, max_over_mean.tolist())),
            "mean_max_over_mean": max_over_mean.mean().item(),
            "tokens_per_expert": dict(zip(self.layer_names, counts)),
            "expert_bias": dict(zip(self.layer_names, step["expert_bias"])),
        }
