"""Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3 attention (QK-norm, GQA, head_dim 128) with 128 routed
experts, softmax top-8 with renormalised weights, no shared expert, every layer MoE."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm.models.moe_decoder import MoEDecoderConfig


@dataclass
class Qwen3MoEConfig(MoEDecoderConfig):
    family: str = "qwen3_moe"
    rotary_base: float = 1000000.0
    norm_epsilon: float = 1e-6
    num_experts: int = 128
    router_topk: int = 8

    def family_transformer_fields(self) -> dict:
        return {**super().family_transformer_fields(), "qk_layernorm": True}


CONFIG_CLASS = Qwen3MoEConfig
