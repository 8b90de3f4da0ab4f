"""What every Mixture-of-Experts family shares: routed experts (and optional shared experts) in
place of the dense MLP, on megatron-core's MoE layer, router and token dispatchers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mm.models.layers.decoder import DecoderConfig


@dataclass
class MoEDecoderConfig(DecoderConfig):
    num_experts: int = 8
    moe_ffn_hidden_size: Optional[int] = None  # per-expert width; None = ffn_hidden_size
    first_k_dense: int = 0  # leading layers with a dense MLP (ffn_hidden_size) instead of experts
    router_topk: int = 2
    router_score_function: str = "softmax"  # softmax | sigmoid
    # softmax over all experts before top-k (probabilities not renormalised); False = softmax over
    # the chosen k, which equals renormalised top-k probabilities (Mixtral, Qwen3-MoE).
    router_pre_softmax: bool = False
    router_num_groups: Optional[int] = None  # group-limited routing: experts in groups (nodes)
    router_group_topk: Optional[int] = None  # ... of which each token may use this many
    router_topk_scaling_factor: Optional[float] = None  # routed scaling factor on the top-k weights
    expert_bias: bool = False  # auxiliary-loss-free balancing: bias for selection only
    expert_bias_update_rate: float = 1.0e-3
    expert_bias_update: str = "fused_kernel"  # fused_kernel (one csrc call for all layers) | megatron
    aux_loss_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    aux_loss_coeff: float = 0.0
    shared_expert_ffn_hidden_size: Optional[int] = None  # None = no shared expert
    capacity_factor: Optional[float] = None  # None = dropless
    pad_to_capacity: bool = False
    token_drop_policy: str = "probs"  # probs | position
    token_dispatcher: str = "alltoall"  # alltoall | allgather
    # local permute/unpermute around the all-to-all: megatron-core's torch ops, or our fused csrc
    # kernels (megatron_mm.moe.dispatcher; alltoall dispatcher, dropless)
    token_permute: str = "megatron"  # megatron | fused_kernel
    # router scores + selection: megatron-core's torch ops, or our fused csrc kernel (megatron_mm.moe.fused_router)
    router_scoring: str = "megatron"  # megatron | fused_kernel

    def family_transformer_fields(self) -> dict:
        dense_then_moe = [0] * self.first_k_dense + [1] * (self.num_layers - self.first_k_dense)
        return {
            "num_moe_experts": self.num_experts,
            "moe_ffn_hidden_size": self.moe_ffn_hidden_size or self.ffn_hidden_size,
            "moe_layer_freq": dense_then_moe,
            "moe_router_topk": self.router_topk,
            "moe_router_score_function": self.router_score_function,
            "moe_router_pre_softmax": self.router_pre_softmax,
            "moe_router_num_groups": self.router_num_groups,
            "moe_router_group_topk": self.router_group_topk,
            "moe_router_topk_scaling_factor": self.router_topk_scaling_factor,
            "moe_router_enable_expert_bias": self.expert_bias,
            "moe_router_bias_update_rate": self.expert_bias_update_rate,
            "moe_router_load_balancing_type": self.aux_loss_type,
            "moe_aux_loss_coeff": self.aux_loss_coeff,
            "moe_router_dtype": "fp32",
            "moe_shared_expert_intermediate_size": self.shared_expert_ffn_hidden_size,
            "moe_expert_capacity_factor": self.capacity_factor,
            "moe_pad_expert_input_to_capacity": self.pad_to_capacity,
            "moe_token_drop_policy": self.token_drop_policy,
            "moe_token_dispatcher_type": self.token_dispatcher,
        }

    def layer_spec(self, transformer_config, backend, vp_stage=None):
        from megatron.core.transformer.moe.moe_layer import MoELayer

        spec = backend.decoder_block_spec(transformer_config, "RMSNorm", vp_stage)
        for layer in spec.layer_specs:
            if layer.submodules.mlp.module is not MoELayer:
                continue
            if self.router_scoring == "fused_kernel":
                from megatron_mm.moe.fused_router import FusedTopKRouter

                layer.submodules.mlp.submodules.router = FusedTopKRouter
            if self.token_permute == "fused_kernel":
                from megatron_mm.moe.dispatcher import FusedPermuteMoELayer

                layer.submodules.mlp.module = FusedPermuteMoELayer
        return spec

    def validate(self, parallel) -> list[str]:
        problems = []
        if self.num_experts % parallel.ep:
            problems.append(f"model.num_experts={self.num_experts} is not divisible by parallel.ep={parallel.ep}")
        if parallel.tp > 1 and not parallel.sequence_parallel:
            problems.append("MoE with parallel.tp > 1 needs parallel.sequence_parallel=true (megatron-core)")
        for name in ("token_permute", "router_scoring", "expert_bias_update"):
            if getattr(self, name) not in ("megatron", "fused_kernel"):
                problems.append(f"model.{name}={getattr(self, name)!r} is not one of megatron, fused_kernel")
        if self.token_permute == "fused_kernel" and self.token_dispatcher != "alltoall":
            problems.append("model.token_permute=fused_kernel needs model.token_dispatcher=alltoall")
        if not 0 < self.router_topk <= self.num_experts:
            problems.append(f"model.router_topk={self.router_topk} must be in [1, num_experts={self.num_experts}]")
        if not 0 <= self.first_k_dense <= self.num_layers:
            problems.append(f"model.first_k_dense={self.first_k_dense} must be in [0, num_layers]")
        if self.router_num_groups and self.num_experts % self.router_num_groups:
            problems.append(
                f"model.num_experts={self.num_experts} is not divisible by model.router_num_groups={self.router_num_groups}"
            )
        return problems
